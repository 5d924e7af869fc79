"""Open any slide and read regions of it by fetching only the tiles they cover.

One entry point, :func:`open_slide`, turns a local path, a ``file://`` URL, an
``s3://`` URL (or any other fsspec URL) or an open binary file object into a
:class:`Slide`. A slide knows its pyramid (:class:`SlideInfo`) and reads
regions of any level as ``HxWx3`` ``uint8`` RGB arrays.

How a region is read (TIFF family)
----------------------------------
The TIFF header and IFDs are parsed once by tifffile (on object storage through
a file opened with small blocks, so opening costs a few 16 KiB range reads, not
the object's default 50 MiB block). For a region, the covering tiles (or
strips) are computed from the level's grid, their byte ranges are taken from
``page.dataoffsets`` / ``page.databytecounts``, ranges that touch in the file
(a row of tiles usually does) are coalesced, and the coalesced ranges are
fetched in one go: ``os.pread`` locally, ``fs.cat_ranges`` (concurrent) on
fsspec file systems. Each tile is then decoded with tifffile's
``page.decode`` and pasted. No byte outside the needed tiles is read, except
gaps of at most :data:`COALESCE_MAX_GAP` bytes between two needed tiles.

Guarantees
----------
- Pixels equal tifffile's own decode of the same tiles; parts of a region
  outside the level, and tiles the file declares empty (byte count 0), are
  white (255).
- Memory is bounded by the region, never by the slide: nothing allocates a
  whole level unless asked (:meth:`Slide.read_level`, within
  :data:`MAX_READ_PIXELS`); :meth:`Slide.thumbnail` reads huge levels in bands.
- Every failure is a typed :class:`~batch.errors.SlideReadError` naming the
  slide (and the tile), chaining the cause, and saying what to change:

  ========================================  ===================================
  input                                     error
  ========================================  ===================================
  missing path / object / bucket            :class:`SlideNotFoundError`
  permission / bucket policy / credentials  :class:`SlideAccessDeniedError`
  not a TIFF, JPEG or PNG (e.g. text)       :class:`UnsupportedSlideError`
  zero-byte file                            :class:`CorruptSlideError` (an
                                            empty file is a failed copy, not
                                            another format)
  truncated file, IFD or tile table past    :class:`CorruptSlideError`, at
  the end of the file                       open, naming the first bad tile
  tile bytes that fail to decode, or that   :class:`CorruptSlideError`, at
  make tifffile log a warning or error      read, naming the tile
  level 0 larger than ``max_pixels``        :class:`SlideTooLargeError`, before
                                            anything is allocated
  ========================================  ===================================

  JPEG carries no checksum and the libjpeg used by imagecodecs swallows its
  "corrupt data" warnings, so JPEG tiles are additionally checked for a
  well-formed stream (SOI, EOI, no illegal marker inside the entropy-coded
  data of a baseline scan). A damaged JPEG tile that still forms a legal
  stream cannot be told from a good one by any reader.

Credentials come only from the standard AWS chain (environment, config files,
instance roles); ``storage_options`` is for the endpoint and client settings.
Neither credentials nor ``storage_options`` appear in messages or logs.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import re
import struct
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import tifffile
from numpy.typing import NDArray

from batch.errors import (
    CorruptSlideError,
    SlideAccessDeniedError,
    SlideNotFoundError,
    SlideReadError,
    SlideTooLargeError,
    UnsupportedSlideError,
)

__all__ = [
    "COALESCE_MAX_GAP",
    "DECODED_TILE_CACHE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "HEADER_BLOCK_SIZE",
    "MAX_READ_PIXELS",
    "LevelInfo",
    "Slide",
    "SlideInfo",
    "coalesce_byte_ranges",
    "decoded_tile_cache",
    "open_slide",
]

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS: int = 200_000 * 200_000
"""Per-slide budget on level-0 pixels (width * height); larger headers are refused."""

MAX_READ_PIXELS: int = 8192 * 8192
"""Largest array one call may return (read_region, read_level): 192 MiB of RGB."""

MAX_WHOLE_IMAGE_PIXELS: int = 2**28
"""JPEG/PNG are decoded whole; above this, convert them to a tiled pyramidal TIFF."""

MAX_SEGMENT_BYTES: int = 256 * 2**20
"""Largest decoded tile/strip accepted; a bigger one cannot be read in bounded memory."""

HEADER_BLOCK_SIZE: int = 2**14
"""Block size of the remote file object used to parse TIFF headers (one ranged GET per miss).

