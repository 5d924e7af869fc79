"""One WBC-crop ImageFolder from several labelled sources, cut as the pipeline cuts.

A classifier that must work on ``hemaray run``'s crops is best trained on
crops made the same way, and the taxonomy's classes come from different
places: the PBC set (eight peripheral-blood types, one centred cell per
image), weakly labelled detector crops of the ALL set (`batch.train.weak_labels`:
blasts, hematogones, and the red cells the detector boxed as WBCs, the
``other`` class), and synthetic slides run through the pipeline itself
(`crops_from_run`: every WBC detection with its ground-truth type, or
``other`` when it matches no WBC).

`build_crop_set` resamples every source to one mpp (the detector's: the
pipeline cuts its crops at the detector's scale), re-crops centred-cell
images to the segmented cell plus the pipeline's margin
(`batch.stages.preprocess.prepare_crop`), renames classes into the taxonomy,
caps each class per source (a seeded sample of its images), and
writes ``<out>/<label>/<source>__<name>.png`` with ``groups.csv``
(``file,group``; the group is the source plus its own grouping, e.g. the
source image of weak crops or the synthetic slide) and ``sources.json``.
Train on it with ``jobs/train_classifier.py --input crop --mpp <mpp> --groups
<out>/groups.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from batch.config import SegmentationConfig
from batch.datasets.folders import class_dirs, list_images, read_rgb
from batch.eval.metrics import box_iou
from batch.stages.crop import resize_by
from batch.stages.preprocess import prepare_crop

__all__ = ["CropSource", "build_crop_set", "crops_from_run", "truth_labels", "OTHER_LABEL"]

#: Label of WBC detections that are not leukocytes (smudges, red cells, stain debris).
OTHER_LABEL = "other"
#: A detection with at least this share of its box inside a truth WBC's box is that WBC
#: (the detector boxed the cell tightly, e.g. only the granules).
PART_OF_WBC = 0.6
#: A detection with less than this share of its box inside any truth WBC is an artefact ...
OFF_WBC = 0.1
#: ... or, with at least this share of its box on truth platelets, a platelet clump.
ON_PLATELETS = 0.2
#: The type label of platelets (and clumps) the detector boxed as WBCs (PBC's class).
PLATELET_LABEL = "platelet"


def _share_inside(boxes: np.ndarray, tboxes: np.ndarray) -> np.ndarray:
    """``(N, M)``: share of each box's area inside each truth box."""
    if not len(tboxes) or not len(boxes):
        return np.zeros((len(boxes), len(tboxes)))
    iw = np.minimum(boxes[:, None, 2], tboxes[None, :, 2]) - np.maximum(
        boxes[:, None, 0], tboxes[None, :, 0]
    )
    ih = np.minimum(boxes[:, None, 3], tboxes[None, :, 3]) - np.maximum(
        boxes[:, None, 1], tboxes[None, :, 1]
    )
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clip(1e-9)
    return np.asarray(iw.clip(0) * ih.clip(0) / area[:, None])


@dataclass
class CropSource:
    """One labelled ImageFolder and how to turn its images into pipeline crops."""

    name: str
    root: str
    #: Microns per pixel of the images.
    mpp: float
    #: The images hold one centred cell (PBC): crop to the segmented cell + margin.
    recrop: bool = False
    #: Folder -> label; folders mapped to "" are skipped.
    rename: dict[str, str] = field(default_factory=dict)
    #: ``file,group`` CSV (paths relative to root), e.g. weak_crops' groups.csv.
    groups_csv: str | None = None
    #: At most this many images per class from this source (seeded sample).
    max_per_class: int | None = None
    #: What the card should say about the source (licence, url).
    citation: dict[str, str] = field(default_factory=dict)
    #: Prefix of this source's groups (default: its name); sources cut from the same images
    #: share one, so no image's cells land in two splits.
    group_prefix: str | None = None


def _groups(src: CropSource) -> dict[str, str]:
    if not src.groups_csv:
        return {}
    with open(src.groups_csv, newline="") as f:
        return {row["file"]: row["group"] for row in csv.DictReader(f)}


