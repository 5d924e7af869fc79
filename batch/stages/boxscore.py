"""How a detector's boxes are scored: canonical class names, COCO matching and AP.

In the stages layer because an export's check (`batch.stages.runtime`) scores
networks on ground truth; `batch.eval.metrics` re-exports all of it.

Detection (``detection_metrics`` and its parts), the definitions the
project's detector metrics use:

- Matching, per image, class and IoU threshold, COCO-style: predictions in
  descending confidence each take the unmatched ground-truth box of the same
  class with the highest IoU, if that IoU is >= the threshold.
- AP candidates: what ``detection_metrics`` is given as ``candidates``, in
  `batch.eval.detector` every class a box scores above ``AP_CONF``, each
  suppressed only within its class (ultralytics' validation protocol, whose
  AP is what YOLO figures are quoted in). A run keeps one label per box; its
  own AP (``*_one_label``) is reported beside.
- AP: COCO 101-point interpolated average precision: the precision envelope
  (running maximum from the right) sampled at recall 0, 0.01, ..., 1 (0 past
  the highest recall reached), averaged. AP50 at IoU 0.5; AP50-95 the mean
  over IoU 0.50:0.05:0.95. A class without ground truth is left out of the
  means (its AP is None).
- Precision, recall, F1: at the detector's operating confidence threshold
  (``conf``, what the pipeline keeps), IoU 0.5. Overall values are the
  unweighted means over classes (like mAP), F1 the harmonic mean of those.
- Errors (``detection_errors``): at the same operating point, each labelled
  box no prediction claimed ("missed") and each prediction that claimed no
  label ("false"), with what overlaps it most from the other side, so a
  person can see which errors are the model's and which are the labels'.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from batch.config import DetectConfig
from batch.stages.parity import box_iou

__all__ = [
    "AP_CONF",
    "DETECTOR_CLASSES",
    "IOU_THRESHOLDS",
    "RECALL_POINTS",
    "average_precision",
    "detection_errors",
    "detection_metrics",
    "f1_score",
    "match_detections",
    "normalize_class_name",
]

#: Canonical detector class names, in the id order of the project's own models.
DETECTOR_CLASSES: tuple[str, ...] = ("RBC", "WBC", "platelet")
#: IoU thresholds of AP50-95.
IOU_THRESHOLDS: npt.NDArray[np.float64] = np.round(np.linspace(0.5, 0.95, 10), 2)
#: Confidence threshold of the predictions collected for AP (low, so the PR curve is whole).
AP_CONF = 0.001
#: Recall points of the COCO interpolation.
RECALL_POINTS: npt.NDArray[np.float64] = np.linspace(0.0, 1.0, 101)
_ALIASES = {
    "rbc": "RBC",
    "redbloodcell": "RBC",
    "erythrocyte": "RBC",
    "wbc": "WBC",
    "whitebloodcell": "WBC",
    "leukocyte": "WBC",
    "platelet": "platelet",
    "platelets": "platelet",
    "plt": "platelet",
    "thrombocyte": "platelet",
}



def normalize_class_name(name: str) -> str:
    """Map a dataset's or model's class name to the canonical one.

    ``"Platelets"``, ``"platelet"`` -> ``"platelet"``; ``"rbc"`` -> ``"RBC"``;
    ``"White Blood Cell"`` -> ``"WBC"``. Unknown names are returned stripped
    but otherwise unchanged.
    """
    key = re.sub(r"[^a-z]", "", name.lower())
    return _ALIASES.get(key, name.strip())



def f1_score(precision: float, recall: float) -> float:
    """Harmonic mean of precision and recall (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


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
        tp[:, t] = _claim(iou, order, float(threshold))[0]
    return tp


def _claim(
    iou: npt.NDArray[np.float64], order: npt.NDArray[np.int64], threshold: float
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """COCO's greedy claim: (predictions that claimed a label, labels claimed)."""
    hit = np.zeros(iou.shape[0], dtype=bool)
    taken = np.zeros(iou.shape[1], dtype=bool)
    if not iou.size:
        return hit, taken
    for i in order:
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] >= threshold:
            taken[j] = True
            hit[i] = True
    return hit, taken


def detection_errors(
    predictions: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    ground_truth: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    class_names: Sequence[str],
    *,
    conf: float = DetectConfig.conf,
    iou_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Every error of a detector at its operating point, box by box.

    The matching is ``match_detections``' at ``iou_threshold`` over the
    predictions with score >= ``conf`` (what ``detection_metrics`` counts
    for precision and recall).

    Returns
    -------
    list of dict
        One per error: ``image`` (index), ``kind`` (``"missed"``: a labelled
        box no prediction of its class claimed; ``"false"``: a prediction
        that claimed no label), ``class``, ``box`` (xyxy), ``score`` (false
        ones), and ``nearest``: the box of the other side (a kept prediction
        of any class for a missed label, a label of any class for a false
        prediction) with the highest IoU, as ``{"class", "iou", "score"}``,
        or None when nothing overlaps. A missed WBC whose nearest is an RBC
        prediction at IoU 0.9 was boxed but called RBC; a false WBC whose
        nearest is an RBC label at 0.9 is a cell the labels call RBC.
    """
    errors: list[dict[str, Any]] = []
    for index, ((pb, pc, ps), (gb, gc)) in enumerate(zip(predictions, ground_truth, strict=True)):
        scores = np.asarray(ps, dtype=np.float64).reshape(-1)
        keep = scores >= conf
        pbox = np.asarray(pb, dtype=np.float64).reshape(-1, 4)[keep]
        pcls = np.asarray(pc, dtype=np.int64).reshape(-1)[keep]
        scores = scores[keep]
        gbox = np.asarray(gb, dtype=np.float64).reshape(-1, 4)
        gcls = np.asarray(gc, dtype=np.int64).reshape(-1)
        overlap = box_iou(pbox, gbox)  # (0, M) / (N, 0) when a side is empty
        same = np.where(pcls[:, None] == gcls[None, :], overlap, -1.0)
        hit, taken = _claim(same, np.argsort(-scores, kind="stable"), iou_threshold)

        def nearest(row: npt.NDArray[np.float64], names: Any, score: Any) -> dict[str, Any] | None:
            if not row.size or row.max() <= 0:
                return None
            j = int(np.argmax(row))
            return {
                "class": class_names[int(names[j])],
                "iou": round(float(row[j]), 4),
                "score": None if score is None else round(float(score[j]), 4),
            }

        for j in np.flatnonzero(~taken):
            errors.append({
                "image": index, "kind": "missed", "class": class_names[int(gcls[j])],
                "box": [round(float(v), 2) for v in gbox[j]], "score": None,
                "nearest": nearest(overlap[:, j], pcls, scores),
            })  # fmt: skip
        for i in np.flatnonzero(~hit):
            errors.append({
                "image": index, "kind": "false", "class": class_names[int(pcls[i])],
                "box": [round(float(v), 2) for v in pbox[i]], "score": round(float(scores[i]), 4),
                "nearest": nearest(overlap[i], gcls, None),
            })  # fmt: skip
    return errors


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
    candidates: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]] | None = None,
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
    candidates
        Per image, the boxes the AP is measured on instead of ``predictions``:
        every class a box scores (``CellDetector.detect(per_class=True)``),
        ultralytics' and COCO's protocol. ``predictions`` (one label per box,
        as a run keeps cells) still give precision, recall and F1, and their
        own AP as ``map50_one_label`` and ``ap50_one_label``.

    Returns
    -------
    dict
        ``map50``, ``map50_95``, ``precision``, ``recall``, ``f1``, ``conf``,
        ``n_images`` and ``per_class.{name}.{ap50, ap50_95, precision,
        recall, f1, n_gt, n_pred}``; with ``candidates`` also
        ``map50_one_label`` and ``per_class.{name}.ap50_one_label``.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"{len(predictions)} prediction sets for {len(ground_truth)} images")
    tp, sc, cl, gt_counts = _scored(predictions, ground_truth, len(class_names))
    ranked = None
    if candidates is not None:
        if len(candidates) != len(ground_truth):
            raise ValueError(f"{len(candidates)} candidate sets for {len(ground_truth)} images")
        ranked = _scored(candidates, ground_truth, len(class_names))[:3]
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        n_gt = int(gt_counts[k])
        kept = (cl == k) & (sc >= conf)
        n_tp = int(tp[kept, 0].sum())
        n_pred = int(kept.sum())
        precision = n_tp / n_pred if n_pred else 0.0
        recall = n_tp / n_gt if n_gt else 0.0
        one_label = _class_aps(tp, sc, cl, k, n_gt)
        ap50, ap50_95 = one_label if ranked is None else _class_aps(*ranked, k, n_gt)
        per_class[name] = {
            "ap50": ap50,
            "ap50_95": ap50_95,
            "precision": precision,
            "recall": recall,
            "f1": f1_score(precision, recall),
            "n_gt": n_gt,
            "n_pred": n_pred,
        }
        if ranked is not None:
            per_class[name]["ap50_one_label"] = one_label[0]
    present = [c for c in per_class.values() if c["n_gt"] > 0]

    def mean(key: str) -> float:
        return float(np.mean([c[key] for c in present])) if present else 0.0

    p, r = mean("precision"), mean("recall")
    out = {
        "map50": mean("ap50"),
        "map50_95": mean("ap50_95"),
        "precision": p,
        "recall": r,
        "f1": f1_score(p, r),
        "conf": conf,
        "n_images": len(ground_truth),
        "per_class": per_class,
    }
    if ranked is not None:
        out["map50_one_label"] = mean("ap50_one_label")
    return out


def _scored(
    predictions: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike]],
    ground_truth: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
    n_classes: int,
) -> tuple[
    npt.NDArray[np.bool_], npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """Every prediction's matches (``match_detections``), score and class; labels per class."""
    tps, scores, classes = [], [], []
    gt_counts = np.zeros(n_classes, dtype=np.int64)
    for (pb, pc, ps), (gb, gc) in zip(predictions, ground_truth, strict=True):
        pc_arr = np.asarray(pc, dtype=np.int64).reshape(-1)
        gc_arr = np.asarray(gc, dtype=np.int64).reshape(-1)
        tps.append(match_detections(pb, pc_arr, ps, gb, gc_arr))
        scores.append(np.asarray(ps, dtype=np.float64).reshape(-1))
        classes.append(pc_arr)
        gt_counts += np.bincount(gc_arr, minlength=n_classes)[:n_classes]
    tp = np.concatenate(tps) if tps else np.zeros((0, len(IOU_THRESHOLDS)), bool)
    sc = np.concatenate(scores) if scores else np.zeros(0)
    cl = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    return tp, sc, cl, gt_counts


def _class_aps(
    tp: npt.NDArray[np.bool_],
    sc: npt.NDArray[np.float64],
    cl: npt.NDArray[np.int64],
    k: int,
    n_gt: int,
) -> tuple[float | None, float | None]:
    """Class ``k``'s AP50 and AP50-95 (None for a class without ground truth)."""
    if not n_gt:
        return None, None
    sel = cl == k
    aps = [average_precision(tp[sel, t], sc[sel], n_gt) for t in range(tp.shape[1])]
    return aps[0], float(np.mean(aps))
