"""Detector training data: merge detection sets, then pack them into canvases at one scale.

1. ``merge_datasets``: merge several sets (`batch.datasets.detection`)
   without counting an image twice. Images are matched by content (a
   normalised 32x24 grey thumbnail, ``image_fingerprint``, so a re-encoded
   copy matches): TXL-PBC re-annotates BCCD photos under new names. The
   first set given wins a duplicate (pass the better-labelled one first),
   and an image that is validation data in *any* set never trains.
2. ``prepare_yolo_dataset``: resample every image to the trained mpp (each
   image's own mpp estimated from its median RBC box, ``RBC_DIAMETER_UM``;
   ``image_mpps``) and pack the resampled images into square canvases of
   exactly ``imgsz`` pixels (``pack_images``). Ultralytics resizes every
   training image so its long side is ``imgsz``; canvases of exactly that
   size are left alone, so the network sees cells at the trained scale only
   (plus the ``scale`` augmentation).

``synthetic_images`` adds synthetic smears (``batch.synth``) of known scale.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import yaml

from batch.datasets.detection import LabeledImage
from batch.stages.detect import (
    DETECTOR_CLASSES,
    PAD_VALUE,
    estimate_mpp_from_rbc,
    normalize_class_name,
)
from batch.stages.preprocess import resample

__all__ = [
    "DEFAULT_IMGSZ",
    "DEFAULT_TRAINED_MPP",
    "MergedData",
    "PreparedData",
    "image_fingerprint",
    "image_mpps",
    "merge_datasets",
    "pack_images",
    "prepare_yolo_dataset",
    "synthetic_images",
]

#: The scale the shipped detector is trained at (um/px). RBC ~37 px, WBC 50-75 px,
#: platelet ~11-18 px. At 0.25 (a 40x scan, the synthetic slides' scale) platelets
#: are ~8-12 px and a YOLOv8n trained there found none (AP50 0.0 after 21 epochs);
#: 0.2 costs 1.56x the pixels of 0.25 and made them learnable.
DEFAULT_TRAINED_MPP = 0.2
#: Training canvas side (px) at the trained mpp: the resampled photos (<= ~250 px)
#: pack two to a row.
DEFAULT_IMGSZ = 384
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
