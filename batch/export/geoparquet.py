"""GeoParquet 1.1.0 files written batch by batch: WKB geometry, a bbox covering column, ``geo`` metadata.

The file is what GeoPandas (``read_parquet``), GDAL/QGIS, DuckDB spatial and
Sedona read (https://geoparquet.org/releases/v1.1.0/): a ``geometry`` column of
WKB (``encoding: "WKB"``), a ``bbox`` struct column (``xmin``, ``ymin``,
``xmax``, ``ymax``) declared as the geometry's ``covering`` so readers can skip
row groups by position, and the ``geo`` key in the Parquet file metadata with
``version``, ``primary_column`` and ``columns.geometry`` (``encoding``,
``geometry_types``, ``crs``, ``bbox``). Coordinates here are slide pixels,
which have no coordinate reference system: ``crs`` is ``null``, which the
spec defines as "undefined", so no reader takes them for longitude/latitude.

`GeoParquetWriter.write` appends one batch as a row group through a
``pyarrow.parquet.ParquetWriter``, so memory is bounded by a batch. The
``geo`` metadata is part of the schema given when the file is opened (so
pyarrow-based readers, GeoPandas among them, find it in the Arrow schema as
well as in the file metadata); the file's bounding box, when the caller knows
it up front, goes into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

__all__ = ["GEO_KEY", "GEOPARQUET_VERSION", "GeoParquetWriter", "geo_metadata"]

#: The GeoParquet spec version written.
GEOPARQUET_VERSION = "1.1.0"
#: File metadata key of the GeoParquet metadata.
GEO_KEY = "geo"
#: Names of the geometry and its covering columns.
GEOMETRY_COLUMN, BBOX_COLUMN = "geometry", "bbox"
_BBOX_TYPE = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


def geo_metadata(geometry_types: list[str], bbox: list[float] | None) -> dict[str, Any]:
    """The ``geo`` metadata of a file whose only geometry column is ``geometry`` (WKB, no CRS)."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": geometry_types,
        "crs": None,
        "edges": "planar",
        "covering": {
            "bbox": {k: [BBOX_COLUMN, k] for k in ("xmin", "ymin", "xmax", "ymax")},
        },
    }
    if bbox is not None:
        column["bbox"] = bbox
    return {
        "version": GEOPARQUET_VERSION,
        "primary_column": GEOMETRY_COLUMN,
        "columns": {GEOMETRY_COLUMN: column},
    }


class GeoParquetWriter:
    """A GeoParquet file of one geometry column plus attributes, written batch by batch.

    Parameters
    ----------
    path
        The file to write.
    attributes
        The attribute columns' schema (every batch has these columns).
    geometry_types
        The geometry types the file holds (``["Polygon"]``; ``[]``: any).
    bbox
        ``[xmin, ymin, xmax, ymax]`` of every geometry the file will hold (None: not stated).
    """

    def __init__(
        self,
        path: Path,
        attributes: pa.Schema,
        geometry_types: list[str],
        bbox: list[float] | None = None,
    ) -> None:
        self.path = path
        meta = json.dumps(geo_metadata(geometry_types, bbox))
        self.schema = (
            attributes.append(pa.field(BBOX_COLUMN, _BBOX_TYPE))
            .append(pa.field(GEOMETRY_COLUMN, pa.binary()))
            .with_metadata({**(attributes.metadata or {}), GEO_KEY.encode(): meta.encode()})
        )
        self._writer = pq.ParquetWriter(str(path), self.schema)
        self.rows = 0

    def write(self, attributes: pa.Table, geometry: npt.NDArray[np.object_]) -> None:
        """Append one batch: ``attributes`` rows and their shapely ``geometry``, row for row."""
        if len(geometry) != attributes.num_rows:
            raise ValueError(
                f"{self.path}: {len(geometry)} geometries for {attributes.num_rows} rows"
            )
        if not len(geometry):
            return
        bounds = shapely.bounds(geometry)
        bbox = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i]) for i in range(4)], fields=list(_BBOX_TYPE)
        )
        wkb = pa.array(shapely.to_wkb(geometry), pa.binary())
        table = attributes.append_column(BBOX_COLUMN, bbox).append_column(GEOMETRY_COLUMN, wkb)
        self._writer.write_table(table.cast(self.schema))
        self.rows += len(geometry)

    def close(self) -> None:
        """Finish the file (its footer)."""
        self._writer.close()

    def __enter__(self) -> GeoParquetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
