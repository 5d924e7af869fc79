"""Training data from corrected labels (``hemaray import-labels``), cut from the slides as the pipeline cuts.

A labels table (``schemas/labels.v1.json``) names each object by its slide
and level-0 box. `labelled_slides` finds each slide among the ones the user
gives (``--slides``: files, folders, ``s3://`` prefixes or a manifest,
`batch.inputs.resolve_inputs`): by slide id first, then, with the run the
labels were imported against (``--run``), by the URI its slides table
records for that id. A label whose slide is not given is a
`LabelSlideError` naming it.

Pixels are cut at the pipeline's detector scale (the level and resize the
tile planner picks, `batch.tiling.choose_level`: the detector's mpp, or the
slide's own where that is coarser, upsampled where it is coarser than
``tiling.min_cell_scale`` allows), with the
export's code (`batch.export.fields`), which cuts what the pipeline cuts
pixel for pixel (on an upsampled slide: the same scale and box, interpolated
on the export's own grid rather than the tile's):

- `crops_from_labels`: each WBC with a ``wbc_type`` becomes the pipeline's
  crop (`batch.stages.crop.crop_wbcs`, the run's ``segmentation.crop_margin``)
  in an ImageFolder ``<label>/<slide>_<cell>.png`` with ``groups.csv`` (group:
  the slide, or the cell); `classifier_config_from_labels` points a
  classifier training at it (``jobs/train_classifier.py --labels``);
- `fields_from_labels`: fields of ``field_px`` pixels around the labelled
  objects with YOLO labels (``images/{train,val}``, ``labels/``,
  ``data.yaml``), returned as `LabeledImage` records that carry each
  field's mpp, for ``jobs/train_detector.py --labels``. A field holds every
  label whose centre lies in it and nothing else: objects nobody labelled
  are background to the detector, so import whole annotated fields (the
  Label Studio, CVAT and COCO exports annotate every detection of a field).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

import schemas
from batch.config import Config, load_config
from batch.datasets.detection import LabeledImage, read_detection_dataset
from batch.errors import ConfigError
from batch.export.fields import plan_fields, read_crop, read_field
from batch.export.formats import ExportContext, ImageFolderWriter, YoloWriter
from batch.export.source import RunSource
from batch.inputs import SlideInput, resolve_inputs
from batch.models import read_model_card
from batch.run.provenance import trained_mpp
from batch.slides import open_slide
from batch.stages.detect import DETECTOR_CLASSES
from batch.tiling import detector_factor
from batch.train.classifier_data import TrainClassifierConfig

__all__ = [
    "add_label_source_args",
    "GROUP_BY",
    "LABELS_DATA_DIR",
    "LABELS_SOURCE",
    "LabelSlideError",
    "LabelledSlide",
    "classifier_config_from_labels",
    "crops_from_labels",
    "fields_from_labels",
    "labelled_slides",
    "pipeline_detector_mpp",
    "read_labels_table",
]

log = logging.getLogger(__name__)

#: How crops from labels are grouped for the train / val / test split.
GROUP_BY = ("slide", "cell")
#: Source name of crops and fields cut from labels (group prefix, detection source).
LABELS_SOURCE = "labels"
#: Sub-folder of a training job's output that holds the data cut from labels.
LABELS_DATA_DIR = "labels_data"


class LabelSlideError(ConfigError):
    """A label names a slide that is not among the slides given (names the slide ids)."""


@dataclass(frozen=True)
class LabelledSlide:
    """A slide the labels name: the id they use, where its pixels are, its level-0 mpp."""

    slide_id: str
    uri: str
    mpp: float


def read_labels_table(
    path: str | Path, *, storage_options: dict[str, Any] | None = None
) -> pd.DataFrame:
    """A labels table (``hemaray import-labels``), checked against ``schemas/labels``.

    Raises
    ------
    ConfigError
        The file cannot be read, or lacks a column the schema requires.
    """
    try:
        with fsspec.open(str(path), "rb", **(storage_options or {})) as f:
            table = pq.read_table(f)
        table = schemas.conform_to(table, schemas.load("labels"), extras="keep", name="labels")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--labels {path}: not a labels table of hemaray import-labels ({e})"
        ) from e
    frame = table.to_pandas()
    frame["slide_id"] = frame["slide_id"].astype(str)
    return frame


def _same_file(uri: str) -> str:
    """One spelling per file, to compare a run's slide URI with a given one."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(local))