Measured on a 16384^2 JPEG pyramid (5 levels): 10 GETs at 16, 32 or 64 KiB
(163 / 327 / 655 KB read), 12-13 GETs at 4-8 KiB; tile tables longer than a
block are fetched in one GET of their own length by the read-ahead cache.
"""

COALESCE_MAX_GAP: int = 512
"""Two needed tiles at most this many bytes apart in the file are fetched in one range."""

DECODED_TILE_CACHE_BYTES: int = 24 * 2**20
"""Decoded TIFF tiles kept per process (all open slides together), least recently used out.

Neighbouring regions share covering tiles: the pipeline's 640 px tiles on a
512 px-tiled slide cover 4 file tiles each, 2.1 of them new when the regions
come in plan order (one row of the slide after another), so a cache of the
last few dozen tiles halves both the JPEG decodes and the bytes fetched.
24 MiB holds 32 RGB tiles of 512 x 512.
"""

SNIFF_BYTES: int = 16
"""Bytes read from the start of a file to recognise its format."""

MAX_PLAUSIBLE_MPP: float = 25.0
"""Resolution tags implying coarser pixels than this (e.g. 72 dpi defaults) are ignored."""

DOWNSAMPLE_TOLERANCE: float = 0.01
"""Relative slack when matching a requested downsample to a level's (rounding of sizes)."""

DEFAULT_THUMBNAIL_SIZE: int = 1024

WHITE: int = 255

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# TIFF tag values used below (tifffile enums compare equal to these ints).
_JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})
_PHOTOMETRIC_MINISWHITE = 0
_PHOTOMETRIC_MINISBLACK = 1
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_PLANAR_SEPARATE = 2
_RESUNIT_UM = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # inch, cm, mm, um
_OME_UNIT_UM = {
    "pm": 1e-6,
    "Å": 1e-4,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
# Inside a baseline scan 0xFF may only precede 0x00 (stuffing), RST0-7 or more 0xFF (fill).
_JPEG_ILLEGAL_SCAN_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SVS_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")
_S3_DENIED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)
_S3_MISSING_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})

DecodeResult = tuple[Any, tuple[int, ...], tuple[int, ...]]


# --------------------------------------------------------------------------- info


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level.

    Attributes
    ----------
    index
        Position in :attr:`SlideInfo.levels`, 0 = full resolution.
    width, height
        Size in this level's pixels.
    downsample
        Level-0 pixels per pixel of this level (mean of both axes).
    tile_width, tile_height
        The unit the reader fetches: the TIFF tile, the strip
        (image width x rows per strip) for stripped TIFFs, the whole image
        for JPEG/PNG.
    """

    index: int
    width: int
    height: int
    downsample: float
    tile_width: int
    tile_height: int


@dataclass(frozen=True)
class SlideInfo:
    """What the header says about a slide.

    Attributes
    ----------
    format
        ``"tiff"``, ``"ome-tiff"``, ``"svs"``, ``"ndpi"``, ``"jpeg"`` or ``"png"``.
    width, height
        Level-0 size in pixels.
    levels
        The pyramid, largest first.
    mpp
        Microns per level-0 pixel, or None when the file does not say.
    tile_size
        Level-0 ``(tile_width, tile_height)``, or None when not tiled.
    compression
        Level-0 compression, lower case (``"jpeg"``, ``"adobe_deflate"``, ``"none"``...).
    """

    format: str
    width: int
    height: int
    levels: list[LevelInfo]
    mpp: float | None
    tile_size: tuple[int, int] | None
    compression: str


# ------------------------------------------------------------------- byte sources


class _ByteSource(Protocol):
    """Where a slide's bytes come from; ranges are half-open ``(start, end)``."""

    size: int

    def header_file(self) -> BinaryIO: ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    def read_all(self) -> bytes: ...

    def close(self) -> None: ...


