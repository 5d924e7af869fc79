"""The detector's NMS without torch (`batch.stages.netrun.yolo_nms`) against ultralytics' own.

A YOLO head's raw output is drawn at random in the shape the detector gives
(clusters of overlapping candidates, as around each cell), and both NMS
implementations must keep the very same boxes, classes and scores in the same
order: class-agnostic (the pipeline's) and class-aware, with confidence and
``max_det`` limits. The end-to-end check on a real export is in
``test_runtime.py``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from batch.stages.netrun import yolo_nms


def _head_output(seed: int, images: int = 3, anchors: int = 2000, classes: int = 3) -> npt.NDArray[np.float32]:
    """Raw ``(images, 4 + classes, anchors)`` output: candidates jittered around ~60 objects."""
    rng = np.random.default_rng(seed)
    out = np.empty((images, 4 + classes, anchors), np.float32)
    for b in range(images):
        centres = rng.uniform(20, 620, size=(60, 2))
        sizes = rng.uniform(8, 90, size=(60, 2))
        owner = rng.integers(0, 60, anchors)
        out[b, :2] = (centres[owner] + rng.normal(0, 3, (anchors, 2))).T
        out[b, 2:4] = (sizes[owner] * rng.uniform(0.8, 1.2, (anchors, 2))).T
        out[b, 4:] = rng.beta(0.5, 2.0, size=(classes, anchors))
    return out


def _ultralytics(
    pred: npt.NDArray[np.float32], *, conf: float, iou: float, max_det: int, agnostic: bool
) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
    import torch
    import torchvision  # noqa: F401  (ultralytics uses torchvision's NMS kernel when imported)
    from ultralytics.utils.nms import non_max_suppression

    found = non_max_suppression(
        torch.from_numpy(pred), conf, iou, agnostic=agnostic, max_det=max_det,
        max_time_img=float("inf"),
    )  # fmt: skip
    return [
        (f[:, :4].numpy(), f[:, 5].numpy().astype(np.int64), f[:, 4].numpy()) for f in found
    ]


@pytest.mark.parametrize("agnostic", [True, False])
@pytest.mark.parametrize(("conf", "iou", "max_det"), [(0.25, 0.6, 1000), (0.05, 0.45, 50)])
def test_yolo_nms_keeps_ultralytics_boxes(
    agnostic: bool, conf: float, iou: float, max_det: int
) -> None:
    pred = _head_output(seed=int(conf * 100) + int(agnostic))
    ours = yolo_nms(pred, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic)
    theirs = _ultralytics(pred, conf=conf, iou=iou, max_det=max_det, agnostic=agnostic)
    assert len(ours) == len(theirs) == len(pred)
    for (xyxy, cls, score), (ref_xyxy, ref_cls, ref_score) in zip(ours, theirs, strict=True):
        assert 0 < len(score) <= max_det
        assert np.array_equal(cls, ref_cls) and np.array_equal(score, ref_score)
        assert np.allclose(xyxy, ref_xyxy, atol=1e-4)
        assert (score > conf).all() and (np.diff(score) <= 0).all()
    if max_det == 50:  # the limit bites
        assert all(len(s) == 50 for _, _, s in ours)
    else:  # class-aware NMS keeps overlapping boxes of different classes that agnostic NMS merges
        other = yolo_nms(pred, conf=conf, iou=iou, max_det=max_det, agnostic=not agnostic)
        aware, merged = (other, ours) if agnostic else (ours, other)
        assert all(len(a[2]) > len(m[2]) for a, m in zip(aware, merged, strict=True))


def test_yolo_nms_with_nothing_above_the_threshold() -> None:
    pred = _head_output(seed=3)
    pred[:, 4:] = 0.01
    for xyxy, cls, score in yolo_nms(pred, conf=0.25, iou=0.6, max_det=100, agnostic=True):
        assert xyxy.shape == (0, 4) and len(cls) == len(score) == 0
