"""batch.slides: every bad input gives its typed error, fast, naming the slide.

Each case asserts the class, that the message names the slide (and the tile
where one is at fault), that ``__cause__`` is set where an underlying
exception existed, and that the error came in under a second.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import tifffile

from batch.errors import (
    CorruptSlideError,
    SlideAccessDeniedError,
    SlideNotFoundError,
    SlideReadError,
    SlideTooLargeError,
    UnsupportedSlideError,
)
from batch.slides import open_slide

WIDTH, HEIGHT, TILE = 640, 512, 128
ACROSS = WIDTH // TILE
MAX_SECONDS = 1.0


def write_tiled(path: Path, compression: str = "zlib", levels: int = 2) -> Path:
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    img[:, :, 1] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :]
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            img, tile=(TILE, TILE), compression=compression, photometric="rgb", subifds=levels - 1
        )
        for i in range(1, levels):
            step = 2**i
            tif.write(
                np.ascontiguousarray(img[::step, ::step]),
                tile=(TILE, TILE),
                compression=compression,
                photometric="rgb",
                subfiletype=1,
            )
    return path


def tile_table(path: Path) -> tuple[list[int], list[int], int]:
    """Level-0 tile offsets, byte counts, and the file position of the offsets array."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return (
            list(page.dataoffsets),
            list(page.databytecounts),
            int(page.tags["TileOffsets"].valueoffset),
        )


@contextmanager
def raises_fast(
    cls: type[SlideReadError], slide: str, *, cause: bool, tile: str | None = None
) -> Iterator[None]:
    start = time.perf_counter()
    with pytest.raises(cls) as info:
        yield
    elapsed = time.perf_counter() - start
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    assert elapsed < MAX_SECONDS, f"{cls.__name__} took {elapsed:.2f} s"
    assert err.slide == slide and slide in str(err)
    assert (err.__cause__ is not None) is cause, f"cause: {err.__cause__!r}"
    if tile is not None:
        assert err.tile == tile and tile in str(err)
    # errors cross process boundaries (Ray): they must pickle with slide and tile
    clone = pickle.loads(pickle.dumps(err))
    assert (type(clone), clone.slide, clone.tile) == (cls, err.slide, err.tile)


# ------------------------------------------------------------------ not a slide


def test_text_file_named_tif_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("patient 12, smear 3: see attached\n")
    with raises_fast(UnsupportedSlideError, str(path), cause=False):
        open_slide(path)


def test_directory_is_unsupported(tmp_path: Path) -> None:
    with raises_fast(UnsupportedSlideError, str(tmp_path), cause=True):
        open_slide(tmp_path)


def test_zero_bytes_is_corrupt(tmp_path: Path) -> None:
    """An empty file is a failed copy, not another format: CorruptSlideError."""
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with raises_fast(CorruptSlideError, str(path), cause=False):
        open_slide(path)


def test_unsupported_sample_type(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.zeros((64, 64), dtype=np.float32), tile=(32, 32))
    with raises_fast(UnsupportedSlideError, str(path), cause=False):
        open_slide(path)


# ------------------------------------------------------------------ damaged files


def test_truncated_file_is_corrupt_at_open_naming_the_tile(tmp_path: Path) -> None:
    src = write_tiled(tmp_path / "whole.tif")
    offsets, counts, _ = tile_table(src)
    data = src.read_bytes()
    cut = offsets[10] + counts[10] // 2  # in the middle of level-0 tile 10
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[:cut])
    with raises_fast(CorruptSlideError, str(path), cause=False, tile="level 0 tile (row 2, col 0)"):
        open_slide(path)


@pytest.mark.parametrize(("size", "cause"), [(4, True), (8, False), (100, True)])
def test_truncated_header_is_corrupt(tmp_path: Path, size: int, cause: bool) -> None:
    """4 and 100 bytes make tifffile raise (chained); 8 bytes parse to a file with no image."""
    src = write_tiled(tmp_path / "whole.tif")
    path = tmp_path / f"cut{size}.tif"
    path.write_bytes(src.read_bytes()[:size])
    with raises_fast(CorruptSlideError, str(path), cause=cause):
        open_slide(path)