class _LocalSource:
    """A local file: ``os.pread`` for ranges, so concurrent reads need no lock."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - owned until close()
        self._fd = self._file.fileno()
        self.size = os.fstat(self._fd).st_size

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self._pread(start, end - start) for start, end in ranges]

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]  # short read (rare: signals, network file systems)
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_all(self) -> bytes:
        return self._pread(0, self.size)

    def close(self) -> None:
        self._file.close()


class _StreamSource:
    """A caller's binary file object; seek+read under a lock. Never closed by us."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self._lock = threading.Lock()
        self._file.seek(0, io.SEEK_END)
        self.size = self._file.tell()
        self._file.seek(0)

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        with self._lock:
            for start, end in ranges:
                self._file.seek(start)
                out.append(self._file.read(end - start))
        return out

    def read_all(self) -> bytes:
        return self.read_ranges([(0, self.size)])[0]

    def close(self) -> None:
        """Leave the caller's file open: it is theirs."""


class _FsspecSource:
    """A file on an fsspec file system (s3://, gs://, memory://...)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        # Small blocks, no big read-ahead: header parsing touches a few KiB at a few places.
        self._file = cast(
            BinaryIO,
            fs.open(path, "rb", block_size=HEADER_BLOCK_SIZE, cache_type="readahead"),
        )
        size = getattr(self._file, "size", None)
        self.size = int(size) if size is not None else int(fs.size(path))

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        n = len(ranges)
        # s3fs (async) issues these concurrently.
        return cast(
            list[bytes],
            self._fs.cat_ranges(
                [self._path] * n,
                [start for start, _ in ranges],
                [end for _, end in ranges],
                on_error="raise",
            ),
        )

    def read_all(self) -> bytes:
        return cast(bytes, self._fs.cat_file(self._path))

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- error mapping


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError anywhere in the cause chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code is not None:
                return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def _storage_error(uri: str, exc: BaseException, doing: str) -> SlideReadError:
    """Translate an exception from a storage layer (OS, fsspec, s3fs, botocore)."""
    code = _error_code(exc)
    name = type(exc).__name__
    if isinstance(exc, IsADirectoryError):
        return UnsupportedSlideError(
            uri, f"is a directory, not a slide file ({doing}); pass the path of one slide file"
        )
    if isinstance(exc, FileNotFoundError) or code in _S3_MISSING_CODES:
        return SlideNotFoundError(
            uri,
            f"no such file or object ({doing}: {name}: {exc}); check the path, bucket "
            "and key, and for non-AWS object storage the endpoint_url in storage_options",
        )
    if (
        isinstance(exc, PermissionError)
        or code in _S3_DENIED_CODES
        or name in {"NoCredentialsError", "PartialCredentialsError"}
    ):
        return SlideAccessDeniedError(
            uri,
            f"the storage refused access ({doing}: {name}: {exc}); grant read access "
            "(file permissions, or s3:GetObject in the bucket/IAM policy) to the identity "
            "of the standard AWS credential chain, or copy the slide somewhere readable",
        )
    return SlideReadError(
        uri,
        f"could not read from storage ({doing}: {name}: {exc}); check the endpoint, "
        "network and storage service, then retry",
    )


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


# ------------------------------------------------------------------ range plan


def _plan_reads(
    spans: Sequence[tuple[int, int]], max_gap: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Coalesce byte spans; return the merged ranges and, per input span, (range, offset in it)."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    merged: list[tuple[int, int]] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(spans)
    for i in order:
        start, end = spans[i]
        if merged and start - merged[-1][1] <= max_gap:
            m_start, m_end = merged[-1]
            merged[-1] = (m_start, max(m_end, end))
        else:
            merged.append((start, end))
        where[i] = (len(merged) - 1, start - merged[-1][0])
    return merged, where


def coalesce_byte_ranges(
    spans: Sequence[tuple[int, int]], *, max_gap: int = COALESCE_MAX_GAP
) -> list[tuple[int, int]]:
    """Merge half-open byte spans that overlap or lie at most ``max_gap`` bytes apart.

    Parameters
    ----------
    spans
        ``(start, end)`` pairs, in any order.
    max_gap
        Largest number of unneeded bytes read to save one request.

    Returns
    -------
    list of tuple of int
        Sorted, disjoint ``(start, end)`` ranges covering every span.
    """
    return _plan_reads(spans, max_gap)[0]


# ------------------------------------------------------------------ JPEG checks


def _jpeg_stream_problem(data: memoryview) -> str | None:
    """Why a complete JPEG tile stream is malformed, or None when it looks intact.

    Checks SOI, EOI (trailing zero padding allowed) and, for a single baseline
    scan, that every 0xFF in the entropy-coded data is a stuffed byte, a
    restart marker or a fill byte. Costs tens of microseconds per tile.
    """
    end = len(data)
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "tile does not start with a JPEG SOI marker"
    while end > 2 and data[end - 1] == 0:
        end -= 1
    if data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return "tile does not end with a JPEG EOI marker (truncated or overwritten)"
    pos = 2
    baseline = True
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return f"invalid JPEG marker structure at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            baseline = False  # progressive/lossless/arithmetic: several scans, skip scan check
        if marker == 0xDA:
            if not baseline:
                return None
            bad = _JPEG_ILLEGAL_SCAN_MARKER.search(data, pos + 2 + length, end - 2)
            if bad is None:
                return None
            return (
                f"illegal marker 0x{bad.group().hex().upper()} inside the JPEG scan data "
                f"at byte {bad.start()}"
            )
        pos += 2 + length
    return "JPEG stream has no scan (SOS) segment"


# --------------------------------------------------------------------- helpers


def _to_rgb8(arr: NDArray[Any], photometric: int) -> NDArray[np.uint8]:
    """HxWxS array of uint8/uint16 gray/RGB(A) -> HxWx3 uint8 RGB."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    samples = arr.shape[2]
    if samples >= 3:
        rgb = arr[:, :, :3]
    else:
        gray = arr[:, :, 0]
        if photometric == _PHOTOMETRIC_MINISWHITE:
            gray = np.iinfo(np.uint8).max - gray
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _clip_window(
    x: int, y: int, width: int, height: int, level_width: int, level_height: int
) -> tuple[int, int, int, int] | None:
    """The part of a region inside the level as (x0, y0, x1, y1), or None."""
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, level_width), min(y + height, level_height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def _area(page: Any) -> int:
    """Pixels of a tifffile page (0 for a missing keyframe)."""
    return 0 if page is None else int(page.imagewidth) * int(page.imagelength)


def _compression_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name).lower() if name is not None else str(value)


