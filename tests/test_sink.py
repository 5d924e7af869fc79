"""The per-slide writer: nothing visible before commit, whole row groups, rows kept in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.run import sink
from batch.run.sink import ROW_GROUP_ROWS, OutputStore

SCHEMA = pa.schema([("slide_id", pa.string()), ("cell_id", pa.string()), ("x0", pa.float64())])


def _tile(start: int, n: int) -> pa.Table:
    ids = [f"c{i:07d}" for i in range(start, start + n)]
    return pa.table(
        {"slide_id": ["s"] * n, "cell_id": ids, "x0": np.arange(start, start + n, dtype=float)}
    )


def test_many_small_writes_make_whole_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slide too big to sort at commit keeps arrival order: what the writer itself wrote.
    monkeypatch.setattr(sink, "SORT_MAX_ROWS", 0)
    store = OutputStore(str(tmp_path / "out"))
    writer = store.slide_writer("s", SCHEMA)
    n_tiles, per_tile = 300, 500  # 150,000 rows, a few hundred per tile as in a run
    for t in range(n_tiles):
        writer.write(_tile(t * per_tile, per_tile))
        assert store.committed() == set()  # nothing visible before the commit
    writer.commit({"slide_id": "s", "slide_uri": "s.tif", "status": "committed"})
    assert store.committed() == {"s"}

    f = pq.ParquetFile(store.cells_path("s"))
    total = n_tiles * per_tile
    sizes = [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)]
    full, rest = divmod(total, ROW_GROUP_ROWS)
    assert sizes == [ROW_GROUP_ROWS] * full + ([rest] if rest else [])
    table = f.read()
    assert table.column_names == ["cell_id", "x0"]  # the partition key lives in the path
    assert table.column("x0").to_numpy().tolist() == list(map(float, range(total)))


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    writer = store.slide_writer("s", SCHEMA)
    writer.write(_tile(0, ROW_GROUP_ROWS + 10))  # one row group already on local disk
    writer.discard()
    assert store.committed() == set()
    assert not Path(store.cells_path("s")).exists()
