"""QuPath export: one GeoJSON FeatureCollection per slide, in level-0 pixels of the slide.

QuPath's own layout (File > Object data > Export as GeoJSON; imported by
dragging the file onto the open slide): each feature is a ``Polygon`` with
``properties.objectType = "detection"``, ``properties.classification =
{"name", "color": [r, g, b]}``, a ``name`` (hemaray's ``cell_id``, so imports
match exactly) and ``measurements`` (a name -> number map: detector and
classifier confidences, areas in um^2, N:C ratio, ...). The feature ``id`` is
a UUID derived from the ``cell_id`` (stable across exports). Geometry is
built with shapely (vectorised) and serialised with the ``geojson`` package; coordinates
are level-0 pixels with the origin at the slide's top-left corner, which is
what QuPath uses for the full-resolution image.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import geojson
import numpy as np
import pandas as pd
import shapely

from batch.export.formats import ExportContext, FormatWriter, finite_or_none
from batch.export.select import cell_labels

__all__ = ["CLASS_COLORS", "MEASUREMENTS", "QuPathWriter", "class_color"]

#: QuPath classification colours (RGB) of the common labels; others get a stable colour.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "RBC": (220, 60, 60),
    "WBC": (60, 60, 220),
    "platelet": (150, 60, 200),
    "blast": (230, 140, 0),
    "neutrophil": (0, 160, 160),
    "lymphocyte": (0, 120, 255),
    "monocyte": (120, 80, 40),
    "eosinophil": (255, 100, 160),
    "basophil": (90, 0, 140),
}
#: Cells column -> QuPath measurement name.
MEASUREMENTS: dict[str, str] = {
    "det_confidence": "Detection confidence",
    "wbc_type_confidence": "WBC type confidence",
    "all_subtype_confidence": "ALL subtype confidence",
    "cell_area_um2": "Cell area um^2",
    "nucleus_area_um2": "Nucleus area um^2",
    "nc_ratio": "N:C ratio",
    "nucleus_circularity": "Nucleus circularity",
    "nucleus_solidity": "Nucleus solidity",
}


def class_color(name: str) -> list[int]:
    """The RGB colour of a class: the table's, else one derived from the name."""
    if name in CLASS_COLORS:
        return list(CLASS_COLORS[name])
    digest = hashlib.blake2b(name.encode(), digest_size=3).digest()
    return [int(b) for b in digest]


def cell_features(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """One QuPath detection feature (a GeoJSON Feature mapping) per cell."""
    boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
    # One vectorised shapely call for every outline: per-object shapely / geojson
    # constructors cost ~0.3 ms a cell, minutes on a 100k-cell slide.
    rings = shapely.get_coordinates(shapely.box(*boxes.T)).reshape(len(cells), 5, 2).tolist()
    columns = {col: cells[col].to_numpy() for col in MEASUREMENTS if col in cells}
    features: list[dict[str, Any]] = []
    for i, (cell_id, label) in enumerate(
        zip(cells["cell_id"].astype(str), cell_labels(cells), strict=True)
    ):
        measurements = {
            MEASUREMENTS[col]: value
            for col, values in columns.items()
            if (value := finite_or_none(values[i])) is not None
        }
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_OID, cell_id)),
                "geometry": {"type": "Polygon", "coordinates": [rings[i]]},
                "properties": {
                    "objectType": "detection",
                    "name": cell_id,
                    "classification": {"name": str(label), "color": class_color(str(label))},
                    "measurements": measurements,
                },
            }
        )
    return features


class QuPathWriter(FormatWriter):
    """``<to>/<slide_id>.geojson``: the slide's chosen cells as QuPath detections."""

    name = "qupath"
    unit = "slides"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.slides: dict[str, int] = {}

    def add_slide(self, slide_id: str, uri: str, cells: pd.DataFrame) -> None:
        collection = geojson.FeatureCollection([])
        # Assigned, not passed: the constructor re-validates every feature one by one.
        collection["features"] = cell_features(cells)
        # dumps, not dump: json.dump always takes the pure-Python encoder.
        (self.ctx.to / f"{slide_id}.geojson").write_text(geojson.dumps(collection))
        self.slides[slide_id] = len(cells)
        self.count += len(cells)

    def finish(self) -> dict[str, Any]:
        return {"features": self.count, "slides": self.slides}