# ----------------------------------------------------------------- TIFF backend


@dataclass(frozen=True)
class _DecodedTile:
    """One decoded tile (or strip) and where it goes: never written to once cached."""

    pixels: NDArray[Any]
    plane: int
    y: int
    x: int


class _DecodedTileCache:
    """Process-wide LRU of decoded tiles, bounded in bytes; keys name the slide's reader."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[int, int, int], _DecodedTile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> _DecodedTile | None:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int, int], tile: _DecodedTile) -> None:
        size = tile.pixels.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._tiles.pop(key, None)
            self._bytes += size - (old.pixels.nbytes if old is not None else 0)
            self._tiles[key] = tile
            self._evict()

    def resize(self, max_bytes: int) -> None:
        """Set the budget, evicting least recently used tiles down to it."""
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:  # the caller holds the lock
        while self._bytes > self.max_bytes:
            _, evicted = self._tiles.popitem(last=False)
            self._bytes -= evicted.pixels.nbytes

    def drop(self, reader: int) -> None:
        """Forget every tile of one reader (its slide was closed)."""
        with self._lock:
            for key in [k for k in self._tiles if k[0] == reader]:
                self._bytes -= self._tiles.pop(key).pixels.nbytes


_DECODED_TILES = _DecodedTileCache(DECODED_TILE_CACHE_BYTES)
_READER_IDS = itertools.count()


@contextmanager
def decoded_tile_cache(max_bytes: int) -> Iterator[None]:
    """Within the block, this process keeps at most ``max_bytes`` of decoded tiles (0: none).

    Benchmarks of the reader itself turn the cache off, so every region pays
    for the fetch and decode of each tile it covers.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    cache = _DECODED_TILES
    previous = cache.max_bytes
    cache.resize(max_bytes)
    try:
        yield
    finally:
        cache.resize(previous)


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


