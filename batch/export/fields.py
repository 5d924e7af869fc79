"""Image fields around chosen cells and WBC crops, cut from the slide at the detector's scale.

A *field* is a square of ``size`` pixels at the pipeline's detector scale
(``factor`` level-0 pixels per field pixel, from `batch.tiling.choose_level`) centred on a
chosen cell (shifted to stay inside the slide when the slide is larger than
the field). Chosen cells are visited in rank order and a cell whose box
already lies inside an earlier field gets no field of its own, so dense
selections share fields. Every detection whose box centre falls in a field is
annotated there, its box clipped to the field.

A *crop* is the pipeline's WBC crop: `batch.stages.crop.crop_wbcs` with the
run's ``segmentation.crop_margin`` on the detector-scale image, so an
exported crop has the geometry and scale the classifier saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from batch.export.source import read_scaled
from batch.slides import Slide
from batch.stages.crop import WHITE, crop_regions, crop_wbcs

__all__ = ["DEFAULT_FIELD_PX", "Field", "plan_fields", "read_crop", "read_field"]

#: Default field side in pixels at the detector's scale (the detector's training canvas).
DEFAULT_FIELD_PX = 640
#: Detector-scale pixels read around a crop region, so the crop never needs padding.
CROP_CONTEXT_PX = 4


@dataclass(frozen=True)
class Field:
    """A square field: level-0 origin, level-0 pixels per field pixel, side, and its cells.

    ``boxes`` are the annotated cells' boxes in field pixels (clipped), in
    the row order of ``cells``.
    """

    name: str
    x0: float
    y0: float
    factor: float
    size: int
    cells: pd.DataFrame
    boxes: npt.NDArray[np.float64]


def _origin(centre: float, side: float, extent: float) -> float:
    start = centre - side / 2
    if extent >= side:
        start = min(max(start, 0.0), extent - side)
    return float(np.floor(start))


def plan_fields(
    slide_id: str,
    chosen: pd.DataFrame,
    cells: pd.DataFrame,
    *,
    factor: float,
    size: int,
    slide_size: tuple[int, int],
) -> Iterator[Field]:
    """Fields for one slide's chosen cells (in their order), each with every cell it holds.

    Parameters
    ----------
    chosen
        The chosen cells (``cell_id``, level-0 box), in review order.
    cells
        All the slide's cells (what a field annotates).
    factor
        Level-0 pixels per field pixel (detector mpp / slide mpp).
    size
        Field side in field pixels.
    slide_size
        Level-0 width and height.
    """
    side = size * factor
    boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    made: list[tuple[float, float]] = []
    chosen_boxes = chosen[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    for cell_id, (bx0, by0, bx1, by1) in zip(
        chosen["cell_id"].astype(str), chosen_boxes, strict=True
    ):
        if any(
            fx <= bx0 and fy <= by0 and bx1 <= fx + side and by1 <= fy + side for fx, fy in made
        ):
            continue
        fx = _origin((bx0 + bx1) / 2, side, slide_size[0])
        fy = _origin((by0 + by1) / 2, side, slide_size[1])
        made.append((fx, fy))
        inside = (cx >= fx) & (cx < fx + side) & (cy >= fy) & (cy < fy + side)
        local = (boxes[inside] - [fx, fy, fx, fy]) / factor
        local = np.clip(local, 0, size)
        yield Field(
            name=f"{slide_id}_{cell_id[:16]}",
            x0=fx,
            y0=fy,
            factor=factor,
            size=size,
            cells=cells[inside].reset_index(drop=True),
            boxes=local,
        )


def read_field(slide: Slide, field: Field) -> npt.NDArray[np.uint8]:
    """The field's pixels (``size x size`` RGB)."""
    return read_scaled(slide, field.x0, field.y0, field.size, field.size, field.factor)


def read_crop(
    slide: Slide, box: npt.ArrayLike, *, factor: float, margin: float
) -> npt.NDArray[np.uint8]:
    """The pipeline's crop of one level-0 ``box`` at ``factor`` level-0 pixels per crop pixel."""
    det_box = np.asarray(box, dtype=np.float64).reshape(1, 4) / factor
    rx0, ry0, rx1, ry1 = (int(v) for v in crop_regions(det_box, margin=margin)[0])
    ox, oy = rx0 - CROP_CONTEXT_PX, ry0 - CROP_CONTEXT_PX
    width = rx1 - rx0 + 2 * CROP_CONTEXT_PX
    height = ry1 - ry0 + 2 * CROP_CONTEXT_PX
    image = read_scaled(slide, ox * factor, oy * factor, width, height, factor)
    local = det_box - [ox, oy, ox, oy]
    return crop_wbcs(image, local, margin=margin, background=WHITE)[0]
