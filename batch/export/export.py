"""``hemaray export``: a run's cells into a labelling tool's or a training job's layout.

Two passes over the run, one slide at a time: the first reads only the
columns the selection needs and chooses the cells (`batch.export.select`);
the second reads each slide with chosen cells in full, opens the slide and
cuts only the fields or crops those cells need. Memory is bounded by one
slide's cells (plus the chosen cells' ids and scores and the writer's index).
``--where`` filters the first pass with a SQL predicate that DuckDB runs over
each slide's cells (`batch.export.where`); ``--to`` may be any fsspec URL
(``s3://bucket/prefix``): the writers write to a local staging folder that is
uploaded after each slide (`batch.export.target`). The chosen cells and their
scores are written next to the export as ``selection.parquet``, and a summary
(with the ``--select``, ``--classes`` and ``--where`` asked for) as
``export.json``, last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batch.errors import ConfigError
from batch.export.fields import DEFAULT_FIELD_PX, plan_fields, read_crop, read_field
from batch.export.formats import WRITERS, ExportContext, FormatWriter
from batch.export.qupath import QuPathWriter
from batch.export.select import Selector, parse_select
from batch.export.source import RunSource, SlideRef
from batch.export.target import ExportTarget
from batch.export.where import parse_where
from batch.models import DEFAULT_DETECTOR, read_model_card, resolve_model
from batch.slides import open_slide
from batch.tiling import detector_factor

__all__ = ["FORMATS", "ExportOptions", "export_run"]

log = logging.getLogger(__name__)

#: Every export format, by ``--format`` name.
ALL_WRITERS: dict[str, type[FormatWriter]] = {**WRITERS, "qupath": QuPathWriter}
FORMATS = tuple(sorted(ALL_WRITERS))
#: Detector classes when the detector has no model card.
DEFAULT_DETECTOR_CLASSES = ("RBC", "WBC", "platelet")
#: Columns the selection pass reads.
SELECT_COLUMNS = (
    "cell_id", "x0", "y0", "x1", "y1", "det_class", "det_confidence",
    "wbc_type_label", "wbc_type_confidence", "wbc_type_probs",
)


@dataclass(frozen=True)
class ExportOptions:
    """What ``hemaray export`` was asked for."""

    format: str
    select: str | None = None
    classes: Sequence[str] | None = None
    #: SQL predicate over the cells columns (DuckDB), e.g. ``wbc_type_label = 'blast'``.
    where: str | None = None
    slides: Sequence[str] | None = None
    seed: int = 0
    field_px: int = DEFAULT_FIELD_PX
    url_prefix: str = ""


def _detector_classes(source: RunSource) -> tuple[list[str], str]:
    model = source.config.detect.model
    local = resolve_model(model, storage_options=source.config.storage.storage_options())
    card = read_model_card(local if model else DEFAULT_DETECTOR)
    names = list(card.class_names) if card is not None and card.class_names else []
    return names or list(DEFAULT_DETECTOR_CLASSES), str(getattr(card, "sha256", "") or "")[:12]


def _context(
    source: RunSource, to: Path, opts: ExportOptions, location: str | None
) -> ExportContext:
    det_classes, version = _detector_classes(source)
    wbc_labels = source.label_sets().get("wbc_type", [])
    labels = [c for c in det_classes if c != "WBC"] + ["WBC"] + list(wbc_labels)
    return ExportContext(
        to=to, detector_classes=det_classes, labels=list(dict.fromkeys(labels)),
        detector_version=version, url_prefix=opts.url_prefix, field_px=opts.field_px,
        location=location,
    )


def _export_slide(
    writer: FormatWriter, ref: SlideRef, cells: pd.DataFrame, chosen: pd.DataFrame,
    source: RunSource, detector_mpp: float,
) -> None:
    if writer.unit == "slides":
        writer.add_slide(ref.slide_id, ref.uri, chosen)
        return
    margin = source.config.segmentation.crop_margin
    with open_slide(ref.uri, storage_options=source.storage_options) as slide:
        # The pipeline's scale: the level and resize the planner picks for the detector (a
        # slide coarser than the detector's mpp is cut at its own, or upsampled when very coarse).
        factor = detector_factor(
            [lv.downsample for lv in slide.info.levels], ref.mpp, detector_mpp,
            min_cell_scale=source.config.tiling.min_cell_scale,
        )  # fmt: skip
        level0 = slide.info.levels[0]
        if writer.unit == "fields":
            for fld in plan_fields(
                ref.slide_id, chosen, cells, factor=factor, size=writer.ctx.field_px,
                slide_size=(level0.width, level0.height),
            ):
                writer.add_field(ref.slide_id, fld, read_field(slide, fld))
            return
        wbcs = chosen[chosen["det_class"] == "WBC"]
        boxes = wbcs[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        for cell, box in zip(wbcs.itertuples(), boxes, strict=True):
            writer.add_crop(ref.slide_id, cell, read_crop(slide, box, factor=factor, margin=margin))


def export_run(
    out: str, to: str | Path, opts: ExportOptions, *, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Export a run's chosen cells to ``to`` (a folder or URL) in ``opts.format``; return the summary.

    ``storage_options`` apply to the run's output, its slides and ``to``.

    Raises
    ------
    ConfigError
        An unknown format or selection, slides the run does not have, or a
        ``to`` that cannot be written.
    WhereError
        ``opts.where`` is not a predicate over the cells' columns.
    """
    if opts.format not in ALL_WRITERS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {opts.format!r}")
    if opts.field_px < 32:
        raise ConfigError(f"--field-px must be >= 32, got {opts.field_px}")
    selector = Selector(parse_select(opts.select), opts.classes, opts.seed)
    where = parse_where(opts.where)
    source = RunSource(out, storage_options=storage_options)
    refs = source.slides(opts.slides)
    try:
        for _ref, cells in source.iter_cells(refs, SELECT_COLUMNS, where):
            selector.add(cells)
    finally:
        if where is not None:
            where.close()
    chosen = selector.result()

    with ExportTarget(to, storage_options=storage_options) as target:
        dest = target.folder
        chosen.to_parquet(dest / "selection.parquet", index=False)
        target.publish()  # a destination that cannot be written fails before any pixels are cut
        ctx = _context(source, dest, opts, None if target.is_local else target.uri)
        writer = ALL_WRITERS[opts.format](ctx)
        detector_mpp = source.detector_mpp()
        for ref in refs:
            mine = chosen[chosen["slide_id"] == ref.slide_id]
            if mine.empty:
                continue
            cells = source.cells(ref.slide_id)
            mine = mine.merge(cells.drop(columns=[c for c in mine if c != "cell_id"], errors="ignore"), on="cell_id")
            _export_slide(writer, ref, cells, mine, source, detector_mpp)
            target.publish()
        summary = {
            "format": opts.format, "out": out,
            "to": str(dest) if target.is_local else target.uri,
            "select": opts.select or "all",
            "classes": list(opts.classes) if opts.classes else None,
            "where": opts.where.strip() if opts.where and opts.where.strip() else None,
            "seed": opts.seed, "cells_selected": len(chosen), "detector_mpp": detector_mpp,
            **writer.finish(),
        }
        target.publish()
        (dest / "export.json").write_text(json.dumps(summary, indent=2, default=str))
        target.publish()
    return summary