class _TiffBackend:
    """Reads TIFF-family slides by ranged tile reads (see module docstring)."""

    def __init__(self, uri: str, source: _ByteSource, max_pixels: int) -> None:
        self._uri = uri
        self._source = source
        self._reader = next(_READER_IDS)  # this open slide's key in the decoded-tile cache
        with _capture_tifffile_log(logging.WARNING) as log:
            try:
                self._tif = tifffile.TiffFile(
                    source.header_file(), name=Path(uri).name or "slide", _multifile=False
                )
            except OSError as e:
                raise _storage_error(uri, e, "reading the TIFF header") from e
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
                raise _storage_error(uri, e, "reading the TIFF directories") from e
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
        series = max(series_list, key=lambda s: _area(s.levels[0].keyframe))
        pages: list[Any] = []
        for lvl in series.levels:
            first = lvl.pages[0] if len(lvl.pages) else None
            if first is None:
                raise CorruptSlideError(uri, "a pyramid level has no readable page")
            pages.append(first)
        pages.sort(key=lambda p: -_area(p.keyframe))

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
            mpp=self._mpp(key0),
            tile_size=tile_size,
            compression=_compression_name(key0.compression),
        )

    def _plan_level(self, index: int, frame: Any, width0: int, height0: int) -> _TiffLevel:
        uri = self._uri
        page = frame.keyframe
        width, height = int(page.imagewidth), int(page.imagelength)
        samples = int(page.samplesperpixel)
        dtype = page.dtype
        photometric = int(page.photometric)
        compression = int(page.compression)
        is_jpeg = compression in _JPEG_COMPRESSIONS
        what = (
            f"level {index}: photometric {_compression_name(page.photometric)}, "
            f"{samples} sample(s) of {dtype}, compression {_compression_name(page.compression)}"
        )
        convert = (
            "; convert it to an 8-bit RGB tiled pyramidal TIFF "
            "(e.g. `vips tiffsave in out.tif --tile --pyramid --compression jpeg`)"
        )
        if dtype is None or np.dtype(dtype) not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise UnsupportedSlideError(uri, f"unsupported sample type ({what}){convert}")
        color_ok = (
            (photometric == _PHOTOMETRIC_RGB and samples >= 3)
            or (photometric == _PHOTOMETRIC_YCBCR and is_jpeg and samples >= 3)
            or (photometric in (_PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_MINISWHITE) and samples <= 2)
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
        planes = samples if int(page.planarconfig) == _PLANAR_SEPARATE and samples > 1 else 1
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
        ends = offsets[:expected] + counts[:expected]
        bad = (
            (counts[:expected] < 0)
            | (offsets[:expected] < 0)
            | ((counts[:expected] > 0) & (ends > self._source.size))
        )
        if bad.any():
            first = int(np.argmax(bad))
            raise CorruptSlideError(
                uri,
                f"its data spans bytes {int(offsets[first])}..{int(ends[first])} but the file "
                f"has {self._source.size} bytes: the file is truncated or its tile table is "
                "damaged; copy it again from its source",
                tile=level.tile_label(first),
            )
        return level

    def _mpp(self, page: Any) -> float | None:
        tif = self._tif
        mpp: float | None = None
        if tif.is_svs:
            match = _SVS_MPP.search(page.description or "")
            mpp = float(match.group(1)) if match else None
        elif tif.is_ome and tif.ome_metadata:
            mpp = _ome_mpp(tif.ome_metadata)
        if mpp is None and 282 in page.tags:  # XResolution
            unit = int(page.resolutionunit)
            xres = float(page.resolution[0])
            if unit in _RESUNIT_UM and xres > 0:
                mpp = _RESUNIT_UM[unit] / xres
        if mpp is None or not math.isfinite(mpp) or not 0 < mpp <= MAX_PLAUSIBLE_MPP:
            return None
        return mpp

    # -- reading

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        lv = self.levels[level]
        shape = (height, width, lv.samples)
        white = np.iinfo(lv.dtype).max
        window = _clip_window(x, y, width, height, lv.info.width, lv.info.height)
        if window is None:
            return _to_rgb8(np.full(shape, white, dtype=lv.dtype), lv.photometric)
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
        cached: list[_DecodedTile] = []
        missing: list[int] = []
        for i in present:
            tile = _DECODED_TILES.get((self._reader, level, int(i)))
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
        return _to_rgb8(out, lv.photometric)

    def _fetch_and_decode(
        self, lv: _TiffLevel, level: int, indices: list[int]
    ) -> Iterator[_DecodedTile]:
        """Fetch the tiles' bytes (coalesced ranges), then decode, cache and yield each."""
        if not indices:
            return
        spans = [(int(lv.offsets[i]), int(lv.offsets[i] + lv.counts[i])) for i in indices]
        merged, where = _plan_reads(spans, COALESCE_MAX_GAP)
        try:
            blobs = self._source.read_ranges(merged)
        except Exception as e:  # pure I/O: any failure is the storage's
            raise _storage_error(self._uri, e, f"fetching tiles of level {level}") from e

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
                    problem = _jpeg_stream_problem(data)
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
                tile = _DecodedTile(segment[0], plane, sy, sx)
                _DECODED_TILES.put((self._reader, level, index), tile)
                yield tile

    def close(self) -> None:
        _DECODED_TILES.drop(self._reader)
        self._tif.close()


def _ome_mpp(xml: str) -> float | None:
    """Microns per pixel from the first OME ``Pixels`` element, or None."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        _LOG.debug("OME-XML does not parse; mpp unknown")
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "Pixels":
            continue
        size = element.attrib.get("PhysicalSizeX")
        unit = element.attrib.get("PhysicalSizeXUnit", "µm")
        if size is None or unit not in _OME_UNIT_UM:
            return None
        try:
            return float(size) * _OME_UNIT_UM[unit]
        except ValueError:
            return None
    return None


# ------------------------------------------------------------ JPEG/PNG backend


def _png_size(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker of a JPEG file, or None."""
    pos = 2
    n = len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        pos += 2 + length
    return None


class _RasterBackend:
    """Plain JPEG/PNG images: decoded whole at open (they have no tiles to fetch)."""

    def __init__(self, uri: str, source: _ByteSource, kind: str, max_pixels: int) -> None:
        try:
            data = source.read_all()
        except Exception as e:  # pure I/O: any failure is the storage's
            raise _storage_error(uri, e, f"reading the {kind.upper()} file") from e
        size = _png_size(data) if kind == "png" else _jpeg_size(data)
        if size is None:
            raise CorruptSlideError(
                uri, f"the {kind.upper()} header is damaged (no image size found); copy it again"
            )
        width, height = size
        budget = min(max_pixels, MAX_WHOLE_IMAGE_PIXELS)
        if width * height > budget:
            raise SlideTooLargeError(
                uri,
                f"the {kind.upper()} declares {width} x {height} = {width * height:,} pixels, "
                f"more than {budget:,}; plain {kind.upper()} is decoded whole: convert it to a "
                "tiled pyramidal TIFF, or raise max_pixels if it is smaller than "
                f"{MAX_WHOLE_IMAGE_PIXELS:,} pixels",
            )
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if decoded is None or decoded.shape[:2] != (height, width):
            raise CorruptSlideError(
                uri,
                f"the {kind.upper()} data cannot be decoded; the file is damaged: copy it again",
            )
        self._image = cast(NDArray[np.uint8], cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))
        level = LevelInfo(0, width, height, 1.0, width, height)
        self.info = SlideInfo(
            format=kind,
            width=width,
            height=height,
            levels=[level],
            mpp=None,
            tile_size=None,
            compression=kind,
        )

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]:
        out = np.full((height, width, 3), WHITE, dtype=np.uint8)
        window = _clip_window(x, y, width, height, self.info.width, self.info.height)
        if window is not None:
            x0, y0, x1, y1 = window
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._image = np.empty((0, 0, 3), dtype=np.uint8)


