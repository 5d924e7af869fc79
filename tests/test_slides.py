"""batch.slides: every format round-trips pixels; regions read only the tiles they cover.

Slides are generated here with tifffile (tiny tiled pyramids, as tiffslide's
conftest does), never committed.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile
from numpy.typing import NDArray

import batch.slides as slides
from batch.errors import SlideTooLargeError
from batch.slides import Slide, coalesce_byte_ranges, open_slide
from batch.slides import cache as tile_cache
from batch.slides import slide as slide_module

WIDTH, HEIGHT = 1000, 700  # deliberately not multiples of the tile size
TILE = 128
LEVELS = 3
MPP = 0.25

Image = NDArray[np.uint8]


def make_image(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image:
    """Structured RGB test image: gradients, a grid and noise, so misplaced tiles show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = ((xx // 37 + yy // 29) % 2 * 120).astype(np.uint8)
    img ^= rng.integers(0, 32, img.shape, dtype=np.uint8)
    return img


def pyramid(img: Image, levels: int = LEVELS) -> list[Image]:
    out = [img]
    for _ in range(levels - 1):
        out.append(np.ascontiguousarray(out[-1][::2, ::2]))
    return out


def write_subifd_pyramid(
    path: Path,
    img: Image,
    *,
    compression: str | None = "zlib",
    bigtiff: bool = False,
    planarconfig: str | None = None,
    resolution: tuple[float, float] | None = None,
    resolutionunit: str | None = None,
) -> Path:
    levels = pyramid(img)
    extra: dict[str, Any] = {"photometric": "rgb", "compression": compression}
    if planarconfig:
        extra["planarconfig"] = planarconfig
        levels = [np.ascontiguousarray(np.moveaxis(lv, -1, 0)) for lv in levels]  # SYX
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(
            levels[0],
            tile=(TILE, TILE),
            subifds=len(levels) - 1,
            resolution=resolution,
            resolutionunit=resolutionunit,
            **extra,
        )
        for level in levels[1:]:
            tif.write(level, tile=(TILE, TILE), subfiletype=1, **extra)
    return path


def write_page_pyramid(path: Path, img: Image, compression: str | None = "zlib") -> Path:
    """Pyramid as separate reduced-resolution pages (libvips/GDAL style, no tifffile metadata)."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(pyramid(img)):
            tif.write(
                level,
                tile=(TILE, TILE),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
            )
    return path


def write_ome(path: Path, img: Image) -> Path:
    levels = pyramid(img)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            levels[0],
            tile=(TILE, TILE),
            subifds=len(levels) - 1,
            compression="zlib",
            photometric="rgb",
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": MPP,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": MPP,
                "PhysicalSizeYUnit": "µm",
            },
        )
        for level in levels[1:]:
            tif.write(
                level, tile=(TILE, TILE), subfiletype=1, compression="zlib", photometric="rgb"
            )
    return path


SVS_DESCRIPTION = (
    "Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q=70"
    "|AppMag = 40|StripeWidth = 2032|MPP = 0.2520|Filename = test"
)


def write_svs(path: Path, img: Image, compression: str = "zlib") -> Path:
    """Aperio layout: baseline, stripped thumbnail, reduced levels, then label (reduced)."""
    levels = pyramid(img)
    description = SVS_DESCRIPTION.format(w=img.shape[1], h=img.shape[0], t=TILE)
    common: dict[str, Any] = {"photometric": "rgb", "metadata": None, "compression": compression}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(TILE, TILE), description=description, **common)
        tif.write(np.ascontiguousarray(img[::8, ::8]), description="Aperio thumbnail", **common)
        for level in levels[1:]:
            tif.write(level, tile=(TILE, TILE), **common)
        tif.write(
            np.ascontiguousarray(img[::16, ::16]), subfiletype=1, description="label", **common
        )
    return path


def write_stripped(path: Path, img: Image, compression: str | None = "zlib") -> Path:
    tifffile.imwrite(
        path,
        img,
        rowsperstrip=48,
        compression=compression,
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    return path


def expected_region(src: Image, x: int, y: int, w: int, h: int) -> Image:
    """Numpy reference: the region with white outside the image."""
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, src.shape[1]), min(y + h, src.shape[0])
    if x0 < x1 and y0 < y1:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = src[y0:y1, x0:x1]
    return out


REGIONS = [
    (0, 0, 10, 10),
    (TILE - 3, TILE - 5, 7, 9),  # straddles four tiles
    (333, 211, 300, 257),
    (-30, -40, 100, 120),  # top-left outside
    (WIDTH - 50, HEIGHT - 20, 100, 90),  # bottom-right outside
    (-10, -10, WIDTH + 20, HEIGHT + 20),  # everything plus a border
    (5000, 5000, 5, 5),  # entirely outside
    (TILE * 3 - 1, 0, 2, HEIGHT),  # thin column over a tile seam
]


@pytest.fixture(scope="module")
def image() -> Image:
    return make_image()


@pytest.fixture(scope="module")
def generic_tif(tmp_path_factory: pytest.TempPathFactory, image: Image) -> Path:
    return write_subifd_pyramid(tmp_path_factory.mktemp("generic") / "generic.tif", image)


# ------------------------------------------------------------------ formats


WRITERS: dict[str, Callable[[Path, Image], Path]] = {
    "subifd-zlib": lambda p, im: write_subifd_pyramid(p, im),
    "subifd-none": lambda p, im: write_subifd_pyramid(p, im, compression=None),
    "subifd-lzw-bigtiff": lambda p, im: write_subifd_pyramid(
        p, im, compression="lzw", bigtiff=True
    ),
    "subifd-planar-separate": lambda p, im: write_subifd_pyramid(p, im, planarconfig="separate"),
    "pages-zlib": lambda p, im: write_page_pyramid(p, im),
    "ome": write_ome,
    "svs": write_svs,
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_lossless_pyramids_round_trip_exactly(kind: str, tmp_path: Path, image: Image) -> None:
    path = WRITERS[kind](tmp_path / f"{kind}.tif", image)
    expected_levels = pyramid(image)
    with open_slide(path) as slide:
        assert len(slide.info.levels) == LEVELS
        for level, expected in enumerate(expected_levels):
            got = slide.read_level(level)
            assert got.dtype == np.uint8 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
        for x, y, w, h in REGIONS:
            np.testing.assert_array_equal(
                slide.read_region(x, y, w, h), expected_region(image, x, y, w, h)
            )
            lx, ly = x // 2, y // 2
            np.testing.assert_array_equal(
                slide.read_region(lx, ly, w, h, level=1),
                expected_region(expected_levels[1], lx, ly, w, h),
            )


def test_jpeg_tiles_match_tifffile_decode(tmp_path: Path, image: Image) -> None:
    path = write_subifd_pyramid(tmp_path / "jpeg.tif", image, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        reference = [lvl.asarray() for lvl in tif.series[0].levels]
    with open_slide(path) as slide:
        assert slide.info.compression == "jpeg"
        for level, expected in enumerate(reference):
            np.testing.assert_array_equal(slide.read_level(level), expected)
        for x, y, w, h in REGIONS:
            np.testing.assert_array_equal(
                slide.read_region(x, y, w, h), expected_region(reference[0], x, y, w, h)
            )


def test_jpeg_svs_matches_tifffile_decode(tmp_path: Path, image: Image) -> None:
    path = write_svs(tmp_path / "jpeg.svs", image, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        reference = tif.pages[0].asarray()  # the SVS baseline page
    with open_slide(path) as slide:
        assert slide.info.format == "svs"
        np.testing.assert_array_equal(slide.read_level(0), reference)


def test_stripped_tiff_round_trips(tmp_path: Path, image: Image) -> None:
    for compression in ("zlib", None):
        path = write_stripped(tmp_path / f"strips-{compression}.tif", image, compression)
        with open_slide(path) as slide:
            info = slide.info
            assert info.tile_size is None
            assert (info.levels[0].tile_width, info.levels[0].tile_height) == (WIDTH, 48)
            assert info.mpp == pytest.approx(0.5)
            for x, y, w, h in REGIONS:
                np.testing.assert_array_equal(
                    slide.read_region(x, y, w, h), expected_region(image, x, y, w, h)
                )


def test_grayscale_tiff_becomes_rgb(tmp_path: Path, image: Image) -> None:
    gray = np.ascontiguousarray(image[..., 1])
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, gray, tile=(TILE, TILE), compression="zlib", photometric="minisblack")
    with open_slide(path) as slide:
        got = slide.read_region(100, 50, 300, 200)
    np.testing.assert_array_equal(got, np.repeat(gray[50:250, 100:400, None], 3, axis=2))


def test_png_round_trips_exactly(tmp_path: Path, image: Image) -> None:
    path = tmp_path / "smear.png"
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    with open_slide(path) as slide:
        assert slide.info.format == "png" and slide.info.mpp is None
        np.testing.assert_array_equal(slide.read_level(0), image)
        for x, y, w, h in REGIONS:
            np.testing.assert_array_equal(
                slide.read_region(x, y, w, h), expected_region(image, x, y, w, h)
            )


def test_jpeg_image_matches_cv2_decode(tmp_path: Path, image: Image) -> None:
    path = tmp_path / "smear.jpg"
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    reference = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    with open_slide(path) as slide:
        assert (slide.info.format, slide.info.width, slide.info.height) == ("jpeg", WIDTH, HEIGHT)
        np.testing.assert_array_equal(slide.read_level(0), reference)
        np.testing.assert_array_equal(
            slide.read_region(-5, 600, 50, 200), expected_region(reference, -5, 600, 50, 200)
        )


# ------------------------------------------------------------------ metadata


def test_describe_reports_pyramid_and_is_json(generic_tif: Path) -> None:
    with open_slide(generic_tif) as slide:
        desc = slide.describe()
    json.dumps(desc)
    assert desc["uri"] == str(generic_tif)
    assert (desc["format"], desc["width"], desc["height"]) == ("tiff", WIDTH, HEIGHT)
    assert desc["tile_size"] == [TILE, TILE]
    assert desc["compression"] == "adobe_deflate"
    assert desc["mpp"] is None  # no resolution tags written
    assert [lv["index"] for lv in desc["levels"]] == [0, 1, 2]
    assert [(lv["width"], lv["height"]) for lv in desc["levels"]] == [
        (1000, 700),
        (500, 350),
        (250, 175),
    ]
    assert [lv["downsample"] for lv in desc["levels"]] == [1.0, 2.0, 4.0]
    assert all(lv["tile_width"] == lv["tile_height"] == TILE for lv in desc["levels"])


@pytest.mark.parametrize(
    ("kind", "fmt", "mpp"),
    [("ome", "ome-tiff", MPP), ("svs", "svs", 0.252), ("subifd-zlib", "tiff", None)],
)
def test_format_and_mpp(
    kind: str, fmt: str, mpp: float | None, tmp_path: Path, image: Image
) -> None:
    path = WRITERS[kind](tmp_path / f"{kind}.tif", image)
    with open_slide(path) as slide:
        assert slide.info.format == fmt
        assert slide.info.mpp == (pytest.approx(mpp) if mpp else None)


def test_mpp_from_resolution_tags(tmp_path: Path, image: Image) -> None:
    per_cm = write_subifd_pyramid(
        tmp_path / "cm.tif", image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    per_inch = write_subifd_pyramid(
        tmp_path / "in.tif", image, resolution=(25_400 / 0.25, 25_400 / 0.25), resolutionunit="INCH"
    )
    screen = write_subifd_pyramid(
        tmp_path / "dpi.tif", image, resolution=(72, 72), resolutionunit="INCH"
    )
    with open_slide(per_cm) as a, open_slide(per_inch) as b, open_slide(screen) as c:
        assert a.info.mpp == pytest.approx(0.5)
        assert b.info.mpp == pytest.approx(0.25)
        assert c.info.mpp is None  # 72 dpi is a default, not a microscope


# ------------------------------------------------------------------ sources


def test_all_sources_give_identical_pixels(generic_tif: Path, s3: dict[str, Any]) -> None:
    key = f"{s3['bucket']}/dir/generic.tif"
    s3["fs"].put(str(generic_tif), key)
    region = (90, 60, 400, 300)
    results: dict[str, tuple[Image, dict[str, Any]]] = {}

    def read(name: str, src: Any, **kw: Any) -> None:
        with open_slide(src, **kw) as slide:
            desc = slide.describe()
            desc.pop("uri")
            results[name] = (slide.read_region(*region, level=0), desc)

    read("path", str(generic_tif))
    read("pathlib", generic_tif)
    read("file-url", generic_tif.as_uri())
    with open(generic_tif, "rb") as fh:
        read("file-object", fh)
        assert not fh.closed  # the caller's object stays open
    read("bytesio", io.BytesIO(generic_tif.read_bytes()))
    read("s3", f"s3://{key}", storage_options=s3["storage_options"])
    base_pixels, base_desc = results["path"]
    for name, (pixels, desc) in results.items():
        np.testing.assert_array_equal(pixels, base_pixels, err_msg=name)
        assert desc == base_desc, name


# ------------------------------------------------------------------ ranged reads


def _tile_spans(path: Path, level: int = 0) -> tuple[list[int], list[int], int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].pages[0]
        assert page is not None
        return list(page.dataoffsets), list(page.databytecounts), int(page.imagewidth)


def test_coalesce_byte_ranges() -> None:
    assert coalesce_byte_ranges([]) == []
    assert coalesce_byte_ranges([(10, 20), (0, 10), (20, 25)]) == [(0, 25)]
    assert coalesce_byte_ranges([(0, 10), (10 + 513, 600)], max_gap=512) == [(0, 10), (523, 600)]
    assert coalesce_byte_ranges([(0, 10), (10 + 512, 600)], max_gap=512) == [(0, 600)]
    assert coalesce_byte_ranges([(0, 100), (50, 60), (5, 7)]) == [(0, 100)]  # shared tile data


def test_region_in_one_tile_row_is_one_local_read(
    generic_tif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offsets, counts, width = _tile_spans(generic_tif)
    across = -(-width // TILE)
    calls: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        calls.append((offset, length))
        return real_pread(fd, length, offset)

    with open_slide(generic_tif) as slide:
        monkeypatch.setattr(os, "pread", counting_pread)
        # Row 1, columns 1..3 (x 130..499, y 140..239).
        slide.read_region(130, 140, 370, 100)
        row1 = [across + c for c in (1, 2, 3)]
        assert all(
            offsets[a] + counts[a] == offsets[b] for a, b in zip(row1, row1[1:], strict=False)
        )
        assert calls == [(offsets[row1[0]], sum(counts[i] for i in row1))]

        calls.clear()  # rows 1 and 2: row 1 is decoded already, so one read of row 2
        slide.read_region(130, 200, 370, 100)
        row2 = [2 * across + c for c in (1, 2, 3)]
        assert calls == [(offsets[row2[0]], sum(counts[i] for i in row2))]
        assert sum(counts[i] for i in row1 + row2) < os.path.getsize(generic_tif) // 5

    with open_slide(generic_tif) as slide:  # a new reader decodes afresh: two tile rows, two reads
        monkeypatch.setattr(os, "pread", counting_pread)
        calls.clear()
        slide.read_region(130, 200, 370, 100)
        assert sorted(calls) == [
            (offsets[row1[0]], sum(counts[i] for i in row1)),
            (offsets[row2[0]], sum(counts[i] for i in row2)),
        ]


def _count_decodes(slide: Slide) -> list[int]:
    """Record the index of every tile the slide's level 0 decodes from now on."""
    level = slide._backend.levels[0]  # type: ignore[attr-defined]
    real_decode, decodes = level.decode, []

    def counting_decode(data: Any, index: int, **kw: Any) -> Any:
        decodes.append(index)
        return real_decode(data, index, **kw)

    level.decode = counting_decode
    return decodes


def test_decoded_tiles_are_reused_and_bounded(
    generic_tif: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overlapping regions decode each covering tile once; the cache stays within its bytes."""
    budget = 6 * TILE * TILE * 3  # six RGB tiles
    cache = tile_cache.DecodedTileCache(max_bytes=budget)
    monkeypatch.setattr(tile_cache, "DECODED_TILES", cache)
    boxes = [(x, 140, 150, 100) for x in range(0, 600, 60)]  # a row of overlapping regions
    with open_slide(generic_tif) as slide:
        decodes = _count_decodes(slide)
        for x, y, w, h in boxes:
            assert np.array_equal(slide.read_region(x, y, w, h), expected_region(image, x, y, w, h))
        assert len(decodes) == len(set(decodes))  # each covering tile decoded once
        assert cache.weight <= cache.max_bytes
        assert len(cache) == 6
    assert cache.weight == 0 and len(cache) == 0  # closing the slide drops its tiles

    with open_slide(generic_tif) as slide, slides.decoded_tile_cache(0):  # off: every read decodes
        decodes = _count_decodes(slide)
        slide.read_region(130, 140, 370, 100)
        slide.read_region(130, 140, 370, 100)
        assert len(decodes) == 2 * len(set(decodes)) > 0
        assert len(cache) == 0
    assert cache.max_bytes == budget  # the budget is back after the block


class CountingFile(io.RawIOBase):
    """A file object that records every read after ``reset()``."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)
        self.reads: list[tuple[int, int]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, size: int | None = -1) -> bytes:
        pos = self._buf.tell()
        data = self._buf.read(-1 if size is None else size)
        self.reads.append((pos, len(data)))
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def test_file_object_reads_only_covering_tiles(generic_tif: Path) -> None:
    offsets, counts, width = _tile_spans(generic_tif, level=1)
    across = -(-width // TILE)
    fh = CountingFile(generic_tif.read_bytes())
    with open_slide(fh) as slide:  # type: ignore[arg-type]
        fh.reads.clear()
        slide.read_region(10, 10, 200, 50, level=1)  # level-1 row 0, columns 0..1
    assert fh.reads == [(offsets[0], counts[0] + counts[1])]
    assert across >= 2


def test_s3_region_in_one_tile_row_is_one_get(generic_tif: Path, s3: dict[str, Any]) -> None:
    from aiobotocore.session import AioSession

    key = f"{s3['bucket']}/generic.tif"
    s3["fs"].put(str(generic_tif), key)
    offsets, counts, width = _tile_spans(generic_tif)
    across = -(-width // TILE)
    gets: list[int] = []

    def on_call(model: Any, http_response: Any, **_: Any) -> None:
        if model.name == "GetObject":
            gets.append(int(http_response.headers.get("content-length", 0)))

    session = AioSession()
    session.register("after-call.s3", on_call)
    options = {**s3["storage_options"], "session": session, "skip_instance_cache": True}
    with open_slide(f"s3://{key}", storage_options=options) as slide:
        header_gets = len(gets)
        assert header_gets >= 1
        assert sum(gets) < 4 * slides.HEADER_BLOCK_SIZE  # header parsing reads a few blocks
        gets.clear()
        slide.read_region(130, 140, 370, 100)
    row1 = [across + c for c in (1, 2, 3)]
    assert gets == [sum(counts[i] for i in row1)]


# ------------------------------------------------------------------ levels, thumbnails


def test_level_for_downsample(generic_tif: Path) -> None:
    with open_slide(generic_tif) as slide:
        pick = slide.level_for_downsample
        assert [pick(d) for d in (0.5, 1, 1.9, 2, 3.9, 3.99, 4, 100)] == [
            0,
            0,
            0,
            1,
            1,
            2,
            2,
            2,
        ]  # 3.99: within tolerance
        with pytest.raises(ValueError):
            pick(0)


def test_thumbnail_uses_smallest_sufficient_level(generic_tif: Path, image: Image) -> None:
    levels = pyramid(image)
    with open_slide(generic_tif) as slide:
        thumb = slide.thumbnail(200)  # level 2 is 250 wide: the smallest >= 200
        expected = cv2.resize(levels[2], (200, 140), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(thumb, expected)
        assert slide.thumbnail(250).shape == (175, 250, 3)
        assert slide.thumbnail(5000).shape == (HEIGHT, WIDTH, 3)  # never enlarged


def test_thumbnail_of_huge_level_is_banded(
    generic_tif: Path, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = open_slide(generic_tif)
    reference = whole.thumbnail(900)
    whole.close()
    # Slide looks the limit up in its own module.
    monkeypatch.setattr(slide_module, "MAX_READ_PIXELS", WIDTH * TILE)  # one tile row per band
    with open_slide(generic_tif) as slide:
        banded = slide.thumbnail(900)
        with pytest.raises(SlideTooLargeError, match="read_region"):
            slide.read_level(0)
    assert banded.shape == reference.shape == (630, 900, 3)
    assert np.abs(banded.astype(int) - reference.astype(int)).mean() < 2.0


def test_concurrent_reads_match_sequential(generic_tif: Path, image: Image) -> None:
    rng = np.random.default_rng(3)
    boxes = [
        (int(rng.integers(-50, WIDTH)), int(rng.integers(-50, HEIGHT)), 150, 120) for _ in range(24)
    ]
    for src in (str(generic_tif), io.BytesIO(generic_tif.read_bytes())):
        failures: list[str] = []
        with open_slide(src) as slide:

            def worker(
                chunk: list[tuple[int, int, int, int]],
                s: Slide = slide,
                failures: list[str] = failures,
            ) -> None:
                for x, y, w, h in chunk:
                    if not np.array_equal(
                        s.read_region(x, y, w, h), expected_region(image, x, y, w, h)
                    ):
                        failures.append(f"{x},{y}")

            threads = [threading.Thread(target=worker, args=(boxes[i::4],)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert failures == []


def test_bad_arguments_raise_value_error(generic_tif: Path) -> None:
    with open_slide(generic_tif) as slide:
        with pytest.raises(ValueError, match="level 3 does not exist"):
            slide.read_region(0, 0, 10, 10, level=3)
        with pytest.raises(ValueError, match="positive"):
            slide.read_region(0, 0, 0, 10)
        with pytest.raises(ValueError, match="MAX_READ_PIXELS"):
            slide.read_region(0, 0, 100_000, 100_000)
    with pytest.raises(ValueError, match="closed"):
        slide.read_region(0, 0, 10, 10)
