"""``hemaray eval synthetic``: the models against a generator's exact ground truth.

Fresh synthetic slides (tiled JPEG TIFFs, as a scanner writes them) are made
from a seed, run through the same in-process chain as ``hemaray eval images``
(plan, read, detect, crop + segment, classify: `batch.run.local.chain_cells`), and
scored two ways:

* detection: the output boxes of every tile, matched per slide and class to
  the ground truth (`batch.eval.run.evaluate_run`, IoU >= 0.5): precision,
  recall and F1 per class, plus WBC duplicates;
* nucleus segmentation: every ground-truth WBC's crop is read from the slide
  (the pipeline's crop margin), segmented by `batch.stages.segment.segment_wbc`
  and compared with the exact mask the generator drew (`seg_dice`, `seg_iou`,
  means over WBCs);
* WBC types and slide figures: the matched WBCs' ``wbc_type_label`` against
  the truth ``wbc_type`` (`wbc_type_accuracy`, per class in ``wbc_type``), and
  each slide's differential, blast fraction and ALL call, aggregated from its
  cells by the same `batch.calls.SlideTally` that fills a run's ``slides``
  table, against the truth (`batch.eval.differential`).

Synthetic slides test the system and the transfer of the models to the
generator's rendering; real-image accuracy comes from ``eval detector``,
``eval classifier`` and ``eval images`` on real data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from batch.calls import SlideTally
from batch.config import Config, SegmentationConfig
from batch.eval.run import evaluate_run
from batch.eval.segmentation import GROUND_TRUTH_FILE, score_cells
from batch.ids import file_stem
from batch.run.local import chain_cells
from batch.slides import open_slide
from batch.stages.crop import crop_regions

__all__ = ["eval_synthetic", "segmentation_scores"]


def segmentation_scores(
    slide_paths: list[Path], truth: pd.DataFrame, *, margin: float = SegmentationConfig.crop_margin
) -> pd.DataFrame:
    """Per ground-truth WBC: Dice / IoU of the nucleus segmented from a crop read off the slide."""
    by_id = {file_stem(str(p)): p for p in slide_paths}  # the truth's ids
    wbc = truth[(truth["class"] == "WBC") & truth["nucleus_mask"].notna()]
    rows: list[dict[str, Any]] = []
    for slide_id, cells in wbc.groupby("slide_id", sort=True):
        regions = crop_regions(cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64), margin=margin)
        with open_slide(by_id[str(slide_id)]) as slide:
            crops = [
                slide.read_region(int(x0), int(y0), int(x1 - x0), int(y1 - y0))
                for x0, y0, x1, y1 in regions
            ]
        rows += score_cells(cells, crops, margin=margin)
    return pd.DataFrame(rows)


def eval_synthetic(
    config: Config,
    *,
    seed: int,
    slides: int = 2,
    width: int = 4096,
    height: int = 4096,
    kind: Literal["blood", "leukemia", "marrow"] = "blood",
    blast_fraction: float | None = None,
    workdir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Detection F1, nucleus Dice / IoU, WBC types and slide figures on fresh synthetic slides.

    Returns ``per_class.{RBC,WBC,platelet}.{precision,recall,f1,...}``,
    ``wbc_f1``, ``wbc_duplicates``, ``seg_dice``, ``seg_iou`` (means over
    ground-truth WBCs), ``seg_cells``, ``subtype_accuracy`` (``all_subtype`` on
    matched WBCs), ``wbc_type_accuracy`` and ``wbc_type`` (per class,
    confusion), ``differential_max_error_pp``, ``blast_fraction_max_abs_error``,
    ``call_accuracy`` and their per-slide figures (``differential``,
    ``blast_fraction``, ``calls``), and what was generated (``blast_fraction_generated``:
    the leukemia slides' blast share).
    """
    from batch.synth import DEFAULT_BLAST_FRACTION, synth_slides

    with tempfile.TemporaryDirectory(prefix="hemaray-evalsyn-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        paths = [
            Path(p)
            for p in synth_slides(
                folder,
                slides=slides,
                width=width,
                height=height,
                seed=seed,
                kind=kind,
                blast_fraction=blast_fraction,
            )
        ]
        truth = pd.read_parquet(folder / GROUND_TRUTH_FILE)
        tables: list[pa.Table] = []
        tallies = {file_stem(str(p)): SlideTally(config.calls) for p in paths}  # the truth's ids
        for path, cells in chain_cells(paths, config, progress=progress):
            sid = file_stem(path)
            tallies[sid].add(cells)
            tables.append(cells.append_column("slide_id", pa.array([sid] * cells.num_rows)))
        cells_df = (
            pa.concat_tables(tables, promote_options="permissive").to_pandas()
            if tables
            else pd.DataFrame(columns=["slide_id", "det_class", "x0", "y0", "x1", "y1"])
        )
        slides_df = pd.DataFrame(
            [{"slide_id": sid, **tally.summary()} for sid, tally in tallies.items()]
        )
        det = evaluate_run(cells_df, truth, slides=slides_df)
        seg = segmentation_scores(paths, truth)
    return {
        "seed": seed,
        "slides": slides,
        "size": [width, height],
        "kind": kind,
        "blast_fraction_generated": (
            DEFAULT_BLAST_FRACTION
            if kind == "leukemia" and blast_fraction is None
            else blast_fraction
        ),
        "mpp": float(truth["mpp"].iloc[0]) if len(truth) else None,
        "per_class": det["per_class"],
        "wbc_f1": det["per_class"]["WBC"]["f1"],
        "wbc_duplicates": det["wbc_duplicates"],
        "subtype_accuracy": det["subtype_accuracy"],
        "seg_dice": round(float(seg["dice"].mean()), 4) if len(seg) else None,
        "seg_iou": round(float(seg["iou"].mean()), 4) if len(seg) else None,
        "seg_median_dice": round(float(seg["dice"].median()), 4) if len(seg) else None,
        "seg_cells": len(seg),
        "wbc_type_accuracy": det["wbc_type"]["accuracy"] if det["wbc_type"] else None,
        "wbc_type_macro_recall": det["wbc_type"]["macro_recall"] if det["wbc_type"] else None,
        "differential_max_error_pp": det["differential_max_error_pp"],
        "blast_fraction_max_abs_error": det["blast_fraction_max_abs_error"],
        "call_accuracy": det["call_accuracy"],
        "wbc_type": det["wbc_type"],
        "differential": det["differential"],
        "blast_fraction": det["blast_fraction"],
        "calls": det["calls"],
    }
