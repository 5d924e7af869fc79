"""The :class:`Slide` class and :func:`open_slide`: sniff the format, pick the backend.

:func:`open_slide` opens the byte source (:mod:`batch.slides.sources`),
recognises TIFF, JPEG or PNG from the first bytes and hands the source to the
TIFF (:mod:`batch.slides.tiff`) or JPEG/PNG (:mod:`batch.slides.raster`)
backend; :class:`Slide` is the format-independent object callers use (regions,
whole levels, thumbnails, level choice).

This module may import only :mod:`batch.errors`, :mod:`batch.config` and its
siblings :mod:`~batch.slides.info`, :mod:`~batch.slides.limits`,
:mod:`~batch.slides.raster`, :mod:`~batch.slides.sources` and
:mod:`~batch.slides.tiff`, plus third-party libraries (numpy, OpenCV).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from types import TracebackType
from typing import Any, BinaryIO, cast

import cv2
import numpy as np
from numpy.typing import NDArray

from batch.config import DEFAULT_MAX_PAGES, DEFAULT_MAX_PIXELS
from batch.errors import CorruptSlideError, SlideTooLargeError, UnsupportedSlideError
from batch.slides.info import Backend, LevelInfo
from batch.slides.limits import (
    DEFAULT_THUMBNAIL_SIZE,
    DOWNSAMPLE_TOLERANCE,
    MAX_READ_PIXELS,
    SNIFF_BYTES,
    WHITE,
)
from batch.slides.raster import RasterBackend
from batch.slides.sources import ByteSource, open_source, storage_error
from batch.slides.tiff import TiffBackend

__all__ = ["Slide", "open_slide"]

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
    pin
        The version of the bytes it was opened on (a local file's size and
        mtime, an object's ETag and VersionId; None for a file object). Every
        read is held to it (see :mod:`batch.slides.sources`); pass it to
        :func:`open_slide` to open the same version again elsewhere.
    """

    def __init__(self, uri: str, backend: Backend, source: ByteSource) -> None:
        self.uri = uri
        self.info = backend.info
        self.pin = source.pin
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
    max_pages: int = DEFAULT_MAX_PAGES,
    pin: str | None = None,
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
    max_pages
        Refuse TIFFs whose page chain is longer than this, or loops back
        (:class:`~batch.errors.CorruptSlideError`), before tifffile parses it.
    pin
        A :attr:`Slide.pin` from an earlier open: the file or object must still
        be that version (:class:`~batch.errors.SlideChangedError` if not), so
        a worker reading the tiles another process planned reads the same bytes.

    Returns
    -------
    Slide
        Open until :meth:`Slide.close` (or the ``with`` block ends).

    Raises
    ------
    SlideReadError
        One of its subclasses; see the :mod:`batch.slides` docstring for which
        input gives which.
    """
    uri = _name_of(src)
    source = open_source(src, uri, storage_options, pin=pin)
    try:
        try:
            header = source.header_file()
            header.seek(0)
            head = header.read(SNIFF_BYTES)
            header.seek(0)
        except Exception as e:  # pure I/O: any failure is the storage's
            raise storage_error(uri, e, "reading the first bytes") from e
        if source.size == 0:
            raise CorruptSlideError(
                uri,
                "the file is empty (0 bytes): the upload or copy failed; copy the slide again",
            )
        kind = _sniff(head)
        backend: Backend
        if kind == "tiff":
            backend = TiffBackend(uri, source, max_pixels, max_pages)
        elif kind in ("jpeg", "png"):
            backend = RasterBackend(uri, source, kind, max_pixels)
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
