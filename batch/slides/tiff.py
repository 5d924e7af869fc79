"""The TIFF backend: reads TIFF-family slides (tiled or stripped TIFF, OME-TIFF, SVS, NDPI).

How a region is read
--------------------
The TIFF header and IFDs are parsed once by tifffile (on object storage through
a file opened with small blocks, so opening costs a few 16 KiB range reads, not
the object's default 50 MiB block). For a region, the covering tiles (or
strips) are computed from the level's grid, their byte ranges are taken from
``page.dataoffsets`` / ``page.databytecounts``, ranges that touch in the file
(a row of tiles usually does) are coalesced, and the coalesced ranges are
fetched in one go: ``os.pread`` locally, ``fs.cat_ranges`` (concurrent) on
fsspec file systems. Each tile is then decoded with tifffile's
``page.decode`` and pasted. No byte outside the needed tiles is read, except
gaps of at most :data:`~batch.slides.limits.COALESCE_MAX_GAP` bytes between two needed tiles.

Decoded tiles go to the process-wide cache of :mod:`batch.slides.cache`, so
neighbouring regions decode a shared tile once. Every failure is a typed
:class:`~batch.errors.SlideReadError` naming the slide and, when it is about
one, the tile; tifffile's log warnings and errors (captured per thread) count
as damage, and JPEG tiles are checked for a well-formed stream first
(:mod:`batch.slides.jpeg`).

This module may import only :mod:`batch.errors` and its siblings
:mod:`~batch.slides.cache`, :mod:`~batch.slides.ifds`, :mod:`~batch.slides.info`,
:mod:`~batch.slides.jpeg`, :mod:`~batch.slides.limits`, :mod:`~batch.slides.ranges`,
:mod:`~batch.slides.sources` and :mod:`~batch.slides.tiffmeta`, plus
third-party libraries (numpy, tifffile).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from batch.errors import (
    CorruptSlideError,
    SlideReadError,
    SlideTooLargeError,
    UnsupportedSlideError,
)
from batch.slides import cache as tile_cache
from batch.slides.cache import DecodedTile
from batch.slides.ifds import check_ifd_chain
from batch.slides.info import LevelInfo, SlideInfo, clip_window
from batch.slides.jpeg import jpeg_stream_problem
from batch.slides.limits import COALESCE_MAX_GAP, MAX_SEGMENT_BYTES
from batch.slides.ranges import plan_reads
from batch.slides.sources import ByteSource, storage_error
from batch.slides.tiffmeta import (
    JPEG_COMPRESSIONS,
    PHOTOMETRIC_MINISBLACK,
    PHOTOMETRIC_MINISWHITE,
    PHOTOMETRIC_RGB,
    PHOTOMETRIC_YCBCR,
    PLANAR_SEPARATE,
    compression_name,
    page_area,
    slide_mpp,
    to_rgb8,
)

__all__ = ["DecodeResult", "TiffBackend"]

#: Bytes of a classic TIFF header; no tile's data can start inside it.
TIFF_HEADER_BYTES = 8

DecodeResult = tuple[Any, tuple[int, ...], tuple[int, ...]]
"""What a tifffile page's ``decode`` returns: (segment, indices, shape)."""


# ------------------------------------------------------------- tifffile log capture


class _TifffileLog(logging.Handler):
    """Collects tifffile's log records emitted by the current thread while active.

    tifffile reports many problems by logging instead of raising; hemaray turns
    them into errors so that damaged data never passes silently.
    """

    def __init__(self, level: int) -> None:
        super().__init__(level=level)
        self._thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            self.messages.append(f"{record.levelname}: {record.getMessage()}")


@contextmanager
def _capture_tifffile_log(level: int) -> Iterator[_TifffileLog]:
    handler = _TifffileLog(level)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------ TIFF backend


