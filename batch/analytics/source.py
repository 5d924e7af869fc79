"""Open run outputs (local or ``s3://``) for DuckDB queries, in bounded memory.

Each output's ``cells`` dataset is handed to DuckDB as a ``pyarrow.dataset``
over its fsspec filesystem (the same code for local paths and S3; DuckDB needs
no extension), so scans stream with projection pushdown. The WBCs that vote in
a slide's calls are chosen with `batch.calls.counted_wbcs` while streaming and
kept in a DuckDB table ``wbc``; everything per WBC type is a query over it.
``slides`` and ``failures`` are small (one row per slide / attempt) and are
read whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

import schemas
from batch.calls import counted_wbcs
from batch.config import CallsConfig, SegmentationConfig, TilingConfig
from batch.errors import ConfigError
from batch.run.sink import latest_run_config, read_table

__all__ = ["RunOutputs", "open_outputs", "run_manifests", "WBC_COLUMNS", "GATE_COLUMNS"]

#: Columns kept per counted WBC (everything the tables, plots and galleries use).
WBC_COLUMNS = (
    "cell_id", "slide_id", "x0", "y0", "x1", "y1", "cx", "cy", "mpp",
    "det_confidence", "cell_area_um2", "nucleus_area_um2", "nc_ratio", "nucleus_circularity",
    "wbc_type_label", "wbc_type_confidence", "all_subtype_label", "all_subtype_confidence",
)  # fmt: skip
#: Columns `batch.calls.counted_wbcs` reads.
GATE_COLUMNS = ("det_class", "det_confidence", "nucleus_area_um2", "nucleus_mean_a")
#: Rows per batch streamed from DuckDB through the gate.
STREAM_BATCH_ROWS = 262_144
#: DuckDB's memory cap; larger intermediate results spill to its temp directory.
DUCKDB_MEMORY_LIMIT = "1GB"


@dataclass
class RunOutputs:
    """One or more run outputs opened for queries.

    Attributes
    ----------
    con
        DuckDB connection with the view ``cells`` (every output's cells, the
        columns of `WBC_COLUMNS` plus ``det_class``) and the tables ``wbc``
        (counted WBCs), ``slides`` and ``failures``.
    outs
        The output URIs, in the order given.
    gate
        The calls gate (from the newest run manifest's config, else the default).
    crop_margin
        The pipeline's crop margin (same source as ``gate``).
    storage_options
        fsspec options for S3 (endpoint); used again to open slides for crops.
    metadata_columns
        Slides-table columns carried from the input manifest (``--by`` candidates).
    runs
        Every run manifest of every output (oldest first), for throughput figures.
    tiling
        The newest run's tiling config (to redraw a slide's analysed area).
    detector_mpp
        The newest run's detector trained mpp (the tiling's target scale).
    """

    con: duckdb.DuckDBPyConnection
    outs: list[str]
    gate: CallsConfig
    crop_margin: float
    storage_options: dict[str, Any] | None = None
    metadata_columns: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    detector_mpp: float | None = None

    def close(self) -> None:
        self.con.close()


def _gate_and_margin(config: dict[str, Any]) -> tuple[CallsConfig, float]:
    calls = config.get("calls") or {}
    known = set(CallsConfig.__dataclass_fields__)
    gate = CallsConfig(**{k: v for k, v in calls.items() if k in known})
    margin = (config.get("segmentation") or {}).get("crop_margin", SegmentationConfig.crop_margin)
    return gate, float(margin)


def _tiling(config: dict[str, Any]) -> TilingConfig:
    known = set(TilingConfig.__dataclass_fields__)
    return TilingConfig(**{k: v for k, v in (config.get("tiling") or {}).items() if k in known})


def run_manifests(out: str, *, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The run manifests (``runs/*/manifest.json``) of output ``out``, oldest first."""
    fs, root = fsspec.core.url_to_fs(out.rstrip("/"), **(storage_options or {}))
    found = sorted(fs.glob(f"{root.rstrip('/')}/runs/*/manifest.json"))
    manifests = []
    for path in found:
        try:
            m = json.loads(fs.cat_file(path))
        except (OSError, ValueError):
            continue  # a run still writing, or a damaged manifest: the tables do not need it
        if isinstance(m, dict):
            manifests.append({**m, "out": out})
    return manifests


def _cells_dataset(fs: Any, root: str) -> pads.Dataset | None:
    path = f"{root}/cells"
    if not fs.exists(path) or not fs.ls(path):
        return None
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")


def _select(names: list[str], available: set[str], types: dict[str, str]) -> str:
    """A projection that yields ``names`` whether or not a dataset has each column."""
    parts = []
    for n in names:
        parts.append(f'"{n}"' if n in available else f'CAST(NULL AS {types[n]}) AS "{n}"')
    return ", ".join(parts)


def _duck_types() -> dict[str, str]:
    schema = schemas.load("cells")
    out: dict[str, str] = {}
    for f in schema:
        if pa.types.is_floating(f.type):
            out[f.name] = "DOUBLE"
        elif pa.types.is_integer(f.type):
            out[f.name] = "BIGINT"
        else:
            out[f.name] = "VARCHAR"
    return out


