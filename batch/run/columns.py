"""The tile batch: the one definition of the rows that travel between the pipeline's stages.

A *tile batch* is a dict of numpy object arrays (Ray Data's ``numpy`` batch
format), one row per tile. Every stage keeps one row per tile so the driver
can count tiles done per slide.

The planned row (`ROW_COLUMNS`) is the tile task (every field of
`batch.tiling.TileTask`, derived from the dataclass) plus the slide-level
columns declared here. Adding a column means adding it to `TileTask` or to
`SLIDE_COLUMNS`; its typed absent value follows from its type, and
`rows_to_batch`, `task_at` and `row_at` pick it up.

Intermediate batches never hold None: a column that is None in every row of a
batch would lose its type and fail to concatenate, so absent values are typed
(``""``, ``0``, ``nan``, ``b""``).

Row ``kind``: ``tile`` (process it), ``empty`` (a slide with no tile to
process; commits with zero cells) or ``error`` (the slide failed; ``error``
holds the typed exception, `batch.errors.encode_error`).

Columns the stages add and drop on the way (`STAGE_COLUMNS`): ``image``
(decoded tile, added by the reader, dropped at the crop), ``cells`` (the
tile's cells as Arrow IPC bytes, from the detector on), ``wbc_crops`` (crops
cut from the tile, until segmentation) and ``crops`` (crops + masks, until
classification).
"""

from __future__ import annotations

import io
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from batch.errors import HemarayError, decode_error, encode_error
from batch.tiling import TileTask

__all__ = [
    "Batch",
    "Column",
    "ROW_COLUMNS",
    "SLIDE_COLUMNS",
    "STAGE_COLUMNS",
    "TILE_COLUMNS",
    "TILE_BOX_COLUMNS",
    "as_arrays",
    "as_table",
    "batch_error",
    "complete_row",
    "error_row",
    "has_value",
    "npz_bytes",
    "object_array",
    "pack",
    "row_at",
    "rows_to_batch",
    "set_error",
    "task_at",
    "unpack",
]

Batch = dict[str, npt.NDArray[Any]]

#: The typed absent value of each column type.
_ABSENT_BY_TYPE: dict[type, Any] = {str: "", int: 0, float: math.nan, bytes: b""}


@dataclass(frozen=True)
class Column:
    """One column of the planned tile row: its name, Python type and meaning."""

    name: str
    type: type
    doc: str

    @property
    def absent(self) -> Any:
        """The value that stands for "none" in this column (never None, see the module doc)."""
        return _ABSENT_BY_TYPE[self.type]

    def cast(self, value: Any) -> Any:
        """``value`` (a numpy scalar from a batch) as this column's Python type."""
        return self.type(value)


def _task_columns() -> tuple[Column, ...]:
    hints = typing.get_type_hints(TileTask)
    return tuple(
        Column(f.name, hints[f.name], "tile task field (batch.tiling.TileTask)")
        for f in fields(TileTask)
    )


#: Columns of the planned row besides the tile task's.
SLIDE_COLUMNS: tuple[Column, ...] = (
    Column("kind", str, "tile | empty | error"),
    Column("n_tiles", int, "tiles planned for processing on this slide (0 on error rows)"),
    Column("mpp", float, "level-0 microns per pixel as settled at planning (nan: unknown)"),
    Column("slide_json", str, "the slide's header facts and plan counts (JSON)"),
    Column("error", bytes, "the typed error of an error row (batch.errors.encode_error)"),
    Column("telemetry", str, "stage call records for the driver, JSON lines (batch.run.telemetry)"),
)
#: Every column of a planned tile row, in order.
ROW_COLUMNS: tuple[Column, ...] = (*_task_columns(), *SLIDE_COLUMNS)
TILE_COLUMNS: tuple[str, ...] = tuple(c.name for c in ROW_COLUMNS)
_BY_NAME = {c.name: c for c in ROW_COLUMNS}
_TASK_FIELDS = tuple(f.name for f in fields(TileTask))

