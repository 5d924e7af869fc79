"""``hemaray eval images``: the whole per-cell chain scored on image-level labels.

Each image of an ImageFolder (one folder per class, e.g. the ALL set's
``Benign/ Early/ Pre/ Pro/``) goes through exactly the stages ``hemaray run``
places on Ray (plan, read, detect, crop + segment, classify; ``batch.stages.cells``),
here called in-process, and its cells are aggregated by the same
:class:`batch.calls.SlideTally` that fills the ``slides`` table. The image's
call is the dominant ``all_subtype`` label among its WBCs; an image with no
WBC gets no call and counts as wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batch.calls import SlideTally
from batch.config import Config
from batch.ids import slide_id_for
from batch.stages.cells import (
    CellStage,
    plan_slide,
    rows_to_batch,
    unpack,
)

__all__ = ["eval_images", "folder_label", "call_images", "chain_cells"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
#: Folder names of the public ALL image set -> all_subtype labels.
FOLDER_ALIASES = {
    "benign": "benign",
    "hematogone": "benign",
    "early": "early_pre_b",
    "early_pre_b": "early_pre_b",
    "early pre-b": "early_pre_b",
    "pre": "pre_b",
    "pre_b": "pre_b",
    "pre-b": "pre_b",
    "pro": "pro_b",
    "pro_b": "pro_b",
    "pro-b": "pro_b",
}
#: Tiles per stage call.
CHUNK = 16
NO_CALL = "no_call"


def folder_label(name: str) -> str:
    """The all_subtype label a class folder stands for (folder name if not an alias)."""
    return FOLDER_ALIASES.get(name.strip().lower(), name.strip().lower())


def chain_cells(
    paths: list[Path], config: Config, *, progress: Callable[[int, int], None] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """Run the chain over every tile of each image or slide; yield ``(path, cells of one tile)``."""
    from batch.pipeline import _trained_mpp

    trained_mpp, _ = _trained_mpp(config)
    chain = CellStage(config, read=True)
    rows: list[dict[str, Any]] = []
    for p in paths:
        rows.extend(
            plan_slide({"slide_id": slide_id_for(str(p)), "slide_uri": str(p)}, config, trained_mpp)
        )
    done = 0
    for start in range(0, len(rows), CHUNK):
        batch = rows_to_batch(rows[start : start + CHUNK])
        batch = chain(batch)
        for i, kind in enumerate(batch["kind"]):
            if kind == "error":  # the image gets no cells (no call), as in a run's failures
                log.warning(
                    "%s: %s at %s: %s", batch["slide_uri"][i], batch["error_type"][i],
                    batch["error_stage"][i], batch["error_message"][i],
                )  # fmt: skip
            if kind == "tile" and batch["cells"][i]:
                yield str(batch["slide_uri"][i]), unpack(batch["cells"][i])
        done += len(batch["kind"])
        if progress:
            progress(done, len(rows))


def call_images(
    paths: list[Path], config: Config, *, progress: Callable[[int, int], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the chain on each image; return ``{path: SlideTally.summary()}`` (keys as str)."""
    tallies: dict[str, SlideTally] = {str(p): SlideTally(config.calls) for p in paths}
    for path, cells in chain_cells(paths, config, progress=progress):
        tallies[path].add(cells)
    return {k: t.summary() for k, t in tallies.items()}


def _macro_f1(
    truth: list[str], pred: list[str], labels: list[str]
) -> tuple[float, dict[str, dict[str, float]]]:
    per: dict[str, dict[str, float]] = {}
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(truth, pred, strict=True))
        fp = sum(t != lab and p == lab for t, p in zip(truth, pred, strict=True))
        fn = sum(t == lab and p != lab for t, p in zip(truth, pred, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[lab] = {
            "precision": round(prec, 4),
            "recall": round(rec, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
        }
    return float(np.mean([v["f1"] for v in per.values()])) if per else 0.0, per


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
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class (ImageFolder layout)")
    paths: list[Path] = []
    truth: list[str] = []
    for c in classes:
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files = files[:limit_per_class] if limit_per_class else files
        paths += files
        truth += [folder_label(c)] * len(files)
    summaries = call_images(paths, config, progress=progress)
    pred = [summaries[str(p)]["all_subtype_call"] or NO_CALL for p in paths]
    labels = sorted(set(truth))
    macro, per = _macro_f1(truth, pred, labels)
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
        "split_note": "images as given; no patient ids, so no split by patient is possible",
    }