def test_tile_table_past_end_is_corrupt(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "bad-offset.tif")
    offsets, _, table_at = tile_table(path)
    with open(path, "r+b") as fh:  # classic little-endian TIFF: LONG offsets
        fh.seek(table_at + 4 * (ACROSS + 2))
        fh.write(struct.pack("<I", os.path.getsize(path) + 4096))
    with raises_fast(CorruptSlideError, str(path), cause=False, tile="level 0 tile (row 1, col 2)"):
        open_slide(path)


def damage_tile(path: Path, tile: int, how: str) -> None:
    """Damage one level-0 tile in place, the ways storage and copies damage data."""
    offsets, counts, _ = tile_table(path)
    start, count = offsets[tile], counts[tile]
    with open(path, "r+b") as fh:
        fh.seek(start)
        data = bytearray(fh.read(count))
        if how == "flip":  # 64 bytes inverted in the middle
            mid = count // 3
            data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
        elif how == "zero-tail":  # the end of the tile never written
            data[-256:] = bytes(256)
        elif how == "random-sector":  # a 512-byte sector of someone else's data
            mid = count // 3
            data[mid : mid + 512] = np.random.default_rng(0).bytes(512)
        fh.seek(start)
        fh.write(bytes(data))


@pytest.mark.parametrize(
    ("compression", "how", "cause"),
    [
        ("zlib", "flip", True),
        ("zlib", "zero-tail", True),
        ("jpeg", "zero-tail", False),
        ("jpeg", "random-sector", False),
    ],
)
def test_damaged_tile_is_corrupt_at_read(
    tmp_path: Path, compression: str, how: str, cause: bool
) -> None:
    """zlib fails to decode (cause chained); JPEG fails the stream check (nothing to chain).

    JPEG has no checksum and imagecodecs' libjpeg swallows its corrupt-data
    warnings, so damage that keeps the JPEG syntax legal cannot be detected.
    """
    path = write_tiled(tmp_path / f"damaged-{compression}.tif", compression)
    damage_tile(path, ACROSS + 1, how)  # row 1, col 1
    with open_slide(path) as slide:
        slide.read_region(0, 0, WIDTH, TILE)  # row 0 is intact and still reads
        slide.read_region(0, 0, 64, 64, level=1)
        with raises_fast(
            CorruptSlideError, str(path), cause=cause, tile="level 0 tile (row 1, col 1)"
        ):
            slide.read_region(200, 200, 20, 20)


def test_file_shrinking_after_open_is_corrupt_naming_the_tile(tmp_path: Path) -> None:
    data = write_tiled(tmp_path / "whole.tif").read_bytes()
    offsets, counts, _ = tile_table(tmp_path / "whole.tif")
    buf = io.BytesIO(data)
    with open_slide(buf) as slide:
        buf.truncate(offsets[ACROSS * 3] + 10)  # cuts level-0 row 3 short
        with raises_fast(
            CorruptSlideError, "<BytesIO>", cause=False, tile="level 0 tile (row 3, col 0)"
        ):
            slide.read_region(0, 3 * TILE, 10, 10)


