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
    pred: npt.NDArray[np.float32], *, conf: float, iou: float, max_det: int, agnostic: bool,
    multi_label: bool = False,
) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]]]:  # fmt: skip
    import torch
    import torchvision  # noqa: F401  (ultralytics uses torchvision's NMS kernel when imported)
    from ultralytics.utils.nms import non_max_suppression

    found = non_max_suppression(
        torch.from_numpy(pred), conf, iou, agnostic=agnostic, max_det=max_det,
        max_time_img=float("inf"), multi_label=multi_label,
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


@pytest.mark.parametrize(("conf", "max_det"), [(0.25, 3000), (0.001, 300)])
def test_per_class_nms_keeps_ultralytics_validation_boxes(conf: float, max_det: int) -> None:
    """``per_class`` is ultralytics' validator's NMS: every class above ``conf``, class-aware."""
    pred = _head_output(seed=7)
    ours = yolo_nms(pred, conf=conf, iou=0.7, max_det=max_det, agnostic=True, per_class=True)
    theirs = _ultralytics(pred, conf=conf, iou=0.7, max_det=max_det, agnostic=False, multi_label=True)
    one_label = yolo_nms(pred, conf=conf, iou=0.7, max_det=max_det, agnostic=False)
    for (xyxy, cls, score), (ref_xyxy, ref_cls, ref_score), (_, _, single) in zip(
        ours, theirs, one_label, strict=True
    ):
        assert np.array_equal(cls, ref_cls) and np.array_equal(score, ref_score)
        assert np.allclose(xyxy, ref_xyxy, atol=1e-4)
        # A box's second and third classes are candidates of their own.
        assert len(score) > len(single) or len(score) == max_det
        assert set(cls.tolist()) == {0, 1, 2}


def test_yolo_nms_with_nothing_above_the_threshold() -> None:
    pred = _head_output(seed=3)
    pred[:, 4:] = 0.01
    for xyxy, cls, score in yolo_nms(pred, conf=0.25, iou=0.6, max_det=100, agnostic=True):
        assert xyxy.shape == (0, 4) and len(cls) == len(score) == 0


def _opencv_loop(
    boxes: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou: float,
    classes: npt.NDArray[np.int64] | None,
) -> npt.NDArray[np.intp]:  # fmt: skip
    """OpenCV's ``NMSBoxes`` as the pipeline called it before the grid (classes offset apart)."""
    import cv2

    xywh = np.array(boxes, np.float64)
    if classes is not None:
        xywh += (classes * 7680.0)[:, None]
    xywh[:, 2:] -= xywh[:, :2]
    return np.asarray(cv2.dnn.NMSBoxes(xywh, scores, 0.0, iou), np.intp).reshape(-1)


def _clusters(rng: np.random.Generator, n: int, spread: float, size: tuple[float, float]):
    """``n`` candidate boxes jittered around ``n // 6`` objects on a 640 px tile, and scores."""
    k = max(1, n // 6)
    owner = rng.integers(0, k, n)
    centre = rng.uniform(0, 640, (k, 2))[owner] + rng.normal(0, spread, (n, 2))
    side = rng.uniform(*size, (k, 2))[owner] * rng.uniform(0.7, 1.3, (n, 2))
    boxes = np.concatenate([centre - side / 2, centre + side / 2], 1).astype(np.float32)
    return boxes, rng.uniform(0.25, 1, n).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_grid_nms_keeps_what_the_opencv_loop_keeps(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grid NMS keeps the very boxes, in the same order, as OpenCV's loop it replaced.

    Random clusters of every density and box size, IoU thresholds from loose
    to strict, tied scores, class-aware and agnostic; and the inputs the grid
    hands back to OpenCV (degenerate sizes, a pile on one spot, a chain of
    suppressions longer than its rounds).
    """
    from batch.stages import netrun
    from batch.stages.netrun import GRID_MAX_ROUNDS, _greedy_nms

    handed_back: list[int] = []
    opencv = netrun._opencv_nms
    monkeypatch.setattr(
        netrun, "_opencv_nms", lambda b, c, iou: handed_back.append(len(b)) or opencv(b, c, iou)
    )
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(40):
        boxes, scores = _clusters(
            rng, int(rng.integers(1, 3000)), rng.uniform(0.5, 8), (5, float(rng.uniform(10, 120)))
        )
        if rng.random() < 0.3:
            scores = np.round(scores, 2)  # ties: the first box given wins, as in OpenCV
        classes = rng.integers(0, 3, len(boxes)) if rng.random() < 0.5 else None
        cases.append((boxes, scores, float(rng.choice([0.3, 0.45, 0.6, 0.7, 0.9])), classes))
    points, point_scores = _clusters(rng, 300, 4.0, (0.0, 0.0))  # zero-size boxes
    pile = np.tile(np.float32([[100, 100, 140, 140]]), (2000, 1)) + rng.normal(0, 0.5, (2000, 4))
    # A chain: each box overlaps the next enough to suppress it, and the next is less sure.
    chain_n = 2 * GRID_MAX_ROUNDS + 20
    chain = np.stack([np.arange(chain_n) * 8.0, np.zeros(chain_n), np.arange(chain_n) * 8.0 + 40,
                      np.full(chain_n, 40.0)], 1).astype(np.float32)  # fmt: skip
    cases += [
        (points, point_scores, 0.6, None),
        (pile.astype(np.float32), rng.uniform(0.3, 1, 2000).astype(np.float32), 0.6, None),
        (chain, np.linspace(0.9, 0.3, chain_n, dtype=np.float32), 0.6, None),
    ]
    kept_any = 0
    for i, (boxes, scores, iou, classes) in enumerate(cases):
        if i == len(cases) - 3:
            assert len(handed_back) <= 4  # the grid settled the random cases itself, nearly all
            handed_back.clear()

        ours = _greedy_nms(boxes, scores, iou, classes)
        theirs = _opencv_loop(boxes, scores, iou, classes)
        assert np.array_equal(ours, theirs), (len(boxes), iou, classes is not None)
        kept_any += int(0 < len(ours) < len(boxes))
    assert kept_any >= 30  # the cases suppress something and keep something
    assert handed_back == [300, 2000, chain_n]  # the last three went to OpenCV
    chain_kept = _greedy_nms(chain, np.linspace(0.9, 0.3, chain_n, dtype=np.float32), 0.6)
    assert np.array_equal(chain_kept, np.arange(0, chain_n, 2))  # every other link survives
