"""The export formats: one writer per labelling tool or training layout.

Every writer gets what the export loop cuts from the slides (fields, WBC
crops or a slide's chosen cells) and writes it in its tool's layout under
the export folder; `FormatWriter.finish` writes the index files.

- ``coco``: ``images/*.jpg`` + ``annotations.json`` (COCO detection: boxes
  ``[x, y, w, h]`` in image pixels, categories = the detector's classes;
  each annotation carries ``cell_id``, ``score`` and the cell's label);
- ``yolo``: ``images/{train,val}/``, ``labels/{train,val}/`` and ``data.yaml``,
  the layout `batch.datasets.detection.read_detection_dataset` reads and
  ``jobs/train_detector.py`` trains on (every fifth field goes to ``val``);
- ``labelstudio``: ``images/*.jpg``, ``tasks.json`` (one task per field,
  ``predictions`` with rectanglelabels in percent of the image and a
  ``score``) and ``label_config.xml`` for the project;
- ``cvat``: ``images/*.jpg`` + ``annotations.xml`` (CVAT for images 1.1) +
  ``fields.json`` (each image's slide and level-0 origin);
- ``imagefolder``: ``<label>/<slide>_<cell>.png`` WBC crops (the layout
  `batch.datasets.folders.discover_images` reads);
- ``qupath``: see `batch.export.qupath`.

In Label Studio, CVAT and QuPath a WBC is labelled with its ``wbc_type``
(what annotators correct), other cells with their detector class; COCO and
YOLO carry detector classes (what the detector trains on).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml

from batch.export.fields import Field
from batch.export.select import cell_labels

__all__ = ["CVAT_FIELDS", "LS_FROM_NAME", "WRITERS", "ExportContext", "FormatWriter", "finite_or_none"]

#: JPEG quality of exported fields.
JPEG_QUALITY = 95
#: Every this-many-th field of a YOLO export goes to ``val``.
YOLO_VAL_EVERY = 5
#: Beside a CVAT export: each image's slide and level-0 origin (read back by the importer).
CVAT_FIELDS = "fields.json"
#: Label Studio's control and object names in ``label_config.xml``.
LS_FROM_NAME, LS_TO_NAME = "label", "image"


@dataclass
class ExportContext:
    """What every writer knows: where to write and the label sets."""

    to: Path
    detector_classes: list[str]
    labels: list[str]
    detector_version: str = ""
    #: Prefix put before an image's relative path in Label Studio tasks.
    url_prefix: str = ""
    #: Field side in pixels at the detector's scale.
    field_px: int = 640
    #: Where the export ends up when ``to`` is only a staging folder (``s3://...``); None:
    #: ``to`` is the export, and index files may name it.
    location: str | None = None


def _write_image(path: Path, rgb: npt.NDArray[np.uint8]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f"cannot write image {path}")


def finite_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else f


class FormatWriter:
    """Base writer: ``unit`` says what the export loop hands it (fields, crops or slides)."""

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "fields"

    def __init__(self, ctx: ExportContext) -> None:
        self.ctx = ctx
        self.count = 0

    def add_field(self, slide_id: str, fld: Field, image: npt.NDArray[np.uint8]) -> None:
        raise NotImplementedError(f"{self.name} does not take fields")

    def add_crop(self, slide_id: str, cell: Any, crop: npt.NDArray[np.uint8]) -> None:
        raise NotImplementedError(f"{self.name} does not take crops")

    def add_slide(self, slide_id: str, uri: str, cells: pd.DataFrame) -> None:
        raise NotImplementedError(f"{self.name} does not take slides")

    def finish(self) -> dict[str, Any]:
        """Write the index files; return counts for the summary."""
        return {"items": self.count}


class CocoWriter(FormatWriter):
    name = "coco"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.category = {c: i + 1 for i, c in enumerate(ctx.detector_classes)}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add_field(self, slide_id: str, fld: Field, image: npt.NDArray[np.uint8]) -> None:
        file_name = f"images/{fld.name}.jpg"
        _write_image(self.ctx.to / file_name, image)
        image_id = len(self.images) + 1
        self.images.append(
            {
                "id": image_id, "file_name": file_name, "width": fld.size, "height": fld.size,
                "slide_id": slide_id, "x0": fld.x0, "y0": fld.y0, "downsample": fld.factor,
            }
        )
        labels = cell_labels(fld.cells)
        for (x0, y0, x1, y1), cell, label in zip(
            fld.boxes, fld.cells.itertuples(), labels, strict=True
        ):
            w, h = float(x1 - x0), float(y1 - y0)
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1, "image_id": image_id,
                    "category_id": self.category.setdefault(
                        str(cell.det_class), len(self.category) + 1
                    ),
                    "bbox": [float(x0), float(y0), w, h], "area": w * h, "iscrowd": 0,
                    "score": finite_or_none(cell.det_confidence), "cell_id": str(cell.cell_id),
                    "attributes": {"label": str(label)},
                }
            )
        self.count += 1

    def finish(self) -> dict[str, Any]:
        doc = {
            "info": {"description": "hemaray export", "version": "1.0"},
            "images": self.images,
            "annotations": self.annotations,
            "categories": [
                {"id": i, "name": n, "supercategory": "cell"} for n, i in self.category.items()
            ],
        }
        (self.ctx.to / "annotations.json").write_text(json.dumps(doc))
        return {"images": len(self.images), "annotations": len(self.annotations)}


class YoloWriter(FormatWriter):
    name = "yolo"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.index = {c: i for i, c in enumerate(ctx.detector_classes)}
        self.splits: dict[str, int] = {"train": 0, "val": 0}

    def add_field(self, slide_id: str, fld: Field, image: npt.NDArray[np.uint8]) -> None:
        split = "val" if self.count % YOLO_VAL_EVERY == YOLO_VAL_EVERY - 1 else "train"
        _write_image(self.ctx.to / "images" / split / f"{fld.name}.jpg", image)
        lines = []
        for (x0, y0, x1, y1), cls in zip(fld.boxes, fld.cells["det_class"], strict=True):
            if x1 <= x0 or y1 <= y0:
                continue
            k = self.index.setdefault(str(cls), len(self.index))
            s = float(fld.size)
            lines.append(
                f"{k} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} "
                f"{(x1 - x0) / s:.6f} {(y1 - y0) / s:.6f}"
            )
        label = self.ctx.to / "labels" / split / f"{fld.name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{ln}\n" for ln in lines))
        self.splits[split] += 1
        self.count += 1

    def finish(self) -> dict[str, Any]:
        for split in ("train", "val"):
            (self.ctx.to / "images" / split).mkdir(parents=True, exist_ok=True)
            (self.ctx.to / "labels" / split).mkdir(parents=True, exist_ok=True)
        # A staged export moves: without "path", ultralytics takes data.yaml's own folder,
        # wherever the export is downloaded to.
        where = {"path": str(self.ctx.to.resolve())} if self.ctx.location is None else {}
        data = {
            **where,
            "train": "images/train",
            # With fewer than YOLO_VAL_EVERY fields there is no val split: validate on train.
            "val": "images/val" if self.splits["val"] else "images/train",
            "names": {i: n for n, i in self.index.items()},
        }
        (self.ctx.to / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return {"images": self.count, **self.splits}


class LabelStudioWriter(FormatWriter):
    name = "labelstudio"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.tasks: list[dict[str, Any]] = []

    def add_field(self, slide_id: str, fld: Field, image: npt.NDArray[np.uint8]) -> None:
        rel = f"images/{fld.name}.jpg"
        _write_image(self.ctx.to / rel, image)
        results, scores = [], []
        s = float(fld.size)
        for (x0, y0, x1, y1), cell, label in zip(
            fld.boxes, fld.cells.itertuples(), cell_labels(fld.cells), strict=True
        ):
            score = finite_or_none(getattr(cell, "wbc_type_confidence", None))
            if score is None or str(cell.det_class) != "WBC":
                score = finite_or_none(cell.det_confidence)
            scores.append(score or 0.0)
            results.append(
                {
                    "id": str(cell.cell_id),
                    "from_name": LS_FROM_NAME,
                    "to_name": LS_TO_NAME,
                    "type": "rectanglelabels",
                    "original_width": fld.size,
                    "original_height": fld.size,
                    "image_rotation": 0,
                    "value": {
                        "x": 100 * float(x0) / s, "y": 100 * float(y0) / s,
                        "width": 100 * float(x1 - x0) / s, "height": 100 * float(y1 - y0) / s,
                        "rotation": 0, "rectanglelabels": [str(label)],
                    },
                    "score": score,
                }
            )
        self.tasks.append(
            {
                "data": {
                    "image": f"{self.ctx.url_prefix}{rel}", "slide_id": slide_id,
                    "x0": fld.x0, "y0": fld.y0, "downsample": fld.factor,
                },
                "predictions": [
                    {
                        "model_version": self.ctx.detector_version or "hemaray",
                        "score": float(min(scores)) if scores else 0.0,
                        "result": results,
                    }
                ],
            }
        )
        self.count += 1

    def finish(self) -> dict[str, Any]:
        (self.ctx.to / "tasks.json").write_text(json.dumps(self.tasks, indent=1))
        view = ET.Element("View")
        ET.SubElement(view, "Image", name=LS_TO_NAME, value="$image")
        rect = ET.SubElement(view, "RectangleLabels", name=LS_FROM_NAME, toName=LS_TO_NAME)
        for label in self.ctx.labels:
            ET.SubElement(rect, "Label", value=label)
        ET.ElementTree(view).write(self.ctx.to / "label_config.xml", encoding="unicode")
        return {"tasks": len(self.tasks)}


class CvatWriter(FormatWriter):
    name = "cvat"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.root = ET.Element("annotations")
        #: Image name -> its slide and level-0 origin (CVAT's XML has no place for them).
        self.fields: dict[str, dict[str, Any]] = {}
        ET.SubElement(self.root, "version").text = "1.1"
        meta = ET.SubElement(self.root, "meta")
        task = ET.SubElement(meta, "task")
        ET.SubElement(task, "name").text = "hemaray export"
        self.size = ET.SubElement(task, "size")
        ET.SubElement(task, "mode").text = "annotation"
        labels = ET.SubElement(task, "labels")
        for name in ctx.labels:
            label = ET.SubElement(labels, "label")
            ET.SubElement(label, "name").text = name
            attrs = ET.SubElement(label, "attributes")
            for attr, kind in (("cell_id", "text"), ("score", "number")):
                a = ET.SubElement(attrs, "attribute")
                ET.SubElement(a, "name").text = attr
                ET.SubElement(a, "mutable").text = "False"
                ET.SubElement(a, "input_type").text = kind
                ET.SubElement(a, "default_value").text = "0" if kind == "number" else ""
                ET.SubElement(a, "values").text = "0;1;0.0001" if kind == "number" else ""

    def add_field(self, slide_id: str, fld: Field, image: npt.NDArray[np.uint8]) -> None:
        rel = f"images/{fld.name}.jpg"
        _write_image(self.ctx.to / rel, image)
        self.fields[rel] = {
            "slide_id": slide_id, "x0": fld.x0, "y0": fld.y0, "downsample": fld.factor,
        }
        im = ET.SubElement(
            self.root, "image", id=str(self.count), name=rel,
            width=str(fld.size), height=str(fld.size),
        )
        for (x0, y0, x1, y1), cell, label in zip(
            fld.boxes, fld.cells.itertuples(), cell_labels(fld.cells), strict=True
        ):
            box = ET.SubElement(
                im, "box", label=str(label), source="auto", occluded="0",
                xtl=f"{x0:.2f}", ytl=f"{y0:.2f}", xbr=f"{x1:.2f}", ybr=f"{y1:.2f}", z_order="0",
            )
            ET.SubElement(box, "attribute", name="cell_id").text = str(cell.cell_id)
            ET.SubElement(box, "attribute", name="score").text = f"{finite_or_none(cell.det_confidence) or 0:.4f}"
        self.count += 1

    def finish(self) -> dict[str, Any]:
        self.size.text = str(self.count)
        tree = ET.ElementTree(self.root)
        ET.indent(tree)
        tree.write(self.ctx.to / "annotations.xml", encoding="utf-8", xml_declaration=True)
        (self.ctx.to / CVAT_FIELDS).write_text(json.dumps(self.fields, indent=1))
        return {"images": self.count}


class ImageFolderWriter(FormatWriter):
    name = "imagefolder"
    unit = "crops"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.per_class: dict[str, int] = {}

    def add_crop(self, slide_id: str, cell: Any, crop: npt.NDArray[np.uint8]) -> None:
        label = str(cell.label)
        _write_image(self.ctx.to / label / f"{slide_id}_{cell.cell_id}.png", crop)
        self.per_class[label] = self.per_class.get(label, 0) + 1
        self.count += 1

    def finish(self) -> dict[str, Any]:
        return {"crops": self.count, "per_class": dict(sorted(self.per_class.items()))}


#: Format name -> writer class of this module (``qupath`` lives in `batch.export.qupath`).
WRITERS: dict[str, type[FormatWriter]] = {
    "coco": CocoWriter,
    "yolo": YoloWriter,
    "labelstudio": LabelStudioWriter,
    "cvat": CvatWriter,
    "imagefolder": ImageFolderWriter,
}
