"""Classifier training data: group-aware splits, rendering as the pipeline would, train-only flips.

Steps 2-4 of `batch.train.classifier` (step 1, finding the images, is
`batch.datasets.folders.discover_images`):

- ``assign_groups`` / ``group_split``: every image belongs to a *group* (a
  patient, a slide, a source image); whole groups go to train / val / test,
  stratified greedily by class, so no group lands in two splits;
- ``render_dataset``: every image turned into what the classifier sees at
  inference (`batch.stages.preprocess.prepare_crop`, then
  `batch.stages.classify.render_input`), written to
  ``<work>/{train,val,test}/<class>/``;
- ``balance_by_flips``: flipped copies of *training* renderings only.

``TrainClassifierConfig`` (everything one run needs) lives here because
rendering reads it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from batch.config import SegmentationConfig
from batch.datasets.folders import SPLITS, ImageRecord, read_rgb
from batch.stages.classify import INPUT_MODES, INPUT_SCALES, MASK_FILL, render_input
from batch.stages.preprocess import prepare_crop
from batch.train.common import FREEZE_PATTERN

__all__ = [
    "DEFAULT_IMGSZ",
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "FLIPS",
    "NAME_SEP",
    "TrainClassifierConfig",
    "assign_groups",
    "balance_by_flips",
    "group_split",
    "render_dataset",
    "view_names",
]

log = logging.getLogger(__name__)

#: Flips used to balance the training split: name -> cv2.flip code.
FLIPS: dict[str, int] = {"h": 1, "v": 0, "hv": -1}
#: Default split fractions.
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
#: Default training image size (pixels): small, for a CPU budget.
DEFAULT_IMGSZ = 64
#: Separator between an image's stem and its view / flip in rendered file names.
NAME_SEP = "__"


@dataclass
class TrainClassifierConfig:
    """Everything one classifier training run needs (see `batch.train.classifier`)."""

    data: Path
    out: Path
    name: str = "classifier"
    input_mode: str = "mask"
    #: ``"fit"`` (letterbox) or ``"field"`` (a window of ``imgsz * work_mpp`` um; see
    #: `batch.stages.classify`), recorded in the card as ``extra.input_scale``.
    input_scale: str = "fit"
    model: str = "yolov8n-cls.yaml"
    freeze: str = "all"
    epochs: int = 10
    imgsz: int = DEFAULT_IMGSZ
    batch: int = 32
    device: str = "cpu"
    workers: int = 0
    seed: int = 0
    patience: int = 100
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    groups_csv: Path | None = None
    group_regex: str | None = None
    group_desc: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    classes: list[str] | None = None
    max_per_class: int | None = None
    mpp: float | None = None
    target_mpp: float | None = None
    recrop: bool = False
    margin: float = SegmentationConfig.crop_margin
    box_margin: float | None = None
    balance: bool = True
    weak_labels: bool = False
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Ultralytics augmentation settings for training (`AUGMENT_KEYS`, e.g. ``hsv_h``: 0.05).
    augment: dict[str, float] = field(default_factory=dict)
    command: str = ""
    #: A labels table (``hemaray import-labels``) to cut the data from (`batch.train.from_labels`).
    labels: Path | None = None
    #: The slides the labels were drawn on (files, folders, s3:// prefixes, a manifest).
    slides: list[str] = field(default_factory=list)
    #: The run the labels were imported against: its config and slide URIs.
    labels_run: str | None = None
    #: Split crops from labels by ``slide`` or by ``cell``.
    group_by: str = "slide"
    #: Classes that get a folder in every split even without images, so a fine-tune keeps
    #: its model's head (ultralytics takes the classes from the training folders).
    head_classes: list[str] = field(default_factory=list)

    def validate(self) -> TrainClassifierConfig:
        """Raise ``ValueError`` on an invalid field; return ``self``."""
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"--input must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.input_scale not in INPUT_SCALES:
            raise ValueError(f"--input-scale must be one of {INPUT_SCALES}, got {self.input_scale!r}")
        if self.input_scale == "field" and self.work_mpp is None:
            raise ValueError("--input-scale field needs --mpp (the window is imgsz x mpp microns)")
        if not FREEZE_PATTERN.match(self.freeze):
            raise ValueError(
                f"--freeze must be 'all' or 'lastN' (last10, last3), got {self.freeze!r}"
            )
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1):
            raise ValueError("--val-fraction and --test-fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("--val-fraction + --test-fraction must leave a training split")
        if self.groups_csv is not None and self.group_regex is not None:
            raise ValueError("give --groups or --group-regex, not both")
        if (self.input_mode != "crop" or self.recrop) and self.mpp is None:
            raise ValueError(
                f"--mpp (microns per pixel of the images) is needed to segment cells "
                f"(--input {self.input_mode}{' --recrop' if self.recrop else ''})"
            )
        for name in ("mpp", "target_mpp"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        if self.imgsz < 16 or self.epochs < 0 or self.batch < 1:
            raise ValueError("--imgsz must be >= 16, --epochs >= 0 and --batch >= 1")
        return self

    @property
    def scale(self) -> float:
        """Resize factor from the source images to ``target_mpp`` (1 if either is unknown)."""
        if self.mpp is None or self.target_mpp is None:
            return 1.0
        return self.mpp / self.target_mpp

    def record_scale(self, record: ImageRecord) -> tuple[float, float | None]:
        """One image's resize factor and its mpp after that resize.

        The image's own `ImageRecord.mpp` where it has one, else ``mpp``;
        resized to ``target_mpp`` when that is set.
        """
        if record.mpp is None:
            return self.scale, self.work_mpp
        if self.target_mpp is None:
            return 1.0, record.mpp
        return record.mpp / self.target_mpp, self.target_mpp

    @property
    def work_mpp(self) -> float | None:
        """Microns per pixel of the images after resampling."""
        return self.target_mpp if self.target_mpp is not None else self.mpp



def assign_groups(
    records: Sequence[ImageRecord],
    root: Path,
    *,
    groups_csv: Path | None = None,
    group_regex: str | None = None,
) -> list[ImageRecord]:
    """Give every record its group from a ``file,group`` CSV or a regex on the file name.

    CSV ``file`` entries match the path relative to ``root`` or the bare file
    name; an optional ``mpp`` column gives an image its own mpp
    (`ImageRecord.mpp`). The regex's first capture group (or whole match) is the group.
    Without either, records keep their own path as the group.

    Raises
    ------
    ValueError
        If an image has no group in the CSV or the regex does not match it.
    """
    if groups_csv is None and group_regex is None:
        return list(records)
    if groups_csv is not None:
        table: dict[str, str] = {}
        mpps: dict[str, float] = {}
        with open(groups_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"file", "group"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{groups_csv}: expected a CSV with columns 'file,group', got {reader.fieldnames}"
                )
            for row in reader:
                table[row["file"]] = row["group"]
                if row.get("mpp"):
                    mpps[row["file"]] = float(row["mpp"])
        out = []
        missing = []
        for r in records:
            rel = r.path.relative_to(root).as_posix()
            g = table.get(rel, table.get(r.path.name))
            if g is None:
                missing.append(rel)
                continue
            out.append(dataclasses.replace(r, group=g, mpp=mpps.get(rel, mpps.get(r.path.name, r.mpp))))
        if missing:
            raise ValueError(
                f"{groups_csv}: {len(missing)} image(s) have no group, e.g. {missing[:3]}; "
                "add them to the CSV (by relative path or file name)"
            )
        return out
    pattern = re.compile(str(group_regex))
    out = []
    for r in records:
        m = pattern.search(r.path.name)
        if m is None:
            raise ValueError(
                f"--group-regex {group_regex!r} does not match file name {r.path.name!r}"
            )
        out.append(dataclasses.replace(r, group=m.group(1) if m.groups() else m.group(0)))
    return out


def group_split(
    records: Sequence[ImageRecord],
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> list[ImageRecord]:
    """Assign whole groups to train / val / test, stratified greedily by class.

    Groups are visited largest first (ties in seeded random order); each goes
    to the split whose per-class counts fall furthest short of their targets
    (``fraction x class total``) for the classes the group holds. Records
    that already have a split (a pre-split dataset) keep it, after a check
    that no group spans two splits.

    Raises
    ------
    ValueError
        If a pre-split dataset has a group in two splits.
    """
    if all(r.split is not None for r in records):
        seen: dict[str, str] = {}
        for r in records:
            other = seen.setdefault(r.group, str(r.split))
            if other != r.split:
                raise ValueError(
                    f"group {r.group!r} is in both {other!r} and {r.split!r}; "
                    "re-split the dataset or drop the grouping"
                )
        return list(records)
    fractions = {
        "train": 1.0 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    by_group: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_group[r.group].append(r)
    class_total = Counter(r.label for r in records)
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    rng = random.Random(seed)
    order = sorted(by_group)
    rng.shuffle(order)
    order.sort(key=lambda g: -len(by_group[g]))  # stable: ties stay shuffled
    assigned: dict[str, str] = {}
    for g in order:
        labels = Counter(r.label for r in by_group[g])
        best, best_gap = "train", -math.inf
        for s in SPLITS:
            if fractions[s] <= 0:
                continue
            gap = sum(
                (fractions[s] * class_total[c] - counts[s][c]) / class_total[c] * n
                for c, n in labels.items()
            )
            if gap > best_gap:
                best, best_gap = s, gap
        assigned[g] = best
        counts[best].update(labels)
    return [dataclasses.replace(r, split=assigned[r.group]) for r in records]


def _write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")


def view_names(mode: str) -> list[str]:
    """The rendered views of an input mode: ``dual`` gives a masked and a plain crop."""
    return ["mask", "crop"] if mode == "dual" else [mode]


def render_dataset(
    records: Sequence[ImageRecord], work: Path, cfg: TrainClassifierConfig
) -> list[dict[str, Any]]:
    """Render every record into ``work/<split>/<label>/`` and return the manifest rows.

    Every label (and every one of ``cfg.head_classes``) gets a folder in every
    split (ultralytics maps classes by folder name). Unreadable images are
    skipped and counted in the log.
    """
    labels = sorted({r.label for r in records} | set(cfg.head_classes))
    for s in SPLITS:
        for c in labels:
            (work / s / c).mkdir(parents=True, exist_ok=True)
    needs_mask = cfg.input_mode in ("mask", "dual")
    rows: list[dict[str, Any]] = []
    skipped = 0
    for r in records:
        image = read_rgb(r.path)
        if image is None:
            log.warning("cannot read image %r", str(r.path))
            skipped += 1
            continue
        scale, mpp = cfg.record_scale(r)
        crop, mask, found = prepare_crop(
            image,
            scale=scale,
            mpp=mpp,
            recrop=cfg.recrop,
            margin=cfg.margin,
            box_margin=cfg.box_margin,
            needs_mask=needs_mask,
        )
        field_scale = None
        if cfg.input_scale == "field":  # the window is imgsz px at work_mpp, as in the pipeline
            field_scale = 1.0 if mpp is None or cfg.work_mpp is None else mpp / cfg.work_mpp
        views = render_input(
            crop, mask, cfg.input_mode, cfg.imgsz, fill=MASK_FILL, field_scale=field_scale
        )
        stem = _safe_stem(r)
        for view, img in zip(view_names(cfg.input_mode), views, strict=True):
            name = f"{stem}{NAME_SEP}{view}.png"
            _write_png(work / str(r.split) / r.label / name, img)
            rows.append(
                {
                    "file": f"{r.split}/{r.label}/{name}",
                    "source": str(r.path),
                    "label": r.label,
                    "group": r.group,
                    "split": r.split,
                    "view": view,
                    "flip": "",
                    "segmented": found,
                }
            )
    if skipped:
        log.warning("skipped %d unreadable image(s)", skipped)
    return rows


def _safe_stem(r: ImageRecord) -> str:
    # Unique per source even when two class folders hold the same file name.
    digest = _hash_path(str(r.path)) % 10**8
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', r.path.stem)}_{digest:08d}"


def _hash_path(text: str) -> int:
    """A stable (process-independent) integer hash of a path string."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def balance_by_flips(
    rows: list[dict[str, Any]], work: Path, *, seed: int = 0
) -> list[dict[str, Any]]:
    """Add flipped copies of *training* renderings until every class matches the largest.

    Counts are in source images (a ``dual`` source has two renderings and is
    flipped as a pair). Each source image gives at most ``len(FLIPS)`` copies,
    so a class can grow to at most four times its size. Returns the new rows.
    """
    train = [r for r in rows if r["split"] == "train" and not r["flip"]]
    by_label: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in train:
        by_label[r["label"]][r["source"]].append(r)
    if not by_label:
        return []
    target = max(len(src) for src in by_label.values())
    rng = random.Random(seed)
    new_rows: list[dict[str, Any]] = []
    for label in sorted(by_label):
        sources = sorted(by_label[label])
        need = target - len(sources)
        if need <= 0:
            continue
        rng.shuffle(sources)
        plan = [(s, f) for f in FLIPS for s in sources][:need]
        for source, flip in plan:
            for r in by_label[label][source]:
                src_file = work / r["file"]
                img = cv2.imread(str(src_file), cv2.IMREAD_COLOR)
                if img is None:
                    raise OSError(f"cannot read rendered image {src_file}")
                stem = src_file.name[: -len(".png")]
                name = f"{stem}{NAME_SEP}flip{flip}.png"
                out = src_file.with_name(name)
                cv2.imwrite(str(out), cv2.flip(img, FLIPS[flip]))
                new_rows.append(
                    {**r, "file": str(Path(r["file"]).with_name(name).as_posix()), "flip": flip}
                )
    return new_rows
