"""Cut a slide into detector tiles with owned cores, and skip background.

Every tile has a *read region* (what the detector sees) and a *core*. The
cores partition the slide: every level-0 point belongs to exactly one core.
A detection is kept only by the tile whose core holds its box centre, so a
cell on a seam is counted exactly once without any global NMS.

Guarantee: if a cell's box is at most ``overlap`` wide and high (in the
read level's pixels), the tile that owns its centre also contains the whole
box in its read region, because every core lies ``overlap / 2`` inside its
read region on each side that borders another tile. Tiled detection thus sees
every cell whole, as whole-image detection would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from batch.config import TilingConfig

__all__ = [
    "TileTask",
    "TilePlan",
    "plan_tiles",
    "choose_level",
    "detector_factor",
    "foreground_mask",
]

#: A level is usable for a target mpp if it is at most this much coarser (scanner rounding).
MPP_TOLERANCE = 1.05
#: Chunk side (pixels of the mask level) read at a time when building the low-res image.
MASK_CHUNK = 2048


@dataclass(frozen=True)
class TileTask:
    """One detector tile.

    ``x, y, w, h`` is the read region in pixels of ``level`` (it may reach past
    the slide's edge; the reader fills that with background). ``core_*`` is
    the owned core in level-0 pixels (half-open). ``scale`` is the factor from
    level pixels to detector pixels (resize the read region by ``scale``).
    """

    slide_id: str
    slide_uri: str
    level: int
    downsample: float
    row: int
    col: int
    x: int
    y: int
    w: int
    h: int
    core_x0: float
    core_y0: float
    core_x1: float
    core_y1: float
    scale: float

    def owns(self, cx: npt.ArrayLike, cy: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which level-0 centres lie in this tile's core."""
        cxa, cya = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
        return (
            (cxa >= self.core_x0) & (cxa < self.core_x1) & (cya >= self.core_y0) & (cya < self.core_y1)
        )

    def to_level0(self, bx: npt.ArrayLike, by: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates within the read region (level pixels) to level-0 pixels."""
        return (
            (np.asarray(bx, dtype=np.float64) + self.x) * self.downsample,
            (np.asarray(by, dtype=np.float64) + self.y) * self.downsample,
        )


@dataclass(frozen=True)
class TilePlan:
    """All tiles of one slide at one level, and which were skipped as background."""

    slide_id: str
    slide_uri: str
    level: int
    downsample: float
    mpp: float | None
    target_mpp: float | None
    scale: float
    tile_size: int
    overlap: int
    stride: int
    #: Level-0 core boundaries: core of column j is [x_edges[j], x_edges[j+1]).
    x_edges: npt.NDArray[np.float64]
    y_edges: npt.NDArray[np.float64]
    tasks: tuple[TileTask, ...]
    skipped: tuple[TileTask, ...]

    @property
    def n_planned(self) -> int:
        return len(self.tasks) + len(self.skipped)

    @property
    def skip_fraction(self) -> float:
        return len(self.skipped) / self.n_planned if self.n_planned else 0.0

    def owner(
        self, cx: npt.ArrayLike, cy: npt.ArrayLike
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(row, col) of the tile whose core holds each level-0 centre."""
        col = np.searchsorted(self.x_edges, np.asarray(cx, dtype=np.float64), side="right") - 1
        row = np.searchsorted(self.y_edges, np.asarray(cy, dtype=np.float64), side="right") - 1
        return (
            np.clip(row, 0, len(self.y_edges) - 2).astype(np.int64),
            np.clip(col, 0, len(self.x_edges) - 2).astype(np.int64),
        )

    def all_tasks(self) -> Iterator[TileTask]:
        yield from self.tasks
        yield from self.skipped


def choose_level(
    downsamples: list[float],
    mpp: float | None,
    target_mpp: float | None,
    *,
    min_cell_scale: float = 0.0,
) -> tuple[int, float]:
    """Pick the coarsest level that is still at least as fine as ``target_mpp``.

    Returns ``(level, scale)`` where ``scale`` resizes that level's pixels
    for the detector: below 1, down to the target mpp. A slide coarser than
    the target is cut at its own pixels (scale 1) unless it is coarser than
    ``target_mpp / min_cell_scale``, where its cells would be drawn at under
    ``min_cell_scale`` of the size the detector was trained on: then it is
    upsampled to that mpp (scale > 1). ``min_cell_scale`` 0 never upsamples.
    Without an mpp on either side, level 0 at scale 1.
    """
    if mpp is None or target_mpp is None:
        return 0, 1.0
    best = 0
    for i, ds in enumerate(downsamples):
        if mpp * ds <= target_mpp * MPP_TOLERANCE:
            best = i if ds >= downsamples[best] else best
    level_mpp = mpp * downsamples[best]
    if min_cell_scale > 0:
        coarsest = target_mpp / min_cell_scale
        if level_mpp > coarsest * MPP_TOLERANCE:
            return best, level_mpp / coarsest
    return best, min(1.0, level_mpp / target_mpp)


def detector_factor(
    downsamples: list[float],
    mpp: float | None,
    target_mpp: float | None,
    *,
    min_cell_scale: float = 0.0,
) -> float:
    """Level-0 pixels per pixel of the detector's input: the level and resize `choose_level` picks."""
    level, scale = choose_level(downsamples, mpp, target_mpp, min_cell_scale=min_cell_scale)
    return float(downsamples[level]) / scale


def _axis_grid(extent: int, tile: int, overlap: int) -> tuple[list[int], list[int]]:
    """Read-region starts and core edges (level pixels) along one axis.

    Tile i reads [start_i, start_i + tile); the cores are
    [start_i + overlap/2, start_{i+1} + overlap/2), the first from 0 and the last to ``extent``.
    """
    stride = tile - overlap
    n = max(1, math.ceil(max(extent - overlap, 1) / stride))
    starts = [i * stride for i in range(n)]
    half = overlap // 2
    edges = [0] + [s + half for s in starts[1:]] + [extent]
    return starts, edges


def foreground_mask(rgb: npt.NDArray[np.uint8], delta: float) -> npt.NDArray[np.bool_]:
    """Pixels that differ from the slide's background colour by more than ``delta`` (RGB distance).

    The background colour is the median of the brightest fifth of the image:
    smears are mostly near-white glass with stained cells on it.
    """
    flat = rgb.reshape(-1, 3).astype(np.float32)
    lum = flat @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bright = flat[lum >= np.quantile(lum, 0.8)]
    background = np.median(bright, axis=0)
    dist = np.sqrt(((rgb.astype(np.float32) - background) ** 2).sum(axis=2))
    mask = dist > delta
    # A pixel of margin so cells at the resolution limit of the mask still count.
    return cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def _low_res(slide: object, max_side: int) -> tuple[npt.NDArray[np.uint8], float]:
    """A low-resolution RGB image of the whole slide and its downsample from level 0.

    Reads the coarsest level that is still at least ``max_side / 2`` on its
    long side, in chunks, resizing each chunk, so memory stays bounded even for
    single-level slides.
    """
    info = slide.info  # type: ignore[attr-defined]
    levels = info.levels
    long0 = max(info.width, info.height)
    target_ds = max(1.0, long0 / max_side)
    idx = 0
    for i, lv in enumerate(levels):
        if lv.downsample <= target_ds * 2 and lv.downsample >= levels[idx].downsample:
            idx = i
    lv = levels[idx]
    factor = min(1.0, max_side / max(lv.width, lv.height))
    out_w, out_h = max(1, round(lv.width * factor)), max(1, round(lv.height * factor))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for y in range(0, lv.height, MASK_CHUNK):
        for x in range(0, lv.width, MASK_CHUNK):
            w, h = min(MASK_CHUNK, lv.width - x), min(MASK_CHUNK, lv.height - y)
            chunk = slide.read_region(x, y, w, h, level=idx)  # type: ignore[attr-defined]
            ox0, oy0 = round(x * factor), round(y * factor)
            ox1, oy1 = round((x + w) * factor), round((y + h) * factor)
            if ox1 > ox0 and oy1 > oy0:
                out[oy0:oy1, ox0:ox1] = cv2.resize(chunk, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
    return out, lv.downsample / factor


def plan_tiles(
    slide: object,
    config: TilingConfig,
    *,
    slide_id: str,
    target_mpp: float | None = None,
) -> TilePlan:
    """Plan detector tiles for ``slide`` (an open :class:`batch.slides.Slide`).

    Parameters
    ----------
    slide
        Open slide: ``info.width/height/levels/mpp`` and ``read_region``.
    config
        Tile size and overlap (detector pixels), background-skip settings.
    slide_id
        Path-safe id carried on every task.
    target_mpp
        The detector's trained mpp (``config.target_mpp`` wins if set).

    Returns
    -------
    TilePlan
        Tasks to run and tasks skipped as background; cores partition the slide.
    """
    config.validate()
    info = slide.info  # type: ignore[attr-defined]
    target = config.target_mpp if config.target_mpp is not None else target_mpp
    downsamples = [float(lv.downsample) for lv in info.levels]
    level, scale = choose_level(downsamples, info.mpp, target, min_cell_scale=config.min_cell_scale)
    lv = info.levels[level]
    ds = downsamples[level]
    # The mpp of the pixels the detector sees: the target; the level's own when the target is
    # finer than the slide; target / min_cell_scale when the slide is coarser still (upsampled).
    det_mpp = info.mpp * ds / scale if info.mpp is not None else config.fallback_mpp
    overlap_det = (
        config.overlap_px
        if config.overlap_px is not None
        else min(config.tile_size // 2 - 1, round(config.overlap_um / det_mpp))
    )
    # Level pixels: the detector sees tile_size px after resizing the read region by `scale`.
    tile = max(1, round(config.tile_size / scale))
    overlap = min(tile // 2 - 1, round(overlap_det / scale))
    overlap -= overlap % 2
    xs, xe = _axis_grid(lv.width, tile, overlap)
    ys, ye = _axis_grid(lv.height, tile, overlap)
    # Level-0 core edges; the last edge is the level-0 extent so nothing falls outside.
    x_edges = np.array([e * ds for e in xe[:-1]] + [float(info.width)], dtype=np.float64)
    y_edges = np.array([e * ds for e in ye[:-1]] + [float(info.height)], dtype=np.float64)
    x_edges[-1], y_edges[-1] = max(x_edges[-1], xe[-1] * ds), max(y_edges[-1], ye[-1] * ds)

    tasks = [
        TileTask(
            slide_id=slide_id,
            slide_uri=getattr(slide, "uri", slide_id),
            level=level,
            downsample=ds,
            row=r,
            col=c,
            x=xs[c],
            y=ys[r],
            w=tile,
            h=tile,
            core_x0=float(x_edges[c]),
            core_y0=float(y_edges[r]),
            core_x1=float(x_edges[c + 1]),
            core_y1=float(y_edges[r + 1]),
            scale=scale,
        )
        for r in range(len(ys))
        for c in range(len(xs))
    ]
    keep: list[TileTask] = tasks
    skip: list[TileTask] = []
    if config.skip_background and len(tasks) > 1:
        low, low_ds = _low_res(slide, config.mask_max_side)
        fg = foreground_mask(low, config.foreground_delta)
        integral = cv2.integral(fg.astype(np.uint8))
        f = ds / low_ds  # level pixels -> mask pixels
        keep, skip = [], []
        for t in tasks:
            x0, y0 = max(0, math.floor(t.x * f)), max(0, math.floor(t.y * f))
            x1 = min(fg.shape[1], math.ceil((t.x + t.w) * f))
            y1 = min(fg.shape[0], math.ceil((t.y + t.h) * f))
            area = max(1, (x1 - x0) * (y1 - y0))
            count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            (keep if count / area >= config.min_foreground_fraction and count > 0 else skip).append(t)
    return TilePlan(
        slide_id=slide_id,
        slide_uri=getattr(slide, "uri", slide_id),
        level=level,
        downsample=ds,
        mpp=info.mpp,
        target_mpp=target,
        scale=scale,
        tile_size=config.tile_size,
        overlap=overlap,
        stride=tile - overlap,
        x_edges=x_edges,
        y_edges=y_edges,
        tasks=tuple(keep),
        skipped=tuple(skip),
    )
