"""Classifier and detector input preparation shared by inference, training and evaluation.

- `resample`: resize an image by a scale factor (the detector's resampling
  of every tile to its trained mpp, and the classifier datasets' resampling
  from their source mpp);
- `prepare_crop`: turn one dataset image (a single-cell photo, or a crop cut
  around a detector box) into the crop and cell mask the pipeline would give
  the classifier; training renders its dataset with it and classifier
  evaluation prepares its images with it, so both see what a run sees;
- `inner_box`: the detector box a crop was cut around.

Arrays in, arrays out; nothing here knows about Ray, training or evaluation.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig
from batch.stages.crop import crop_regions, crop_wbcs
from batch.stages.segment import segment_wbc

__all__ = ["SCALE_TOLERANCE", "inner_box", "prepare_crop", "resample"]

#: Relative scale change below which an image is not resampled.
SCALE_TOLERANCE = 1e-3


def resample(image: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    """Resize an image by ``factor`` (area interpolation when shrinking, linear when enlarging).

    A factor within ``SCALE_TOLERANCE`` of 1 returns the image itself.
    """
    if abs(factor - 1.0) < SCALE_TOLERANCE:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, size, interpolation=interp), dtype=np.uint8)


def inner_box(height: int, width: int, margin: float) -> tuple[float, float, float, float]:
    """The box a crop of ``height`` x ``width`` was cut around with ``margin`` (`crop_wbcs`).

    Exact up to the crop's outward rounding (under a pixel).
    """
    fx, fy = margin / (1 + 2 * margin) * width, margin / (1 + 2 * margin) * height
    return (fx, fy, width - fx, height - fy)


def prepare_crop(
    image: npt.NDArray[np.uint8],
    *,
    scale: float = 1.0,
    mpp: float | None = None,
    recrop: bool = False,
    margin: float = SegmentationConfig.crop_margin,
    box_margin: float | None = None,
    needs_mask: bool = True,
    seg_config: SegmentationConfig | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None, bool]:
    """Turn one dataset image into a pipeline-like crop and its cell mask.

    The mask is segmented as the pipeline does it: on the crop, with the
    cell's box (``cell_box``) when it is known.

    Parameters
    ----------
    image
        RGB image.
    scale
        Resize factor applied first (source mpp / target mpp).
    mpp
        Microns per pixel *after* resizing (needed to segment).
    recrop
        The image holds one centred cell (PBC): segment it (keeping the
        nucleus that reaches the image's central part), and cut the image
        down to the cell's box grown by ``margin``, as
        `batch.stages.crop.crop_wbcs` does with a detector box.
    margin
        Margin of that re-crop.
    box_margin
        The images already are crops cut with this margin around a detector
        box (`batch.train.weak_labels` crops): the box is recovered with `inner_box`.
    needs_mask
        Segment the final crop (the ``mask`` and ``dual`` modes).
    seg_config
        Segmentation parameters.

    Returns
    -------
    crop, mask, found
        The crop, its cell mask (None when not needed) and whether a
        nucleus was found (False: the mask is empty).
    """
    img = resample(image, scale)
    found = True
    cell_box: tuple[float, float, float, float] | None = None
    if box_margin is not None:
        cell_box = inner_box(img.shape[0], img.shape[1], box_margin)
    if recrop:
        if mpp is None:
            raise ValueError("recrop needs the images' mpp")
        h, w = img.shape[:2]
        seg = segment_wbc(img, mpp=mpp, config=seg_config, cell_box=(0.0, 0.0, w, h))
        if seg.found:
            ys, xs = np.nonzero(seg.cell_mask)
            box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
            x0, y0 = crop_regions(box, margin=margin)[0, :2].tolist()
            img = crop_wbcs(img, box, margin=margin)[0]
            cell_box = (box[0, 0] - x0, box[0, 1] - y0, box[0, 2] - x0, box[0, 3] - y0)
        else:
            found = False
    mask: npt.NDArray[np.bool_] | None = None
    if needs_mask:
        if mpp is None:
            raise ValueError("the mask and dual input modes need the images' mpp")
        seg = segment_wbc(img, mpp=mpp, config=seg_config, cell_box=cell_box)
        mask = seg.cell_mask
        found = found and seg.found
    return img, mask, found
