"""The slide reader's limits and tuning constants, in one place.

Budgets on what one call or one slide may cost (pixels, bytes), the block and
gap sizes that shape remote reads, the decoded-tile cache size, and the small
numeric conventions of the reader (sniffed bytes, mpp plausibility, the white
fill). The per-slide pixel budget is a user default and lives in
:mod:`batch.config` as ``DEFAULT_MAX_PIXELS``.

This module imports nothing.
"""

from __future__ import annotations

__all__ = [
    "BODY_READ_ATTEMPTS",
    "BODY_RETRY_BASE_S",
    "COALESCE_MAX_GAP",
    "DECODED_TILE_CACHE_BYTES",
    "DEFAULT_THUMBNAIL_SIZE",
    "DOWNSAMPLE_TOLERANCE",
    "HEADER_BLOCK_SIZE",
    "MAX_PLAUSIBLE_MPP",
    "MAX_READ_PIXELS",
    "MAX_SEGMENT_BYTES",
    "MAX_WHOLE_IMAGE_PIXELS",
    "SNIFF_BYTES",
    "WHITE",
]

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

BODY_READ_ATTEMPTS: int = 3
"""Tries of one ranged GET whose body breaks off mid-transfer (a connection reset while
receiving). The request itself is retried by botocore (``storage.max_attempts``), but not
a body that dies after the answer began."""

BODY_RETRY_BASE_S: float = 0.2
"""Seconds before the second try of a broken-off body; doubled for each further one."""

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
"""Longest side of :meth:`Slide.thumbnail` when no size is given."""

WHITE: int = 255
"""Value of the pixels of a region outside the level, and of tiles declared empty."""
