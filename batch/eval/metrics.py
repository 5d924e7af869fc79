"""Every scoring function of the evaluations and of the training jobs' reports.

Pure functions over arrays and label lists; no models, no files.

Detection scoring (``detection_metrics`` and its parts, COCO matching and AP) lives in
`batch.stages.boxscore` and is re-exported here.

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

from batch.stages.boxscore import (
    AP_CONF,
    IOU_THRESHOLDS,
    RECALL_POINTS,
    average_precision,
    detection_errors,
    detection_metrics,
    f1_score,
    match_detections,
)
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
    "detection_errors",
    "detection_metrics",
    "dice",
    "f1_score",
    "iou",
    "macro_f1",
    "match_detections",
    "precision_recall_f1",
]

#: Label of the non-malignant class for the malignant-vs-benign false-negative rate.
BENIGN_LABEL = "benign"


def precision_recall_f1(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision ``tp / n_pred``, recall ``tp / n_true`` and their F1 (0 for an empty count)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, f1_score(p, r)


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


