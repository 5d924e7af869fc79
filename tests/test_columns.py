"""The tile batch contract: every column round-trips, absent values are typed, errors keep their type."""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import pytest

from batch.errors import (
    ConfigError,
    CorruptSlideError,
    HemarayError,
    StageError,
    decode_error,
    encode_error,
    error_type_name,
)
from batch.run.columns import (
    ROW_COLUMNS,
    TILE_COLUMNS,
    batch_error,
    complete_row,
    error_row,
    row_at,
    rows_to_batch,
    set_error,
    task_at,
)
from batch.tiling import TileTask

#: A value of each column type that is not its absent value.
SAMPLE = {str: "x", int: 7, float: 2.5, bytes: b"\x01"}


def _task(row: int = 1) -> TileTask:
    return TileTask(
        slide_id="s1", slide_uri="/data/s1.tif", level=1, downsample=2.0, row=row, col=3,
        x=10, y=20, w=640, h=640, core_x0=0.0, core_y0=1.5, core_x1=600.0, core_y1=601.5,
        scale=0.5,
    )  # fmt: skip


def test_every_tile_task_field_is_a_column() -> None:
    assert {f.name for f in fields(TileTask)} <= set(TILE_COLUMNS)
    assert len(set(TILE_COLUMNS)) == len(TILE_COLUMNS)


def test_every_column_round_trips() -> None:
    row = {c.name: SAMPLE[c.type] for c in ROW_COLUMNS}
    row.update(asdict(_task()))
    batch = rows_to_batch([row, row])
    assert list(batch) == list(TILE_COLUMNS)
    for i in range(2):
        back = row_at(batch, i)
        assert back == row
        assert {k: type(v) for k, v in back.items()} == {c.name: c.type for c in ROW_COLUMNS}
    assert task_at(batch, 1) == _task()


def test_absent_values_are_typed_never_none() -> None:
    batch = rows_to_batch([{"slide_id": "s", "kind": "empty"}])
    back = row_at(batch, 0)
    for c in ROW_COLUMNS:
        value = back[c.name]
        assert value is not None and type(value) is c.type, c.name
        if c.name not in ("slide_id", "kind"):
            assert value == c.absent or (c.type is float and math.isnan(value)), c.name
    # Unknown keys do not travel; a None is replaced by the typed absent value.
    assert "other" not in complete_row({"other": 1, "mpp": None})
    assert math.isnan(complete_row({"mpp": None})["mpp"])


def test_a_hemaray_error_keeps_its_class_slide_tile_and_stage() -> None:
    batch = rows_to_batch([asdict(_task(0)), asdict(_task(1))])
    err = CorruptSlideError("/data/s1.tif", "bad JPEG stream", tile="level 1 tile (1, 3)")
    set_error(batch, 1, "read", err)
    assert batch_error(batch, 0) is None
    back = batch_error(batch, 1)
    assert type(back) is CorruptSlideError
    assert (back.slide, back.tile, back.stage) == ("/data/s1.tif", "level 1 tile (1, 3)", "read")
    assert str(back) == str(err)
    assert batch["kind"][1] == "error" and batch["kind"][0] == ""


def test_a_foreign_error_arrives_as_stage_error_naming_its_class() -> None:
    batch = rows_to_batch([asdict(_task(2))])
    set_error(batch, 0, "read", OSError("disk on fire"))
    back = batch_error(batch, 0)
    assert isinstance(back, StageError) and isinstance(back, HemarayError)
    assert (back.type_name, str(back), back.stage) == ("OSError", "disk on fire", "read")
    assert (back.slide, back.tile) == ("s1", "s1:2:3")
    assert error_type_name(back) == "OSError"


def test_error_rows_before_tiles() -> None:
    row = error_row({"slide_id": "s9", "slide_uri": "s3://b/s9.tif"}, "plan", ConfigError("no mpp"))
    back = batch_error(rows_to_batch([row]), 0)
    assert type(back) is ConfigError and back.stage == "plan" and str(back) == "no mpp"


class _Unpicklable(HemarayError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.handle: Any = lambda: None  # a lambda does not pickle


def test_an_unpicklable_hemaray_error_still_arrives_typed_by_name() -> None:
    back = decode_error(encode_error(_Unpicklable("odd"), stage="detect", slide="s"))
    assert isinstance(back, StageError) and back.type_name == "_Unpicklable"
    assert back.stage == "detect" and back.slide == "s"
    with pytest.raises(TypeError, match="HemarayError"):
        decode_error(pickle.dumps(ValueError("x")))


def test_object_columns_hold_bytes_not_arrays() -> None:
    batch = rows_to_batch([{"error": b"abc"}, {}])
    assert batch["error"].dtype == np.dtype(object) and batch["error"][1] == b""
