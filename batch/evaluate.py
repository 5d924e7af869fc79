"""Metrics and evaluation commands.

Detector evaluation (``eval_detector``) runs the pipeline's own detector stage
(``CellDetector``, with its resampling to the trained mpp) over a labelled
set and reports, overall and per class, precision, recall, F1, AP50 and
AP50-95.

Definitions (all computed here, tested in ``tests/test_detect.py``):

- Matching, per image, class and IoU threshold, COCO-style: predictions in
  descending confidence each take the unmatched ground-truth box of the same
  class with the highest IoU, if that IoU is >= the threshold.
- AP: COCO 101-point interpolated average precision: the precision envelope
  (running maximum from the right) sampled at recall 0, 0.01, ..., 1 (0 past
  the highest recall reached), averaged. AP50 at IoU 0.5; AP50-95 the mean
  over IoU 0.50:0.05:0.95. A class without ground truth is left out of the
  means (its AP is None).
- Precision, recall, F1: at the detector's operating confidence threshold
  (``conf``, what the pipeline keeps), IoU 0.5. Overall values are the
  unweighted means over classes (like mAP), F1 the harmonic mean of those.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from batch.stages.detect import DEFAULT_CONF, DETECTOR_CLASSES

if TYPE_CHECKING:
    from batch.stages.detect import CellDetector, Detections
    from batch.train_detector import LabeledImage

__all__ = [
    "AP_CONF",
    "IOU_THRESHOLDS",
    "average_precision",
    "box_iou",
    "detection_metrics",
    "eval_detector",
    "evaluate_images",
    "match_detections",
]

log = logging.getLogger(__name__)

#: IoU thresholds of AP50-95.
IOU_THRESHOLDS: npt.NDArray[np.float64] = np.round(np.linspace(0.5, 0.95, 10), 2)
#: Confidence threshold of the predictions collected for AP (low, so the PR curve is whole).
AP_CONF = 0.001
#: Recall points of the COCO interpolation.
RECALL_POINTS: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 101)


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Pairwise IoU of ``xyxy`` boxes: ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    iw = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(
        0
    )
    ih = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])).clip(
        0
    )
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(
    pred_boxes: npt.ArrayLike,
    pred_classes: npt.ArrayLike,
    pred_scores: npt.ArrayLike,
    gt_boxes: npt.ArrayLike,
    gt_classes: npt.ArrayLike,
    iou_thresholds: Sequence[float] | npt.NDArray[np.float64] = IOU_THRESHOLDS,
) -> npt.NDArray[np.bool_]:
    """Mark each prediction of one image as a true positive at each IoU threshold.

    Predictions are taken in descending confidence; each claims the
    unmatched ground-truth box of its class with the highest IoU if that IoU
    reaches the threshold (COCO's rule).

    Returns
    -------
    ndarray of bool
        ``(N_pred, len(iou_thresholds))``, rows in the input order.
    """
    pb = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    pc = np.asarray(pred_classes).reshape(-1)
    ps = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    gb = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gc = np.asarray(gt_classes).reshape(-1)
    thr = np.asarray(iou_thresholds, dtype=np.float64)
    tp = np.zeros((len(pb), len(thr)), dtype=bool)
    if not len(pb) or not len(gb):
        return tp
    iou = box_iou(pb, gb)
    iou[pc[:, None] != gc[None, :]] = -1.0
    order = np.argsort(-ps, kind="stable")
    for t, threshold in enumerate(thr):
        taken = np.zeros(len(gb), dtype=bool)
        for i in order:
            cand = np.where(taken, -1.0, iou[i])
            j = int(np.argmax(cand))
            if cand[j] >= threshold:
                taken[j] = True
                tp[i, t] = True
    return tp


def average_precision(tp: npt.ArrayLike, scores: npt.ArrayLike, n_gt: int) -> float:
    """COCO 101-point interpolated AP of one class at one IoU threshold.

    Parameters
    ----------
    tp
        True-positive flag of each prediction.
    scores
        Confidence of each prediction.
    n_gt
        Ground-truth boxes of the class (must be > 0).
    """
    if n_gt <= 0:
        raise ValueError("average precision needs at least one ground-truth box")
    tp_arr = np.asarray(tp, dtype=bool).reshape(-1)
    if not tp_arr.size:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable")
    hits = tp_arr[order]
    ctp = np.cumsum(hits)
    cfp = np.cumsum(~hits)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(sampled.mean())


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def detection_metrics(
    predictions: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    ground_truth: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    class_names: Sequence[str],
    *,
    conf: float = DEFAULT_CONF,
) -> dict[str, Any]:
    """Overall and per-class detection metrics over a set of images.

    Parameters
    ----------
    predictions
        Per image ``(boxes xyxy, class ids, scores)``; collect them at a low
        confidence (``AP_CONF``) so the AP's precision-recall curve is whole.
    ground_truth
        Per image ``(boxes xyxy, class ids)``, ids into ``class_names``.
    class_names
        Names by id.
    conf
        Operating threshold for precision, recall and F1.

    Returns
    -------
    dict
        ``map50``, ``map50_95``, ``precision``, ``recall``, ``f1``, ``conf``,
        ``n_images`` and ``per_class.{name}.{ap50, ap50_95, precision,
        recall, f1, n_gt, n_pred}``.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction sets for {len(ground_truth)} images")
    tps, scores, classes = [], [], []
    gt_counts = np.zeros(len(class_names), dtype=np.int64)
    for (pb, pc, ps), (gb, gc) in zip(predictions, ground_truth, strict=True):
        pc_arr = np.asarray(pc, dtype=np.int64).reshape(-1)
        gc_arr = np.asarray(gc, dtype=np.int64).reshape(-1)
        tps.append(match_detections(pb, pc_arr, ps, gb, gc_arr))
        scores.append(np.asarray(ps, dtype=np.float64).reshape(-1))
        classes.append(pc_arr)
        gt_counts += np.bincount(gc_arr, minlength=len(class_names))[: len(class_names)]
    tp = np.concatenate(tps) if tps else np.zeros((0, len(IOU_THRESHOLDS)), bool)
    sc = np.concatenate(scores) if scores else np.zeros(0)
    cl = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        sel = cl == k
        n_gt = int(gt_counts[k])
        kept = sel & (sc >= conf)
        n_tp = int(tp[kept, 0].sum())
        n_pred = int(kept.sum())
        precision = n_tp / n_pred if n_pred else 0.0
        recall = n_tp / n_gt if n_gt else 0.0
        ap50: float | None = None
        ap50_95: float | None = None
        if n_gt:
            aps = [average_precision(tp[sel, t], sc[sel], n_gt) for t in range(tp.shape[1])]
            ap50, ap50_95 = aps[0], float(np.mean(aps))
        per_class[name] = {
            "ap50": ap50,
            "ap50_95": ap50_95,
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "n_gt": n_gt,
            "n_pred": n_pred,
        }
    present = [c for c in per_class.values() if c["n_gt"] > 0]

    def mean(key: str) -> float:
        return float(np.mean([c[key] for c in present])) if present else 0.0

    p, r = mean("precision"), mean("recall")
    return {
        "map50": mean("ap50"),
        "map50_95": mean("ap50_95"),
        "precision": p,
        "recall": r,
        "f1": _f1(p, r),
        "conf": conf,
        "n_images": len(ground_truth),
        "per_class": per_class,
    }


def evaluate_images(
    detector: CellDetector,
    images: Sequence[LabeledImage],
    *,
    mpp: float | str | None = None,
    conf: float | None = None,
) -> dict[str, Any]:
    """Detection metrics of ``detector`` on labelled images.

    Parameters
    ----------
    detector
        The detector stage to evaluate.
    images
        Labelled images (``batch.train_detector.read_detection_dataset``).
    mpp
        Scale of the images: a number for all of them; otherwise an image's
        own known ``mpp`` if it has one, else, with ``"labels"`` or None,
        the scale its labelled RBCs give (``estimate_mpp_from_rbc``; an
        oracle for the scale only, so the metrics measure detection), or with
        ``"auto"`` the detector's own estimate (``CellDetector.estimate_mpp``,
        experimental: see its docstring).
    conf
        Operating threshold for precision / recall / F1 (default: the detector's).

    Returns
    -------
    dict
        ``detection_metrics`` output plus ``mpp_mode``, ``mpp_median`` and
        ``mpp_unresolved`` (images whose scale could not be estimated and
        were used as given).
    """
    from batch.stages.detect import estimate_mpp_from_rbc

    names = list(detector.class_names)
    preds: list[tuple[Any, Any, Any]] = []
    gts: list[tuple[Any, Any]] = []
    used_mpp: list[float] = []
    unresolved = 0
    skipped_classes: set[str] = set()
    for im in images:
        rgb = im.read_rgb()
        image_mpp: float | None
        if isinstance(mpp, (int, float)):
            image_mpp = float(mpp)
        elif im.mpp is not None:
            image_mpp = im.mpp  # the image's own, known scale
        elif mpp is None or mpp == "labels":
            image_mpp = estimate_mpp_from_rbc(
                im.boxes, im.classes, image_shape=(im.height, im.width)
            )
        elif mpp == "auto":
            image_mpp = detector.estimate_mpp(rgb)
        else:
            raise ValueError(f"mpp must be a number, 'labels', 'auto' or None; got {mpp!r}")
        if image_mpp is None:
            unresolved += 1
        else:
            used_mpp.append(image_mpp)
        det: Detections = detector.detect([rgb], image_mpp, conf=AP_CONF)[0]
        preds.append((det.boxes, det.class_ids, det.scores))
        keep = [i for i, c in enumerate(im.classes) if c in names]
        skipped_classes.update(c for c in im.classes if c not in names)
        gts.append(
            (im.boxes[keep], np.asarray([names.index(im.classes[i]) for i in keep], np.int64))
        )
    if skipped_classes:
        log.warning(
            "ground-truth classes unknown to the model ignored: %s", sorted(skipped_classes)
        )
    result = detection_metrics(preds, gts, names, conf=detector.conf if conf is None else conf)
    result["mpp_mode"] = "labels" if mpp is None else mpp
    result["mpp_median"] = float(np.median(used_mpp)) if used_mpp else None
    result["mpp_unresolved"] = unresolved
    return result


def _select_split(
    images: Sequence[LabeledImage], split: str | None
) -> tuple[list[LabeledImage], str]:
    present = {im.split for im in images}
    if split is None:
        split = "val" if "val" in present else "all" if "all" in present else sorted(present)[0]
    chosen = [im for im in images if im.split == split]
    if not chosen:
        raise ValueError(f"no images in split {split!r}; splits present: {sorted(present)}")
    return chosen, split


def eval_detector(
    data_dir: str | Path,
    model: str | Path | CellDetector | None = None,
    *,
    mpp: float | str | None = None,
    split: str | None = None,
    conf: float | None = None,
    device: str = "auto",
    batch_size: int = 8,
    max_images: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a detector on a labelled YOLO or Pascal VOC set.

    Parameters
    ----------
    data_dir
        VOC (``Annotations/``, ``JPEGImages/``, optional ``ImageSets/val.txt``)
        or YOLO (``images/``, ``labels/``, optional ``train``/``val``
        subfolders, ``data.yaml`` with class names).
    model
        A ``CellDetector``, a weights path / URL, or None for the shipped detector.
    mpp
        Microns per pixel of the images (a number); None or ``"labels"``: each
        image's scale from its labelled RBCs (the sets carry no scale);
        ``"auto"``: the detector's own estimate (experimental). See
        ``evaluate_images``.
    split
        Which split to evaluate; default ``val`` if present, else the whole set.
    conf
        Operating confidence threshold for precision / recall / F1.
    device, batch_size
        Passed to ``CellDetector`` when ``model`` is not one.
    max_images
        Evaluate only the first N images of the split (sorted by path).
    storage_options
        fsspec options for a remote ``model``.

    Returns
    -------
    dict
        ``map50``, ``map50_95``, ``precision``, ``recall``, ``f1``,
        ``per_class.{RBC,WBC,platelet}.{ap50, ap50_95, precision, recall, f1,
        n_gt, n_pred}``, ``n_images``, ``split``, ``data``, ``model``,
        ``model_sha256``, ``trained_mpp``, ``mpp_mode``.
    """
    from batch.stages.detect import CellDetector
    from batch.train_detector import read_detection_dataset

    detector = (
        model
        if isinstance(model, CellDetector)
        else CellDetector(
            model, device=device, batch_size=batch_size, storage_options=storage_options
        )
    )
    images, split = _select_split(read_detection_dataset(data_dir), split)
    images = sorted(images, key=lambda im: str(im.path))
    if max_images is not None:
        images = images[:max_images]
    result = evaluate_images(detector, images, mpp=mpp, conf=conf)
    result.update(
        {
            "split": split,
            "data": str(data_dir),
            "model": str(detector.weights_path),
            "model_sha256": detector.sha256,
            "trained_mpp": detector.trained_mpp,
        }
    )
    return result


# The class order of the project's own detectors, for callers building ground truth.
CLASS_NAMES = DETECTOR_CLASSES
