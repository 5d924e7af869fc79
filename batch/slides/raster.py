"""The JPEG/PNG backend: plain images, decoded whole when the slide is opened.

They have no tiles to fetch, so :class:`RasterBackend` reads the file once,
checks the size its header declares against the pixel budget (at most
:data:`~batch.slides.limits.MAX_WHOLE_IMAGE_PIXELS`) before decoding, and
serves regions from the decoded RGB array.

This module may import only :mod:`batch.errors` and its siblings
:mod:`~batch.slides.info`, :mod:`~batch.slides.limits` and
:mod:`~batch.slides.sources`, plus third-party libraries (numpy, OpenCV).
"""

from __future__ import annotations

import struct
from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

from batch.errors import CorruptSlideError, SlideReadError, SlideTooLargeError
from batch.slides.info import LevelInfo, SlideInfo, clip_window
from batch.slides.limits import MAX_WHOLE_IMAGE_PIXELS, WHITE
from batch.slides.sources import ByteSource, storage_error

__all__ = ["RasterBackend"]


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


class RasterBackend:
    """Plain JPEG/PNG images: decoded whole at open (they have no tiles to fetch)."""

    def __init__(self, uri: str, source: ByteSource, kind: str, max_pixels: int) -> None:
        try:
            data = source.read_all()
        except SlideReadError:  # the source's own verdict (the file changed since open)
            raise
        except Exception as e:  # pure I/O: any failure is the storage's
            raise storage_error(uri, e, f"reading the {kind.upper()} file") from e
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
        window = clip_window(x, y, width, height, self.info.width, self.info.height)
        if window is not None:
            x0, y0, x1, y1 = window
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._image[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._image = np.empty((0, 0, 3), dtype=np.uint8)
