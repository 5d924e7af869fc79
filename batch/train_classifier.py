"""Train a WBC classifier (ultralytics ``-cls``) from an ImageFolder, with honest splits.

Steps (`train_classifier`):

1. **Find images**: ``data/<class>/*.jpg|png|...`` (one folder per class), or
   a dataset already split into ``train/``, ``val/`` (and ``test/``).
   ``rename`` maps folder names to labels (``Early=early_pre_b``).
2. **Group and split**: every image belongs to a *group* (a patient, a
   slide, a source image): from a CSV (``file,group``), from a regular
   expression on the file name, or, with neither, the image itself ("split
   by image, not by patient"). Whole groups are assigned to train / val /
   test (stratified greedily by class), so no group lands in two splits.
3. **Render**: every image is turned into what the classifier will see at
   inference, with the same code (`batch.stages.classify.render_input`):
   optionally resampled from ``mpp`` to ``target_mpp``, optionally re-cropped
   to the segmented cell plus the pipeline's crop margin (``recrop``, for
   datasets like PBC whose images hold one centred cell with a wide rim),
   segmented (`batch.stages.segment.segment_wbc`) for the ``mask`` / ``dual``
   modes, and letterboxed to ``imgsz``. Renderings go to
   ``<out>/work/{train,val,test}/<class>/``; ``manifest.csv`` lists every file
   with its source, group, split, view and flip.
4. **Balance** the *train* split only: classes with fewer training images
   than the largest one get horizontally / vertically / both-ways flipped
   copies of their own training images (at most 3 per image). Validation
   and test images are never flipped or duplicated.
5. **Train** with ultralytics (``plots=False``, ``amp=False``; nothing is
   downloaded: the model is a ``.yaml`` or a local ``.pt``). ``freeze``
   follows the seeds' fine-tuning strategies: ``all`` trains every layer;
   ``lastN`` (``last10``, ``last3``) trains only the last N top-level layers
   of the ultralytics model (the rows of its summary; the ``Classify`` head
   is the last) and freezes the rest. yolov8n-cls has 10 such layers, so
   ``last10`` equals ``all`` there.
6. **Evaluate** the best checkpoint (chosen on val) on val and test, per
   source image (``dual``: the two views' probabilities averaged): accuracy,
   macro F1, per-class precision / recall / F1 / false-negative rate, the
   malignant-vs-benign false-negative rate when a ``benign`` class exists,
   MAE over class indices (seed 000; meaningful only for ordered labels),
   confusion matrix (JSON + PNG). Written to ``metrics.json``.
7. **Ship**: ``<out>/<name>.pt`` with its model card (JSON, markdown, and
   embedded in the checkpoint; `batch.models.write_model_card`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import random
import re
import shlex
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from batch.models import ModelCard, render_card_markdown, write_model_card
from batch.stages.classify import INPUT_MODES, MASK_FILL, WbcClassifier, render_input
from batch.stages.crop import DEFAULT_MARGIN, crop_regions, crop_wbcs
from batch.stages.segment import SegmentConfig, segment_wbc

__all__ = [
    "FLIPS",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "ImageRecord",
    "TrainClassifierConfig",
    "assign_groups",
    "balance_by_flips",
    "build_parser",
    "classification_metrics",
    "discover_images",
    "freeze_count",
    "group_split",
    "inner_box",
    "main",
    "plot_confusion",
    "prepare_crop",
    "render_dataset",
    "train_classifier",
    "write_classifier_markdown",
]

log = logging.getLogger(__name__)

#: The splits, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: File suffixes read as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
#: Flips used to balance the training split: name -> cv2.flip code.
FLIPS: dict[str, int] = {"h": 1, "v": 0, "hv": -1}
#: Default split fractions.
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
#: Default training image size (pixels): small, for a CPU budget.
DEFAULT_IMGSZ = 64
#: Fine-tuning strategies (seeds 000/001): train all layers, or only the last N.
FREEZE_PATTERN = re.compile(r"^(all|last(\d+))$")
#: Label of the non-malignant class for the malignant-vs-benign false-negative rate.
BENIGN_LABEL = "benign"
#: Separator between an image's stem and its view / flip in rendered file names.
NAME_SEP = "__"
#: Stated next to every figure when no grouping is known.
SPLIT_BY_IMAGE = "split by image, not by patient (no patient ids known)"
#: Stated on every card trained on weak labels.
WEAK_LABEL_NOTE = (
    "Weak labels: every cell crop carries the class of the whole image it was cut from "
    "(image-level labels), so some crops are mislabelled (e.g. benign cells in a malignant "
    "image); metrics measure agreement with those weak labels."
)


@dataclass(frozen=True)
class ImageRecord:
    """One source image: where it is, its label, its group and (once split) its split."""

    path: Path
    label: str
    group: str
    split: str | None = None


@dataclass
class TrainClassifierConfig:
    """Everything one classifier training run needs (see the module docstring)."""

    data: Path
    out: Path
    name: str = "classifier"
    input_mode: str = "mask"
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
    margin: float = DEFAULT_MARGIN
    box_margin: float | None = None
    balance: bool = True
    weak_labels: bool = False
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def validate(self) -> TrainClassifierConfig:
        """Raise ``ValueError`` on an invalid field; return ``self``."""
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"--input must be one of {INPUT_MODES}, got {self.input_mode!r}")
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
        if self.imgsz < 16 or self.epochs < 1 or self.batch < 1:
            raise ValueError("--imgsz must be >= 16, --epochs and --batch >= 1")
        return self

    @property
    def scale(self) -> float:
        """Resize factor from the source images to ``target_mpp`` (1 if either is unknown)."""
        if self.mpp is None or self.target_mpp is None:
            return 1.0
        return self.mpp / self.target_mpp

    @property
    def work_mpp(self) -> float | None:
        """Microns per pixel of the images after resampling."""
        return self.target_mpp if self.target_mpp is not None else self.mpp


# --------------------------------------------------------------------------- discovery


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def discover_images(
    root: Path,
    *,
    rename: dict[str, str] | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> list[ImageRecord]:
    """List an ImageFolder's images with their labels (group = the path, split if pre-split).

    Parameters
    ----------
    root
        ``root/<class>/...`` or ``root/{train,val,test}/<class>/...``.
    rename
        Folder name -> label.
    classes
        Keep only these labels (after renaming).
    max_per_class
        Keep at most this many images per label and split (a seeded random sample).
    seed
        Seed of that sample.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    rename = rename or {}
    presplit = (root / "train").is_dir()
    parts: list[tuple[str | None, Path]] = (
        [(s, root / s) for s in SPLITS if (root / s).is_dir()] if presplit else [(None, root)]
    )
    records: list[ImageRecord] = []
    rng = random.Random(seed)
    for split, base in parts:
        for cdir in _class_dirs(base):
            label = rename.get(cdir.name, cdir.name)
            if classes is not None and label not in classes:
                continue
            files = _images(cdir)
            if max_per_class is not None and len(files) > max_per_class:
                files = sorted(rng.sample(files, max_per_class))
            records += [ImageRecord(f, label, f.relative_to(root).as_posix(), split) for f in files]
    if not records:
        raise FileNotFoundError(
            f"no images under {str(root)!r}; expected <class>/<image> or train/<class>/<image>"
        )
    return records


