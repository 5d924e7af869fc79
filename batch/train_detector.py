"""Train the RBC / WBC / platelet detector (ultralytics YOLO) at one fixed scale.

Steps, each a function that can be used on its own:

1. ``read_detection_dataset``: read YOLO-format (``images/``, ``labels/``,
   optional ``train``/``val`` subfolders, ``data.yaml``) or Pascal VOC
   (``JPEGImages/``, ``Annotations/``, ``ImageSets/{train,val}.txt``) sets
   into ``LabeledImage`` records with canonical class names.
2. ``merge_datasets``: merge several sets without counting an image twice.
   Images are matched by content (a normalised 32x24 grey thumbnail, so a
   re-encoded copy matches): TXL-PBC re-annotates BCCD photos under new
   names. The first set given wins a duplicate (pass the better-labelled one
   first), and an image that is validation data in *any* set never trains.
3. ``prepare_yolo_dataset``: resample every image to the trained mpp (each
   image's own mpp estimated from its median RBC box, ``RBC_DIAMETER_UM``)
   and pack the resampled images into square canvases of exactly ``imgsz``
   pixels. Ultralytics resizes every training image so its long side is
   ``imgsz``; canvases of exactly that size are left alone, so the network
   sees cells at the trained scale only (plus the ``scale`` augmentation).
4. ``train_detector``: ultralytics training, then evaluation of the best
   weights through ``CellDetector`` (the pipeline's own resampling) on the
   original validation images, then weights, ``metrics.json`` and a model
   card (JSON + markdown, also embedded in the ``.pt``) in ``--out``.

Fine-tuning strategies (``--freeze``), after seed 000, which compared
"unfreezing all layers, the last 10, and the last 3" of YOLOv8 n/s/m/l/x.
The value names the part that is *trained*:

- ``all``: every layer trains (ultralytics ``freeze=None``);
- ``last10``: only the last 10 top-level modules train, i.e. the first
  ``len(model.model) - 10`` are frozen; for YOLOv8 (23 modules) that freezes
  the backbone (0-9) and the first three neck modules (10-12);
- ``last3``: only the last 3 train; for YOLOv8 that is the P5 neck block
  (Concat + C2f, modules 20-21) and the ``Detect`` head (22).

Freezing only makes sense when starting from trained weights (a local
``.pt``); from a ``.yaml`` the frozen layers stay random, so the job warns.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import yaml

from batch.stages.detect import (
    DETECTOR_CLASSES,
    PAD_VALUE,
    estimate_mpp_from_rbc,
    normalize_class_name,
    resample,
)

__all__ = [
    "DEFAULT_TRAINED_MPP",
    "FREEZE_STRATEGIES",
    "KNOWN_SOURCES",
    "LabeledImage",
    "MergedData",
    "PreparedData",
    "TrainDetectorConfig",
    "build_parser",
    "offline_ultralytics",
    "freeze_layers",
    "image_mpps",
    "image_fingerprint",
    "main",
    "merge_datasets",
    "pack_images",
    "prepare_yolo_dataset",
    "read_detection_dataset",
    "synthetic_images",
    "train_detector",
]

log = logging.getLogger(__name__)

#: The scale the shipped detector is trained at (um/px). RBC ~37 px, WBC 50-75 px,
#: platelet ~11-18 px. At 0.25 (a 40x scan, the synthetic slides' scale) platelets
#: are ~8-12 px and a YOLOv8n trained there found none (AP50 0.0 after 21 epochs);
#: 0.2 costs 1.56x the pixels of 0.25 and made them learnable.
DEFAULT_TRAINED_MPP = 0.2
#: Training canvas side (px) at the trained mpp: the resampled photos (<= ~250 px)
#: pack two to a row.
DEFAULT_IMGSZ = 384
#: Fine-tuning strategies of seed 000: number of trailing top-level modules trained.
FREEZE_STRATEGIES: dict[str, int | None] = {"all": None, "last10": 10, "last3": 3}
#: Thumbnail size (w, h) used to recognise the same photo in two datasets.
FINGERPRINT_SIZE = (32, 24)
#: Correlation of two thumbnails above which they are the same photo.
DUPLICATE_CORRELATION = 0.98
#: Aspect ratios further apart than this are never the same photo.
ASPECT_TOLERANCE = 0.02
#: Pixels of padding left between images packed on one canvas.
PACK_GAP = 4
#: A box cut by a tile border is kept if at least this fraction of its area remains.
MIN_VISIBLE_FRACTION = 0.4
#: Fraction of a set without a split that is held out for validation.
DEFAULT_VAL_FRACTION = 0.2
#: Image suffixes read from dataset folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: Keys of the headline metrics (validation photos of all real sets, each once).
_HEADLINE_KEYS = ("map50", "map50_95", "precision", "recall", "f1", "per_class", "n_images", "conf")
#: Side of a synthetic training field, in training canvases.
SYNTH_FIELD_CANVASES = 4
#: Side (px) of a synthetic validation field.
SYNTH_VAL_SIZE = 640
#: Seed offset that keeps synthetic validation fields apart from training ones.
SYNTH_VAL_SEED_OFFSET = 1000
#: Ultralytics settings that would reach the network or start third-party loggers.
_ULTRALYTICS_INTEGRATIONS = (
    "sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb",
)
#: Provenance of the sets the project knows (for model cards).
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    "txl-pbc": {
        "url": "https://github.com/lugan113/TXL-PBC_Dataset",
        "licence": "MIT (LICENSE.txt)",
        "note": "re-annotated from BCCD, BCD, PBC and Raabin-WBC",
    },
    "bccd": {
        "url": "https://github.com/Shenggan/BCCD_Dataset",
        "licence": "MIT (LICENSE)",
        "note": "many RBCs not annotated; boxes loose",
    },
    "synthetic": {
        "url": "batch.synth",
        "licence": "generated by hemaray (AGPL-3.0-or-later)",
        "note": "synthetic smears with exact ground truth",
    },
}


@dataclass(frozen=True)
class LabeledImage:
    """One annotated image of a detection dataset.

    ``boxes`` are ``xyxy`` in the image's pixels; ``classes`` canonical names.
    """

    path: Path
    width: int
    height: int
    boxes: npt.NDArray[np.float64]
    classes: tuple[str, ...]
    source: str
    split: str
    #: Known microns per pixel; None: estimated from the labelled RBCs.
    mpp: float | None = None

    def read_rgb(self) -> npt.NDArray[np.uint8]:
        """The image as an RGB ``uint8`` array."""
        bgr = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"cannot read image {self.path}")
        return np.ascontiguousarray(bgr[..., ::-1])


def _yolo_names(root: Path) -> list[str] | None:
    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        p = root / name
        if p.is_file():
            data = yaml.safe_load(p.read_text()) or {}
            names = data.get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names)]
            if isinstance(names, list):
                return [str(n) for n in names]
    p = root / "classes.txt"
    if p.is_file():
        return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    return None


def _image_size(path: Path) -> tuple[int, int]:
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if im is None:
        raise OSError(f"cannot read image {path}")
    return int(im.shape[1]), int(im.shape[0])


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_yolo(root: Path, source: str, names: Sequence[str] | None) -> list[LabeledImage]:
    names = list(names) if names is not None else _yolo_names(root)
    if names is None:
        raise ValueError(
            f"{root}: YOLO set without class names; add data.yaml with 'names' or pass names"
        )
    canon = [normalize_class_name(n) for n in names]
    images_dir, labels_dir = root / "images", root / "labels"
    splits = sorted(d.name for d in images_dir.iterdir() if d.is_dir())
    folders = [(s, images_dir / s, labels_dir / s) for s in splits] or [
        ("all", images_dir, labels_dir)
    ]
    out = []
    for split, im_dir, lb_dir in folders:
        for path in _list_images(im_dir):
            w, h = _image_size(path)
            label = lb_dir / (path.stem + ".txt")
            rows = (
                np.loadtxt(label, ndmin=2, dtype=np.float64)
                if label.is_file() and label.stat().st_size
                else np.zeros((0, 5))
            )
            if rows.size and rows.shape[1] != 5:
                raise ValueError(
                    f"{label}: expected 5 columns (class cx cy w h), got {rows.shape[1]}"
                )
            cx, cy, bw, bh = rows[:, 1] * w, rows[:, 2] * h, rows[:, 3] * w, rows[:, 4] * h
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
            classes = tuple(canon[int(c)] for c in rows[:, 0])
            out.append(LabeledImage(path, w, h, boxes.reshape(-1, 4), classes, source, split))
    return out


def _voc_split_ids(root: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for folder in (root / "ImageSets", root / "ImageSets" / "Main"):
        for split in ("train", "val", "test"):
            p = folder / f"{split}.txt"
            if p.is_file() and split not in found:
                found[split] = {ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()}
    return found


def _read_voc(root: Path, source: str) -> list[LabeledImage]:
    split_ids = _voc_split_ids(root)
    out = []
    for ann in sorted((root / "Annotations").glob("*.xml")):
        tree = ET.parse(ann).getroot()
        fname = tree.findtext("filename") or (ann.stem + ".jpg")
        path = root / "JPEGImages" / fname
        if not path.is_file():
            path = root / "JPEGImages" / (ann.stem + ".jpg")
        if not path.is_file():
            log.warning("%s: no image for %s; skipped", root, ann.name)
            continue
        w, h = _image_size(path)
        boxes, classes = [], []
        for obj in tree.iter("object"):
            bb = obj.find("bndbox")
            if bb is None:
                continue
            x0, y0, x1, y1 = (float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)])
            classes.append(normalize_class_name(obj.findtext("name") or ""))
        splits = [s for s, ids in split_ids.items() if ann.stem in ids]
        split = splits[0] if splits else ("none" if split_ids else "all")
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out.append(LabeledImage(path, w, h, arr, tuple(classes), source, split))
    return out


def read_detection_dataset(
    root: str | Path, *, source: str | None = None, names: Sequence[str] | None = None
) -> list[LabeledImage]:
    """Read a YOLO-format or Pascal VOC detection dataset.

    Parameters
    ----------
    root
        The dataset folder. VOC if it has ``Annotations/``, YOLO if ``images/``.
    source
        Name recorded on every image (default: the folder's name).
    names
        YOLO class names by id when the folder has no ``data.yaml``.

    Returns
    -------
    list of LabeledImage
        With ``split`` from the set's own split (``train``, ``val``, ...),
        ``"all"`` when the set has none, ``"none"`` for VOC images listed in
        no split file.
    """
    root = Path(root)
    source = source or root.name
    if (root / "Annotations").is_dir():
        return _read_voc(root, source)
    if (root / "images").is_dir():
        return _read_yolo(root, source, names)
    raise ValueError(
        f"{root}: not a detection dataset; expected YOLO (images/, labels/) or "
        "Pascal VOC (Annotations/, JPEGImages/)"
    )


def image_fingerprint(path: str | Path) -> npt.NDArray[np.float32]:
    """Zero-mean, unit-norm grey thumbnail: equal for re-encoded copies of one photo."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise OSError(f"cannot read image {path}")
    thumb = cv2.resize(grey, FINGERPRINT_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
    thumb = thumb.ravel() - thumb.mean()
    return thumb / (np.linalg.norm(thumb) + 1e-6)


@dataclass
class MergedData:
    """Training and validation images after merging and deduplication."""

    train: list[LabeledImage]
    val: list[LabeledImage]
    report: dict[str, Any] = field(default_factory=dict)


def _hash_split(path: Path, val_fraction: float) -> str:
    """Deterministic split by file name (stable across machines and runs)."""
    digest = hashlib.sha256(path.name.encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") / 2**32 < val_fraction else "train"


def merge_datasets(
    sets: Sequence[Sequence[LabeledImage]], *, val_fraction: float = DEFAULT_VAL_FRACTION
) -> MergedData:
    """Merge detection sets without counting one photo twice or training on validation.

    Parameters
    ----------
    sets
        Image lists in priority order: for a photo present in several sets,
        the labels of the first set win.
    val_fraction
        For images without a split (``"all"``), the fraction held out for
        validation (deterministic, by file name).

    Returns
    -------
    MergedData
        ``train`` holds no photo that is validation data in any set; ``val``
        holds each validation photo once.
    """
    # "test" and unlisted ("none") images are held out from both training and validation.
    items = [im for s in sets for im in s if im.split in ("train", "val", "all")]
    if not items:
        return MergedData([], [], {"images": 0})
    splits = [_hash_split(im.path, val_fraction) if im.split == "all" else im.split for im in items]
    fps = np.stack([image_fingerprint(im.path) for im in items])
    aspect = np.asarray([im.width / im.height for im in items])
    # group[i]: index of the first (highest-priority) copy of item i's photo.
    group = list(range(len(items)))
    for i in range(len(items)):
        if group[i] != i:
            continue
        same_shape = np.abs(aspect[i + 1 :] - aspect[i]) <= ASPECT_TOLERANCE * aspect[i]
        corr = fps[i + 1 :] @ fps[i]
        for j in np.nonzero(same_shape & (corr > DUPLICATE_CORRELATION))[0] + i + 1:
            if group[j] == j:
                group[j] = i
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    train, val = [], []
    n_dropped_train = 0
    for g, idx in members.items():
        in_val = any(splits[i] == "val" for i in idx)
        # Labels of the highest-priority copy; split from the whole group.
        chosen = items[g]
        if in_val:
            val.append(LabeledImage(**{**chosen.__dict__, "split": "val"}))
            n_dropped_train += sum(splits[i] == "train" for i in idx)
        elif any(splits[i] == "train" for i in idx):
            train.append(LabeledImage(**{**chosen.__dict__, "split": "train"}))
    report = {
        "images_read": len(items),
        "unique_photos": len(members),
        "duplicates": len(items) - len(members),
        "train_copies_dropped_because_validation_elsewhere": n_dropped_train,
        "train": len(train),
        "val": len(val),
        "train_by_source": _count_by(train, "source"),
        "val_by_source": _count_by(val, "source"),
    }
    return MergedData(train, val, report)


def _count_by(images: Iterable[LabeledImage], attr: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for im in images:
        counts[str(getattr(im, attr))] += 1
    return dict(counts)


def image_mpps(images: Sequence[LabeledImage]) -> list[float]:
    """Each image's mpp: known, else from its labelled RBCs, else its source and size group's median.

    Raises
    ------
    ValueError
        If no image of the whole list has enough RBCs to estimate a scale.
    """
    own = [
        im.mpp
        if im.mpp is not None
        else estimate_mpp_from_rbc(im.boxes, im.classes, image_shape=(im.height, im.width))
        for im in images
    ]
    groups: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for im, m in zip(images, own, strict=True):
        if m is not None:
            groups[(im.source, im.width, im.height)].append(m)
    known = [m for m in own if m is not None]
    if not known:
        raise ValueError("no image has enough labelled RBCs to estimate its microns per pixel")
    overall = float(np.median(known))
    out = []
    for im, m in zip(images, own, strict=True):
        g = groups.get((im.source, im.width, im.height))
        out.append(m if m is not None else float(np.median(g)) if g else overall)
    return out


def _tile_image(
    image: npt.NDArray[np.uint8],
    boxes: npt.NDArray[np.float64],
    classes: Sequence[int],
    size: int,
) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]]:
    """Cut an image larger than ``size`` into pieces of at most ``size``; clip boxes."""
    h, w = image.shape[:2]
    if h <= size and w <= size:
        return [(image, boxes, list(classes))]
    out = []
    ys = list(range(0, max(h - size, 0) + 1, size)) + (
        [h - size] if h > size and (h - size) % size else []
    )
    xs = list(range(0, max(w - size, 0) + 1, size)) + (
        [w - size] if w > size and (w - size) % size else []
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for y in ys if h > size else [0]:
        for x in xs if w > size else [0]:
            piece = image[y : y + size, x : x + size]
            b = boxes - [x, y, x, y]
            b[:, [0, 2]] = b[:, [0, 2]].clip(0, piece.shape[1])
            b[:, [1, 3]] = b[:, [1, 3]].clip(0, piece.shape[0])
            vis = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            keep = vis >= MIN_VISIBLE_FRACTION * np.maximum(area, 1e-9)
            out.append((piece, b[keep], [c for c, k in zip(classes, keep, strict=True) if k]))
    return out


def pack_images(
    pieces: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]],
    size: int,
    *,
    gap: int = PACK_GAP,
) -> list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]]:
    """Shelf-pack images (each at most ``size``) onto square ``size`` canvases.

    Boxes move with their image. Empty canvas area is ``PAD_VALUE`` grey, the
    value ultralytics and ``CellDetector`` pad with.
    """
    canvases: list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]] = []
    canvas: npt.NDArray[np.uint8] | None = None
    boxes: list[npt.NDArray[np.float64]] = []
    classes: list[int] = []
    shelf_y = shelf_h = cursor_x = 0

    def flush() -> None:
        if canvas is not None:
            canvases.append((canvas, np.concatenate(boxes) if boxes else np.zeros((0, 4)), classes))

    for image, b, c in pieces:
        h, w = image.shape[:2]
        if h > size or w > size:
            raise ValueError(f"piece {w}x{h} does not fit a {size} px canvas; tile it first")
        if canvas is not None and cursor_x + w > size:
            shelf_y, cursor_x, shelf_h = shelf_y + shelf_h + gap, 0, 0
        if canvas is None or shelf_y + h > size:
            flush()
            canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
            boxes, classes = [], []
            shelf_y = shelf_h = cursor_x = 0
        canvas[shelf_y : shelf_y + h, cursor_x : cursor_x + w] = image
        boxes.append(b + [cursor_x, shelf_y, cursor_x, shelf_y])
        classes.extend(c)
        cursor_x += w + gap
        shelf_h = max(shelf_h, h)
    flush()
    return canvases