class _Backend(Protocol):
    info: SlideInfo

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------- the slide


class Slide:
    """An open slide. Create it with :func:`open_slide`; use it as a context manager.

    Reads are safe from several threads: local and fsspec sources need no
    lock, a caller's file object is read under one.

    Attributes
    ----------
    uri
        The slide as the caller named it (path, URL, or a file object's name).
    info
        Format, size, pyramid, mpp, tiling and compression.
    """

    def __init__(self, uri: str, backend: _Backend, source: _ByteSource) -> None:
        self.uri = uri
        self.info = backend.info
        self._backend = backend
        self._source = source
        self._closed = False

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.uri!r}, format={self.info.format!r}, "
            f"{self.info.width}x{self.info.height}, levels={len(self.info.levels)})"
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Release the file handles (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._backend.close()
        finally:
            self._source.close()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: uri, format, size, levels, mpp, tile_size, compression.

        Returns
        -------
        dict
            ``levels`` is a list of dicts with ``index``, ``width``, ``height``,
            ``downsample``, ``tile_width``, ``tile_height``; ``tile_size`` is
            ``[width, height]`` or None.
        """
        info = self.info
        return {
            "uri": self.uri,
            "format": info.format,
            "width": info.width,
            "height": info.height,
            "levels": [asdict(level) for level in info.levels],
            "mpp": info.mpp,
            "tile_size": list(info.tile_size) if info.tile_size else None,
            "compression": info.compression,
        }

    def read_region(
        self, x: int, y: int, width: int, height: int, *, level: int = 0
    ) -> NDArray[np.uint8]:
        """Read a region of one level.

        Parameters
        ----------
        x, y
            Top-left corner in that level's pixels; may be negative.
        width, height
            Size in that level's pixels (at most :data:`MAX_READ_PIXELS` in all).
        level
            Pyramid level index.

        Returns
        -------
        numpy.ndarray
            ``(height, width, 3)`` ``uint8`` RGB; parts outside the level are white.

        Raises
        ------
        CorruptSlideError
            A covering tile is truncated or does not decode (the error names it).
        SlideReadError
            The storage failed while fetching.
        """
        x, y, width, height, level = int(x), int(y), int(width), int(height), int(level)
        self._check_open()
        if width < 1 or height < 1:
            raise ValueError(f"region size must be positive, got {width} x {height}")
        if width * height > MAX_READ_PIXELS:
            raise ValueError(
                f"region {width} x {height} exceeds MAX_READ_PIXELS={MAX_READ_PIXELS:,}; "
                "read it in parts"
            )
        self._check_level(level)
        return self._backend.read(level, x, y, width, height)

    def read_level(self, level: int) -> NDArray[np.uint8]:
        """Read a whole level (meant for small levels).

        Raises
        ------
        SlideTooLargeError
            The level has more than :data:`MAX_READ_PIXELS` pixels; use
            :meth:`read_region` or :meth:`thumbnail` instead.
        """
        self._check_level(level)
        lv = self.info.levels[level]
        if lv.width * lv.height > MAX_READ_PIXELS:
            raise SlideTooLargeError(
                self.uri,
                f"level {level} is {lv.width} x {lv.height} pixels, more than "
                f"MAX_READ_PIXELS={MAX_READ_PIXELS:,} for one array; read it with "
                "read_region in parts, use thumbnail(), or pick a smaller level",
            )
        return self.read_region(0, 0, lv.width, lv.height, level=level)

    def thumbnail(self, size: int = DEFAULT_THUMBNAIL_SIZE) -> NDArray[np.uint8]:
        """An RGB overview whose longest side is at most ``size``.

        Read from the smallest level whose longest side is still >= ``size``
        (level 0 if none is), then shrunk with ``cv2.INTER_AREA``; never
        enlarged. A level too big for one array is read and shrunk in bands of
        whole tile rows, so memory stays bounded.
        """
        if size < 1:
            raise ValueError(f"thumbnail size must be positive, got {size}")
        self._check_open()
        levels = self.info.levels
        chosen = levels[0]
        for lv in reversed(levels):
            if max(lv.width, lv.height) >= size:
                chosen = lv
                break
        scale = min(1.0, size / max(chosen.width, chosen.height))
        out_w = max(1, min(size, round(chosen.width * scale)))
        out_h = max(1, min(size, round(chosen.height * scale)))
        if chosen.width * chosen.height <= MAX_READ_PIXELS:
            image = self.read_level(chosen.index)
            if (out_w, out_h) == (chosen.width, chosen.height):
                return image
            return cast(
                NDArray[np.uint8],
                cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA),
            )
        return self._banded_thumbnail(chosen, out_w, out_h)

    def _banded_thumbnail(self, lv: LevelInfo, out_w: int, out_h: int) -> NDArray[np.uint8]:
        out = np.full((out_h, out_w, 3), WHITE, dtype=np.uint8)
        rows_per_band = max(lv.tile_height, MAX_READ_PIXELS // lv.width)
        rows_per_band -= rows_per_band % lv.tile_height
        rows_per_band = max(rows_per_band, 1)
        for top in range(0, lv.height, rows_per_band):
            bottom = min(top + rows_per_band, lv.height)
            dst_top = round(top * out_h / lv.height)
            dst_bottom = round(bottom * out_h / lv.height)
            if dst_bottom <= dst_top:
                continue
            band = self.read_region(0, top, lv.width, bottom - top, level=lv.index)
            out[dst_top:dst_bottom] = cv2.resize(
                band, (out_w, dst_bottom - dst_top), interpolation=cv2.INTER_AREA
            )
        return out

    def level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample``.

        A level counts as "not above" within :data:`DOWNSAMPLE_TOLERANCE`
        (level sizes are rounded); below 1 the answer is level 0.
        """
        if not math.isfinite(downsample) or downsample <= 0:
            raise ValueError(f"downsample must be a positive number, got {downsample}")
        best = 0
        for lv in self.info.levels:
            if lv.downsample <= downsample * (1 + DOWNSAMPLE_TOLERANCE) and (
                lv.downsample > self.info.levels[best].downsample
            ):
                best = lv.index
        return best

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.info.levels):
            raise ValueError(
                f"level {level} does not exist; {self.uri} has levels 0..{len(self.info.levels) - 1}"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.uri} is closed")