def assign_groups(
    records: Sequence[ImageRecord],
    root: Path,
    *,
    groups_csv: Path | None = None,
    group_regex: str | None = None,
) -> list[ImageRecord]:
    """Give every record its group from a ``file,group`` CSV or a regex on the file name.

    CSV ``file`` entries match the path relative to ``root`` or the bare file
    name. The regex's first capture group (or whole match) is the group.
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
        with open(groups_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"file", "group"} <= set(reader.fieldnames):
                raise ValueError(
                    f"{groups_csv}: expected a CSV with columns 'file,group', got {reader.fieldnames}"
                )
            for row in reader:
                table[row["file"]] = row["group"]
        out = []
        missing = []
        for r in records:
            rel = r.path.relative_to(root).as_posix()
            g = table.get(rel, table.get(r.path.name))
            if g is None:
                missing.append(rel)
                continue
            out.append(ImageRecord(r.path, r.label, g, r.split))
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
        out.append(ImageRecord(r.path, r.label, m.group(1) if m.groups() else m.group(0), r.split))
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
    return [ImageRecord(r.path, r.label, r.group, assigned[r.group]) for r in records]


# --------------------------------------------------------------------------- rendering


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {str(path)!r}")
    return np.ascontiguousarray(bgr[..., ::-1])


def _resample(image: npt.NDArray[np.uint8], factor: float) -> npt.NDArray[np.uint8]:
    if abs(factor - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, size, interpolation=interp), dtype=np.uint8)


def inner_box(height: int, width: int, margin: float) -> tuple[float, float, float, float]:
    """The box a crop of ``height`` x ``width`` was cut around with ``margin`` (`crop_wbcs`).

    Exact up to the crop's outward rounding (under a pixel).
    """
    fx, fy = margin / (1 + 2 * margin) * width, margin / (1 + 2 * margin) * height
    return (fx, fy, width - fx, height - fy)


def prepare_crop(
    image: npt.NDArray[np.uint8],
    *,
    scale: float = 1.0,
    mpp: float | None = None,
    recrop: bool = False,
    margin: float = DEFAULT_MARGIN,
    box_margin: float | None = None,
    needs_mask: bool = True,
    seg_config: SegmentConfig | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None, bool]:
    """Turn one dataset image into a pipeline-like crop and its cell mask.

    The mask is segmented as the pipeline does it: on the crop, with the
    cell's box (``cell_box``) when it is known.

    Parameters
    ----------
    image
        RGB image.
    scale
        Resize factor applied first (source mpp / target mpp).
    mpp
        Microns per pixel *after* resizing (needed to segment).
    recrop
        The image holds one centred cell (PBC): segment it (keeping the
        nucleus that reaches the image's central part), and cut the image
        down to the cell's box grown by ``margin``, as
        `batch.stages.crop.crop_wbcs` does with a detector box.
    margin
        Margin of that re-crop.
    box_margin
        The images already are crops cut with this margin around a detector
        box (`batch.weak_labels` crops): the box is recovered with `inner_box`.
    needs_mask
        Segment the final crop (the ``mask`` and ``dual`` modes).
    seg_config
        Segmentation parameters.

    Returns
    -------
    crop, mask, found
        The crop, its cell mask (None when not needed) and whether a
        nucleus was found (False: the mask is empty).
    """
    img = _resample(image, scale)
    found = True
    cell_box: tuple[float, float, float, float] | None = None
    if box_margin is not None:
        cell_box = inner_box(img.shape[0], img.shape[1], box_margin)
    if recrop:
        if mpp is None:
            raise ValueError("recrop needs the images' mpp")
        h, w = img.shape[:2]
        seg = segment_wbc(img, mpp=mpp, config=seg_config, cell_box=(0.0, 0.0, w, h))
        if seg.found:
            ys, xs = np.nonzero(seg.cell_mask)
            box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
            x0, y0 = crop_regions(box, margin=margin)[0, :2].tolist()
            img = crop_wbcs(img, box, margin=margin)[0]
            cell_box = (box[0, 0] - x0, box[0, 1] - y0, box[0, 2] - x0, box[0, 3] - y0)
        else:
            found = False
    mask: npt.NDArray[np.bool_] | None = None
    if needs_mask:
        if mpp is None:
            raise ValueError("the mask and dual input modes need the images' mpp")
        seg = segment_wbc(img, mpp=mpp, config=seg_config, cell_box=cell_box)
        mask = seg.cell_mask
        found = found and seg.found
    return img, mask, found


def _write_png(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")


def _view_names(mode: str) -> list[str]:
    return ["mask", "crop"] if mode == "dual" else [mode]


def render_dataset(
    records: Sequence[ImageRecord], work: Path, cfg: TrainClassifierConfig
) -> list[dict[str, Any]]:
    """Render every record into ``work/<split>/<label>/`` and return the manifest rows.

    Every label gets a folder in every split (ultralytics maps classes by
    folder name). Unreadable images are skipped and counted in the log.
    """
    labels = sorted({r.label for r in records})
    for s in SPLITS:
        for c in labels:
            (work / s / c).mkdir(parents=True, exist_ok=True)
    needs_mask = cfg.input_mode in ("mask", "dual")
    rows: list[dict[str, Any]] = []
    skipped = 0
    for r in records:
        try:
            image = _read_rgb(r.path)
        except ValueError as e:
            log.warning("%s", e)
            skipped += 1
            continue
        crop, mask, found = prepare_crop(
            image,
            scale=cfg.scale,
            mpp=cfg.work_mpp,
            recrop=cfg.recrop,
            margin=cfg.margin,
            box_margin=cfg.box_margin,
            needs_mask=needs_mask,
        )
        views = render_input(crop, mask, cfg.input_mode, cfg.imgsz, fill=MASK_FILL)
        stem = _safe_stem(r)
        for view, img in zip(_view_names(cfg.input_mode), views, strict=True):
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


# --------------------------------------------------------------------------- metrics


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class P / R / F1 / FNR, malignant-vs-benign FNR, MAE, confusion.

    Parameters
    ----------
    y_true, y_pred
        Class indices into ``class_names``.
    class_names
        Labels in index order.

    Returns
    -------
    dict
        JSON-serialisable metrics. ``confusion_matrix[i][j]`` counts true
        class ``i`` predicted as ``j``. ``mae_class_index`` is the mean
        absolute difference of class indices (seed 000's MAE; meaningful only
        when the label order is ordinal). ``malignant_vs_benign`` is present
        when a class named ``benign`` exists: positives are all other classes.
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "false_negative_rate": float(1 - recall[i]) if present[i] else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    n = int(t.size)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": float((t == p).mean()) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "macro_precision": float(precision[present].mean()) if present.any() else 0.0,
        "macro_recall": float(recall[present].mean()) if present.any() else 0.0,
        "false_negative_rate_macro": float((1 - recall[present]).mean()) if present.any() else 0.0,
        "mae_class_index": float(np.abs(t - p).mean()) if n else 0.0,
        "per_class": per_class,
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
    }
    lower = [c.lower() for c in class_names]
    if BENIGN_LABEL in lower:
        b = lower.index(BENIGN_LABEL)
        malignant = t != b
        missed = malignant & (p == b)
        benign = t == b
        out["malignant_vs_benign"] = {
            "benign_class": class_names[b],
            "n_malignant": int(malignant.sum()),
            "n_benign": int(benign.sum()),
            "false_negative_rate": float(missed.sum() / malignant.sum())
            if malignant.any()
            else None,
            "false_positive_rate": float((benign & (p != b)).sum() / benign.sum())
            if benign.any()
            else None,
        }
    return out


def plot_confusion(
    cm: Sequence[Sequence[int]], class_names: Sequence[str], out: Path, title: str
) -> Path:
    """Save a confusion matrix (rows true, columns predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.6 * k))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = m.max() if m.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(m[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if top and m[i, j] > top / 2 else "black",
            )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- training


def freeze_count(model: str, freeze: str) -> tuple[int, int]:
    """Map a seed fine-tuning strategy to ultralytics' ``freeze`` (first N layers frozen).

    Returns
    -------
    tuple of int
        ``(n_frozen, n_layers)``: ``all`` -> ``(0, L)``; ``lastN`` ->
        ``(max(0, L - N), L)`` with ``L`` the model's top-level layer count.
    """
    m = FREEZE_PATTERN.match(freeze)
    if m is None:
        raise ValueError(f"freeze must be 'all' or 'lastN', got {freeze!r}")
    from ultralytics import YOLO

    net: Any = YOLO(model, task="classify").model
    n_layers = len(net.model)
    if m.group(1) == "all":
        return 0, n_layers
    return max(0, n_layers - int(m.group(2))), n_layers


def _evaluate(
    weights: Path, rows: Sequence[dict[str, Any]], work: Path, cfg: TrainClassifierConfig
) -> tuple[dict[str, Any], list[str]]:
    clf = WbcClassifier(
        weights,
        name=cfg.name,
        input_mode=cfg.input_mode,
        device=cfg.device,
        imgsz=cfg.imgsz,
        batch_size=max(cfg.batch, 1),
    )
    names = clf.class_names
    index = {c: i for i, c in enumerate(names)}
    grouped = cfg.groups_csv is not None or cfg.group_regex is not None
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        split_rows = [r for r in rows if r["split"] == split and not r["flip"]]
        if not split_rows:
            continue
        by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in split_rows:
            by_source[r["source"]].append(r)
        sources = sorted(by_source)
        images, owner = [], []
        for i, s in enumerate(sources):
            for r in by_source[s]:
                images.append(_read_rgb(work / r["file"]))
                owner.append(i)
        probs = clf.predict_images(images)
        agg = np.zeros((len(sources), len(names)), dtype=np.float64)
        np.add.at(agg, np.asarray(owner), probs)
        agg /= agg.sum(axis=1, keepdims=True)  # dual: the mean of the two views
        y_true = [index[by_source[s][0]["label"]] for s in sources]
        m = classification_metrics(y_true, agg.argmax(axis=1).tolist(), names)
        m["split"] = split
        groups = [str(by_source[s][0]["group"]) for s in sources]
        m["n_groups"] = len(set(groups))
        if grouped:
            by_group = _group_metrics(agg, y_true, groups, names)
            if by_group is not None:
                m["by_group"] = by_group
        results[split] = m
    return results, names


def _group_metrics(
    probs: npt.NDArray[np.float64], y_true: Sequence[int], groups: Sequence[str], names: list[str]
) -> dict[str, Any] | None:
    """Metrics per group (its images' probabilities averaged), if every group has one label."""
    label_of: dict[str, int] = {}
    for g, y in zip(groups, y_true, strict=True):
        if label_of.setdefault(g, y) != y:
            return None
    keys = sorted(label_of)
    pos = {g: i for i, g in enumerate(keys)}
    total = np.zeros((len(keys), probs.shape[1]))
    np.add.at(total, np.asarray([pos[g] for g in groups]), probs)
    m = classification_metrics([label_of[g] for g in keys], total.argmax(axis=1).tolist(), names)
    m["note"] = "one prediction per group: the mean of its images' probabilities"
    return m


def _split_note(cfg: TrainClassifierConfig) -> str:
    if cfg.groups_csv is None and cfg.group_regex is None:
        return SPLIT_BY_IMAGE
    how = cfg.group_desc or (
        f"groups from {cfg.groups_csv}"
        if cfg.groups_csv
        else f"groups from file-name regex {cfg.group_regex!r}"
    )
    return f"split by group ({how}); no group in two splits"


def _metrics_markdown(metrics: dict[str, Any]) -> str:
    lines = ["## Classification metrics", ""]
    for split, m in metrics.items():
        if not isinstance(m, dict) or "accuracy" not in m:
            continue
        lines += [
            f"### {split}: {m['n']} images, {m.get('n_groups', '?')} groups ({m.get('split_note', '')})",
            "",
            f"accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, "
            f"macro FNR {m['false_negative_rate_macro']:.3f}, MAE over class indices "
            f"{m['mae_class_index']:.3f} (seed 000's MAE; meaningful only for ordered labels)",
            "",
            "| class | precision | recall | F1 | FNR | support |",
            "| - | - | - | - | - | - |",
        ]
        for c, v in m["per_class"].items():
            fnr = "-" if v["false_negative_rate"] is None else f"{v['false_negative_rate']:.3f}"
            lines.append(
                f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {fnr} | {v['support']} |"
            )
        bg = m.get("by_group")
        if bg:
            lines += [
                "",
                f"Per group ({bg['n']} groups; {bg['note']}): accuracy {bg['accuracy']:.3f}, "
                f"macro F1 {bg['macro_f1']:.3f}",
            ]
        mb = m.get("malignant_vs_benign")
        if mb and mb.get("false_negative_rate") is not None:
            lines += [
                "",
                f"Malignant vs benign: false-negative rate {mb['false_negative_rate']:.3f} "
                f"({mb['n_malignant']} malignant, {mb['n_benign']} benign)",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


def _write_manifest(rows: Sequence[dict[str, Any]], path: Path) -> None:
    fields = ["file", "source", "label", "group", "split", "view", "flip", "segmented"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def train_classifier(cfg: TrainClassifierConfig) -> dict[str, Any]:
    """Run steps 1-7 of the module docstring; return the metrics (also in ``metrics.json``).

    Outputs in ``cfg.out``: ``<name>.pt`` (+ ``.json`` / ``.md`` card),
    ``metrics.json``, ``confusion_<split>.png``, ``work/`` (renderings and
    ``manifest.csv``) and ``runs/`` (ultralytics' own logs).
    """
    cfg.validate()
    out = Path(cfg.out)
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    root = Path(cfg.data)

    records = discover_images(
        root, rename=cfg.rename, classes=cfg.classes, max_per_class=cfg.max_per_class, seed=cfg.seed
    )
    records = assign_groups(records, root, groups_csv=cfg.groups_csv, group_regex=cfg.group_regex)
    records = group_split(
        records, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed
    )
    t0 = time.time()
    rows = render_dataset(records, work, cfg)
    if cfg.balance:
        rows += balance_by_flips(rows, work, seed=cfg.seed)
    _write_manifest(rows, work / "manifest.csv")
    render_s = time.time() - t0
    # Source images (what a figure's n counts) and renderings (what ultralytics trains on:
    # two per source in dual mode, plus the flipped copies in train).
    split_counts = {
        s: dict(
            sorted(
                Counter(
                    r["label"]
                    for r in rows
                    if r["split"] == s
                    and not r["flip"]
                    and r["view"] == _view_names(cfg.input_mode)[0]
                ).items()
            )
        )
        for s in SPLITS
    }
    rendering_counts = {
        s: dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items()))
        for s in SPLITS
    }
    log.info("rendered in %.0f s: %s", render_s, split_counts)

    n_frozen, n_layers = freeze_count(cfg.model, cfg.freeze)
    from ultralytics import YOLO

    model = YOLO(cfg.model, task="classify")
    train_kwargs: dict[str, Any] = {
        "data": str(work.resolve()),
        "epochs": cfg.epochs,
        "imgsz": cfg.imgsz,
        "batch": cfg.batch,
        "device": cfg.device,
        "workers": cfg.workers,
        "seed": cfg.seed,
        "deterministic": True,
        "patience": cfg.patience,
        "plots": False,
        "amp": False,
        "project": str((out / "runs").resolve()),
        "name": cfg.name,
        "exist_ok": True,
        "verbose": False,
    }
    if n_frozen:
        train_kwargs["freeze"] = n_frozen
    t1 = time.time()
    model.train(**train_kwargs)
    train_s = time.time() - t1
    best = out / "runs" / cfg.name / "weights" / "best.pt"
    if not best.is_file():
        best = out / "runs" / cfg.name / "weights" / "last.pt"
    weights = out / f"{cfg.name}.pt"
    shutil.copyfile(best, weights)

    metrics, names = _evaluate(weights, rows, work, cfg)
    note = _split_note(cfg)
    for split, m in metrics.items():
        m["split_note"] = note
        m["selection"] = (
            "checkpoint chosen on val top-1"
            if split == "val"
            else "untouched by training and selection"
        )
        plot_confusion(
            m["confusion_matrix"],
            names,
            out / f"confusion_{split}.png",
            f"{cfg.name} {split} (n={m['n']}; {note})",
        )
    summary = {
        "name": cfg.name,
        "input_mode": cfg.input_mode,
        "class_names": names,
        "split_note": note,
        "images_per_split": split_counts,
        "renderings_per_split": rendering_counts,
        "metrics": metrics,
        "training_time_s": round(train_s, 1),
        "render_time_s": round(render_s, 1),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")

    source_counts = {s: sum(split_counts[s].values()) for s in SPLITS}
    sources = [dict(src, images=source_counts) for src in cfg.sources] or [
        {"name": root.name, "path": str(root), "licence": "unknown", "images": source_counts}
    ]
    notes = list(cfg.notes) + [f"Figures: {note}."]
    if cfg.weak_labels:
        notes.append(WEAK_LABEL_NOTE)
    if cfg.balance:
        notes.append(
            "Training split balanced by flipped copies (h, v, hv); val/test never augmented."
        )
    card = ModelCard(
        name=cfg.name,
        task="classify",
        class_names=names,
        trained_mpp=cfg.work_mpp,
        architecture=cfg.model,
        imgsz=cfg.imgsz,
        data_sources=sources,
        metrics=metrics,
        training_command=cfg.command,
        reproduce_command=cfg.command,
        training_time_s=round(train_s, 1),
        notes=notes,
        extra={
            "input_mode": cfg.input_mode,
            "mask_fill": list(MASK_FILL),
            "freeze": cfg.freeze,
            "frozen_layers": n_frozen,
            "model_layers": n_layers,
            "epochs": cfg.epochs,
            "recrop": cfg.recrop,
            "crop_margin": cfg.margin,
            "box_margin": cfg.box_margin,
            "source_mpp": cfg.mpp,
            "split_note": note,
            "split_fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction},
            "images_per_split": split_counts,
            "renderings_per_split": rendering_counts,
            "weak_labels": cfg.weak_labels,
            "seed": cfg.seed,
        },
    )
    write_model_card(card, weights, embed=True, markdown=False)
    write_classifier_markdown(weights)
    return summary


def write_classifier_markdown(weights: Path) -> Path:
    """Write ``<stem>.md`` for a classifier from its sidecar card JSON (metrics tables included)."""
    data = json.loads(weights.with_suffix(".json").read_text())
    sha = data.pop("sha256", None)
    card = ModelCard.from_dict(data)
    md = render_card_markdown(ModelCard(**{**asdict(card), "metrics": {}}))
    md += "\n" + _metrics_markdown(card.metrics) + f"\nSHA-256 of `{weights.name}`: `{sha}`\n"
    out = weights.with_suffix(".md")
    out.write_text(md)
    return out


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``train_classifier`` command line."""
    p = argparse.ArgumentParser(
        prog="train_classifier",
        description="Train a WBC classifier (ultralytics -cls) from an ImageFolder.",
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="ImageFolder: <class>/<img> or train|val|test/<class>/<img>",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--name", default="classifier", help="model name (weights <out>/<name>.pt)")
    p.add_argument("--input", dest="input_mode", default="mask", choices=INPUT_MODES)
    p.add_argument(
        "--model", default="yolov8n-cls.yaml", help="ultralytics model yaml or a local .pt"
    )
    p.add_argument(
        "--freeze", default="all", help="all (train every layer) | last10 | last3 | lastN"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu | 0 | auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--groups",
        dest="groups_csv",
        type=Path,
        help="CSV file,group (patient / slide / source image)",
    )
    g.add_argument("--group-regex", help="regex on the file name; its first group is the group")
    p.add_argument("--group-desc", help="what a group is, for the model card (e.g. 'source image')")
    p.add_argument("--rename", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--classes", help="comma-separated labels to keep (after --rename)")
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--mpp", type=float, help="microns per pixel of the images")
    p.add_argument("--target-mpp", type=float, help="resample images to this mpp first")
    p.add_argument(
        "--recrop", action="store_true", help="crop each image to its segmented cell + margin"
    )
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    p.add_argument(
        "--box-margin",
        type=float,
        help="the images are detector crops cut with this margin (weak_crops: 0.15)",
    )
    p.add_argument("--no-balance", dest="balance", action="store_false")
    p.add_argument("--weak-labels", action="store_true", help="labels are image-level (weak)")
    p.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="JSON",
        help='data source for the card, e.g. \'{"name": "PBC", "url": "...", "licence": "CC BY 4.0"}\'',
    )
    p.add_argument("--note", action="append", default=[], help="caveat for the model card")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TrainClassifierConfig:
    """Parse the command line into a `TrainClassifierConfig`."""
    args = build_parser().parse_args(argv)
    rename = {}
    for item in args.rename:
        if "=" not in item:
            raise SystemExit(f"--rename expects FOLDER=LABEL, got {item!r}")
        k, v = item.split("=", 1)
        rename[k] = v
    device = args.device
    if device == "auto":
        from batch.stages.detect import select_device

        device = select_device("auto").replace("cuda:", "")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    return TrainClassifierConfig(
        data=args.data,
        out=args.out,
        name=args.name,
        input_mode=args.input_mode,
        model=args.model,
        freeze=args.freeze,
        epochs=args.epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        device=device,
        workers=args.workers,
        seed=args.seed,
        patience=args.patience,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        groups_csv=args.groups_csv,
        group_regex=args.group_regex,
        group_desc=args.group_desc,
        rename=rename,
        classes=args.classes.split(",") if args.classes else None,
        max_per_class=args.max_per_class,
        mpp=args.mpp,
        target_mpp=args.target_mpp,
        recrop=args.recrop,
        margin=args.margin,
        box_margin=args.box_margin,
        balance=args.balance,
        weak_labels=args.weak_labels,
        sources=[json.loads(s) for s in args.source],
        notes=list(args.note),
        command="python jobs/train_classifier.py " + shlex.join(argv_list),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = config_from_args(argv)
    summary = train_classifier(cfg)
    print(json.dumps({k: summary[k] for k in ("name", "class_names", "split_note")}, indent=2))
    for split, m in summary["metrics"].items():
        print(
            f"{split}: accuracy {m['accuracy']:.3f} macro_f1 {m['macro_f1']:.3f} (n={m['n']}; {m['split_note']})"
        )
    return 0
