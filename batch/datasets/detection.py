"""Detection datasets on disk: YOLO format and Pascal VOC, read into ``LabeledImage`` records.

- YOLO: ``images/`` and ``labels/`` (optional ``train`` / ``val`` / ...
  sub-folders), class names from ``data.yaml`` (or ``classes.txt``);
- Pascal VOC: ``JPEGImages/``, ``Annotations/``, ``ImageSets/{train,val}.txt``.

Class names are mapped to the detector's canonical ones
(`batch.stages.detect.normalize_class_name`). Detector training merges these
records; detector evaluation scores a model on them.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import yaml

from batch.datasets.folders import list_images, read_rgb
from batch.stages.detect import normalize_class_name

__all__ = ["LabeledImage", "read_detection_dataset"]

log = logging.getLogger(__name__)


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
        rgb = read_rgb(self.path)
        if rgb is None:
            raise OSError(f"cannot read image {self.path}")
        return rgb


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
        for path in list_images(im_dir):
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