@dataclass
class _TiffLevel:
    """The reading plan of one TIFF pyramid level."""

    info: LevelInfo
    page: Any  # tifffile.TiffPage (keyframe: tags, decode)
    offsets: NDArray[np.int64]
    counts: NDArray[np.int64]
    tiles_across: int
    tiles_down: int
    planes: int  # 1 (contiguous samples) or samples per pixel (planar separate)
    samples: int
    dtype: np.dtype[Any]
    photometric: int
    is_jpeg: bool
    jpegtables: bytes | None
    jpegheader: bytes | None
    decode: Callable[..., DecodeResult]

    def tile_label(self, index: int) -> str:
        per_plane = self.tiles_across * self.tiles_down
        plane, rest = divmod(index, per_plane)
        row, col = divmod(rest, self.tiles_across)
        label = f"level {self.info.index} tile (row {row}, col {col})"
        return label + (f" sample plane {plane}" if self.planes > 1 else "")


class TiffBackend:
    """Reads TIFF-family slides by ranged tile reads (see module docstring)."""

    def __init__(self, uri: str, source: ByteSource, max_pixels: int, max_pages: int) -> None:
        self._uri = uri
        self._source = source
        self._reader = tile_cache.new_reader_id()  # this open slide's key in the decoded-tile cache
        # Before tifffile walks the pages: a looping or endless chain is refused in bounded time.
        try:
            check_ifd_chain(source.header_file(), source.size, uri, max_pages)
        except OSError as e:
            raise storage_error(uri, e, "reading the TIFF page chain") from e
        with _capture_tifffile_log(logging.WARNING) as log:
            try:
                self._tif = tifffile.TiffFile(
                    source.header_file(), name=Path(uri).name or "slide", _multifile=False
                )
            except OSError as e:
                raise storage_error(uri, e, "reading the TIFF header") from e
            except Exception as e:
                raise CorruptSlideError(
                    uri,
                    f"the TIFF header cannot be parsed ({type(e).__name__}: {e}); the file is "
                    "damaged or truncated: copy it again from its source",
                ) from e
            try:
                self._build(max_pixels, log)
            except SlideReadError:
                self._tif.close()
                raise
            except OSError as e:
                self._tif.close()
                raise storage_error(uri, e, "reading the TIFF directories") from e
            except Exception as e:
                self._tif.close()
                raise CorruptSlideError(
                    uri,
                    f"the TIFF directories cannot be parsed ({type(e).__name__}: {e}); "
                    "the file is damaged: copy it again from its source",
                ) from e

    # -- open-time parsing and validation

    def _build(self, max_pixels: int, log: _TifffileLog) -> None:
        uri, tif = self._uri, self._tif
        series_list = tif.series
        if not series_list:
            raise CorruptSlideError(
                uri,
                "the TIFF holds no image"
                + (f" (tifffile: {'; '.join(log.messages[:3])})" if log.messages else "")
                + "; the file is damaged or truncated: copy it again from its source",
            )
        # The main image is the series with the largest level 0 (labels, macros are smaller).
        series = max(series_list, key=lambda s: page_area(s.levels[0].keyframe))
        pages: list[Any] = []
        for lvl in series.levels:
            first = lvl.pages[0] if len(lvl.pages) else None
            if first is None:
                raise CorruptSlideError(uri, "a pyramid level has no readable page")
            pages.append(first)
        pages.sort(key=lambda p: -page_area(p.keyframe))

        key0: Any = pages[0].keyframe
        width0, height0 = int(key0.imagewidth), int(key0.imagelength)
        # Before anything is sized from the header: refuse absurd dimensions.
        if width0 * height0 > max_pixels:
            raise SlideTooLargeError(
                uri,
                f"level 0 declares {width0} x {height0} = {width0 * height0:,} pixels, more "
                f"than max_pixels={max_pixels:,}; if the slide is genuine, raise max_pixels",
            )
        # Tile tables first: their errors name the tile, which says more than a log line.
        self.levels = [self._plan_level(i, page, width0, height0) for i, page in enumerate(pages)]
        errors = [m for m in log.messages if m.startswith("ERROR")]
        if errors:  # warnings at open are tifffile's notes on vendor quirks, not damage
            raise CorruptSlideError(
                uri,
                "tifffile reported damage while parsing the header: "
                + "; ".join(errors[:3])
                + "; the file is damaged or truncated: copy it again from its source",
            )

        if tif.is_svs:
            fmt = "svs"
        elif tif.is_ome:
            fmt = "ome-tiff"
        elif tif.is_ndpi:
            fmt = "ndpi"
        else:
            fmt = "tiff"
        lv0 = self.levels[0]
        tile_size = (lv0.info.tile_width, lv0.info.tile_height) if key0.is_tiled else None
        self.info = SlideInfo(
            format=fmt,
            width=width0,
            height=height0,
            levels=[lv.info for lv in self.levels],
            mpp=slide_mpp(self._tif, key0),
            tile_size=tile_size,
            compression=compression_name(key0.compression),
        )

    def _plan_level(self, index: int, frame: Any, width0: int, height0: int) -> _TiffLevel:
        uri = self._uri
        page = frame.keyframe
        width, height = int(page.imagewidth), int(page.imagelength)
        samples = int(page.samplesperpixel)
        dtype = page.dtype
        photometric = int(page.photometric)
        compression = int(page.compression)
        is_jpeg = compression in JPEG_COMPRESSIONS
        what = (
            f"level {index}: photometric {compression_name(page.photometric)}, "
            f"{samples} sample(s) of {dtype}, compression {compression_name(page.compression)}"
        )
        convert = (
            "; convert it to an 8-bit RGB tiled pyramidal TIFF "
            "(e.g. `vips tiffsave in out.tif --tile --pyramid --compression jpeg`)"
        )
        if dtype is None or np.dtype(dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise UnsupportedSlideError(uri, f"unsupported sample type ({what}){convert}")
        color_ok = (
            (photometric == PHOTOMETRIC_RGB and samples >= 3)
            or (photometric == PHOTOMETRIC_YCBCR and is_jpeg and samples >= 3)
            or (photometric in (PHOTOMETRIC_MINISBLACK, PHOTOMETRIC_MINISWHITE) and samples <= 2)
        )
        if not color_ok:
            raise UnsupportedSlideError(uri, f"unsupported colour model ({what}){convert}")
        if int(page.imagedepth) > 1:
            raise UnsupportedSlideError(uri, f"3-D (volumetric) TIFF pages ({what}){convert}")

        if page.is_tiled:
            tile_w, tile_h = int(page.tilewidth), int(page.tilelength)
        else:
            tile_w, tile_h = width, min(int(page.rowsperstrip), height)
        if tile_w < 1 or tile_h < 1:
            raise CorruptSlideError(uri, f"level {index} declares an empty tile/strip size")
        planes = samples if int(page.planarconfig) == PLANAR_SEPARATE and samples > 1 else 1
        contig = samples if planes == 1 else 1
        segment_bytes = tile_w * tile_h * contig * np.dtype(dtype).itemsize
        if segment_bytes > MAX_SEGMENT_BYTES:
            raise SlideTooLargeError(
                uri,
                f"level {index} stores {tile_w} x {tile_h} pixels per {'tile' if page.is_tiled else 'strip'} "
                f"({segment_bytes:,} bytes decoded, limit {MAX_SEGMENT_BYTES:,}); it cannot be read "
                f"in bounded memory{convert}",
            )
        tiles_across = math.ceil(width / tile_w)
        tiles_down = math.ceil(height / tile_h)
        expected = tiles_across * tiles_down * planes

        offsets = np.asarray(frame.dataoffsets, dtype=np.int64)
        counts = np.asarray(frame.databytecounts, dtype=np.int64)
        level_info = LevelInfo(
            index=index,
            width=width,
            height=height,
            downsample=(width0 / width + height0 / height) / 2,
            tile_width=tile_w,
            tile_height=tile_h,
        )
        level = _TiffLevel(
            info=level_info,
            page=page,
            offsets=offsets,
            counts=counts,
            tiles_across=tiles_across,
            tiles_down=tiles_down,
            planes=planes,
            samples=samples,
            dtype=np.dtype(dtype),
            photometric=photometric,
            is_jpeg=is_jpeg,
            jpegtables=getattr(frame, "jpegtables", None) or page.jpegtables,
            jpegheader=page.jpegheader,
            decode=page.decode,  # builds the decoder now, in this thread
        )
        if len(offsets) < expected or len(counts) < expected:
            raise CorruptSlideError(
                uri,
                f"level {index} needs {expected} tile/strip entries but its tables hold "
                f"{len(offsets)} offsets and {len(counts)} byte counts; the file is damaged",
            )
        self._check_tile_table(level, offsets[:expected], counts[:expected])
        return level

    def _check_tile_table(
        self, level: _TiffLevel, offsets: NDArray[np.int64], counts: NDArray[np.int64]
    ) -> None:
        """Every tile's bytes lie inside the file, after the header; a level holds some data.

        A tile with offset 0 and byte count 0 is the TIFF convention for a tile
        never written (sparse files: it reads as white). One of the two zeroed
        without the other is a damaged table, and a level whose every tile is
        "never written" is a zeroed table, not a blank slide: neither may pass
        as background.
        """
        uri, size = self._uri, self._source.size
        ends = offsets + counts
        sparse = (offsets == 0) & (counts == 0)
        checks = [
            (
                (counts < 0) | (offsets < 0) | ((counts > 0) & (ends > size)),
                "its data spans bytes {start}..{end} but the file has {size} bytes: the file "
                "is truncated or its tile table is damaged",
            ),
            (
                ~sparse & ((counts == 0) | (offsets < TIFF_HEADER_BYTES)),
                "its tile table entry (offset {start}, {count} bytes) is zeroed or points into "
                "the file header: the tile table is damaged",
            ),
        ]
        for bad, message in checks:
            if bad.any():
                first = int(np.argmax(bad))
                detail = message.format(
                    start=int(offsets[first]), end=int(ends[first]), size=size,
                    count=int(counts[first]),
                )  # fmt: skip
                raise CorruptSlideError(
                    uri, f"{detail}; copy the file again from its source",
                    tile=level.tile_label(first),
                )  # fmt: skip
        if len(counts) and sparse.all():
            raise CorruptSlideError(
                uri,
                f"level {level.info.index}: every one of its {len(counts)} tile/strip table "
                "entries is zero (no pixel data at all): the tile tables are zeroed; copy the "
                "file again from its source",
            )

    # -- reading

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        lv = self.levels[level]
        shape = (height, width, lv.samples)
        white = np.iinfo(lv.dtype).max
        window = clip_window(x, y, width, height, lv.info.width, lv.info.height)
        if window is None:
            return to_rgb8(np.full(shape, white, dtype=lv.dtype), lv.photometric)
        x0, y0, x1, y1 = window
        tw, th = lv.info.tile_width, lv.info.tile_height
        cols = np.arange(x0 // tw, (x1 - 1) // tw + 1)
        rows = np.arange(y0 // th, (y1 - 1) // th + 1)
        per_plane = lv.tiles_across * lv.tiles_down
        grid = (rows[:, None] * lv.tiles_across + cols[None, :]).ravel()
        indices = (np.arange(lv.planes)[:, None] * per_plane + grid[None, :]).ravel()
        counts = lv.counts[indices]
        present = indices[counts > 0]  # count 0: the file declares the tile empty -> white
        if window == (x, y, x + width, y + height) and len(present) == len(indices):
            out = np.empty(shape, dtype=lv.dtype)  # every pixel will be pasted
        else:
            out = np.full(shape, white, dtype=lv.dtype)
        cached: list[DecodedTile] = []
        missing: list[int] = []
        for i in present:
            tile = tile_cache.DECODED_TILES.get((self._reader, level, int(i)))
            if tile is None:
                missing.append(int(i))
            else:
                cached.append(tile)
        # Tiles are pasted as they are decoded: beyond the cache's budget, a large region never
        # holds all its decoded tiles next to its pixels.
        for tile in itertools.chain(cached, self._fetch_and_decode(lv, level, missing)):
            seg = tile.pixels
            ix0, iy0 = max(tile.x, x0), max(tile.y, y0)
            ix1, iy1 = min(tile.x + seg.shape[1], x1), min(tile.y + seg.shape[0], y1)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            channels = slice(None) if lv.planes == 1 else slice(tile.plane, tile.plane + 1)
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x, channels] = seg[
                iy0 - tile.y : iy1 - tile.y, ix0 - tile.x : ix1 - tile.x
            ]
        return to_rgb8(out, lv.photometric)

    def _fetch_and_decode(
        self, lv: _TiffLevel, level: int, indices: list[int]
    ) -> Iterator[DecodedTile]:
        """Fetch the tiles' bytes (coalesced ranges), then decode, cache and yield each."""
        if not indices:
            return
        spans = [(int(lv.offsets[i]), int(lv.offsets[i] + lv.counts[i])) for i in indices]
        merged, where = plan_reads(spans, COALESCE_MAX_GAP)
        try:
            blobs = self._source.read_ranges(merged)
        except SlideReadError:  # the source's own verdict (the file changed since open)
            raise
        except Exception as e:  # pure I/O: any failure is the storage's
            raise storage_error(self._uri, e, f"fetching tiles of level {level}") from e

        decode_kwargs: dict[str, Any] = {}
        if lv.is_jpeg:
            decode_kwargs = {"jpegtables": lv.jpegtables, "jpegheader": lv.jpegheader}
        check_jpeg = lv.is_jpeg and lv.jpegheader is None
        with _capture_tifffile_log(logging.WARNING) as log:
            for (blob_index, start), (s0, s1), index in zip(where, spans, indices, strict=True):
                blob = blobs[blob_index]
                data = memoryview(blob)[start : start + (s1 - s0)]
                if len(data) != s1 - s0:
                    raise CorruptSlideError(
                        self._uri,
                        f"expected {s1 - s0} bytes at offset {s0} but got {len(data)}: the "
                        "file is truncated or changed while reading; copy it again",
                        tile=lv.tile_label(index),
                    )
                if check_jpeg:
                    problem = jpeg_stream_problem(data)
                    if problem:
                        raise CorruptSlideError(
                            self._uri,
                            f"{problem}; the tile data is damaged: copy the file again from its source",
                            tile=lv.tile_label(index),
                        )
                try:
                    segment, (plane, _, sy, sx, _), _ = lv.decode(data, index, **decode_kwargs)
                except Exception as e:
                    raise CorruptSlideError(
                        self._uri,
                        f"tile data cannot be decoded ({type(e).__name__}: {e}); the tile is "
                        "damaged: copy the file again from its source",
                        tile=lv.tile_label(index),
                    ) from e
                if log.messages:
                    raise CorruptSlideError(
                        self._uri,
                        "tifffile reported while decoding: "
                        + "; ".join(log.messages[:3])
                        + "; the tile is damaged: copy the file again from its source",
                        tile=lv.tile_label(index),
                    )
                if segment is None:
                    continue
                tile = DecodedTile(segment[0], plane, sy, sx)
                tile_cache.DECODED_TILES.put((self._reader, level, index), tile)
                yield tile

    def close(self) -> None:
        tile_cache.DECODED_TILES.drop(self._reader)
        self._tif.close()
