"""What a slide is, independent of its format: its pyramid description and the backend protocol.

:class:`LevelInfo` and :class:`SlideInfo` describe a slide's header;
:class:`Backend` is what every format reader (:mod:`batch.slides.tiff`,
:mod:`batch.slides.raster`) implements for :class:`~batch.slides.slide.Slide`;
:func:`clip_window` is the region clipping they share.

This module may import only third-party libraries (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ["Backend", "LevelInfo", "SlideInfo", "clip_window"]


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


class Backend(Protocol):
    """A format reader: the slide's info, region reads at any level, and close."""

    info: SlideInfo

    def read(self, level: int, x: int, y: int, width: int, height: int) -> NDArray[np.uint8]: ...

    def close(self) -> None: ...


def clip_window(
    x: int, y: int, width: int, height: int, level_width: int, level_height: int
) -> tuple[int, int, int, int] | None:
    """The part of a region inside the level as (x0, y0, x1, y1), or None."""
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, level_width), min(y + height, level_height)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1