def open_outputs(
    outs: list[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunOutputs:
    """Open run outputs ``outs`` (paths, ``file://`` or ``s3://`` prefixes) for queries.

    Raises
    ------
    ConfigError
        If no output is given, or two outputs hold the same ``slide_id``
        (the tables are keyed by it: report such runs separately).
    """
    if not outs:
        raise ConfigError("report needs at least one run output (OUT folder or s3:// prefix)")
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
    con.execute("SET preserve_insertion_order = false")
    types = _duck_types()
    cols = list(dict.fromkeys(["det_class", *WBC_COLUMNS, *GATE_COLUMNS]))
    selects, slide_tables, failure_tables = [], [], []
    runs: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for i, out in enumerate(outs):
        fs, root = fsspec.core.url_to_fs(out.rstrip("/"), **(storage_options or {}))
        root = root.rstrip("/")
        config = latest_run_config(out, storage_options=storage_options) or config
        runs += run_manifests(out, storage_options=storage_options)
        data = _cells_dataset(fs, root)
        if data is not None:
            con.register(f"cells_{i}", data)
            available = set(data.schema.names)
            selects.append(f"SELECT {_select(cols, available, types)} FROM cells_{i}")
        slide_tables.append(read_table(out, "slides", storage_options=storage_options))
        failure_tables.append(read_table(out, "failures", storage_options=storage_options))
    if not selects:
        empty = schemas.load("cells").empty_table().select(cols)
        con.register("cells_empty", empty)
        selects.append("SELECT * FROM cells_empty")
    con.execute("CREATE VIEW cells AS " + " UNION ALL ".join(selects))

    slides = pa.concat_tables(slide_tables, promote_options="permissive")
    ids = slides.column("slide_id").to_pylist()
    dupes = sorted({s for s in ids if ids.count(s) > 1})
    if dupes:
        raise ConfigError(
            f"slide ids {dupes[:5]} appear in more than one output; report those runs separately"
        )
    schema = schemas.load("slides")
    for f in schema:  # outputs of older versions lack some columns: null, not an error
        if f.name not in slides.column_names:
            slides = slides.append_column(f.name, pa.nulls(slides.num_rows, f.type))
    base = set(schema.names)
    metadata = [n for n in slides.column_names if n not in base]
    con.register("slides_arrow", slides)
    con.execute("CREATE TABLE slides AS SELECT * FROM slides_arrow")
    con.register("failures_arrow", pa.concat_tables(failure_tables, promote_options="permissive"))
    con.execute("CREATE TABLE failures AS SELECT * FROM failures_arrow")

    gate, margin = _gate_and_margin(config)
    _load_counted_wbcs(con, gate, types, progress)
    mpps = [float(r["detector_trained_mpp"]) for r in runs if r.get("detector_trained_mpp")]
    return RunOutputs(
        con, list(outs), gate, margin, storage_options, metadata,
        runs=runs, tiling=_tiling(config), detector_mpp=mpps[-1] if mpps else None,
    )  # fmt: skip


def _load_counted_wbcs(
    con: duckdb.DuckDBPyConnection,
    gate: CallsConfig,
    types: dict[str, str],
    progress: Callable[[str], None] | None,
) -> None:
    """Fill table ``wbc`` with the WBCs `batch.calls.counted_wbcs` lets vote, batch by batch."""
    defs = ", ".join(f'"{c}" {types[c]}' for c in WBC_COLUMNS)
    con.execute(f"CREATE TABLE wbc ({defs})")
    cols = ", ".join(f'"{c}"' for c in dict.fromkeys([*WBC_COLUMNS, *GATE_COLUMNS]))
    # One connection cannot stream and insert at once: a cursor (same database; it does
    # not see the registered datasets, but sees table ``wbc``) does the inserts.
    cur = con.cursor()
    reader = con.sql(f"SELECT {cols} FROM cells WHERE det_class = 'WBC'").to_arrow_reader(
        STREAM_BATCH_ROWS
    )
    kept, seen = [], 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        mask = counted_wbcs(table, gate)
        seen += table.num_rows
        if mask.any():
            kept.append(table.filter(pa.array(np.asarray(mask))).select(list(WBC_COLUMNS)))
        if progress is not None:
            progress(f"read {seen:,} WBC rows")
        if sum(t.num_rows for t in kept) >= STREAM_BATCH_ROWS:
            _append(cur, kept)
            kept = []
    _append(cur, kept)
    cur.close()


def _append(con: duckdb.DuckDBPyConnection, tables: list[pa.Table]) -> None:
    if not tables:
        return
    chunk = pa.concat_tables(tables)
    con.register("wbc_chunk", chunk)
    con.execute("INSERT INTO wbc SELECT * FROM wbc_chunk")
    con.unregister("wbc_chunk")


def json_safe(value: Any) -> Any:
    """Plain JSON values (NaN -> null) for the report's JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), default=str)
