"""Parquet output and the per-slide commit protocol.

Layout under ``OUT`` (local path, ``file://`` or ``s3://``)::

    cells/slide_id=<id>/part-0.parquet   one file per committed slide (hive partition)
    slides/<id>.parquet                  one row per slide
    failures/<id>.<attempt>.parquet      one row per failed attempt
    runs/<run_id>/manifest.json          provenance of each run (+ config.yaml)

Commit guarantee: a slide's cells become visible all at once or not at all.
Rows are streamed to a local temporary Parquet file (memory stays bounded by
the rows in flight), and the slide is committed by one atomic step: an
``os.replace`` of a hidden temporary file locally, a single object PUT on S3
(objects appear whole or not at all). A file over twice `MULTIPART_CHUNK_BYTES`
goes up as a multipart upload: invisible until its completion, and aborted
when a part or the completion fails beyond botocore's retries. Readers
(pyarrow, pandas, DuckDB, Spark) skip names starting with ``.`` or ``_``. The cells file is the commit marker:
a rerun skips every slide whose cells file exists, so a retried task, a killed
worker or a rerun job never leaves duplicates or half a slide. The slide's
summary row rides in the cells file's metadata, so a crash between the cells
commit and the ``slides`` row is repaired on the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import schemas
from batch.errors import error_type_name

__all__ = [
    "OutputStore",
    "SlideWriter",
    "CELLS_FILE",
    "SUMMARY_KEY",
    "PARTITION_KEY",
    "cells_schema",
    "latest_run_config",
    "read_table",
]

CELLS_FILE = "part-0.parquet"
#: Key of the slide summary (one JSON row) in the cells file's Parquet metadata.
SUMMARY_KEY = b"hemaray.slide_summary"
#: Part size (bytes) of the multipart uploads of big files on S3: s3fs's default. A file under
#: twice this size goes up in one PUT.
MULTIPART_CHUNK_BYTES = 50 * 2**20
#: Failure attempt numbers tried in a row before giving up (concurrent runs take numbers).
MAX_ATTEMPT_CLASHES = 100
#: Parquet row group size: bounded memory for readers of big slides.
ROW_GROUP_ROWS = 65_536
#: Slides with at most this many cells are written in a stable order (tile, then position), so
#: two runs give byte-identical files; bigger ones keep arrival order to bound memory.
SORT_MAX_ROWS = 2_000_000
#: The stable order of a slide's rows.
SORT_KEYS = [
    ("tile_row", "ascending"),
    ("tile_col", "ascending"),
    ("y0", "ascending"),
    ("x0", "ascending"),
    ("cell_id", "ascending"),
]
#: Hive partition column of ``cells``: carried by the folder name, not stored in the files
#: (pandas/pyarrow refuse a column that is both in the file and in the path).
PARTITION_KEY = "slide_id"


def cells_schema(label_sets: dict[str, list[str]], export_crops: bool) -> pa.Schema:
    """The cells file schema: schemas/cells plus one column group per configured classifier."""
    base = schemas.load("cells")
    fields = [
        f
        for f in base
        if not f.name.startswith(("wbc_type_", "all_subtype_", "crop_png", "mask_png"))
    ]
    for name, labels in label_sets.items():
        fields += [
            pa.field(f"{name}_label", pa.string(), metadata={"unit": "", "doc": f"classifier {name}: one of {labels}"}),
            pa.field(f"{name}_confidence", pa.float32(), metadata={"unit": "probability [0,1]", "doc": f"classifier {name}: top-1 probability"}),
            pa.field(f"{name}_probs", pa.list_(pa.float32()), metadata={"unit": "probability [0,1]", "doc": f"classifier {name}: probabilities in the order {labels}"}),
            pa.field(f"{name}_version", pa.string(), metadata={"unit": "", "doc": f"classifier {name}: first 12 hex of the weights' SHA-256"}),
        ]  # fmt: skip
    if export_crops:
        fields += [base.field("crop_png"), base.field("mask_png")]
    return pa.schema(fields, metadata=base.metadata)


class OutputStore:
    """The output dataset of one or many runs, on any fsspec filesystem."""

    #: Part size of this store's multipart uploads on S3 (a subclass may set a smaller one).
    multipart_chunk_bytes = MULTIPART_CHUNK_BYTES

    def __init__(self, out: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = out.rstrip("/")
        self.storage_options = storage_options
        fs, root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        for sub in ("cells", "slides", "failures", "runs"):
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)

    # -- paths ---------------------------------------------------------------
    def cells_path(self, slide_id: str) -> str:
        return f"{self.root}/cells/slide_id={slide_id}/{CELLS_FILE}"

    def slides_path(self, slide_id: str) -> str:
        return f"{self.root}/slides/{slide_id}.parquet"

    # -- state -----------------------------------------------------------------
    def committed(self) -> set[str]:
        """Slide ids whose cells file exists (committed by any run)."""
        self.fs.invalidate_cache()
        found = self.fs.glob(f"{self.root}/cells/slide_id=*/{CELLS_FILE}")
        return {p.rstrip("/").split("/")[-2].split("=", 1)[1] for p in found}

    def failure_attempts(self, slide_id: str) -> int:
        self.fs.invalidate_cache()
        return len(self.fs.glob(f"{self.root}/failures/{slide_id}.*.parquet"))

    # -- writing ---------------------------------------------------------------
    def _put_atomic(self, local: str, remote: str) -> None:
        """Make ``local``'s content appear at ``remote`` in one step."""
        if self.is_local:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            hidden = str(Path(remote).parent / f".{Path(remote).name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(local, hidden)
            os.replace(hidden, remote)
        elif "s3" in self.fs.protocol:
            self.fs.put_file(local, remote, chunksize=self.multipart_chunk_bytes)
        else:
            self.fs.put_file(local, remote)

    def write_table(self, table: pa.Table, remote: str) -> None:
        """Write one small table atomically (slides and failures rows)."""
        with tempfile.TemporaryDirectory(prefix="hemaray-") as tmp:
            local = f"{tmp}/t.parquet"
            pq.write_table(table, local)
            self._put_atomic(local, remote)

    def write_slide_row(self, row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        table = pa.Table.from_pylist([{**row, **(extra or {})}])
        self.write_table(schemas.conform(table, "slides"), self.slides_path(row["slide_id"]))

    def _put_exclusive(self, local: str, remote: str) -> bool:
        """Make ``local``'s content appear at ``remote`` only if nothing is there; False if taken.

        Locally a hard link of a complete temporary file (``link`` fails if the name
        exists); on S3 a conditional PUT (``If-None-Match: *``).
        """
        if self.is_local:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            hidden = str(Path(remote).parent / f".{Path(remote).name}.{uuid.uuid4().hex}.tmp")
            shutil.copyfile(local, hidden)
            try:
                os.link(hidden, remote)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(hidden)
        bucket, _, key = remote.partition("/")
        with open(local, "rb") as f:
            body = f.read()
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")  # type: ignore[attr-defined]
            return True
        except FileExistsError:
            # botocore retries a PUT whose answer was lost (a reset after the store applied it);
            # the retry then meets the object its own first try made: that one is ours.
            return self._holds(remote, body)
        except NotImplementedError:  # a store without conditional writes: check, then put
            if self.fs.exists(remote):
                return False
            self.fs.put_file(local, remote)
            return True

    def _holds(self, remote: str, body: bytes) -> bool:
        """Whether ``remote`` holds exactly ``body`` (a failures row names its time to the us)."""
        try:
            return bool(self.fs.cat_file(remote) == body)
        except FileNotFoundError:
            return False

    def write_failure(
        self,
        slide_id: str,
        slide_uri: str,
        *,
        stage: str,
        error: BaseException,
        tile: str | None = None,
    ) -> int:
        """One failures row: the error's class (the original one of a `StageError`) and message.

        Its ``attempt`` is unique per slide even when runs fail the slide at once: the row
        is created only if that attempt's file does not exist yet, else the next number is
        tried. Returns the attempt number.
        """
        first = self.failure_attempts(slide_id) + 1
        row = {
            "slide_id": slide_id,
            "slide_uri": slide_uri,
            "stage": stage,
            "error_type": error_type_name(error),
            "message": str(error),
            "tile": tile if tile is not None else getattr(error, "tile", None),
            "failed_at": datetime.now(UTC),
        }
        with tempfile.TemporaryDirectory(prefix="hemaray-") as tmp:
            local = f"{tmp}/t.parquet"
            for attempt in range(first, first + MAX_ATTEMPT_CLASHES):
                table = schemas.conform(pa.Table.from_pylist([{**row, "attempt": attempt}]), "failures")
                pq.write_table(table, local)
                if self._put_exclusive(local, f"{self.root}/failures/{slide_id}.{attempt}.parquet"):
                    return attempt
        raise OSError(f"{slide_id}: {MAX_ATTEMPT_CLASHES} failure attempt numbers taken in a row")

    def repair_slide_rows(self) -> list[str]:
        """Make the ``slides`` rows agree with the committed cells files; returns the ids repaired.

        The cells file is the commit: a committed slide whose row is missing or not
        ``committed`` (its row write failed after the cells file landed, or a failed
        attempt's row outlived a later commit) gets its row back from the summary in the
        cells file's metadata. A ``committed`` row without a cells file (the file was
        deleted) is removed, so the slide is processed again.
        """
        self.fs.invalidate_cache()
        status: dict[str, str | None] = {}
        rows = read_table(self.uri, "slides", storage_options=self.storage_options)
        if rows.num_rows:
            for sid, st in zip(rows.column("slide_id").to_pylist(), rows.column("status").to_pylist(), strict=True):
                status[str(sid)] = st
        committed = self.committed()
        repaired = []
        for sid in sorted(committed):
            if status.get(sid) == "committed":
                continue
            with self.fs.open(self.cells_path(sid), "rb") as f:
                meta = pq.read_metadata(f).metadata or {}
            if SUMMARY_KEY in meta:
                summary = json.loads(meta[SUMMARY_KEY])
                self.write_slide_row(summary["row"], summary.get("extra"))
                repaired.append(sid)
        for sid, st in sorted(status.items()):
            if st == "committed" and sid not in committed:
                self.fs.rm_file(self.slides_path(sid))
                repaired.append(sid)
        return repaired

    def write_manifest(self, run_id: str, manifest: dict[str, Any], config_yaml: str) -> str:
        base = f"{self.root}/runs/{run_id}"
        self.fs.makedirs(base, exist_ok=True)
        with self.fs.open(f"{base}/manifest.json", "w") as f:
            f.write(json.dumps(manifest, indent=2, default=str))
        with self.fs.open(f"{base}/config.yaml", "w") as f:
            f.write(config_yaml)
        return f"{self.uri}/runs/{run_id}/manifest.json"

    def slide_writer(self, slide_id: str, schema: pa.Schema) -> SlideWriter:
        return SlideWriter(self, slide_id, schema)


class SlideWriter:
    """Streams one slide's cell rows to a local temp file; :meth:`commit` publishes them at once."""

    def __init__(self, store: OutputStore, slide_id: str, schema: pa.Schema) -> None:
        self.store = store
        self.slide_id = slide_id
        # The partition key lives in the folder name only.
        self.schema = (
            schema.remove(schema.get_field_index(PARTITION_KEY))
            if PARTITION_KEY in schema.names
            else schema
        )
        self._tmpdir = tempfile.mkdtemp(prefix=f"hemaray-{slide_id[:32]}-")
        self._path = f"{self._tmpdir}/{CELLS_FILE}"
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, batch: pa.Table | pa.RecordBatch) -> None:
        """Stage rows; they reach the file in whole row groups of ``ROW_GROUP_ROWS`` rows.

        A tile's few hundred cells would otherwise make one tiny row group each: a
        footer entry per tile, slow scans, and a Parquet write call per tile in the driver.
        """
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        # The run's cells schema without the partition key: missing nullable columns become
        # nulls, columns it lacks are dropped, types are cast.
        table = schemas.conform_to(table, self.schema, extras="drop")
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(whole_groups=True)

    def _flush(self, *, whole_groups: bool = False) -> None:
        """Write staged rows: all of them, or only whole row groups (the rest stays staged)."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, self.schema)
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        n = (len(table) // ROW_GROUP_ROWS) * ROW_GROUP_ROWS if whole_groups else len(table)
        self._writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP_ROWS)
        rest = table.slice(n)
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def publish(self, summary_row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Publish the cells file, the commit point (the summary row rides in its metadata)."""
        summary = json.dumps({"row": summary_row, "extra": extra or {}}, default=str).encode()
        self._flush()
        assert self._writer is not None
        self._writer.add_key_value_metadata({SUMMARY_KEY: summary})
        self._writer.close()
        self._writer = None
        if 0 < self.rows <= SORT_MAX_ROWS and all(k in self.schema.names for k, _ in SORT_KEYS):
            table = pq.read_table(self._path)
            # The footer's key-value metadata does not come back with the table: carry the
            # summary over by hand, or the repair would find no row to restore.
            meta = {**(table.schema.metadata or {}), SUMMARY_KEY: summary}
            table = table.sort_by(SORT_KEYS).replace_schema_metadata(meta)
            pq.write_table(table, self._path, row_group_size=ROW_GROUP_ROWS)
        try:
            self.store._put_atomic(self._path, self.store.cells_path(self.slide_id))
        finally:
            self.discard()

    def commit(self, summary_row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Publish the cells file (the commit point), then the slide's summary row.

        If the row write fails the slide is still committed; the next run's
        `OutputStore.repair_slide_rows` writes the row from the cells file.
        """
        self.publish(summary_row, extra)
        self.store.write_slide_row(summary_row, extra)

    def discard(self) -> None:
        """Drop everything staged for this slide (nothing becomes visible)."""
        self._pending, self._pending_rows = [], 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmpdir, ignore_errors=True)


def read_table(out: str, table: str, *, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read one output table (``cells``, ``slides`` or ``failures``) as Arrow."""
    import pyarrow.dataset as ds

    fs, root = fsspec.core.url_to_fs(out.rstrip("/"), **(storage_options or {}))
    path = f"{root.rstrip('/')}/{table}"
    partitioning = "hive" if table == "cells" else None
    if not fs.exists(path) or not fs.ls(path):
        return schemas.load(table).empty_table()
    data = ds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning)
    if table != "cells":  # one small file per row: carry every file's manifest columns
        schema = pa.unify_schemas(
            [f.physical_schema for f in data.get_fragments()], promote_options="permissive"
        )
        data = ds.dataset(path, filesystem=fs, format="parquet", schema=schema)
    return data.to_table()


def latest_run_config(out: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The saved config (parsed ``config.yaml``) of the newest run in ``out``; ``{}`` if none.

    Run ids start with their UTC start time, so the last one sorted is the newest.
    """
    fs, root = fsspec.core.url_to_fs(out.rstrip("/"), **(storage_options or {}))
    found = sorted(fs.glob(f"{root.rstrip('/')}/runs/*/config.yaml"))
    if not found:
        return {}
    loaded = yaml.safe_load(fs.cat_file(found[-1]))
    return loaded if isinstance(loaded, dict) else {}
