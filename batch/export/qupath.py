"""QuPath export: one GeoJSON FeatureCollection and one GeoParquet file per slide, in level-0 pixels.

QuPath's own layout (File > Object data > Export as GeoJSON; imported by
dragging the file onto the open slide): each feature is a ``Polygon`` with
``properties.objectType = "detection"``, ``properties.classification =
{"name", "color": [r, g, b]}``, a ``name`` (hemaray's ``cell_id``, so imports
match exactly) and ``measurements`` (a name -> number map: detector and
classifier confidences, areas in um^2, N:C ratio, ...). The feature ``id`` is
a UUID derived from the ``cell_id`` (stable across exports). Geometry is
built with shapely (vectorised) and serialised with the C JSON encoder; coordinates
are level-0 pixels with the origin at the slide's top-left corner, which is
what QuPath uses for the full-resolution image.

Beside it, ``<slide_id>.geo.parquet`` holds the same cells for GeoPandas,
QGIS or DuckDB spatial (`batch.export.geoparquet`): one row per cell with
``cell_id``, ``slide_id``, ``det_class``, ``label`` (the classification
name), the measured columns under their cells-table names, a ``bbox`` and
the ``geometry`` (WKB of the same polygon). Both files are written
`QUPATH_BATCH_ROWS` cells at a time, so a 100,000-cell slide's features never
sit in memory at once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import shapely

from batch.export.formats import ExportContext, FormatWriter
from batch.export.geoparquet import GeoParquetWriter
from batch.export.select import cell_labels

__all__ = [
    "CLASS_COLORS", "GEOPARQUET_SUFFIX", "MEASUREMENTS", "QUPATH_BATCH_ROWS", "QuPathWriter",
    "cell_features", "class_color",
]  # fmt: skip

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
#: Cells serialised at a time (GeoJSON features and one GeoParquet row group).
QUPATH_BATCH_ROWS = 16_384
#: File name suffix of a slide's GeoParquet file (beside ``<slide_id>.geojson``).
GEOPARQUET_SUFFIX = ".geo.parquet"


def class_color(name: str) -> list[int]:
    """The RGB colour of a class: the table's, else one derived from the name."""
    if name in CLASS_COLORS:
        return list(CLASS_COLORS[name])
    digest = hashlib.blake2b(name.encode(), digest_size=3).digest()
    return [int(b) for b in digest]


def cell_outlines(cells: pd.DataFrame) -> npt.NDArray[np.object_]:
    """Each cell's outline: its level-0 box as a shapely polygon (one vectorised call)."""
    # Per-object shapely / geojson constructors cost ~0.3 ms a cell, minutes on a
    # 100k-cell slide.
    return shapely.box(*cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64).T)


def measured(cells: pd.DataFrame) -> dict[str, npt.NDArray[np.float64]]:
    """The `MEASUREMENTS` columns the cells have, as floats (NaN: not measured or not finite)."""
    out = {}
    for col in MEASUREMENTS:
        if col in cells:
            values = pd.to_numeric(cells[col], errors="coerce").to_numpy(np.float64)
            out[col] = np.where(np.isfinite(values), values, np.nan)
    return out


def cell_features(
    cells: pd.DataFrame, outlines: npt.NDArray[np.object_] | None = None
) -> list[dict[str, Any]]:
    """One QuPath detection feature (a GeoJSON Feature mapping) per cell."""
    polygons = cell_outlines(cells) if outlines is None else outlines
    rings = shapely.get_coordinates(polygons).reshape(len(cells), 5, 2).tolist()
    # Python floats once per column: a per-value float() / isnan costs seconds a 100k slide.
    columns = {MEASUREMENTS[col]: v.tolist() for col, v in measured(cells).items()}
    features: list[dict[str, Any]] = []
    for i, (cell_id, label) in enumerate(
        zip(cells["cell_id"].astype(str), cell_labels(cells), strict=True)
    ):
        # NaN != NaN: a cell's unmeasured values are left out.
        measurements = {name: v[i] for name, v in columns.items() if v[i] == v[i]}
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


def geoparquet_schema(cells: pd.DataFrame) -> pa.Schema:
    """The attribute columns of a slide's GeoParquet file (measurements the cells have)."""
    fields = [pa.field(n, pa.string()) for n in ("cell_id", "slide_id", "det_class", "label")]
    fields += [pa.field(col, pa.float64()) for col in MEASUREMENTS if col in cells]
    return pa.schema(fields)


def geoparquet_attributes(cells: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """One batch of cells as the GeoParquet file's attribute columns (NaN stored as null)."""
    columns: dict[str, pa.Array] = {
        "cell_id": pa.array(cells["cell_id"].astype(str).to_numpy(), pa.string()),
        "slide_id": pa.array(cells["slide_id"].astype(str).to_numpy(), pa.string()),
        "det_class": pa.array(cells["det_class"].astype(str).to_numpy(), pa.string()),
        "label": pa.array(cell_labels(cells).astype(str).to_numpy(), pa.string()),
    }
    for col, values in measured(cells).items():
        columns[col] = pa.array(values, pa.float64(), from_pandas=True)
    return pa.table(columns, schema=schema)


class QuPathWriter(FormatWriter):
    """``<to>/<slide_id>.geojson`` (QuPath detections) and ``<slide_id>.geo.parquet`` per slide."""

    name = "qupath"
    unit = "slides"

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.slides: dict[str, int] = {}

    def add_slide(self, slide_id: str, uri: str, cells: pd.DataFrame) -> None:
        cells = cells.assign(slide_id=slide_id)
        schema = geoparquet_schema(cells)
        boxes = cells[["x0", "y0", "x1", "y1"]].to_numpy(np.float64)
        bbox = (
            None
            if cells.empty
            else [float(v) for v in (*boxes[:, :2].min(axis=0), *boxes[:, 2:].max(axis=0))]
        )
        geo_path = self.ctx.to / f"{slide_id}{GEOPARQUET_SUFFIX}"
        with (
            (self.ctx.to / f"{slide_id}.geojson").open("w") as out,
            GeoParquetWriter(geo_path, schema, ["Polygon"], bbox) as geo,
        ):
            # A FeatureCollection written batch by batch, without every feature in memory.
            out.write('{"type": "FeatureCollection", "features": [')
            for start in range(0, len(cells), QUPATH_BATCH_ROWS):
                batch = cells.iloc[start : start + QUPATH_BATCH_ROWS]
                outlines = cell_outlines(batch)
                # json.dumps, not json.dump (always the pure-Python encoder) nor
                # geojson.dumps (which round-trips every feature through json.loads).
                text = json.dumps(cell_features(batch, outlines))[1:-1]
                out.write(text if start == 0 else f", {text}")
                geo.write(geoparquet_attributes(batch, schema), outlines)
            out.write("]}")
        self.slides[slide_id] = len(cells)
        self.count += len(cells)

    def finish(self) -> dict[str, Any]:
        return {"features": self.count, "slides": self.slides, "geoparquet": len(self.slides)}