def test_corrupt_png_is_corrupt(tmp_path: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    data[40:60] = bytes(20)  # zero the start of the IDAT chunk
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with raises_fast(CorruptSlideError, str(path), cause=False):
        open_slide(path)


# ------------------------------------------------------------------ hostile page chains


def _ifd_at(path: Path) -> list[int]:
    """Byte offsets of the top-level IFDs (classic little-endian TIFF), walked by hand."""
    data = path.read_bytes()
    (offset,) = struct.unpack_from("<I", data, 4)
    chain: list[int] = []
    seen: set[int] = set()
    while offset and offset not in seen:
        chain.append(offset)
        seen.add(offset)
        (entries,) = struct.unpack_from("<H", data, offset)
        (offset,) = struct.unpack_from("<I", data, offset + 2 + 12 * entries)
    return chain


def _next_pointer_at(data: bytes, ifd: int) -> int:
    (entries,) = struct.unpack_from("<H", data, ifd)
    return ifd + 2 + 12 * entries


def append_pages(path: Path, count: int, *, loop_back: bool = False) -> None:
    """Append ``count`` copies of page 0's IFD to the chain (its tags point at the same data).

    With ``loop_back`` the last copy points at the first copy: a cycle of ``count`` pages.
    """
    data = bytearray(path.read_bytes())
    first = _ifd_at(path)[0]
    ifd = bytes(data[first : _next_pointer_at(data, first) + 4])
    start = len(data) + len(data) % 2  # IFDs start on a word boundary
    data.extend(bytes(start - len(data)))
    last = _next_pointer_at(data, _ifd_at(path)[-1])
    struct.pack_into("<I", data, last, start)
    copies = bytearray(ifd * count)
    for k in range(count):
        nxt = start + (k + 1) * len(ifd) if k < count - 1 else (start if loop_back else 0)
        struct.pack_into("<I", copies, (k + 1) * len(ifd) - 4, nxt)
    data.extend(copies)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("length", [1, 150])
def test_page_chain_looping_back_is_corrupt_at_open(tmp_path: Path, length: int) -> None:
    """A loop of any length is caught by the offsets seen (tifffile checks only at page 100)."""
    path = write_tiled(tmp_path / f"loop{length}.tif")
    if length == 1:
        data = bytearray(path.read_bytes())
        first = _ifd_at(path)[0]
        struct.pack_into("<I", data, _next_pointer_at(data, first), first)
        path.write_bytes(bytes(data))
    else:
        append_pages(path, length, loop_back=True)
    with raises_fast(CorruptSlideError, str(path), cause=False):
        open_slide(path)


def test_hundred_thousand_pages_are_corrupt_at_open(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "pages.tif")
    append_pages(path, 100_000)
    assert len(_ifd_at(path)) == 100_001
    with raises_fast(CorruptSlideError, str(path), cause=False):
        open_slide(path)


def test_max_pages_is_the_budget(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "six-pages.tif")
    append_pages(path, 5)
    with raises_fast(CorruptSlideError, str(path), cause=False):
        open_slide(path, max_pages=5)
    with open_slide(path, max_pages=6) as slide:
        assert (slide.info.width, slide.info.height) == (WIDTH, HEIGHT)


def zero_tile_table(path: Path, tag: str) -> None:
    """Overwrite one of level 0's tile tables (TileOffsets / TileByteCounts) with zeros."""
    with tifffile.TiffFile(path) as tif:
        t = tif.pages[0].tags[tag]
        at, size = int(t.valueoffset), int(t.valuebytecount)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(bytes(size))


@pytest.mark.parametrize("compression", ["zlib", "none"])
@pytest.mark.parametrize(
    ("tables", "tile"),
    [
        (("TileByteCounts",), "level 0 tile (row 0, col 0)"),
        (("TileOffsets",), "level 0 tile (row 0, col 0)"),
        (("TileOffsets", "TileByteCounts"), None),
    ],
)
def test_zeroed_tile_tables_are_corrupt_at_open(
    tmp_path: Path, compression: str, tables: tuple[str, ...], tile: str | None
) -> None:
    """Not white background (zero counts), not garbage pixels (zero offsets): corrupt."""
    path = write_tiled(tmp_path / f"zeroed-{compression}.tif", compression)
    for tag in tables:
        zero_tile_table(path, tag)
    with raises_fast(CorruptSlideError, str(path), cause=False, tile=tile):
        open_slide(path)
    if tile is None:
        with pytest.raises(CorruptSlideError) as info:
            open_slide(path)
        assert "zero" in str(info.value)


def test_one_zeroed_byte_count_is_corrupt_naming_the_tile(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "one-zero.tif")
    with tifffile.TiffFile(path) as tif:
        at = int(tif.pages[0].tags["TileByteCounts"].valueoffset)
    with open(path, "r+b") as fh:
        fh.seek(at + 4 * (ACROSS + 3))  # row 1, col 3
        fh.write(bytes(4))
    with raises_fast(CorruptSlideError, str(path), cause=False, tile="level 0 tile (row 1, col 3)"):
        open_slide(path)


# ------------------------------------------------------------------ too large


def test_absurd_dimensions_are_too_large_before_allocating(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "huge.tif", levels=1)
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        width_at = tags["ImageWidth"].valueoffset
        length_at = tags["ImageLength"].valueoffset
        assert tags["ImageWidth"].dtype == tifffile.DATATYPE.LONG
    with open(path, "r+b") as fh:
        for at in (width_at, length_at):
            fh.seek(at)
            fh.write(struct.pack("<I", 1_000_000))
    with raises_fast(SlideTooLargeError, str(path), cause=False):
        open_slide(path)


def test_max_pixels_is_the_budget(tmp_path: Path) -> None:
    path = write_tiled(tmp_path / "small.tif")
    with raises_fast(SlideTooLargeError, str(path), cause=False):
        open_slide(path, max_pixels=WIDTH * HEIGHT - 1)
    open_slide(path, max_pixels=WIDTH * HEIGHT).close()


def test_png_header_with_absurd_size_is_too_large(tmp_path: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    data[16:24] = struct.pack(">II", 1_000_000, 1_000_000)  # IHDR width, height
    path = tmp_path / "huge.png"
    path.write_bytes(bytes(data))
    with raises_fast(SlideTooLargeError, str(path), cause=False):
        open_slide(path)


# ------------------------------------------------------------------ not found / denied


def test_missing_local_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.tif"
    with raises_fast(SlideNotFoundError, str(path), cause=True):
        open_slide(path)
    with raises_fast(SlideNotFoundError, path.as_uri(), cause=True):
        open_slide(path.as_uri())


def test_local_access_denied() -> None:
    """Tests run as root, so chmod cannot deny; /proc/sys write-only files deny root reads."""
    path = "/proc/sys/vm/drop_caches"
    try:
        with open(path, "rb"):
            pytest.skip(f"{path} is readable here")
    except PermissionError:
        pass
    except OSError as e:
        pytest.skip(f"{path} unavailable: {e}")
    with raises_fast(SlideAccessDeniedError, path, cause=True):
        open_slide(path)


def test_missing_s3_object_and_bucket(s3: dict[str, Any]) -> None:
    options = s3["storage_options"]
    for uri in (f"s3://{s3['bucket']}/missing.tif", "s3://no-such-bucket/missing.tif"):
        with raises_fast(SlideNotFoundError, uri, cause=True):
            open_slide(uri, storage_options=options)


def test_s3_bucket_policy_denying_get_object(tmp_path: Path, s3: dict[str, Any]) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    fs.put(str(write_tiled(tmp_path / "slide.tif")), f"{bucket}/slide.tif")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    fs.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))
    uri = f"s3://{bucket}/slide.tif"
    with raises_fast(SlideAccessDeniedError, uri, cause=True):
        open_slide(uri, storage_options=s3["storage_options"])