def build_crop_set(
    sources: Sequence[CropSource],
    out: str | Path,
    *,
    target_mpp: float,
    margin: float = SegmentationConfig.crop_margin,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the combined crop set; returns counts per source and label."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    report: dict[str, Any] = {"target_mpp": target_mpp, "sources": {}}
    for src in sources:
        groups = _groups(src)
        counts: Counter[str] = Counter()
        skipped = 0
        for folder in class_dirs(Path(src.root)):
            label = src.rename.get(folder.name, folder.name)
            if not label:
                continue
            files = list_images(folder)
            if src.max_per_class is not None and len(files) > src.max_per_class:
                files = sorted(
                    random.Random(f"{seed}:{src.name}:{label}").sample(files, src.max_per_class)
                )
            (out / label).mkdir(exist_ok=True)
            for path in files:
                rgb = read_rgb(path)
                if rgb is None:
                    skipped += 1
                    continue
                crop, _, found = prepare_crop(
                    rgb, scale=src.mpp / target_mpp, mpp=target_mpp, recrop=src.recrop,
                    margin=margin, needs_mask=False,
                )  # fmt: skip
                if src.recrop and not found:
                    skipped += 1
                    continue
                rel_src = path.relative_to(src.root).as_posix()
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{src.name}__{folder.name}__{path.stem}")
                rel = f"{label}/{name}.png"
                cv2.imwrite(str(out / rel), np.ascontiguousarray(crop[..., ::-1]))
                group = groups.get(rel_src, rel_src)
                rows.append({"file": rel, "group": f"{src.group_prefix or src.name}:{group}"})
                counts[label] += 1
        report["sources"][src.name] = {
            **asdict(src), "crops": dict(sorted(counts.items())), "skipped": skipped,
        }  # fmt: skip
    _append_groups(out / "groups.csv", rows)
    manifest = out / "sources.json"  # a set may be built in several calls: keep earlier sources
    if manifest.exists():
        report["sources"] = {**json.loads(manifest.read_text())["sources"], **report["sources"]}
    manifest.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _append_groups(path: Path, rows: list[dict[str, str]]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "group"])
        if new:
            w.writeheader()
        w.writerows(rows)


