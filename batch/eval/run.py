"""Score a run's cells against synthetic ground truth (``hemaray evaluate``).

Per slide and class, output boxes are matched one-to-one to ground-truth
boxes (greedy by IoU, IoU >= 0.5) for precision / recall / F1. Separately,
every ground-truth WBC counts the output rows overlapping it at IoU >= 0.5:
more than one is a duplicate (a seam cell counted twice). Candidate pairs
come from a grid on box centres, so memory grows with the number of cells,
not with their square.

The matched WBCs also score the pipeline's ``wbc_type_label`` against the
truth ``wbc_type``, and the run's ``slides`` table (when given) is scored
per slide: differential, blast fraction and ALL call
(`batch.eval.differential`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from batch.errors import ConfigError
from batch.eval.differential import slide_scores, wbc_type_scores
from batch.eval.metrics import precision_recall_f1
from batch.ids import file_stem
from batch.stages.detect import DETECTOR_CLASSES

__all__ = ["IOU_MATCH", "evaluate_run", "match_boxes"]

#: IoU at which an output box matches a ground-truth box (and a second one is a duplicate).
IOU_MATCH = 0.5


def _candidates(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """All (i, j) pairs whose centres fall in neighbouring grid cells, with their IoU."""
    if a.empty or b.empty:
        return pd.DataFrame({"i": [], "j": [], "iou": []})
    size = float(
        max((a.x1 - a.x0).max(), (a.y1 - a.y0).max(), (b.x1 - b.x0).max(), (b.y1 - b.y0).max(), 1.0)
    )
    ga = pd.DataFrame(
        {"i": np.arange(len(a)), "gx": ((a.x0 + a.x1) / 2 // size).astype(np.int64).to_numpy(),
         "gy": ((a.y0 + a.y1) / 2 // size).astype(np.int64).to_numpy()}
    )  # fmt: skip
    gb = pd.DataFrame(
        {"j": np.arange(len(b)), "gx": ((b.x0 + b.x1) / 2 // size).astype(np.int64).to_numpy(),
         "gy": ((b.y0 + b.y1) / 2 // size).astype(np.int64).to_numpy()}
    )  # fmt: skip
    parts = []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            shifted = gb.assign(gx=gb.gx + dx, gy=gb.gy + dy)
            parts.append(ga.merge(shifted, on=["gx", "gy"])[["i", "j"]])
    pairs = pd.concat(parts, ignore_index=True)
    ab = a[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)[pairs.i.to_numpy()]
    bb = b[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)[pairs.j.to_numpy()]
    iw = np.clip(np.minimum(ab[:, 2], bb[:, 2]) - np.maximum(ab[:, 0], bb[:, 0]), 0, None)
    ih = np.clip(np.minimum(ab[:, 3], bb[:, 3]) - np.maximum(ab[:, 1], bb[:, 1]), 0, None)
    inter = iw * ih
    area_a = (ab[:, 2] - ab[:, 0]) * (ab[:, 3] - ab[:, 1])
    area_b = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    union = area_a + area_b - inter
    pairs["iou"] = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
    return pairs


def match_boxes(
    pred: pd.DataFrame, truth: pd.DataFrame, iou: float = IOU_MATCH
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One-to-one greedy matches (highest IoU first): arrays of pred and truth row positions."""
    pairs = _candidates(pred, truth)
    pairs = pairs[pairs.iou >= iou].sort_values(["iou", "i", "j"], ascending=[False, True, True])
    used_p: set[int] = set()
    used_t: set[int] = set()
    mp, mt = [], []
    for i, j in zip(pairs.i.to_numpy(), pairs.j.to_numpy(), strict=True):
        if i in used_p or j in used_t:
            continue
        used_p.add(int(i))
        used_t.add(int(j))
        mp.append(int(i))
        mt.append(int(j))
    return np.asarray(mp, np.int64), np.asarray(mt, np.int64)


def _prf(tp: int, n_pred: int, n_true: int) -> dict[str, float]:
    p, r, f = precision_recall_f1(tp, n_pred, n_true)
    return {
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(f, 4),
        "tp": tp,
        "n_pred": n_pred,
        "n_true": n_true,
    }