# ----------------------------------------------------------------- open_slide


def _name_of(src: str | os.PathLike[str] | BinaryIO) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else f"<{type(src).__name__}>"


def _open_source(
    src: str | os.PathLike[str] | BinaryIO, uri: str, storage_options: dict[str, Any] | None
) -> _ByteSource:
    if not isinstance(src, (str, os.PathLike)):
        if not all(hasattr(src, attr) for attr in ("read", "seek", "tell")):
            raise TypeError(
                f"open_slide takes a path, a URL or a binary file object, got {type(src).__name__}"
            )
        try:
            return _StreamSource(src)
        except OSError as e:
            raise _storage_error(uri, e, "seeking the file object") from e
    path = os.fspath(src)
    protocol = path.split("://", 1)[0].lower() if "://" in path else "file"
    if protocol == "file":
        if "://" in path:
            path = unquote(urlparse(path).path)
        try:
            return _LocalSource(path)
        except OSError as e:
            raise _storage_error(uri, e, "opening the file") from e
    try:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise UnsupportedSlideError(
            uri,
            f"cannot open {protocol}:// URLs ({type(e).__name__}: {e}); use a local path, "
            "file://, s3:// or another installed fsspec protocol",
        ) from e
    try:
        return _FsspecSource(fs, fs_path)
    except Exception as e:
        raise _storage_error(uri, e, "opening the object") from e