@dataclass
class PreparedData:
    """A YOLO dataset written for training, and how it was made."""

    data_yaml: Path
    counts: dict[str, Any]


def _write_yolo_split(
    canvases: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]],
    root: Path,
    split: str,
) -> dict[str, int]:
    im_dir, lb_dir = root / "images" / split, root / "labels" / split
    im_dir.mkdir(parents=True, exist_ok=True)
    lb_dir.mkdir(parents=True, exist_ok=True)
    per_class = dict.fromkeys(DETECTOR_CLASSES, 0)
    for k, (img, boxes, classes) in enumerate(canvases):
        h, w = img.shape[:2]
        cv2.imwrite(str(im_dir / f"{split}_{k:05d}.png"), img[..., ::-1])
        lines = []
        for (x0, y0, x1, y1), c in zip(boxes, classes, strict=True):
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            lines.append(
                f"{c} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} "
                f"{(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
            )
            per_class[DETECTOR_CLASSES[c]] += 1
        (lb_dir / f"{split}_{k:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return {"canvases": len(canvases), **per_class}


def _resampled_pieces(
    images: Sequence[LabeledImage], mpps: Sequence[float], target_mpp: float, size: int
) -> tuple[list[tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64], list[int]]], int]:
    pieces = []
    skipped = 0
    for im, mpp in zip(images, mpps, strict=True):
        keep = [i for i, c in enumerate(im.classes) if c in DETECTOR_CLASSES]
        skipped += len(im.classes) - len(keep)
        factor = mpp / target_mpp
        rgb = resample(im.read_rgb(), factor)
        fx, fy = rgb.shape[1] / im.width, rgb.shape[0] / im.height
        boxes = im.boxes[keep] * [fx, fy, fx, fy]
        classes = [DETECTOR_CLASSES.index(im.classes[i]) for i in keep]
        pieces.extend(_tile_image(rgb, boxes, classes, size))
    return pieces, skipped


