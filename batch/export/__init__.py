"""Annotation round trip: a run's cells out to COCO, YOLO, QuPath, Label Studio, CVAT, ImageFolder, and back.

`export_run` is the entry point (``hemaray export``): `select` chooses the
cells (least confident first, margin, random, stratified), `where` filters
them with a SQL predicate (DuckDB), `source` reads the run slide by slide and
cuts pixels from the slides, `fields` plans image fields and WBC crops,
`formats` and `qupath` write each tool's layout (`geoparquet` the GeoParquet
files beside QuPath's GeoJSON), `target` uploads the export to ``s3://``.
`importer.import_labels` (``hemaray import-labels``) reads the tools' files
back into a labels table matched to the run's cells.
"""

from batch.export.export import FORMATS, ExportOptions, export_run

__all__ = ["FORMATS", "ExportOptions", "export_run"]