def test_s3_truncated_object_is_corrupt(tmp_path: Path, s3: dict[str, Any]) -> None:
    src = write_tiled(tmp_path / "slide.tif")
    offsets, counts, _ = tile_table(src)
    s3["fs"].pipe(f"{s3['bucket']}/cut.tif", src.read_bytes()[: offsets[7] + 5])
    uri = f"s3://{s3['bucket']}/cut.tif"
    with raises_fast(CorruptSlideError, uri, cause=False, tile="level 0 tile (row 1, col 2)"):
        open_slide(uri, storage_options=s3["storage_options"])


@pytest.mark.parametrize("make", [lambda p: str(p), lambda p: io.BytesIO(p.read_bytes())])
def test_errors_leave_no_open_handles(tmp_path: Path, make: Callable[[Path], Any]) -> None:
    path = tmp_path / "text.tif"
    path.write_text("not an image")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(UnsupportedSlideError):
            open_slide(make(path))
    assert len(os.listdir("/proc/self/fd")) <= before


def test_b7_slow_open_is_a_timeout_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening is bounded in time too: a slide whose open never ends is one typed failure."""
    import threading

    from batch.config import Config
    from batch.errors import SlideOpenTimeoutError, decode_error
    from batch.run import tasks

    release = threading.Event()

    def stuck(*args: object, **kwargs: object) -> None:
        release.wait(60)  # a store answering at a trickle, a parser spinning

    monkeypatch.setattr(tasks, "_open", stuck)
    config = Config()
    config.slides.open_timeout_s = 0.5
    path = str(write_tiled(tmp_path / "slow.tif"))
    try:
        [row] = tasks.plan_slide({"slide_id": "slow", "slide_uri": path}, config, 0.25)
    finally:
        release.set()
    assert row["kind"] == "error"
    error = decode_error(row["error"])
    assert isinstance(error, SlideOpenTimeoutError) and "slides.open_timeout_s" in str(error)