def synthetic_images(
    out_dir: str | Path,
    n_slides: int,
    *,
    size: int,
    mpp: float = DEFAULT_TRAINED_MPP,
    seed: int = 0,
    split: str = "train",
) -> list[LabeledImage]:
    """Synthetic smears from ``batch.synth`` as labelled images of known scale.

    Slides alternate between ``"blood"`` (dense RBCs, few WBCs) and
    ``"marrow"`` (many nucleated cells), so both classes are well represented.

    Parameters
    ----------
    out_dir
        Folder for the PNG fields and their ground truth.
    n_slides
        Number of fields.
    size
        Side of each field in pixels.
    mpp
        Scale the fields are drawn at.
    seed
        ``batch.synth`` seed (use another one for validation).
    split
        Recorded on every image.
    """
    import pandas as pd

    try:
        from batch.synth import synth_slides
    except ImportError as e:
        raise RuntimeError("synthetic training data needs batch.synth, which is not importable") from e
    images: list[LabeledImage] = []
    kinds = {"blood": (n_slides + 1) // 2, "marrow": n_slides // 2}
    for offset, (kind, count) in enumerate(kinds.items()):
        if not count:
            continue
        folder = Path(out_dir) / kind
        paths = synth_slides(folder, slides=count, width=size, height=size, seed=seed + offset,
                             mpp=mpp, kind=kind, format="png")  # type: ignore[arg-type]
        gt = pd.read_parquet(folder / "ground_truth.parquet")
        for path in paths:
            rows = gt[gt["slide_id"] == Path(path).stem]
            images.append(LabeledImage(
                Path(path), size, size, rows[["x0", "y0", "x1", "y1"]].to_numpy(np.float64),
                tuple(normalize_class_name(str(c)) for c in rows["class"]),
                "synthetic", split, mpp,
            ))
    return images


def prepare_yolo_dataset(
    merged: MergedData,
    work_dir: str | Path,
    *,
    target_mpp: float = DEFAULT_TRAINED_MPP,
    imgsz: int = DEFAULT_IMGSZ,
    seed: int = 0,
) -> PreparedData:
    """Write a YOLO dataset of ``imgsz`` canvases at ``target_mpp`` from merged images.

    Parameters
    ----------
    merged
        Output of ``merge_datasets``.
    work_dir
        Folder for the dataset (``images/{train,val}``, ``labels/``, ``data.yaml``).
    target_mpp
        Microns per pixel every image is resampled to.
    imgsz
        Canvas side in pixels (the ultralytics ``imgsz``).
    seed
        Order of packing (images are shuffled before packing).
    """
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rng = random.Random(seed)
    counts: dict[str, Any] = {"target_mpp": target_mpp, "imgsz": imgsz}
    for split, images in (("train", merged.train), ("val", merged.val)):
        if not images:
            raise ValueError(f"no {split} images after merging; check the dataset splits")
        mpps = image_mpps(images)
        pieces, skipped = _resampled_pieces(images, mpps, target_mpp, imgsz)
        rng.shuffle(pieces)
        canvases = pack_images(pieces, imgsz)
        counts[split] = {
            "images": len(images),
            "by_source": _count_by(images, "source"),
            "pieces": len(pieces),
            "boxes_of_other_classes_skipped": skipped,
            "mpp_median": float(np.median(mpps)),
            "mpp_range": [float(min(mpps)), float(max(mpps))],
            **_write_yolo_split(canvases, work, split),
        }
    data_yaml = work / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump(
            {
                "path": str(work.resolve()),
                "train": "images/train",
                "val": "images/val",
                "names": dict(enumerate(DETECTOR_CLASSES)),
            },
            sort_keys=False,
        )
    )
    return PreparedData(data_yaml, counts)


