"""Every scoring function of the evaluations and of the training jobs' reports.

Pure functions over arrays and label lists; no models, no files.

Detection (``detection_metrics`` and its parts), the definitions the
project's detector metrics use:

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

Classification: ``classification_metrics`` (per-class P / R / F1 / FNR,
malignant-vs-benign FNR, MAE, confusion) and ``macro_f1`` (image-level calls
as label strings). Segmentation: ``dice`` and ``iou`` of boolean masks.
Precision, recall and F1 from counts are computed in one place,
``precision_recall_f1`` / ``f1_score``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import DetectConfig
from batch.stages.parity import box_iou, detection_parity

__all__ = [
    "detection_parity",
    "AP_CONF",
    "BENIGN_LABEL",
    "IOU_THRESHOLDS",
    "RECALL_POINTS",
    "average_precision",
    "box_iou",
    "classification_metrics",
    "detection_metrics",
    "dice",
    "f1_score",
    "iou",
    "macro_f1",
    "match_detections",
    "precision_recall_f1",
]

#: IoU thresholds of AP50-95.
IOU_THRESHOLDS: npt.NDArray[np.float64] = np.round(np.linspace(0.5, 0.95, 10), 2)
#: Confidence threshold of the predictions collected for AP (low, so the PR curve is whole).
AP_CONF = 0.001
#: Recall points of the COCO interpolation.
RECALL_POINTS: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 101)
#: Label of the non-malignant class for the malignant-vs-benign false-negative rate.
BENIGN_LABEL = "benign"


def f1_score(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def precision_recall_f1(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision ``tp / n_pred``, recall ``tp / n_true`` and their F1 (0 for an empty count)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, f1_score(p, r)


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


def detection_metrics(
    predictions: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    ground_truth: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    class_names: Sequence[str],
    *,
    conf: float = DetectConfig.conf,
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
            "f1": f1_score(precision, recall),
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
        "f1": f1_score(p, r),
        "conf": conf,
        "n_images": len(ground_truth),
        "per_class": per_class,
    }


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class P / R / F1 / FNR, malignant-vs-benign FNR, MAE, confusion.

    Parameters
    ----------
    y_true, y_pred
        Class indices into ``class_names``.
    class_names
        Labels in index order.

    Returns
    -------
    dict
        JSON-serialisable metrics. ``confusion_matrix[i][j]`` counts true
        class ``i`` predicted as ``j``. ``mae_class_index`` is the mean
        absolute difference of class indices (seed 000's MAE; meaningful only
        when the label order is ordinal). ``malignant_vs_benign`` is present
        when a class named ``benign`` exists: positives are all other classes.
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "false_negative_rate": float(1 - recall[i]) if present[i] else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    n = int(t.size)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float((t == p).mean()) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "false_negative_rate_macro": float((1 - recall[present]).mean()) if present.any() else 0.0,
        "mae_class_index": float(np.abs(t - p).mean()) if n else 0.0,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
    }
    lower = [c.lower() for c in class_names]
    if BENIGN_LABEL in lower:
        b = lower.index(BENIGN_LABEL)
        malignant = t != b
        missed = malignant & (p == b)
        benign = t == b
        out["malignant_vs_benign"] = {
            "benign_class": class_names[b],
            "n_malignant": int(malignant.sum()),
            "n_benign": int(benign.sum()),
            "false_negative_rate": float(missed.sum() / malignant.sum())
            if malignant.any()
            else None,
            "false_positive_rate": float((benign & (p != b)).sum() / benign.sum())
            if benign.any()
            else None,
        }
    return out


def macro_f1(
    truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]
) -> tuple[float, dict[str, dict[str, float]]]:
    """Macro F1 over ``labels`` of label-string predictions, and per-label P / R / F1 / support.

    A prediction outside ``labels`` (e.g. ``no_call``) is a false negative of
    its true label. Per-label values are rounded to 4 decimals; the macro F1
    is the mean of those rounded values.
    """
    per: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(truth, pred, strict=True))
        fp = sum(t != lab and p == lab for t, p in zip(truth, pred, strict=True))
        fn = sum(t == lab and p != lab for t, p in zip(truth, pred, strict=True))
        prec, rec, f1 = precision_recall_f1(tp, tp + fp, tp + fn)
        per[lab] = {
            "precision": round(prec, 4),
            "recall": round(rec, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
        }
    return float(np.mean([v["f1"] for v in per.values()])) if per else 0.0, per


def dice(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Dice coefficient ``2|A & B| / (|A| + |B|)`` of two boolean masks (1.0 when both are empty)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"mask shapes differ: {x.shape} vs {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


def iou(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Intersection over union ``|A & B| / |A | B|`` of two boolean masks (1.0 when both are empty)."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"mask shapes differ: {x.shape} vs {y.shape}")
    union = int((x | y).sum())
    return 1.0 if union == 0 else int((x & y).sum()) / union