def _sniff(head: bytes) -> str | None:
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    return None


def open_slide(
    src: str | os.PathLike[str] | BinaryIO,
    *,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Slide:
    """Open a slide from a path, a ``file://`` or ``s3://`` URL, or a binary file object.

    Parameters
    ----------
    src
        Local path, ``file://`` URL, ``s3://bucket/key`` (or another fsspec
        URL), or an open binary file object (read from its start; left open).
    storage_options
        Passed to the fsspec file system of a URL, e.g.
        ``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}``.
        Credentials come from the standard AWS chain; do not put them here.
        Ignored for local paths and file objects.
    max_pixels
        Refuse slides whose level 0 has more pixels than this
        (:class:`~batch.errors.SlideTooLargeError`), before allocating anything.

    Returns
    -------
    Slide
        Open until :meth:`Slide.close` (or the ``with`` block ends).

    Raises
    ------
    SlideReadError
        One of its subclasses; see the module docstring for which input
        gives which.
    """
    uri = _name_of(src)
    source = _open_source(src, uri, storage_options)
    try:
        try:
            header = source.header_file()
            header.seek(0)
            head = header.read(SNIFF_BYTES)
            header.seek(0)
        except Exception as e:  # pure I/O: any failure is the storage's
            raise _storage_error(uri, e, "reading the first bytes") from e
        if source.size == 0:
            raise CorruptSlideError(
                uri,
                "the file is empty (0 bytes): the upload or copy failed; copy the slide again",
            )
        kind = _sniff(head)
        backend: _Backend
        if kind == "tiff":
            backend = _TiffBackend(uri, source, max_pixels)
        elif kind in ("jpeg", "png"):
            backend = _RasterBackend(uri, source, kind, max_pixels)
        else:
            raise UnsupportedSlideError(
                uri,
                f"not a TIFF, JPEG or PNG image (it starts with {head[:8]!r}); hemaray reads "
                "tiled or stripped TIFF (incl. OME-TIFF, Aperio SVS, NDPI), JPEG and PNG: "
                "convert the slide or check that the path points at the image",
            )
    except BaseException:
        source.close()
        raise
    return Slide(uri, backend, source)
