"""ImageFolder sets: one folder per class, ``root/<class>/<image>``.

Shared by classifier training (`discover_images`, optionally pre-split as
``root/{train,val,test}/<class>/...``), weak-label crops and the image-level
evaluations: which sub-folders are classes (`class_dirs`), which files are
images (`list_images`, ``batch.datasets.IMAGE_SUFFIXES``), how a folder name
becomes a label (`folder_label`, `FOLDER_ALIASES`, `ALL4_RENAME`) and how an
image is read (`read_rgb`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from batch.datasets import IMAGE_SUFFIXES

__all__ = [
    "ALL4_RENAME",
    "FOLDER_ALIASES",
    "SPLITS",
    "ImageRecord",
    "class_dirs",
    "discover_images",
    "folder_label",
    "list_images",
    "read_rgb",
]

#: The splits of a pre-split ImageFolder, in order.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Folder names of the public ALL image set (lower case) -> all_subtype labels.
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


@dataclass(frozen=True)
class ImageRecord:
    """One source image: where it is, its label, its group, (once split) its split and its mpp.

    ``mpp`` is the image's own microns per pixel where the images of a set
    differ (crops cut from slides of several scales); None: the set's ``--mpp``.
    """

    path: Path
    label: str
    group: str
    split: str | None = None
    mpp: float | None = None


def folder_label(name: str) -> str:
    """The all_subtype label a class folder stands for (folder name if not an alias)."""
    return FOLDER_ALIASES.get(name.strip().lower(), name.strip().lower())


#: Folder names of the Kaggle ALL set (``all4``) -> hemaray's subtype labels.
ALL4_RENAME: dict[str, str] = {name: folder_label(name) for name in ("Benign", "Early", "Pre", "Pro")}


def read_rgb(path: str | Path) -> npt.NDArray[np.uint8] | None:
    """An image file as an RGB ``uint8`` array; None if OpenCV cannot read it."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else np.ascontiguousarray(bgr[..., ::-1])


def class_dirs(root: Path) -> list[Path]:
    """The class folders of an ImageFolder: its sub-folders, sorted, hidden ones skipped."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files (``IMAGE_SUFFIXES``) in ``folder``, sorted; with ``recursive`` also below it."""
    found = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
        for cdir in class_dirs(base):
            label = rename.get(cdir.name, cdir.name)
            if classes is not None and label not in classes:
                continue
            files = list_images(cdir, recursive=True)
            if max_per_class is not None and len(files) > max_per_class:
                files = sorted(rng.sample(files, max_per_class))
            records += [ImageRecord(f, label, f.relative_to(root).as_posix(), split) for f in files]
    if not records:
        raise FileNotFoundError(
            f"no images under {str(root)!r}; expected <class>/<image> or train/<class>/<image>"
        )
    return records
