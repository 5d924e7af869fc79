"""Open any slide and read regions of it by fetching only the tiles they cover.

One entry point, :func:`open_slide`, turns a local path, a ``file://`` URL, an
``s3://`` URL (or any other fsspec URL) or an open binary file object into a
:class:`Slide`. A slide knows its pyramid (:class:`SlideInfo`) and reads
regions of any level as ``HxWx3`` ``uint8`` RGB arrays.

``open_slide(src, *, storage_options=None, max_pixels=DEFAULT_MAX_PIXELS, max_pages=DEFAULT_MAX_PAGES, pin=None)``
takes ``storage_options`` keyword-only (the fsspec settings of a URL, e.g. an
S3 endpoint). TIFF-family slides are read by ranged fetches of the covering
tiles only (see :mod:`batch.slides.tiff`); JPEG and PNG are decoded whole.
:class:`OpenSlides` keeps a process's few open slides for a pipeline's workers.

Guarantees
----------
- Pixels equal tifffile's own decode of the same tiles; parts of a region
  outside the level, and tiles the file declares empty (byte count 0), are
  white (255).
- Every read of an open slide reads the version of the bytes its header was
  parsed from (:attr:`Slide.pin`: an object's ETag and VersionId, a file's
  size and mtime; ranged GETs carry ``If-Match``), and ``open_slide(...,
  pin=...)`` opens only that version: a slide rewritten meanwhile is a
  :class:`SlideChangedError`, never pixels of one file cut along another's
  tile table (see :mod:`batch.slides.sources`).
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
  zeroed TileOffsets or TileByteCounts      :class:`CorruptSlideError`, at
  (one without the other, or a whole        open (not white background, not
  level of empty entries)                   garbage pixels)
  a page chain that loops back (any         :class:`CorruptSlideError`, at
  length) or has more than ``max_pages``    open, before tifffile walks it
  pages (:mod:`~batch.slides.ifds`)         (bounded: at most ``max_pages``
                                            small reads)
  tile bytes that fail to decode, or that   :class:`CorruptSlideError`, at
  make tifffile log a warning or error      read, naming the tile
  level 0 larger than ``max_pixels``        :class:`SlideTooLargeError`, before
                                            anything is allocated
  file or object rewritten after open, or   :class:`SlideChangedError`, at the
  not the version ``pin`` names             first read after it (or at open)
  ========================================  ===================================

  JPEG carries no checksum and the libjpeg used by imagecodecs swallows its
  "corrupt data" warnings, so JPEG tiles are additionally checked for a
  well-formed stream (SOI, EOI, no illegal marker inside the entropy-coded
  data of a baseline scan). A damaged JPEG tile that still forms a legal
  stream cannot be told from a good one by any reader.

Credentials come only from the standard AWS chain (environment, config files,
instance roles); ``storage_options`` is for the endpoint and client settings.
Neither credentials nor ``storage_options`` appear in messages or logs.

Modules
-------
This package's ``__init__`` is only the facade: import from ``batch.slides``.

- :mod:`~batch.slides.slide`: :class:`Slide`, format sniffing, :func:`open_slide`.
- :mod:`~batch.slides.info`: :class:`SlideInfo`, :class:`LevelInfo`, the backend protocol.
- :mod:`~batch.slides.limits`: the reader's limits and tuning constants.
- :mod:`~batch.slides.sources`: byte sources (local, file object, fsspec/S3), storage errors.
- :mod:`~batch.slides.tiff`: the TIFF backend; :mod:`~batch.slides.tiffmeta` (tag
  meanings, colour conversion, mpp), :mod:`~batch.slides.jpeg` (JPEG tile checks),
  :mod:`~batch.slides.ifds` (the page-chain budget: cycles, page count) and
  :mod:`~batch.slides.ranges` (range coalescing) serve it.
- :mod:`~batch.slides.cache`: the process-wide decoded-tile cache.
- :mod:`~batch.slides.opened`: :class:`OpenSlides`, a process's few open slides, pinned.
- :mod:`~batch.slides.raster`: the JPEG/PNG backend.

The package may import only :mod:`batch.errors`, :mod:`batch.config` (for
``DEFAULT_MAX_PIXELS`` and ``DEFAULT_MAX_PAGES``, the per-slide budgets, user defaults) and
:mod:`batch.lru`, plus third-party libraries.
"""

from __future__ import annotations

from batch.config import DEFAULT_MAX_PIXELS
from batch.slides.cache import decoded_tile_cache
from batch.slides.info import LevelInfo, SlideInfo
from batch.slides.limits import (
    COALESCE_MAX_GAP,
    DECODED_TILE_CACHE_BYTES,
    DEFAULT_THUMBNAIL_SIZE,
    DOWNSAMPLE_TOLERANCE,
    HEADER_BLOCK_SIZE,
    MAX_PLAUSIBLE_MPP,
    MAX_READ_PIXELS,
    MAX_SEGMENT_BYTES,
    MAX_WHOLE_IMAGE_PIXELS,
    SNIFF_BYTES,
    WHITE,
)
from batch.slides.opened import OpenSlides
from batch.slides.ranges import coalesce_byte_ranges
from batch.slides.slide import Slide, open_slide

__all__ = [
    "COALESCE_MAX_GAP",
    "DECODED_TILE_CACHE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_THUMBNAIL_SIZE",
    "DOWNSAMPLE_TOLERANCE",
    "HEADER_BLOCK_SIZE",
    "MAX_PLAUSIBLE_MPP",
    "MAX_READ_PIXELS",
    "MAX_SEGMENT_BYTES",
    "MAX_WHOLE_IMAGE_PIXELS",
    "SNIFF_BYTES",
    "WHITE",
    "LevelInfo",
    "OpenSlides",
    "Slide",
    "SlideInfo",
    "coalesce_byte_ranges",
    "decoded_tile_cache",
    "open_slide",
]
