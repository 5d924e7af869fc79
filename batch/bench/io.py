"""``bench_io``: the slide reader (:mod:`batch.slides`) against object storage and tifffile.

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
import socket
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import numpy as np
import tifffile
from numpy.typing import NDArray

from batch.slides import decoded_tile_cache, open_slide

__all__ = ["bench_io"]

BENCH_REPEATS = 5
BENCH_BUCKET = "hemaray-bench"
BENCH_REGION = "us-east-1"
BENCH_CREDENTIALS = ("hemaray-bench", "hemaray-bench")  # for the local moto server only


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

    Every region is read cold: the decoded-tile cache is off for the whole
    measurement, so each region fetches and decodes every tile it covers (the
    pipeline's plan-order reads reuse about half of them; see
    `batch.slides.DECODED_TILE_CACHE_BYTES`).

    Parameters
    ----------
    slide_path
        A local tiled TIFF to measure; None writes a synthetic smear
        (:func:`batch.synth.synth_slides`, ``width`` x ``height``) into ``workdir``.
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
        stack.enter_context(decoded_tile_cache(0))
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hemaray-bench-"))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if slide_path is None:
            from batch.synth import synth_slides

            (slide_path,) = synth_slides(workdir, slides=1, width=width, height=height, seed=seed)
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