def labelled_slides(
    slide_ids: Iterable[str],
    slides: Sequence[str],
    *,
    run: RunSource | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, LabelledSlide]:
    """Find the slide of every label slide id among ``slides`` (what ``--slides`` names).

    A label's slide is the given slide with the same id; failing that, with
    ``run``, the given slide whose URI is the one the run recorded for that
    id (slide ids may be spelled differently by another version, or be
    pseudonyms). Each slide's mpp is its file's, else its manifest's, else
    the run's.

    Raises
    ------
    LabelSlideError
        A label's slide is not among ``slides``, or its mpp is unknown.
    """
    inputs = resolve_inputs(list(slides), storage_options=storage_options)
    by_id = {s.slide_id: s for s in inputs}
    by_file = {_same_file(s.uri): s for s in inputs}
    refs = {r.slide_id: r for r in run.slides()} if run is not None else {}
    found: dict[str, SlideInput] = {}
    missing = []
    for sid in sorted(set(slide_ids)):
        ref = refs.get(sid)
        hit = by_id.get(sid) or (by_file.get(_same_file(ref.uri)) if ref is not None else None)
        if hit is None:
            missing.append(sid)
        else:
            found[sid] = hit
    if missing:
        given = ", ".join(sorted(by_id)) or "none"
        hint = "" if run is not None else "; or give --run OUT (the run the labels were imported against) to match them by URI"
        raise LabelSlideError(
            f"labels name slide(s) {', '.join(missing)} that --slides does not give "
            f"(the slides given are {given}): add their files, folders or prefixes to --slides{hint}"
        )
    out = {}
    for sid, inp in found.items():
        with open_slide(inp.uri, storage_options=storage_options) as slide:
            mpp = slide.info.mpp or inp.mpp or (refs[sid].mpp if sid in refs else None)
        if mpp is None:
            raise LabelSlideError(
                f"slide {sid} ({inp.uri}) has no mpp in its file: give it in a manifest "
                "(slide_uri,mpp) in --slides, or --run OUT whose slides table has it"
            )
        out[sid] = LabelledSlide(sid, inp.uri, float(mpp))
    return out


def pipeline_detector_mpp(config: Config | None = None) -> float:
    """The mpp the pipeline runs its detector at (and cuts its WBC crops at) under ``config``.

    ``tiling.target_mpp``, else the detector card's trained mpp, else
    ``tiling.fallback_mpp`` (`batch.export.source.RunSource.detector_mpp` for a run).
    """
    config = config if config is not None else load_config(None, [])
    if config.tiling.target_mpp is not None:
        return float(config.tiling.target_mpp)
    mpp, _ = trained_mpp(config)
    return float(mpp) if mpp else float(config.tiling.fallback_mpp)


def _ids(frame: pd.DataFrame) -> list[str]:
    """Each label's cell id; a new object (no matched cell) is named by its row."""
    return [
        f"label{i:06d}" if cid is None or pd.isna(cid) else str(cid)
        for i, cid in zip(frame.index, frame["cell_id"], strict=True)
    ]


