"""Do two runs of a detector give the same boxes? Box IoU, parity figures and the pass rule.

Used where a detector is exported to another inference runtime
(`batch.stages.runtime`: every export is checked against PyTorch when it is
made) and by the evals and benches (`batch.eval.metrics` re-exports these).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "PARITY_CONF",
    "PARITY_IOU",
    "PARITY_MATCHED",
    "QUANTIZED_IOU",
    "QUANTIZED_MAP50_DROP",
    "Boxes",
    "box_iou",
    "detection_parity",
    "parity_passed",
]

#: Another runtime passes parity when, against PyTorch on the same tiles, at least
#: PARITY_MATCHED of PyTorch's boxes find a box of the same class at IoU >= PARITY_IOU (and the
#: box counts differ by no more than that share), with confidences within PARITY_CONF.
#: Not all 100 %: a box whose confidence sits within float rounding of the threshold may flip.
PARITY_IOU = 0.9
PARITY_CONF = 0.02
PARITY_MATCHED = 0.99
#: A quantized runtime (OpenVINO INT8) shifts confidences by several hundredths and moves some
#: boxes by a pixel or two, so it cannot meet that rule. It passes when it finds the same
#: cells: PARITY_MATCHED of PyTorch's boxes matched by a box of the same class at IoU >=
#: QUANTIZED_IOU (the match rule of map50), box counts within the same share; its confidences
#: are not bounded. The accuracy this keeps, measured on real labelled data (`hemaray eval
#: detector --runtime openvino-int8 --json` against `--runtime torch`, the shipped detector, val
#: splits): map50 0.8117 vs 0.8156 on TXL-PBC, 0.7284 vs 0.7318 on BCCD, within the 0.01 that
#: INT8 is allowed (issue 17).
QUANTIZED_IOU = 0.5
#: Agreement with PyTorch cannot see a quantized network reorder confidences between right and
#: wrong boxes, so a quantized export is also scored against the parity slide's exact ground
#: truth: its map50 may fall at most QUANTIZED_MAP50_DROP below PyTorch's on the same tiles
#: (issue 17 allows INT8 0.01 of map50).
QUANTIZED_MAP50_DROP = 0.01


class Boxes(NamedTuple):
    """One image's boxes (``xyxy``), class labels (names or ids) and confidences."""

    boxes: npt.NDArray[np.float32]
    labels: npt.NDArray[Any]
    scores: npt.NDArray[np.float32]


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


def detection_parity(
    reference: Sequence[Any], other: Sequence[Any], *, iou: float = PARITY_IOU
) -> dict[str, float | int]:
    """How closely ``other``'s detections reproduce ``reference``'s on the same images.

    Each argument holds one object per image with ``boxes`` (``xyxy``),
    ``labels`` and ``scores`` (a ``Detections`` or :class:`Boxes`). A
    reference box is matched by the other's box of the same class with the
    highest IoU, when that IoU reaches ``iou``.

    Returns
    -------
    dict
        ``matched_fraction`` of reference boxes, ``worst_iou`` and
        ``max_conf_diff`` over the matched pairs, and ``n_reference`` /
        ``n_other`` box counts.
    """
    n_ref = n_other = n_matched = 0
    worst_iou, max_diff = 1.0, 0.0
    for a, b in zip(reference, other, strict=True):
        n_ref, n_other = n_ref + len(a.boxes), n_other + len(b.boxes)
        if not len(a.boxes) or not len(b.boxes):
            continue
        m = box_iou(a.boxes, b.boxes)
        m[np.asarray(a.labels)[:, None] != np.asarray(b.labels)[None, :]] = -1.0
        best = m.argmax(axis=1)
        for i, j in enumerate(best):
            if m[i, j] >= iou:
                n_matched += 1
                worst_iou = min(worst_iou, float(m[i, j]))
                max_diff = max(max_diff, abs(float(a.scores[i]) - float(b.scores[j])))
    return {
        "matched_fraction": n_matched / n_ref if n_ref else 1.0,
        "worst_iou": round(worst_iou, 6),
        "max_conf_diff": round(max_diff, 6),
        "n_reference": n_ref,
        "n_other": n_other,
    }


def parity_passed(parity: dict[str, Any], *, quantized: bool = False) -> bool:
    """Whether :func:`detection_parity` figures meet the rule of a runtime.

    FP32 runtimes: PARITY_MATCHED, PARITY_IOU and PARITY_CONF. A ``quantized``
    runtime's figures, matched at QUANTIZED_IOU: PARITY_MATCHED, and when
    the figures hold ``truth`` / ``truth_torch`` (map50 on ground truth), a
    map50 at most QUANTIZED_MAP50_DROP below PyTorch's.
    """
    n_ref, n_other = int(parity["n_reference"]), int(parity["n_other"])
    same_cells = (
        parity["matched_fraction"] >= PARITY_MATCHED
        and abs(n_other - n_ref) <= (1 - PARITY_MATCHED) * n_ref
    )
    if quantized:
        accurate = "truth" not in parity or (
            parity["truth"]["map50"] >= parity["truth_torch"]["map50"] - QUANTIZED_MAP50_DROP
        )
        return bool(same_cells and accurate and parity["worst_iou"] >= QUANTIZED_IOU)
    return bool(
        same_cells and parity["worst_iou"] >= PARITY_IOU and parity["max_conf_diff"] <= PARITY_CONF
    )