def align_truth_ids(truth: pd.DataFrame, slides: pd.DataFrame) -> pd.DataFrame:
    """``truth`` with its slide ids (file stems, as `batch.synth` writes them) renamed to the run's.

    A run's slide ids are ``<stem>-<hash>`` (`batch.ids.slide_id_for`) or whatever the
    run was told; the slides table's ``slide_uri`` gives each run id its file stem.
    Truth ids that are already run ids stay as they are.

    Raises
    ------
    ConfigError
        If two slides of the run share the file stem a truth slide names.
    """
    run_ids = set(slides["slide_id"].astype(str)) if "slide_id" in slides else set()
    by_stem: dict[str, list[str]] = {}
    if "slide_uri" in slides:
        for sid, uri in zip(slides["slide_id"].astype(str), slides["slide_uri"].astype(str), strict=True):
            by_stem.setdefault(file_stem(uri), []).append(sid)
    mapping = {}
    for t in sorted(set(truth["slide_id"].astype(str)) - run_ids):
        hits = sorted(set(by_stem.get(t, [])))
        if len(hits) > 1:
            raise ConfigError(f"truth slide {t!r} matches {len(hits)} slides of the run: {hits}")
        if hits:
            mapping[t] = hits[0]
    return truth.assign(slide_id=truth["slide_id"].astype(str).replace(mapping))


def evaluate_run(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    iou: float = IOU_MATCH,
    slides: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Detection, WBC-type and per-slide scores over all slides in ``truth``.

    ``cells`` is the run's cells table (with ``slide_id``); ``truth`` the
    synthetic ground truth (``slide_id``, ``class``, ``wbc_type``,
    ``subtype``, box); ``slides`` the run's slides table, if any.

    Returns per-class precision/recall/F1, WBC duplicates, ``subtype_accuracy``
    (``all_subtype_label`` on matched WBCs), ``wbc_type`` (accuracy, macro
    recall, per class, confusion of ``wbc_type_label`` on matched WBCs; null
    without those columns) and the keys of
    :func:`batch.eval.differential.slide_scores`.
    """
    cells = cells.copy()
    cells["slide_id"] = cells["slide_id"].astype(str)
    counts = {c: [0, 0, 0] for c in DETECTOR_CLASSES}  # tp, n_pred, n_true
    dup = 0
    seam_dup = 0
    n_wbc_true = 0
    sub_right = sub_total = 0
    type_truth: list[Any] = []
    type_pred: list[Any] = []
    slide_ids = sorted(set(truth.slide_id.astype(str)))
    for sid in slide_ids:
        t_s = truth[truth.slide_id.astype(str) == sid]
        p_s = cells[cells.slide_id == sid]
        for cls in DETECTOR_CLASSES:
            t = t_s[t_s["class"] == cls].reset_index(drop=True)
            p = p_s[p_s.det_class == cls].reset_index(drop=True)
            mp, mt = match_boxes(p, t, iou)
            counts[cls][0] += len(mp)
            counts[cls][1] += len(p)
            counts[cls][2] += len(t)
            if cls == "WBC":
                n_wbc_true += len(t)
                # Duplicates: any output row (of any class) overlapping a true WBC at IoU >= iou.
                pairs = _candidates(p_s.reset_index(drop=True), t)
                close = pairs[pairs.iou >= iou]
                hits = close.groupby("j").size()
                dup += int((hits > 1).sum())
                if {"tile_row", "tile_col"} <= set(p_s.columns) and len(close):
                    tiles = p_s.reset_index(drop=True)[["tile_row", "tile_col"]].to_numpy()[
                        close.i.to_numpy()
                    ]
                    per_gt = pd.DataFrame(
                        {"j": close.j.to_numpy(), "tile": [f"{r}:{c}" for r, c in tiles]}
                    )
                    seam_dup += int((per_gt.groupby("j").tile.nunique() > 1).sum())
                if "all_subtype_label" in p.columns and "subtype" in t.columns and len(mp):
                    pred_lab = p.all_subtype_label.to_numpy()[mp]
                    true_lab = t.subtype.to_numpy()[mt]
                    ok = pd.notna(pred_lab) & pd.notna(true_lab)
                    sub_right += int((pred_lab[ok] == true_lab[ok]).sum())
                    sub_total += int(ok.sum())
                if "wbc_type_label" in p.columns and "wbc_type" in t.columns and len(mp):
                    type_truth += t.wbc_type.to_numpy()[mt].tolist()
                    type_pred += p.wbc_type_label.to_numpy()[mp].tolist()
    per_class = {c: _prf(*v) for c, v in counts.items()}
    return {
        "slides": len(slide_ids),
        "iou_threshold": iou,
        "per_class": per_class,
        "wbc_duplicates": dup,
        "wbc_seam_duplicates": seam_dup,
        "wbc_true": n_wbc_true,
        "subtype_accuracy": round(sub_right / sub_total, 4) if sub_total else None,
        "subtype_matched": sub_total,
        "wbc_type": wbc_type_scores(type_truth, type_pred),
        **slide_scores(truth, slides),
    }