def crops_from_labels(
    labels: pd.DataFrame,
    slides: Mapping[str, LabelledSlide],
    out: str | Path,
    *,
    detector_mpp: float,
    margin: float,
    group_by: str = "slide",
    storage_options: dict[str, Any] | None = None,
    min_cell_scale: float = 0.0,
) -> dict[str, Any]:
    """The pipeline's crop of every labelled WBC type, as an ImageFolder under ``out`` (replaced).

    Writes ``<out>/<wbc_type>/<slide>_<cell>.png`` and ``<out>/groups.csv``
    (group ``labels:<slide>``, or ``labels:<slide>:<cell>`` with ``group_by="cell"``;
    ``mpp``, the crop's own: the slide's detector scale).
    Returns crops per label and each slide's crop mpp. ``min_cell_scale`` is the
    run's ``tiling.min_cell_scale`` (a very coarse slide is upsampled, as the planner does).
    """
    if group_by not in GROUP_BY:
        raise ConfigError(f"--group-by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    typed = labels[(labels["det_class"] == "WBC") & labels["wbc_type"].notna()]
    writer = ImageFolderWriter(
        ExportContext(to=out, detector_classes=list(DETECTOR_CLASSES), labels=[])
    )
    rows, crop_mpp = [], {}
    for sid, group in typed.groupby("slide_id", sort=True):
        ref = slides[str(sid)]
        boxes = group[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        with open_slide(ref.uri, storage_options=storage_options) as slide:
            factor = detector_factor(
                [lv.downsample for lv in slide.info.levels], ref.mpp, detector_mpp,
                min_cell_scale=min_cell_scale,
            )  # fmt: skip
            crop_mpp[str(sid)] = ref.mpp * factor
            for label, cell_id, box in zip(group["wbc_type"], _ids(group), boxes, strict=True):
                cell = SimpleNamespace(label=str(label), cell_id=cell_id)
                writer.add_crop(str(sid), cell, read_crop(slide, box, factor=factor, margin=margin))
                rel = f"{label}/{sid}_{cell_id}.png"  # ImageFolderWriter's layout
                if not (out / rel).is_file():
                    raise OSError(f"{out / rel}: expected the crop the ImageFolder writer wrote")
                group_of = f"{LABELS_SOURCE}:{sid}" + (f":{cell_id}" if group_by == "cell" else "")
                rows.append({"file": rel, "group": group_of, "mpp": crop_mpp[str(sid)]})
    with open(out / "groups.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "group", "mpp"])
        w.writeheader()
        w.writerows(rows)
    return {**writer.finish(), "crop_mpp": crop_mpp}


def fields_from_labels(
    labels: pd.DataFrame,
    slides: Mapping[str, LabelledSlide],
    out: str | Path,
    *,
    detector_mpp: float,
    field_px: int,
    storage_options: dict[str, Any] | None = None,
    min_cell_scale: float = 0.0,
) -> list[LabeledImage]:
    """Fields around the labelled objects with YOLO labels, as a YOLO folder under ``out`` (replaced).

    Fields are planned as the export plans them (`batch.export.fields.plan_fields`,
    labels in reading order) at the detector's scale; every fifth field is
    validation. Returns the fields as detection records with their mpp.
    """
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    writer = YoloWriter(
        ExportContext(
            to=out, detector_classes=list(DETECTOR_CLASSES), labels=[], field_px=field_px
        )
    )
    field_mpp: dict[str, float] = {}
    for sid, group in labels.groupby("slide_id", sort=True):
        ref = slides[str(sid)]
        cells = group.sort_values(["y0", "x0"], kind="stable").copy()
        cells["cell_id"] = _ids(cells)
        cells = cells.reset_index(drop=True)
        with open_slide(ref.uri, storage_options=storage_options) as slide:
            factor = detector_factor(
                [lv.downsample for lv in slide.info.levels], ref.mpp, detector_mpp,
                min_cell_scale=min_cell_scale,
            )  # fmt: skip
            level0 = slide.info.levels[0]
            for fld in plan_fields(
                str(sid), cells, cells, factor=factor, size=field_px,
                slide_size=(level0.width, level0.height),
            ):  # fmt: skip
                writer.add_field(str(sid), fld, read_field(slide, fld))
                field_mpp[fld.name] = ref.mpp * factor
    writer.finish()
    images = read_detection_dataset(out, source=LABELS_SOURCE)
    return [dataclasses.replace(im, mpp=field_mpp[im.path.stem]) for im in images]


def _model_classes(model: str) -> list[str]:
    """The class names of a starting ``.pt`` (from its card); none for a ``.yaml``."""
    if not model.endswith(".pt") or not Path(model).is_file():
        return []
    card = read_model_card(Path(model))
    return list(card.class_names) if card is not None and card.class_names else []


def classifier_config_from_labels(
    cfg: TrainClassifierConfig, *, storage_options: dict[str, Any] | None = None
) -> TrainClassifierConfig:
    """Cut ``cfg.labels``' WBC crops from ``cfg.slides`` and point the training at them.

    The crops go to ``<out>/labels_data`` (`crops_from_labels`); the returned
    config reads them as pipeline crops (each at its own mpp, the slide's
    detector scale, from ``groups.csv``; no re-crop; resampled only by the
    ``field`` input scale, to ``cfg.target_mpp`` or the fine-tuned card's
    trained mpp; ``box_margin`` the crop margin, so ``mask`` segmentation
    gets the cell's box as the pipeline's does), split by ``cfg.group_by``,
    and, fine-tuning a ``.pt`` with a card, keeps every class of the
    model's head (``head_classes``) even when the labels hold only some.
    Margin and detector mpp are the run's (``cfg.labels_run``), else the
    default config's.
    """
    if cfg.labels is None:
        raise ConfigError("classifier_config_from_labels needs cfg.labels")
    if not cfg.slides:
        raise ConfigError("--labels needs --slides: the slide files the labels were drawn on")
    labels = read_labels_table(cfg.labels, storage_options=storage_options)
    typed = labels[(labels["det_class"] == "WBC") & labels["wbc_type"].notna()]
    if typed.empty:
        raise ConfigError(f"--labels {cfg.labels}: no row labels a WBC type")
    run = RunSource(cfg.labels_run, storage_options=storage_options) if cfg.labels_run else None
    config = run.config if run is not None else load_config(None, [])
    detector_mpp = run.detector_mpp() if run is not None else pipeline_detector_mpp(config)
    margin = config.segmentation.crop_margin
    slides = labelled_slides(
        typed["slide_id"], cfg.slides, run=run, storage_options=storage_options
    )
    data = Path(cfg.out) / LABELS_DATA_DIR
    report = crops_from_labels(
        typed, slides, data, detector_mpp=detector_mpp, margin=margin, group_by=cfg.group_by,
        storage_options=storage_options, min_cell_scale=config.tiling.min_cell_scale,
    )  # fmt: skip
    log.info("crops from %s: %s", cfg.labels, report)
    head = _model_classes(cfg.model)
    card = read_model_card(Path(cfg.model)) if head else None
    if card is not None:
        theirs = (card.extra.get("input_mode"), card.extra.get("input_scale", "fit"), card.imgsz)
        if theirs != (cfg.input_mode, cfg.input_scale, cfg.imgsz):
            log.warning("fine-tuning %s (input %s, scale %s, imgsz %s) with --input %s "
                        "--input-scale %s --imgsz %s", cfg.model, *theirs, cfg.input_mode,
                        cfg.input_scale, cfg.imgsz)  # fmt: skip
    # Each crop is segmented at its own mpp (groups.csv). The field input resamples every
    # crop to one scale: the one the fine-tuned model was trained at, else the detector's.
    target_mpp = None
    if cfg.input_scale == "field":
        target_mpp = cfg.target_mpp or (card.trained_mpp if card is not None else None) or detector_mpp
    new_classes = sorted(set(typed["wbc_type"].astype(str)) - set(head))
    if head and new_classes:
        log.warning("labels bring classes %s that %s lacks: its head is rebuilt", new_classes, cfg.model)
        head = []
    n_slides = len(slides)
    return dataclasses.replace(
        cfg,
        data=data,
        groups_csv=data / "groups.csv",
        group_regex=None,
        group_desc=cfg.group_desc or (
            "slide" if cfg.group_by == "slide" else "cell (cells of one slide can sit in two splits)"
        ),
        mpp=detector_mpp,
        target_mpp=target_mpp,
        recrop=False,
        margin=margin,
        box_margin=margin,
        head_classes=head,
        sources=list(cfg.sources) or [
            {
                "name": f"{LABELS_SOURCE}: {Path(str(cfg.labels)).name}",
                "path": str(cfg.labels),
                "slides": n_slides,
                "crops": report["per_class"],
                "prepared": f"the pipeline's crops (margin {margin}) at the detector's "
                f"{detector_mpp} um/px, or the slide's own where coarser "
                f"({sorted(set(round(m, 4) for m in report['crop_mpp'].values()))} um/px here)",
            }
        ],
    )


def add_label_source_args(parser: Any, run_note: str) -> None:
    """The training jobs' ``--slides`` and ``--run`` (``--labels`` is declared by each job)."""
    parser.add_argument("--slides", nargs="+", default=[], help="with --labels: the slide files, "
                        "folders, s3:// prefixes or manifest the labels were drawn on")
    parser.add_argument("--run", dest="labels_run", help="with --labels: the run they were "
                        f"imported against ({run_note})")
