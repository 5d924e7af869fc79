"""``hemaray eval images``: the whole per-cell chain scored on image-level labels.

Each image of an ImageFolder (one folder per class, e.g. the ALL set's
``Benign/ Early/ Pre/ Pro/``) goes through exactly the stages ``hemaray run``
places on Ray (plan, read, detect, crop + segment, classify), here called
in-process by `batch.run.local.chain_cells`, and its cells are aggregated by
the same :class:`batch.calls.SlideTally` that fills the ``slides`` table. The
image's call is the slide call: the dominant ``all_subtype`` label among its
blasts when blasts reach ``calls.min_blast_fraction`` of its counted
leukocytes, else ``none``, which is scored as ``benign`` (no leukemia seen);
an image with no counted leukocyte gets no call and counts as wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from batch.calls import NO_ALL_CALL, SlideTally
from batch.config import Config
from batch.datasets.folders import class_dirs, folder_label, list_images
from batch.eval.metrics import macro_f1
from batch.run.local import chain_cells

__all__ = ["NO_CALL", "call_images", "eval_images"]

#: The prediction of an image without a counted WBC (scored as wrong).
NO_CALL = "no_call"
#: The label a ``none`` call (blasts under the threshold) is scored as.
NONE_AS = "benign"


def call_images(
    paths: list[Path], config: Config, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the chain on each image; return ``{path: SlideTally.summary()}`` (keys as str)."""
    tallies: dict[str, SlideTally] = {str(p): SlideTally(config.calls) for p in paths}
    for path, cells in chain_cells(paths, config, progress=progress):
        tallies[path].add(cells)
    return {k: t.summary() for k, t in tallies.items()}


def eval_images(
    data: str | Path,
    config: Config,
    *,
    limit_per_class: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Image-level accuracy of the per-cell chain on an ImageFolder.

    Returns ``accuracy``, ``macro_f1``, ``per_class`` (precision / recall / F1),
    ``confusion`` (truth -> call -> count), ``n_images``, ``no_call`` (images
    without a counted WBC, see ``calls.*``; scored as wrong). Splits are by
    image: the public ALL set names no patients.
    """
    root = Path(data)
    folders = class_dirs(root)
    if not folders:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class (ImageFolder layout)")
    paths: list[Path] = []
    truth: list[str] = []
    for folder in folders:
        files = list_images(folder)
        files = files[:limit_per_class] if limit_per_class else files
        paths += files
        truth += [folder_label(folder.name)] * len(files)
    summaries = call_images(paths, config, progress=progress)
    calls = [summaries[str(p)]["all_subtype_call"] or NO_CALL for p in paths]
    pred = [NONE_AS if c == NO_ALL_CALL else c for c in calls]
    labels = sorted(set(truth))
    macro, per = macro_f1(truth, pred, labels)
    confusion: dict[str, dict[str, int]] = {t: {} for t in labels}
    for t, p in zip(truth, pred, strict=True):
        confusion[t][p] = confusion[t].get(p, 0) + 1
    correct = sum(t == p for t, p in zip(truth, pred, strict=True))
    return {
        "accuracy": round(correct / len(paths), 4) if paths else 0.0,
        "macro_f1": round(macro, 4),
        "per_class": per,
        "confusion": confusion,
        "n_images": len(paths),
        "no_call": pred.count(NO_CALL),
        "called_none": calls.count(NO_ALL_CALL),
        "blast_fraction_median": {
            t: _median(
                [
                    summaries[str(p)]["blast_fraction"]
                    for p, u in zip(paths, truth, strict=True)
                    if u == t
                ]
            )
            for t in labels
        },
        "split_note": "images as given; no patient ids, so no split by patient is possible",
    }


def _median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    return round(known[len(known) // 2], 4) if known else None
