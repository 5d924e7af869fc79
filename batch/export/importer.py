"""``hemaray import-labels``: annotation tool files back into one labels table (``schemas/labels``).

Reads what `batch.export` wrote and the tools give back: QuPath GeoJSON
(one file per slide, named ``<slide_id>.geojson``), COCO ``annotations.json``
(images carry their slide and level-0 origin), Label Studio JSON task exports
(the latest annotation of a task, else its prediction) and CVAT for images
1.1 XML (with the export's ``fields.json`` beside it). Every box is mapped
back to level-0 pixels of its slide.

Matching (with the run's output given): a label that carries a ``cell_id``
the run has keeps it (``match = "id"``); otherwise it takes the run cell of
the same slide with the highest IoU if that is at least `MATCH_IOU`
(``"iou"``); otherwise it is a new object (``"new"``). A cell seen in several
overlapping fields keeps one row: the one whose box overlaps it most (the
least clipped copy). A label that is a detector class (RBC, WBC, platelet)
sets ``det_class``; any other label is a ``wbc_type`` of a WBC; "platelet" on a
cell the run called a WBC is the ``wbc_type`` classifier's platelet class. A file that is not
what its format says raises `LabelImportError` naming the file and the
feature, image or task.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

import schemas
from batch.errors import HemarayError
from batch.export.formats import CVAT_FIELDS
from batch.export.source import RunSource

__all__ = ["IMPORT_FORMATS", "MATCH_IOU", "LabelImportError", "import_labels", "read_labels"]

#: Formats ``import-labels`` reads.
IMPORT_FORMATS = ("coco", "cvat", "labelstudio", "qupath")
#: A label without a known cell_id matches the run cell it overlaps at least this much.
MATCH_IOU = 0.5
#: Detector classes; any other label is a WBC type.
DETECTOR_CLASSES = ("RBC", "WBC", "platelet")

_COLUMNS = ("slide_id", "x0", "y0", "x1", "y1", "label", "source_cell_id", "annotator",
            "fx0", "fy0", "fx1", "fy1")  # fx*: the level-0 bounds of the field drawn on


class LabelImportError(HemarayError):
    """An annotation file is not what its format says (names the file and the item)."""


def _row(
    slide_id: Any, box: Sequence[float], label: Any, cell_id: Any, annotator: Any,
    field: Sequence[float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One label; ``field``: the level-0 bounds of the image it was drawn on (None: the slide)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    fx0, fy0, fx1, fy1 = (float(v) for v in field) if field is not None else (math.nan,) * 4
    return {
        "slide_id": str(slide_id), "x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": str(label),
        "source_cell_id": None if cell_id in (None, "") else str(cell_id),
        "annotator": None if annotator in (None, "") else str(annotator),
        "fx0": fx0, "fy0": fy0, "fx1": fx1, "fy1": fy1,
    }


def _origin(meta: dict[str, Any], box: Sequence[float]) -> list[float]:
    f, x0, y0 = float(meta["downsample"]), float(meta["x0"]), float(meta["y0"])
    return [x0 + box[0] * f, y0 + box[1] * f, x0 + box[2] * f, y0 + box[3] * f]


def _field(meta: dict[str, Any], width: Any, height: Any) -> list[float]:
    """Level-0 bounds of an exported field image of ``width`` x ``height`` pixels."""
    return _origin(meta, [0.0, 0.0, float(width), float(height)])


def _qupath(path: Path) -> list[dict[str, Any]]:
    from shapely.geometry import shape

    doc = json.loads(path.read_text())
    features = doc.get("features") if isinstance(doc, dict) else doc
    if not isinstance(features, list):
        raise LabelImportError(f"{path}: expected a GeoJSON FeatureCollection or feature list")
    rows = []
    for i, feat in enumerate(features):
        try:
            props = feat.get("properties") or {}
            geom = shape(feat["geometry"])
            label = (props.get("classification") or {})["name"]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise LabelImportError(
                f"{path}: feature {i}: needs a geometry and properties.classification.name ({e!r})"
            ) from e
        rows.append(_row(path.stem, geom.bounds, label, props.get("name"), None))
    return rows


def _coco(path: Path) -> list[dict[str, Any]]:
    doc = json.loads(path.read_text())
    try:
        images = {im["id"]: im for im in doc["images"]}
        cats = {c["id"]: c["name"] for c in doc["categories"]}
        annotations = doc["annotations"]
    except (KeyError, TypeError) as e:
        raise LabelImportError(f"{path}: not a COCO file (images, categories, annotations)") from e
    rows = []
    for ann in annotations:
        try:
            image = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            box = _origin(image, [x, y, x + w, y + h])
            label = (ann.get("attributes") or {}).get("label") or cats[ann["category_id"]]
            rows.append(_row(image["slide_id"], box, label, ann.get("cell_id"), None,
                             _field(image, image["width"], image["height"])))
        except (KeyError, TypeError, ValueError) as e:
            raise LabelImportError(
                f"{path}: annotation {ann.get('id')!r}: needs bbox, a known category and an image "
                f"exported by hemaray (slide_id, x0, y0, downsample) ({e!r})"
            ) from e
    return rows


def _labelstudio(path: Path) -> list[dict[str, Any]]:
    tasks = json.loads(path.read_text())
    if not isinstance(tasks, list):
        raise LabelImportError(f"{path}: expected a JSON list of Label Studio tasks")
    rows = []
    for i, task in enumerate(tasks):
        try:
            data = task["data"]
            done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
            if done:
                latest = max(done, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
                results, annotator = latest["result"], latest.get("completed_by")
            else:
                results, annotator = task["predictions"][0]["result"], None
            if isinstance(annotator, dict):
                annotator = annotator.get("email") or annotator.get("id")
            for r in results:
                if r.get("type") != "rectanglelabels":
                    continue
                v, w, h = r["value"], float(r["original_width"]), float(r["original_height"])
                box = [v["x"] * w / 100, v["y"] * h / 100,
                       (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]
                rows.append(_row(data["slide_id"], _origin(data, box), v["rectanglelabels"][0],
                                 r.get("id"), annotator, _field(data, w, h)))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise LabelImportError(
                f"{path}: task {task.get('id', i) if isinstance(task, dict) else i}: not a Label "
                f"Studio task over a hemaray field (data.slide_id / x0 / y0 / downsample, "
                f"rectanglelabels with original_width / height) ({e!r})"
            ) from e
    return rows


def _cvat(path: Path) -> list[dict[str, Any]]:
    index_path = path.parent / CVAT_FIELDS
    if not index_path.is_file():
        raise LabelImportError(f"{path}: {CVAT_FIELDS} of the export must lie beside it")
    index = json.loads(index_path.read_text())
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise LabelImportError(f"{path}: not XML: {e}") from e
    if root.tag != "annotations":
        raise LabelImportError(f"{path}: not CVAT for images XML (root <{root.tag}>)")
    rows = []
    for im in root.iter("image"):
        name = im.get("name", "")
        if name not in index:
            raise LabelImportError(f"{path}: image {name!r} is not in {index_path}")
        for b in im.iter("box"):
            try:
                box = [float(b.get(k, "")) for k in ("xtl", "ytl", "xbr", "ybr")]
            except ValueError as e:
                raise LabelImportError(f"{path}: image {name!r}: a box without coordinates") from e
            attrs = {a.get("name"): a.text for a in b.iter("attribute")}
            rows.append(_row(index[name]["slide_id"], _origin(index[name], box), b.get("label"),
                             attrs.get("cell_id"), None,
                             _field(index[name], im.get("width", "nan"), im.get("height", "nan"))))
    return rows


_READERS = {"coco": _coco, "cvat": _cvat, "labelstudio": _labelstudio, "qupath": _qupath}


def read_labels(files: Sequence[str | Path], fmt: str) -> pd.DataFrame:
    """Every annotated box of ``files`` (level-0, with its slide), unmatched."""
    if fmt not in _READERS:
        raise LabelImportError(f"--format must be one of {', '.join(IMPORT_FORMATS)}, got {fmt!r}")
    frames = []
    for f in files:
        path = Path(f)
        try:
            rows = _READERS[fmt](path)
        except (OSError, json.JSONDecodeError) as e:
            raise LabelImportError(f"{path}: cannot read as {fmt}: {e}") from e
        frame = pd.DataFrame(rows, columns=list(_COLUMNS))
        frames.append(frame.assign(source_file=str(path)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(_COLUMNS))


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.asarray(inter / np.maximum(area + areas - inter, 1e-12))


def _match(labels: pd.DataFrame, source: RunSource | None) -> pd.DataFrame:
    # labels has a 0..n-1 index: positions index these arrays.
    cell_id = np.full(len(labels), None, dtype=object)
    how = np.full(len(labels), "new", dtype=object)
    run_class = np.full(len(labels), None, dtype=object)
    ious = np.full(len(labels), np.nan, dtype=np.float64)
    restored = labels[["x0", "y0", "x1", "y1"]].to_numpy(np.float64, copy=True)
    for slide_id, group in labels.groupby("slide_id", sort=True):
        cells = (
            source.cells(str(slide_id), ["cell_id", "x0", "y0", "x1", "y1", "det_class"])
            if source is not None
            else pd.DataFrame(columns=["cell_id", "x0", "y0", "x1", "y1", "det_class"])
        )
        ids = cells["cell_id"].astype(str).tolist()
        classes = cells["det_class"].astype(str).tolist()
        pos = {c: i for i, c in enumerate(ids)}
        boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        group_boxes = group[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        given = [None if pd.isna(c) else str(c) for c in group["source_cell_id"]]
        fields = group[["fx0", "fy0", "fx1", "fy1"]].to_numpy(np.float64)
        for i, box, known, fld in zip(
            group.index.to_numpy(np.int64), group_boxes, given, fields, strict=True
        ):
            if known is not None and known in pos:
                k = pos[known]
                cell_id[i], how[i], run_class[i] = known, "id", classes[k]
                box = _unclip(box, boxes[k], fld)
                restored[i] = box
                ious[i] = float(_iou(box, boxes[k : k + 1])[0])
            elif len(boxes):
                overlap = _iou(box, boxes)
                k = int(overlap.argmax())
                if overlap[k] >= MATCH_IOU:
                    cell_id[i], how[i], ious[i] = ids[k], "iou", float(overlap[k])
                    run_class[i] = classes[k]
    return labels.assign(
        x0=restored[:, 0], y0=restored[:, 1], x1=restored[:, 2], y1=restored[:, 3],
        cell_id=cell_id, match=how, match_iou=ious, run_class=run_class,
    )


def _unclip(box: np.ndarray, cell: np.ndarray, field: np.ndarray) -> np.ndarray:
    """A label's box with the sides its field's edge cut restored to its run cell's.

    An exported field shows a cell reaching past its edge cut there, and the
    tool gives the cut box back. A side of the label at the field's edge
    (within a hundredth of a level-0 pixel and a thousandth of the field), where the
    run's cell goes on past it, is the cell's side; the other sides are the
    annotator's.
    """
    if np.isnan(field).any():
        return box
    tol = 1e-2 + 1e-3 * float(max(field[2] - field[0], field[3] - field[1]))
    out = box.copy()
    for side, edge, beyond in ((0, field[0], cell[0] < field[0]), (1, field[1], cell[1] < field[1]),
                               (2, field[2], cell[2] > field[2]), (3, field[3], cell[3] > field[3])):  # fmt: skip
        if beyond and abs(box[side] - edge) <= tol:
            out[side] = cell[side]
    return out


def import_labels(
    files: Sequence[str | Path],
    fmt: str,
    out: str | Path,
    *,
    run: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """Read ``files`` (format ``fmt``), match them to the run's cells, write the labels table ``out``."""
    labels = read_labels(files, fmt).reset_index(drop=True)
    source = RunSource(run, storage_options=storage_options) if run else None
    labels = _match(labels, source)
    # Overlapping fields show a cell more than once: keep its least clipped copy (a copy cut
    # by its field's edge is whole again when it kept its id, see `_unclip`).
    matched = labels["cell_id"].notna()
    best = (
        labels[matched]
        .sort_values(["match_iou", "source_file"], ascending=[False, True], kind="stable")
        .drop_duplicates(["slide_id", "cell_id"])
    )
    labels = pd.concat([best, labels[~matched]]).sort_index().reset_index(drop=True)
    # "platelet" is both a detector class and a wbc_type class: on a cell the run called a
    # WBC it is the classifier's label, anywhere else the detector's.
    is_det = labels["label"].isin(DETECTOR_CLASSES) & ~(
        (labels["label"] == "platelet") & (labels["run_class"] == "WBC")
    )
    labels["det_class"] = labels["label"].where(is_det, "WBC")
    labels["wbc_type"] = labels["label"].where(~is_det, None)
    labels["source"] = fmt
    labels["imported_at"] = pd.Timestamp(datetime.now(timezone.utc))
    table = pa.Table.from_pandas(
        labels.drop(columns=["source_cell_id", "run_class"]), preserve_index=False
    )
    table = schemas.conform_to(table, schemas.load("labels"), extras="drop", name="labels")
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(table, dest)
    return table
