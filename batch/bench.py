"""Benchmarks.

``bench_io`` measures the slide reader (:mod:`batch.slides`) against object
storage and against tifffile itself:

- **S3 over-read**: bytes the reader pulls from a real S3 server (moto on
  loopback) while opening the slide and reading N random regions, divided by
  the compressed bytes of the tiles those regions cover. Counted at the
  botocore layer (``after-call`` events of the client's session: the
  ``Content-Length`` of every response body), so fsspec caches cannot hide
  anything. 1.0 means not one byte beyond the needed tiles.
- **GETs per region**: every ``GetObject`` call, header reads included,
  divided by the number of regions.
- **Speed vs tifffile**: regions/s of :meth:`Slide.read_region` over regions/s
  of the plainest tifffile loop over the same tiles of the same local file
  (``seek``, ``read``, ``page.decode``, paste), alternated over several
  repetitions in one process; the ratio of the medians. The baseline finds
  the covering tiles with its own arithmetic (not hemaray's), and its output
  is checked equal to hemaray's.

``s3_regions_per_s`` is end-to-end through moto and says little about the
reader: moto copies the whole object out of its buffer for every ranged GET
(``FakeKey.value``), so on a 60 MB slide each GET costs the server tens of
milliseconds. Bytes and GET counts do not depend on the server.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import tifffile
from numpy.typing import NDArray

from batch.slides import open_slide

__all__ = ["bench_io", "write_bench_slide"]

BENCH_TILE = 512
BENCH_JPEG_QUALITY = 85
BENCH_MPP = 0.25
BENCH_MIN_LEVEL_SIDE = 1024  # the pyramid stops at the first level whose longest side <= this
BENCH_REPEATS = 5
BENCH_BUCKET = "hemaray-bench"
BENCH_REGION = "us-east-1"
BENCH_CREDENTIALS = ("hemaray-bench", "hemaray-bench")  # for the local moto server only
CELL_SPACING = 64  # level-0 pixels between cell grid points
BACKGROUND_RGB = (236.0, 228.0, 232.0)
RBC_RGB = (205, 105, 120)
RBC_PALLOR_RGB = (228, 165, 175)
WBC_RGB = (120, 70, 160)
NUCLEUS_RGB = (70, 30, 110)
NOISE_AMPLITUDE = 6
BIGTIFF_ABOVE_BYTES = 2**31  # uncompressed size above which the bench slide is BigTIFF


# ------------------------------------------------------------------ test slide


class _SmearTexture:
    """A deterministic smear-like texture evaluated tile by tile at any downsample."""

    def __init__(self, width: int, height: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        grid_w = width // CELL_SPACING + 2
        grid_h = height // CELL_SPACING + 2
        # Per grid point: jitter x, jitter y, radius, kind draw.
        self.cells = rng.random((grid_h, grid_w, 4)).astype(np.float32)
        self.waves = [
            (rng.uniform(2e-4, 2e-3), rng.uniform(2e-4, 2e-3), rng.uniform(0, 6.3), amp)
            for amp in (10.0, 6.0, 4.0)
        ]

    def tile(self, level: int, x0: int, y0: int, size: int, downsample: int) -> NDArray[np.uint8]:
        xs = (x0 + np.arange(size, dtype=np.float32)) * downsample
        ys = (y0 + np.arange(size, dtype=np.float32)) * downsample
        shade = np.zeros((size, size), dtype=np.float32)
        for fx, fy, phase, amp in self.waves:
            shade += amp * np.outer(np.sin(fy * ys + phase), np.cos(fx * xs))
        image = np.empty((size, size, 3), dtype=np.float32)
        for c, base in enumerate(BACKGROUND_RGB):
            image[..., c] = base + shade
        tile = np.clip(image, 0, 255).astype(np.uint8)
        self._draw_cells(tile, x0 * downsample, y0 * downsample, size * downsample, downsample)
        noise_rng = np.random.default_rng([self.seed, level, y0, x0])
        noise = noise_rng.integers(
            -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, tile.shape, dtype=np.int16
        )
        return np.clip(tile.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    def _draw_cells(self, tile: NDArray[np.uint8], x0: int, y0: int, span: int, ds: int) -> None:
        margin = CELL_SPACING
        gx0 = max((x0 - margin) // CELL_SPACING, 0)
        gy0 = max((y0 - margin) // CELL_SPACING, 0)
        gx1 = min((x0 + span + margin) // CELL_SPACING + 1, self.cells.shape[1])
        gy1 = min((y0 + span + margin) // CELL_SPACING + 1, self.cells.shape[0])
        for gy in range(gy0, gy1):
            for gx in range(gx0, gx1):
                jx, jy, size, kind = (float(v) for v in self.cells[gy, gx])
                if kind < 0.12:
                    continue  # gaps between cells
                is_wbc = kind > 0.96
                radius = (18 + 10 * size) if is_wbc else (11 + 4 * size)
                cx = (gx * CELL_SPACING + jx * CELL_SPACING - x0) / ds
                cy = (gy * CELL_SPACING + jy * CELL_SPACING - y0) / ds
                r = radius / ds
                if r < 0.75:
                    continue
                centre = (round(cx), round(cy))
                if is_wbc:
                    cv2.circle(tile, centre, round(r), WBC_RGB, -1, cv2.LINE_AA)
                    cv2.circle(tile, centre, max(round(r * 0.6), 1), NUCLEUS_RGB, -1, cv2.LINE_AA)
                else:
                    cv2.circle(tile, centre, round(r), RBC_RGB, -1, cv2.LINE_AA)
                    cv2.circle(
                        tile, centre, max(round(r * 0.4), 1), RBC_PALLOR_RGB, -1, cv2.LINE_AA
                    )


def write_bench_slide(
    path: str | Path, *, width: int, height: int, seed: int = 0, tile: int = BENCH_TILE
) -> Path:
    """Write a tiled, JPEG-compressed, pyramidal TIFF of a smear-like texture.

    Written tile by tile from a generator, so memory stays at a few tiles
    whatever the size. Level 0 carries resolution tags for
    :data:`BENCH_MPP`; reduced levels are SubIFDs.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    texture = _SmearTexture(width, height, seed)
    sizes = [(width, height)]
    while max(sizes[-1]) > BENCH_MIN_LEVEL_SIDE:
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 2), math.ceil(h / 2)))

    def tiles(level: int, level_w: int, level_h: int) -> Iterator[NDArray[np.uint8]]:
        for ty in range(0, level_h, tile):
            for tx in range(0, level_w, tile):
                yield texture.tile(level, tx, ty, tile, 2**level)

    bigtiff = width * height * 3 > BIGTIFF_ABOVE_BYTES
    resolution = (1e4 / BENCH_MPP, 1e4 / BENCH_MPP)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, (level_w, level_h) in enumerate(sizes):
            tif.write(
                tiles(level, level_w, level_h),
                shape=(level_h, level_w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": BENCH_JPEG_QUALITY},
                subifds=len(sizes) - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                resolution=resolution if level == 0 else None,
                resolutionunit="CENTIMETER" if level == 0 else None,
                metadata=None,
            )
    return path


# ------------------------------------------------------------------ counting S3 bytes


class _S3Counter:
    """botocore ``after-call.s3`` handler counting requests, GETs and response body bytes."""

    def __init__(self) -> None:
        self.requests = 0
        self.gets = 0
        self.body_bytes = 0

    def reset(self) -> None:
        self.requests = self.gets = self.body_bytes = 0

    def __call__(self, *, model: Any, http_response: Any, **_: Any) -> None:
        self.requests += 1
        if model.name == "GetObject":
            self.gets += 1
        if model.name != "HeadObject":  # HEAD's Content-Length is the object's, no body comes
            self.body_bytes += int(http_response.headers.get("content-length", 0) or 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ tifffile baseline


class _TifffileBaseline:
    """The plainest tifffile loop: seek, read, decode, paste; its own tile arithmetic."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._tif = tifffile.TiffFile(path)
        page = self._tif.series[0].levels[0].pages[0]
        assert page is not None
        self.page = cast(Any, page.keyframe)
        self.offsets = list(page.dataoffsets)
        self.counts = list(page.databytecounts)
        self.width, self.height = int(self.page.imagewidth), int(self.page.imagelength)
        self.tile_w, self.tile_h = int(self.page.tilewidth), int(self.page.tilelength)
        self.across = -(-self.width // self.tile_w)
        self.samples = int(self.page.samplesperpixel)
        self.decode = self.page.decode
        self.jpegtables = self.page.jpegtables
        self.jpegheader = self.page.jpegheader

    def tiles(self, x: int, y: int, w: int, h: int) -> list[int]:
        """Level-0 tile indices covering a region inside the image."""
        cols = range(x // self.tile_w, (x + w - 1) // self.tile_w + 1)
        rows = range(y // self.tile_h, (y + h - 1) // self.tile_h + 1)
        return [r * self.across + c for r in rows for c in cols]

    def read(self, x: int, y: int, w: int, h: int) -> NDArray[np.uint8]:
        out = np.empty((h, w, self.samples), dtype=np.uint8)
        for index in self.tiles(x, y, w, h):
            self._fh.seek(self.offsets[index])
            data = self._fh.read(self.counts[index])
            seg, (_, _, sy, sx, _), _ = self.decode(
                data, index, jpegtables=self.jpegtables, jpegheader=self.jpegheader
            )
            seg = cast(NDArray[np.uint8], seg)[0]
            ix0, iy0 = max(sx, x), max(sy, y)
            ix1, iy1 = min(sx + seg.shape[1], x + w), min(sy + seg.shape[0], y + h)
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = seg[
                iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx
            ]
        return out

    def close(self) -> None:
        self._tif.close()
        self._fh.close()


# ------------------------------------------------------------------ the benchmark


def _regions_per_s(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def bench_io(
    *,
    slide_path: str | Path | None = None,
    regions: int = 60,
    region_size: int = 640,
    seed: int = 0,
    width: int = 16384,
    height: int = 16384,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Measure S3 over-read, GETs per region, and speed relative to tifffile.

    Parameters
    ----------
    slide_path
        A local tiled TIFF to measure; None writes a bench slide
        (:func:`write_bench_slide`, ``width`` x ``height``) into ``workdir``
        (reused there on the next run with the same size and seed).
    regions, region_size
        How many random ``region_size`` x ``region_size`` level-0 regions
        (seeded by ``seed``) each pass reads.
    workdir
        Where to keep the generated slide; None uses a temporary directory.

    Returns
    -------
    dict
        ``regions``, ``region_size``, ``slide_width``, ``slide_height``,
        ``s3_bytes``, ``tile_bytes``, ``s3_overread_ratio``, ``s3_gets``,
        ``s3_gets_per_region``, ``s3_regions_per_s``,
        ``hemaray_regions_per_s``, ``tifffile_regions_per_s``,
        ``read_vs_tifffile``, plus the open-time share of the S3 figures.
    """
    import s3fs
    from aiobotocore.session import AioSession
    from moto.server import ThreadedMotoServer

    with ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hemaray-bench-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if slide_path is None:
            slide_path = workdir / f"bench_{width}x{height}_seed{seed}.tif"
            if not slide_path.exists():
                partial = slide_path.with_suffix(".partial")
                write_bench_slide(partial, width=width, height=height, seed=seed)
                partial.replace(slide_path)
        slide_path = Path(slide_path)

        baseline = _TifffileBaseline(slide_path)
        stack.callback(baseline.close)
        if region_size > min(baseline.width, baseline.height):
            raise ValueError(
                f"region_size {region_size} exceeds the slide ({baseline.width} x {baseline.height})"
            )
        rng = np.random.default_rng(seed)
        boxes = [
            (
                int(rng.integers(0, baseline.width - region_size + 1)),
                int(rng.integers(0, baseline.height - region_size + 1)),
                region_size,
                region_size,
            )
            for _ in range(regions)
        ]
        tile_bytes = sum(baseline.counts[i] for box in boxes for i in baseline.tiles(*box))

        # -- S3: a real HTTP server on loopback, counted at the botocore layer
        werkzeug_log = logging.getLogger("werkzeug")
        stack.callback(werkzeug_log.setLevel, werkzeug_log.level)
        werkzeug_log.setLevel(logging.ERROR)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        stack.callback(server.stop)
        session = AioSession()
        session.set_credentials(*BENCH_CREDENTIALS)
        session.set_config_variable("region", BENCH_REGION)
        counter = _S3Counter()
        session.register("after-call.s3", counter)
        storage_options: dict[str, Any] = {
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
            "session": session,
            "skip_instance_cache": True,
        }
        uploader = s3fs.S3FileSystem(**storage_options)
        uploader.makedirs(BENCH_BUCKET, exist_ok=True)
        key = f"{BENCH_BUCKET}/{slide_path.name}"
        uploader.put(str(slide_path), key)
        stack.callback(uploader.rm, key)  # moto keeps objects in this process's memory

        counter.reset()
        started = time.perf_counter()
        with open_slide(f"s3://{key}", storage_options=storage_options) as remote:
            open_gets, open_bytes = counter.gets, counter.body_bytes
            for box in boxes:
                remote.read_region(*box)
        s3_seconds = time.perf_counter() - started
        s3_gets, s3_bytes, s3_requests = counter.gets, counter.body_bytes, counter.requests

        # -- local: hemaray vs the tifffile loop, alternated
        local = stack.enter_context(open_slide(slide_path))
        for box in boxes:  # warm-up (page cache, decoders) and equality check
            if not np.array_equal(local.read_region(*box), baseline.read(*box)):
                raise RuntimeError(f"hemaray and tifffile disagree on region {box}")
        hemaray_rates: list[float] = []
        tifffile_rates: list[float] = []
        for rep in range(BENCH_REPEATS):
            order = ("hemaray", "tifffile") if rep % 2 == 0 else ("tifffile", "hemaray")
            for who in order:
                started = time.perf_counter()
                if who == "hemaray":
                    for box in boxes:
                        local.read_region(*box)
                else:
                    for box in boxes:
                        baseline.read(*box)
                rate = _regions_per_s(len(boxes), time.perf_counter() - started)
                (hemaray_rates if who == "hemaray" else tifffile_rates).append(rate)

        hemaray_rate = statistics.median(hemaray_rates)
        tifffile_rate = statistics.median(tifffile_rates)
        result = {
            "regions": regions,
            "region_size": region_size,
            "slide_width": baseline.width,
            "slide_height": baseline.height,
            "tile_size": [baseline.tile_w, baseline.tile_h],
            "s3_bytes": s3_bytes,
            "tile_bytes": tile_bytes,
            "s3_overread_ratio": round(s3_bytes / tile_bytes, 4) if tile_bytes else float("nan"),
            "s3_gets": s3_gets,
            "s3_gets_per_region": round(s3_gets / regions, 3) if regions else float("nan"),
            "s3_requests": s3_requests,
            "s3_open_gets": open_gets,
            "s3_open_bytes": open_bytes,
            "s3_regions_per_s": round(_regions_per_s(regions, s3_seconds), 2),
            "hemaray_regions_per_s": round(hemaray_rate, 2),
            "tifffile_regions_per_s": round(tifffile_rate, 2),
            "read_vs_tifffile": round(hemaray_rate / tifffile_rate, 3),
            "repeats": BENCH_REPEATS,
        }
    return result