def freeze_layers(n_modules: int, strategy: str) -> int | None:
    """Ultralytics ``freeze`` value for a strategy of seed 000 (see the module docstring).

    Parameters
    ----------
    n_modules
        Top-level modules of the model (``len(YOLO(...).model.model)``; 23 for YOLOv8).
    strategy
        ``"all"``, ``"last10"`` or ``"last3"``: which part trains.

    Returns
    -------
    int or None
        Number of leading modules to freeze; None freezes nothing.
    """
    if strategy not in FREEZE_STRATEGIES:
        raise ValueError(f"--freeze must be one of {sorted(FREEZE_STRATEGIES)}, got {strategy!r}")
    trained = FREEZE_STRATEGIES[strategy]
    if trained is None:
        return None
    if trained >= n_modules:
        raise ValueError(f"model has {n_modules} modules; cannot train only the last {trained}")
    return n_modules - trained


@dataclass
class TrainDetectorConfig:
    """Arguments of one detector training run (mirrors the job's flags)."""

    data: list[Path]
    out: Path
    model: str = "yolov8n.yaml"
    freeze: str = "all"
    epochs: int = 60
    time_hours: float | None = None
    imgsz: int = DEFAULT_IMGSZ
    batch: int = 16
    device: str = "auto"
    workers: int = 1
    target_mpp: float = DEFAULT_TRAINED_MPP
    synth_slides: int = 0
    seed: int = 0
    patience: int = 100
    scale_aug: float = 0.25
    close_mosaic: int = 5
    eval_mpp: str = "labels"
    work_dir: Path | None = None
    skip_training: bool = False
    #: Extra notes for the model card (e.g. how a starting ``.pt`` was made).
    notes: list[str] = field(default_factory=list)
    #: Class-weight power: loss weights (1 / class frequency) ** cls_pw; 0 disables.
    cls_pw: float = 0.0
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def offline_ultralytics(config_dir: Path) -> Iterator[None]:
    """Keep an ultralytics training offline and its settings inside ``config_dir``.

    ``YOLO_OFFLINE`` stops the online check, but two calls still try the
    network first during training: ``check_font`` (downloads Arial.ttf, only
    used for plots, which are off) and ``check_amp`` (downloads a reference
    model to test mixed precision on CUDA). Both are replaced while the block
    runs; AMP is then trusted on CUDA. Hub sync and logger integrations are
    switched off in the settings.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer
    from ultralytics import settings

    settings.update({key: False for key in _ULTRALYTICS_INTEGRATIONS if key in settings})
    saved = {
        (data_utils, "check_font"): getattr(data_utils, "check_font", None),
        (trainer, "check_amp"): getattr(trainer, "check_amp", None),
    }

    def no_font(*args: Any, **kwargs: Any) -> None:
        return None

    def trust_amp(*args: Any, **kwargs: Any) -> bool:
        return True

    data_utils.check_font = no_font  # type: ignore[assignment]
    trainer.check_amp = trust_amp  # type: ignore[assignment]
    try:
        yield
    finally:
        for (module, name), value in saved.items():
            if value is not None:
                setattr(module, name, value)


def _source_card(name: str, images: dict[str, int], path: Path) -> dict[str, Any]:
    known = KNOWN_SOURCES.get(name, {})
    licence = known.get("licence")
    if licence is None:
        lic = [p.name for p in path.glob("LICEN[CS]E*")] if path.is_dir() else []
        licence = f"see {', '.join(lic)}" if lic else "unknown: check before redistributing"
    return {
        "name": name,
        "path": str(path),
        "url": known.get("url", ""),
        "licence": licence,
        "note": known.get("note", ""),
        "images": images,
    }


def train_detector(cfg: TrainDetectorConfig) -> dict[str, Any]:
    """Run a full training: merge, prepare, train, evaluate, write weights + metrics + card.

    Writes into ``cfg.out``: ``detector.pt`` (best weights, card embedded),
    ``detector.json`` / ``detector.md`` (model card), ``metrics.json``
    (validation metrics of the merged set and of each source) and
    ``runs/`` (ultralytics' own outputs).

    Returns
    -------
    dict
        The metrics written to ``metrics.json``.
    """
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with offline_ultralytics(out / ".ultralytics"):
        return _train(cfg, out)


def _train(cfg: TrainDetectorConfig, out: Path) -> dict[str, Any]:
    from ultralytics import YOLO

    from batch.evaluate import evaluate_images
    from batch.models import ModelCard, write_model_card
    from batch.stages.detect import CellDetector, select_device

    sets = [read_detection_dataset(d) for d in cfg.data]
    merged = merge_datasets(sets)
    log.info("merged data: %s", merged.report)
    synth_val: list[LabeledImage] = []
    if cfg.synth_slides:
        # Training fields are cut into canvases; validation fields stay whole (and small
        # enough that max_det never caps them).
        if not cfg.skip_training:  # training fields are not needed to re-evaluate
            merged.train += synthetic_images(
                out / "synth" / "train", cfg.synth_slides, size=cfg.imgsz * SYNTH_FIELD_CANVASES,
                mpp=cfg.target_mpp, seed=cfg.seed, split="train",
            )
        synth_val = synthetic_images(
            out / "synth" / "val", max(2, cfg.synth_slides // 4), size=SYNTH_VAL_SIZE,
            mpp=cfg.target_mpp, seed=cfg.seed + SYNTH_VAL_SEED_OFFSET, split="val",
        )
        merged.val += synth_val
    run_dir = out / "runs" / "train"
    model = YOLO(cfg.model, task="detect")
    n_modules = len(model.model.model)  # type: ignore[union-attr,arg-type]
    freeze = freeze_layers(n_modules, cfg.freeze)
    device = select_device(cfg.device)
    prepared_counts: dict[str, Any] = {}
    if cfg.skip_training:
        if not (run_dir / "weights").is_dir():
            raise FileNotFoundError(f"--skip-training: no earlier run in {run_dir}")
        log.info("--skip-training: evaluating the weights in %s", run_dir / "weights")
        report = out / "data_report.json"
        if report.is_file():
            prepared_counts = json.loads(report.read_text()).get("prepared", {})
    else:
        work = Path(cfg.work_dir) if cfg.work_dir else out / "work"
        prepared = prepare_yolo_dataset(
            merged, work, target_mpp=cfg.target_mpp, imgsz=cfg.imgsz, seed=cfg.seed
        )
        prepared_counts = prepared.counts
        log.info("prepared data: %s", prepared.counts)
        (out / "data_report.json").write_text(
            json.dumps({"merge": merged.report, "prepared": prepared.counts}, indent=2)
        )
        from_yaml = cfg.model.endswith((".yaml", ".yml"))
        if freeze is not None and from_yaml:
            log.warning(
                "--freeze %s on a model built from %s: frozen layers stay random",
                cfg.freeze, cfg.model,
            )
        model.train(
            data=str(prepared.data_yaml),
            epochs=cfg.epochs,
            time=cfg.time_hours,
            imgsz=cfg.imgsz,
            batch=cfg.batch,
            device=device,
            workers=cfg.workers,
            project=str(out / "runs"),
            name="train",
            exist_ok=True,
            pretrained=not from_yaml,
            freeze=freeze,
            seed=cfg.seed,
            patience=cfg.patience,
            amp=device.startswith("cuda"),
            plots=False,
            cache=False,
            scale=cfg.scale_aug,
            flipud=0.5,
            fliplr=0.5,
            close_mosaic=cfg.close_mosaic,
            verbose=False,
            **_class_weight_kwargs(cfg.cls_pw),
        )
    epochs_run, train_time = _run_progress(run_dir / "results.csv")
    best = run_dir / "weights" / "best.pt"
    if not best.is_file():
        best = run_dir / "weights" / "last.pt"
    weights = out / "detector.pt"
    shutil.copy2(best, weights)
    card = ModelCard(
        name="detector",
        task="detect",
        class_names=list(DETECTOR_CLASSES),
        trained_mpp=cfg.target_mpp,
        architecture=_architecture(cfg.model),
        imgsz=cfg.imgsz,
        training_time_s=round(train_time, 1),
        # The command that trained these weights (a --skip-training rerun only re-evaluates).
        training_command=cfg.command.replace(" --skip-training", ""),
    )
    # A provisional card so the detector below resamples to the trained mpp.
    write_model_card(card, weights, embed=False, markdown=False)
    detector = CellDetector(weights, device=device)
    eval_mpp: float | str = (
        cfg.eval_mpp if cfg.eval_mpp in ("labels", "auto") else float(cfg.eval_mpp)
    )
    real_val = [im for im in merged.val if im.source != "synthetic"]
    sets_metrics: dict[str, Any] = {}
    if real_val:
        sets_metrics["val"] = evaluate_images(detector, real_val, mpp=eval_mpp)
        if eval_mpp == "labels":
            # Diagnostic: the same photos at the detector's own scale estimate (what a
            # pipeline run on photos without mpp would do), which shows the cost of
            # estimating the scale.
            sets_metrics["val/mpp_auto"] = evaluate_images(detector, real_val, mpp="auto")
    for source in sorted({im.source for im in real_val}):
        own = [im for s in sets for im in s if im.source == source and im.split == "val"]
        sets_metrics[f"{source}/val"] = evaluate_images(detector, own, mpp=eval_mpp)
    if synth_val:
        sets_metrics["synthetic/val"] = evaluate_images(detector, synth_val, mpp=eval_mpp)
    for m in sets_metrics.values():
        m["split"] = "val"
    headline = sets_metrics.get("val") or next(iter(sets_metrics.values()))
    metrics: dict[str, Any] = {
        **{k: headline[k] for k in _HEADLINE_KEYS},
        "sets": sets_metrics,
        "training_time_s": round(train_time, 1),
        "trained_mpp": cfg.target_mpp,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    by_source_train = merged.report.get("train_by_source", {})
    by_source_val = merged.report.get("val_by_source", {})
    sources = [
        _source_card(
            name,
            {"train": by_source_train.get(name, 0), "val": by_source_val.get(name, 0)},
            Path(path),
        )
        for name, path in ((s[0].source, d) for s, d in zip(sets, cfg.data, strict=True) if s)
    ]
    if cfg.synth_slides:
        sources.append(
            _source_card(
                "synthetic", {"train": cfg.synth_slides, "val": len(synth_val)}, Path("batch/synth.py")
            )
        )
    card.data_sources = sources
    card.metrics = sets_metrics
    card.reproduce_command = _reproduce_command(cfg)
    card.notes = [
        "Validation images: the union of every set's validation split, each photo once; "
        "no photo that is validation data in any set was trained on.",
        "Each training image was resampled to the trained mpp using its own scale, estimated "
        "from its median labelled RBC box (max side) taken as 7.5 um.",
        f"Metrics computed by batch.evaluate through CellDetector (image mpp: {cfg.eval_mpp}), "
        "COCO-style 101-point AP; precision / recall / F1 at the detector's confidence "
        f"threshold {detector.conf}.",
        "BCCD labels omit many RBCs: RBC precision on bccd/val reads low even when correct.",
    ]
    card.notes.extend(cfg.notes)
    if not cfg.synth_slides:
        notes_extra = "Trained on real photos only (no synthetic slides)."
        card.notes.append(notes_extra)
    card.extra = {
        "freeze": cfg.freeze,
        "ultralytics_freeze": freeze,
        "epochs": cfg.epochs,
        "time_hours": cfg.time_hours,
        "batch": cfg.batch,
        "device": device,
        "seed": cfg.seed,
        "scale_augmentation": cfg.scale_aug,
        "cls_pw": cfg.cls_pw,
        "merge": merged.report,
        "prepared": prepared_counts,
        "epochs_run": epochs_run,
        **cfg.extra,
    }
    write_model_card(card, weights)
    return metrics


def _architecture(model: str) -> str:
    """The model's architecture for the card; a starting ``.pt`` with a card names its own."""
    from batch.models import read_model_card

    path = Path(model)
    if path.suffix == ".pt" and path.is_file():
        parent = read_model_card(path)
        base = parent.architecture if parent is not None and parent.architecture else "unknown"
        return f"{base}, fine-tuned from {path.name}"
    return model


def _class_weight_kwargs(cls_pw: float) -> dict[str, Any]:
    """Inverse-frequency class weights (``cls_pw``) where the installed ultralytics has them."""
    if not cls_pw:
        return {}
    from ultralytics.cfg import DEFAULT_CFG_DICT

    if "cls_pw" not in DEFAULT_CFG_DICT:
        log.warning("this ultralytics has no cls_pw (class weights); --cls-pw %s ignored", cls_pw)
        return {}
    return {"cls_pw": cls_pw}


def _run_progress(results_csv: Path) -> tuple[int, float]:
    """Epochs completed and training seconds, from ultralytics' ``results.csv``."""
    import pandas as pd

    if not results_csv.is_file():
        return 0, 0.0
    table = pd.read_csv(results_csv)
    table.columns = [c.strip() for c in table.columns]
    if table.empty:
        return 0, 0.0
    seconds = float(table["time"].iloc[-1]) if "time" in table else 0.0
    return int(len(table)), seconds


def _reproduce_command(cfg: TrainDetectorConfig) -> str:
    args = ["python", "jobs/train_detector.py"]
    for d in cfg.data:
        args += ["--data", str(d)]
    args += [
        "--model",
        cfg.model,
        "--freeze",
        cfg.freeze,
        "--epochs",
        str(cfg.epochs),
        "--imgsz",
        str(cfg.imgsz),
        "--batch",
        str(cfg.batch),
        "--mpp",
        str(cfg.target_mpp),
        "--seed",
        str(cfg.seed),
        "--out",
        "OUT",
    ]
    if cfg.time_hours:
        args += ["--time-hours", str(cfg.time_hours)]
    if cfg.synth_slides:
        args += ["--synth-slides", str(cfg.synth_slides)]
    if cfg.cls_pw:
        args += ["--cls-pw", str(cfg.cls_pw)]
    return shlex.join(args)


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``jobs/train_detector.py``."""
    p = argparse.ArgumentParser(
        prog="train_detector",
        description="Train the hemaray cell detector (ultralytics YOLO) at a fixed microns-per-pixel.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        type=Path,
        help="YOLO or Pascal VOC dataset folder; repeat to merge (first wins duplicates)",
    )
    p.add_argument(
        "--model",
        default="yolov8n.yaml",
        help="ultralytics model yaml (yolov8{n,s,m,l,x}.yaml) or a local .pt",
    )
    p.add_argument(
        "--freeze",
        default="all",
        choices=sorted(FREEZE_STRATEGIES),
        help="which part trains (seed 000): all layers, or only the last 10 / 3 modules",
    )
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument(
        "--time-hours",
        type=float,
        default=None,
        help="stop after this many hours (ultralytics 'time'; overrides --epochs)",
    )
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ, help="training canvas side (px)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda:0, 0,1, ...")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--mpp",
        type=float,
        default=DEFAULT_TRAINED_MPP,
        dest="target_mpp",
        help="microns per pixel to train at",
    )
    p.add_argument(
        "--synth-slides",
        type=int,
        default=0,
        help="add this many synthetic slides (batch.synth) to training",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--note", action="append", default=[],
                   help="a note for the model card (repeatable)")
    p.add_argument(
        "--cls-pw",
        type=float,
        default=0.0,
        help="class weights (1/frequency)**CLS_PW in [0, 1] against class imbalance; 0 disables",
    )
    p.add_argument(
        "--eval-mpp",
        default="labels",
        help="scale of validation images: labels (from labelled RBCs), "
        "auto (estimated by the detector, experimental) or a number",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the converted dataset is written (default OUT/work)",
    )
    p.add_argument("--skip-training", action="store_true",
                   help="reuse OUT/runs/train (an earlier run): only evaluate and write the card")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/train_detector.py``; prints the metrics JSON."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainDetectorConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        freeze=args.freeze,
        epochs=args.epochs,
        time_hours=args.time_hours,
        imgsz=args.imgsz,
        batch=args.batch,
        device=args.device,
        workers=args.workers,
        target_mpp=args.target_mpp,
        synth_slides=args.synth_slides,
        seed=args.seed,
        patience=args.patience,
        eval_mpp=args.eval_mpp,
        work_dir=args.work_dir,
        skip_training=args.skip_training,
        cls_pw=args.cls_pw,
        notes=list(args.note),
        command=shlex.join(["python", "jobs/train_detector.py", *argv]),
    )
    metrics = train_detector(cfg)
    print(json.dumps(metrics))
    return 0