#: Columns stages add and drop: name -> (added by, dropped by).
STAGE_COLUMNS: dict[str, tuple[str, str]] = {
    "image": ("read_tiles", "crop_tiles"),
    "cells": ("DetectStage", "the driver (written)"),
    "wbc_crops": ("crop_tiles", "segment_tiles"),
    "crops": ("segment_tiles", "ClassifyStage"),
}
#: Cell columns only used between stages (tile-pixel boxes for cropping); dropped before writing.
TILE_BOX_COLUMNS = ("tx0", "ty0", "tx1", "ty1")


def object_array(values: list[Any]) -> npt.NDArray[Any]:
    """A 1-D object array of ``values`` (numpy would otherwise stack arrays into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):  # one by one: numpy would look into sequences (tables)
        out[i] = value
    return out


def complete_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every column of `ROW_COLUMNS` present and typed; other keys dropped."""
    out: dict[str, Any] = {}
    for c in ROW_COLUMNS:
        value = row.get(c.name)
        out[c.name] = c.absent if value is None else value
    return out


def rows_to_batch(rows: list[dict[str, Any]]) -> Batch:
    """A tile batch of planned rows (missing columns get their absent values)."""
    full = [complete_row(r) for r in rows]
    return {c: object_array([r[c] for r in full]) for c in TILE_COLUMNS}


def row_at(batch: Batch, i: int) -> dict[str, Any]:
    """Row ``i`` of a batch's planned columns, each as its column's Python type."""
    return {c.name: c.cast(batch[c.name][i]) for c in ROW_COLUMNS}


def task_at(batch: Batch, i: int) -> TileTask:
    """The tile task of row ``i``."""
    return TileTask(**{k: _BY_NAME[k].cast(batch[k][i]) for k in _TASK_FIELDS})


def tile_name(batch: Batch, i: int) -> str:
    """``SLIDE_ID:ROW:COL`` of row ``i`` (how errors and fault injection name a tile)."""
    return f"{batch['slide_id'][i]}:{batch['row'][i]}:{batch['col'][i]}"


def error_row(base: dict[str, Any], stage: str, error: BaseException) -> dict[str, Any]:
    """An ``error`` row for a slide that failed at ``stage`` before it had tiles."""
    data = encode_error(error, stage=stage, slide=base.get("slide_id"))
    return {**base, "kind": "error", "error": data}


def set_error(batch: Batch, i: int, stage: str, error: BaseException) -> None:
    """Turn row ``i`` into an ``error`` row: its slide failed at ``stage`` on this tile."""
    batch["kind"][i] = "error"
    batch["error"][i] = encode_error(
        error, stage=stage, slide=str(batch["slide_id"][i]), tile=tile_name(batch, i)
    )


def batch_error(batch: Batch, i: int) -> HemarayError | None:
    """The typed error of row ``i``, or None for a row that is not an error."""
    if batch["kind"][i] != "error":
        return None
    return decode_error(batch["error"][i])


def pack(table: pa.Table) -> bytes:
    """Arrow IPC stream bytes of ``table``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def unpack(data: bytes) -> pa.Table:
    """The table `pack` wrote."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def has_value(value: Any) -> bool:
    """A ``cells`` / crops entry holds something: non-empty bytes, or an object (a live table
    of any length, a dict of arrays with entries) handed on within one process."""
    if value is None:
        return False
    if isinstance(value, (bytes, bytearray, dict)):
        return len(value) > 0
    return True


def as_table(value: bytes | pa.Table) -> pa.Table:
    """A ``cells`` entry as a table: `pack` bytes unpacked, a live table as it is."""
    return value if isinstance(value, pa.Table) else unpack(value)


def npz_bytes(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """Named arrays (a tile's crops, masks, rows) as ``.npz`` bytes, for the object store."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def as_arrays(value: bytes | Mapping[str, npt.NDArray[Any]]) -> Mapping[str, npt.NDArray[Any]]:
    """A crops entry as named arrays: `npz_bytes` loaded, a live dict as it is."""
    return value if isinstance(value, Mapping) else np.load(io.BytesIO(value))
