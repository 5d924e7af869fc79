"""The commit and its neighbours: leases, unique failure attempts, repair of every combination.

Leases and attempts are raced by threads (each its own run) on a local folder
and on the moto S3 server; the repair is checked on every combination of a
cells file and a slides row a crash can leave.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.config import Config
from batch.inputs import resolve_inputs
from batch.run.lease import LeaseBook
from batch.run.ledger import RunLedger, RunResult
from batch.run.sink import OutputStore, cells_schema, read_table

RACERS = 8


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for ``i < n`` in threads released at once; their results in order."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        out[i] = fn(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OutputStore:
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"))
    s3 = request.getfixturevalue("s3")
    return OutputStore(f"s3://{s3['bucket']}/out", storage_options=s3["storage_options"])


def _book(store: OutputStore, run_id: str, **kw: Any) -> LeaseBook:
    return LeaseBook(store.fs, store.root, run_id, **kw)


def test_one_of_many_racing_runs_takes_a_lease(store: OutputStore) -> None:
    books = [_book(store, f"run-{i}") for i in range(RACERS)]
    holders = _race(RACERS, lambda i: books[i].acquire("slide-a"))
    winners = [i for i, h in enumerate(holders) if h is None]
    assert len(winners) == 1
    assert {h for h in holders if h is not None} == {f"run-{winners[0]}"}
    # released, the next run takes it
    books[winners[0]].release("slide-a")
    other = (winners[0] + 1) % RACERS
    assert books[other].acquire("slide-a") is None
    assert books[winners[0]].acquire("slide-a") == f"run-{other}"


def test_a_stale_lease_is_taken_over_by_exactly_one_run(store: OutputStore) -> None:
    expired = _book(store, "old-run", ttl=-1.0)  # expired the moment it is written
    assert expired.acquire("slide-a") is None
    books = [_book(store, f"run-{i}") for i in range(RACERS)]
    holders = _race(RACERS, lambda i: books[i].acquire("slide-a"))
    assert sum(h is None for h in holders) == 1
    # the old run lost it: its release leaves the new holder's lease alone
    expired.release("slide-a")
    winner = holders.index(None)
    assert json.loads(store.fs.cat_file(books[winner].path("slide-a")))["run_id"] == f"run-{winner}"


def test_a_dead_drivers_lease_on_this_host_is_stale(tmp_path: Path) -> None:
    """A killed ``hemaray run``'s rerun need not wait for the expiry (same host, pid gone)."""
    store = OutputStore(str(tmp_path / "out"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    path = Path(_book(store, "x").path("slide-a"))
    record = {"run_id": "killed", "host": socket.gethostname(), "pid": int(gone.stdout),
              "renewed_at": 0, "expires_at": 4e9}  # fmt: skip
    path.write_text(json.dumps(record))
    assert _book(store, "rerun").acquire("slide-a") is None
    record["pid"] = 1  # a live process: the lease holds until it expires
    path.write_text(json.dumps(record))
    assert _book(store, "another").acquire("slide-a") == "killed"


def test_renewal_keeps_the_lease_and_notices_a_loss(store: OutputStore) -> None:
    book = _book(store, "r1")
    assert book.acquire("a") is None and book.acquire("b") is None
    before = json.loads(store.fs.cat_file(book.path("a")))["expires_at"]
    store.fs.rm_file(book.path("b"))  # b's lease was cleaned up, and another run took it
    assert _book(store, "intruder").acquire("b") is None
    lost = book.renew()
    assert json.loads(store.fs.cat_file(book.path("a")))["expires_at"] > before
    assert lost == ["b"] and list(book.held) == ["a"]
    book.release_all()
    store.fs.invalidate_cache()
    assert not store.fs.exists(book.path("a"))


def test_racing_failures_get_distinct_attempts(store: OutputStore) -> None:
    attempts = _race(RACERS, lambda i: store.write_failure(
        "s", "s.tif", stage="read", error=RuntimeError(f"boom {i}")))  # fmt: skip
    assert sorted(attempts) == list(range(1, RACERS + 1))
    rows = read_table(store.uri, "failures", storage_options=store.storage_options)
    assert sorted(rows.column("attempt").to_pylist()) == list(range(1, RACERS + 1))
    assert {m.split()[-1] for m in rows.column("message").to_pylist()} == {str(i) for i in range(RACERS)}


def _commit(store: OutputStore, sid: str, *, row: bool) -> None:
    w = store.slide_writer(sid, cells_schema({}, False))
    if sid == "no_row":  # rows to sort: the file is rewritten in a stable order before it lands
        given = {"cell_id": ["b", "a"], "tile_row": [1, 0], "det_class": ["RBC", "WBC"]}
        cols = {}
        for f in w.schema:
            if f.name in given:
                cols[f.name] = pa.array(given[f.name]).cast(f.type)
            elif f.nullable:
                cols[f.name] = pa.nulls(2, f.type)
            else:
                cols[f.name] = pa.array(["x", "x"] if pa.types.is_string(f.type) else [0, 0]).cast(f.type)
        w.write(pa.table(cols))
    summary = {"slide_id": sid, "slide_uri": f"{sid}.tif", "status": "committed", "tiles_done": 3}
    w.publish(summary, {"group": "g"})
    if row:
        store.write_slide_row(summary, {"group": "g"})


def test_repair_makes_rows_agree_with_cells_files(store: OutputStore) -> None:
    _commit(store, "ok", row=True)  # consistent: left alone
    _commit(store, "no_row", row=False)  # crash between the cells file and the row
    _commit(store, "failed_row", row=False)  # a failed attempt's row outlived a later commit
    store.write_slide_row({"slide_id": "failed_row", "slide_uri": "f.tif", "status": "failed"})
    store.write_slide_row({"slide_id": "ghost", "slide_uri": "g.tif", "status": "committed"})
    store.write_slide_row({"slide_id": "bad", "slide_uri": "b.tif", "status": "failed"})
    assert sorted(store.repair_slide_rows()) == ["failed_row", "ghost", "no_row"]
    rows = {r["slide_id"]: r for r in read_table(store.uri, "slides", storage_options=store.storage_options).to_pylist()}
    assert {k: v["status"] for k, v in rows.items()} == {
        "ok": "committed", "no_row": "committed", "failed_row": "committed", "bad": "failed"}  # fmt: skip
    assert rows["no_row"]["tiles_done"] == 3 and rows["no_row"]["group"] == "g"
    assert store.repair_slide_rows() == []  # idempotent


class _RowDown(OutputStore):
    """Slides rows cannot be written (the store fails right after a cells file lands)."""

    def write_slide_row(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("slides table unreachable")


def test_a_failed_row_write_after_the_cells_file_leaves_the_slide_committed(tmp_path: Path) -> None:
    """F2 in the books: the cells file is the commit; the row comes back on the next run."""
    store = _RowDown(str(tmp_path / "out"))
    result = RunResult(run_id="r", out=store.uri)
    books = LeaseBook(store.fs, store.root, "r")
    ledger = RunLedger(store, cells_schema({}, False), result, Config(), lambda _: None, books)
    [slide] = resolve_inputs([str(tmp_path / "a.tif")])
    assert books.acquire(slide.slide_id) is None
    ledger.start([slide])
    ledger.states[slide.slide_id].n_tiles = 0
    ledger.commit(slide.slide_id)
    ledger.finish()
    assert result.committed == [slide.slide_id] and not result.failed and result.exit_code == 0
    assert "slides row failed" in result.unrecorded[slide.slide_id]
    assert not books.held and not Path(books.path(slide.slide_id)).exists()  # released
    healthy = OutputStore(store.uri)
    assert healthy.repair_slide_rows() == [slide.slide_id]
    [row] = read_table(store.uri, "slides").to_pylist()
    assert row["status"] == "committed"
    assert pq.read_metadata(healthy.cells_path(slide.slide_id)).num_rows == 0


def test_a_lease_whose_put_reply_is_lost_is_still_ours(s3: dict[str, Any]) -> None:
    """F1 on leases: the PUT lands, its reply is lost, the client's retry gets 412: still ours."""
    import s3fs
    from faultproxy import Fault, FaultProxy

    faults = [Fault("lost_reply", "PUT", prefix=f"/{s3['bucket']}/out/leases/")]

    def through(proxy: FaultProxy) -> Any:
        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.endpoint}, skip_instance_cache=True)

    with FaultProxy(s3["endpoint"], faults) as proxy:
        book = LeaseBook(through(proxy), f"{s3['bucket']}/out", "r1")
        assert book.acquire("a") is None  # taken, though no reply said so
        assert proxy.injected[("PUT", "lost_reply")] == 1
    with FaultProxy(s3["endpoint"], faults) as proxy:  # a new proxy faults the renewal too
        book.fs = through(proxy)
        assert book.renew() == []  # renewed, though no reply said so
        assert proxy.injected[("PUT", "lost_reply")] == 1
    other = LeaseBook(s3["fs"], f"{s3['bucket']}/out", "r2")
    assert other.acquire("a") == "r1"