def truth_labels(
    boxes: np.ndarray,
    truth: pd.DataFrame,
    *,
    iou: float = 0.5,
    label_column: str = "wbc_type",
    unmatched: str | None = OTHER_LABEL,
) -> list[str | None]:
    """The label each detected WBC box takes from one slide's synthetic ground truth.

    ``boxes`` are ``(N, 4)`` level-0 boxes, ``truth`` the slide's rows of the
    generator's ``ground_truth.parquet`` (every class). A box takes the
    ``label_column`` of the truth WBC it overlaps best (IoU >= ``iou``, or
    with at least ``PART_OF_WBC`` of its box inside that WBC's box); one with
    less than ``OFF_WBC`` of its box on any truth WBC is ``unmatched`` (None:
    no label), or ``platelet`` when it lies on truth platelets (a clump);
    anything in between, or a truth WBC without this label, is None.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    t = truth[truth["class"] == "WBC"]
    tboxes = t[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    ious = box_iou(boxes, tboxes) if len(t) else np.zeros((len(boxes), 0))
    inside = _share_inside(boxes, tboxes)
    plates = truth[truth["class"] == "platelet"]
    on_platelets = _share_inside(boxes, plates[["x0", "y0", "x1", "y1"]].to_numpy(np.float64))
    labels: list[str | None] = []
    for k in range(len(boxes)):
        label: Any = None
        if ious.shape[1] and ious[k].max() >= iou:
            label = t[label_column].iloc[int(ious[k].argmax())]
        elif inside.shape[1] and inside[k].max() >= PART_OF_WBC:
            label = t[label_column].iloc[int(inside[k].argmax())]  # a tight box on a WBC
        elif not inside.shape[1] or inside[k].max() < OFF_WBC:
            # nowhere near a WBC: a platelet clump, else an artefact
            on_clump = on_platelets.shape[1] and on_platelets[k].sum() >= ON_PLATELETS
            label = PLATELET_LABEL if on_clump and unmatched is not None else unmatched
        missing = label is None or (isinstance(label, float) and np.isnan(label))
        labels.append(None if missing else str(label))
    return labels


def crops_from_run(
    cells: pd.DataFrame,
    truth: pd.DataFrame,
    out: str | Path,
    *,
    source: str = "synthetic",
    iou: float = 0.5,
    max_per_class: int | None = None,
    seed: int = 0,
    label_column: str = "wbc_type",
    unmatched: str | None = OTHER_LABEL,
    target_mpp: float | None = None,
    crop_mpp: Mapping[str, float | None] | None = None,
) -> dict[str, int]:
    """Label a run's WBC crops with a synthetic ground truth and write them as an ImageFolder.

    ``cells`` is a run's cells table with ``crop_png`` (run with
    ``--set export.crops=true``); ``truth`` the generator's
    ``ground_truth.parquet``. Each WBC detection takes its label by
    `truth_labels` (ambiguous overlaps and truth WBCs without a
    ``label_column`` value are skipped). Writes ``<out>/<label>/<source>__<cell_id>.png`` and appends
    to ``<out>/groups.csv`` (group: the slide). Returns crops per label.

    A run's crops are at the pixel size of the tiles they were cut from
    (``crop_mpp``: slide id -> the mpp the run's detector saw there,
    `batch.export.source.RunSource.crop_mpp`), not the set's: with
    ``target_mpp`` each is resampled to it as `build_crop_set` resamples its
    sources (and as the classifier's ``field`` input scale expects every
    training crop to be). Without, crops are written as cut.
    """
    out = Path(out)
    wbc = cells[(cells["det_class"] == "WBC") & cells["crop_png"].notna()]
    picked: dict[str, list[tuple[str, str, bytes, float]]] = defaultdict(list)
    for sid, dets in wbc.groupby("slide_id"):
        labels = truth_labels(
            dets[["x0", "y0", "x1", "y1"]].to_numpy(np.float64), truth[truth["slide_id"] == sid],
            iou=iou, label_column=label_column, unmatched=unmatched,
        )  # fmt: skip
        scale = _run_crop_scale(str(sid), crop_mpp, target_mpp)
        for label, cell_id, png in zip(labels, dets["cell_id"], dets["crop_png"], strict=True):
            if label is not None:  # None: an ambiguous overlap, or a truth WBC without this label
                picked[label].append((str(sid), str(cell_id), bytes(png), scale))
    counts: dict[str, int] = {}
    rows = []
    for label, items in sorted(picked.items()):
        if max_per_class is not None and len(items) > max_per_class:
            items = random.Random(f"{seed}:{source}:{label}").sample(items, max_per_class)
        (out / label).mkdir(parents=True, exist_ok=True)
        for sid, cell_id, png, scale in items:
            rel = f"{label}/{source}__{cell_id}.png"
            # crop_png holds BGR PNG bytes (cv2.imencode of the RGB crop flipped): write as is
            (out / rel).write_bytes(_rescaled_png(png, scale))
            rows.append({"file": rel, "group": f"{source}:{sid}"})
        counts[label] = len(items)
    _append_groups(out / "groups.csv", rows)
    return counts


def _run_crop_scale(
    slide_id: str, crop_mpp: Mapping[str, float | None] | None, target_mpp: float | None
) -> float:
    """The factor that takes one slide's run crops to ``target_mpp`` (1 without one)."""
    if target_mpp is None:
        return 1.0
    mpp = (crop_mpp or {}).get(slide_id)
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(
            f"run crops of slide {slide_id} without a known crop mpp cannot be resampled to "
            f"target_mpp (give crop_mpp: RunSource.crop_mpp)"
        )
    return float(mpp) / target_mpp


def _rescaled_png(png: bytes, scale: float) -> bytes:
    """PNG bytes resized by ``scale`` as the field input resizes (`resize_by`; as is at ~1)."""
    if abs(scale - 1.0) < 1e-3:
        return png
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("a run crop's PNG bytes do not decode")
    ok, buf = cv2.imencode(".png", resize_by(np.asarray(image, np.uint8), scale))
    if not ok:
        raise ValueError("could not re-encode a resampled crop")
    return bytes(buf.tobytes())
