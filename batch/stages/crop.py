"""Cut white-blood-cell crops out of a tile that is already in memory.

A crop is the detector box grown by ``margin`` (a fraction of the box's width
and height on each side), so the whole cell and a rim of its surroundings are
in view. Where the grown box reaches past the tile, the missing pixels are
filled with the background colour, so a crop's size depends only on its box
and never on where the box lies in the tile: a cell on the tile's edge gives
the same crop geometry as the same cell in the middle.

Guarantee: for every box, ``crop_regions`` gives the integer region (in tile
pixels, possibly outside the tile) that ``crop_wbcs`` returns, pixel for
pixel, before any ``out_size`` resize. Callers that need to map a crop's
pixels back to the tile (or to level-0 via the tile's origin) use that region.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig

__all__ = [
    "WHITE",
    "crop_regions",
    "crop_wbcs",
    "estimate_background",
    "field_window",
    "png_bytes",
    "letterbox",
    "resize_by",
]

#: Fallback fill colour (RGB) when the background cannot be estimated.
WHITE: tuple[int, int, int] = (255, 255, 255)
#: Pixels brighter than this percentile of the grey level are background candidates.
BACKGROUND_PERCENTILE = 75.0
#: At most this many pixels (a regular subsample) are used to estimate the background: on 96
#: synthetic tiles and 60 TXL-PBC images the colour moved by at most 1 level of 255 against
#: 65,536 pixels, at 0.8 ms an image instead of 2.9 (it runs for every tile with a WBC).
BACKGROUND_SAMPLE = 16_384


def estimate_background(image: npt.NDArray[np.uint8]) -> tuple[int, int, int]:
    """Estimate the background (glass) colour of a smear image.

    The glass is the brightest large area of a stained smear: the colour is
    the per-channel median of the pixels whose grey level lies at or above the
    ``BACKGROUND_PERCENTILE`` percentile.

    Parameters
    ----------
    image
        RGB ``uint8`` array ``(H, W, 3)``.

    Returns
    -------
    tuple of int
        RGB colour; ``WHITE`` for an empty image.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if image.size == 0:
        return WHITE
    pixels = image.reshape(-1, 3)
    step = max(1, pixels.shape[0] // BACKGROUND_SAMPLE)
    pixels = pixels[::step]
    grey = pixels.astype(np.float32).mean(axis=1)
    bright = pixels[grey >= np.percentile(grey, BACKGROUND_PERCENTILE)]
    median = np.median(bright, axis=0)
    return (int(median[0]), int(median[1]), int(median[2]))


def crop_regions(
    boxes: npt.ArrayLike, *, margin: float = SegmentationConfig.crop_margin
) -> npt.NDArray[np.int64]:
    """Integer crop regions ``(N, 4)`` ``x0, y0, x1, y1`` (half-open) for boxes grown by ``margin``.

    The region is ``floor(x0 - margin * w)`` to ``ceil(x1 + margin * w)`` (the
    same for y with the height) and is at least one pixel wide and high. It
    is not clipped to any image.

    Parameters
    ----------
    boxes
        ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels.
    margin
        Fraction of the box size added on each side (``>= 0``).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = np.clip(b[:, 2] - b[:, 0], 0, None)
    h = np.clip(b[:, 3] - b[:, 1], 0, None)
    x0 = np.floor(b[:, 0] - margin * w)
    y0 = np.floor(b[:, 1] - margin * h)
    x1 = np.maximum(np.ceil(b[:, 2] + margin * w), x0 + 1)
    y1 = np.maximum(np.ceil(b[:, 3] + margin * h), y0 + 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)


def letterbox(
    image: npt.NDArray[np.uint8], size: int, fill: tuple[int, int, int]
) -> npt.NDArray[np.uint8]:
    """Resize ``image`` to fit a ``size`` x ``size`` square, keeping its aspect, padding with ``fill``.

    The resized image is centred; the longer side becomes exactly ``size``.
    """
    if size <= 0:
        raise ValueError(f"out_size must be > 0, got {size}")
    return field_window(image, size, size / max(image.shape[:2]), fill)


def resize_by(image: npt.NDArray[np.uint8], scale: float) -> npt.NDArray[np.uint8]:
    """``image`` resized by ``scale`` (sides rounded, at least 1 px): area-averaged down, linear up."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, size, interpolation=interp), np.uint8)


def field_window(
    image: npt.NDArray[np.uint8], size: int, scale: float, fill: tuple[int, int, int]
) -> npt.NDArray[np.uint8]:
    """``image`` resized by ``scale`` and centred on a ``size`` x ``size`` square.

    Where the resized image is larger than the square its centre is kept;
    where it is smaller the rest is ``fill``. Unlike `letterbox` the pixel
    size is the caller's (``scale``), not the image's: equal pixel sizes in,
    equal sizes in microns out.
    """
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if scale != 1.0:
        image = resize_by(image, scale)
    h, w = image.shape[:2]
    top, left = max(h - size, 0) // 2, max(w - size, 0) // 2  # where the larger is cut
    cut = image[top : top + size, left : left + size]
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    oy, ox = (size - cut.shape[0]) // 2, (size - cut.shape[1]) // 2  # where the smaller sits
    out[oy : oy + cut.shape[0], ox : ox + cut.shape[1]] = cut
    return out


def crop_wbcs(
    tile: npt.NDArray[np.uint8],
    boxes: npt.ArrayLike,
    *,
    margin: float = SegmentationConfig.crop_margin,
    out_size: int | None = None,
    background: tuple[int, int, int] | None = None,
) -> list[npt.NDArray[np.uint8]]:
    """Cut one crop per box from an RGB tile.

    Parameters
    ----------
    tile
        RGB ``uint8`` array ``(H, W, 3)``.
    boxes
        ``(N, 4)`` boxes ``x0, y0, x1, y1`` in tile pixels.
    margin
        Fraction of the box's width / height added on each side.
    out_size
        If given, every crop is letterboxed to ``out_size`` x ``out_size``
        (aspect kept, padding in the background colour).
    background
        Fill colour (RGB) for pixels outside the tile; ``None`` estimates the
        tile's background with `estimate_background`.

    Returns
    -------
    list of numpy.ndarray
        One RGB ``uint8`` crop per box, in box order; shape
        ``crop_regions(boxes)`` heights/widths, or ``(out_size, out_size, 3)``.
    """
    tile = np.asarray(tile)
    if tile.ndim != 3 or tile.shape[2] != 3 or tile.dtype != np.uint8:
        raise ValueError(
            f"tile must be an RGB uint8 array (H, W, 3), got {tile.dtype} {tile.shape}"
        )
    regions = crop_regions(boxes, margin=margin)
    if len(regions) == 0:
        return []
    fill = background if background is not None else estimate_background(tile)
    fill_arr = np.asarray(fill, dtype=np.uint8)
    th, tw = tile.shape[:2]
    crops: list[npt.NDArray[np.uint8]] = []
    for x0, y0, x1, y1 in regions.tolist():
        cx0, cy0 = min(max(x0, 0), tw), min(max(y0, 0), th)
        cx1, cy1 = min(max(x1, 0), tw), min(max(y1, 0), th)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            crop = tile[y0:y1, x0:x1].copy()
        else:
            crop = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
            crop[:] = fill_arr
            if cx1 > cx0 and cy1 > cy0:
                crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = tile[cy0:cy1, cx0:cx1]
        if out_size is not None:
            crop = letterbox(crop, out_size, fill)
        crops.append(crop)
    return crops


def png_bytes(image: npt.NDArray[Any]) -> bytes:
    """``image`` (BGR or grey, as OpenCV writes it) encoded as PNG."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf.tobytes())
