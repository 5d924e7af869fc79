"""Storage faults (issue 16, F1, F2 multipart, F7, F8): a failing store costs at most its slide.

Contracts, each asserted exactly:

- F1: S3 throttling (``503 SlowDown``) and connection resets on reads and on
  the commit's writes, injected by a proxy on loopback in front of the moto
  server (`faultproxy.FaultProxy`): every cells-file PUT lands and loses its
  answer, every slides-row PUT is reset, every failures-row PUT loses its
  answer, and a share of all other GETs, HEADs and PUTs is throttled or reset.
  The run commits every good slide with exactly the ``cell_id`` set of a clean
  computation, nothing twice, and one failures row per bad slide.
- F7: a slide rewritten after its plan: reads are pinned to the version the
  plan opened (ETag / size and mtime), so the slide is one failures row with
  a ``SlideChangedError``, never pixels of the new file under the old header;
  the same on S3 and on a local file, in the worker that planned the slide
  and in one that opens it again.
- F8: access denied to an input is that slide's failures row
  (``SlideAccessDeniedError``); to OUT, a clear error and exit 1 before any
  compute, and nothing created.
- F2 inside a multipart upload: a part of a cells file that fails on every
  try aborts the upload (no object, no upload left); the same commit then
  lands whole. (A whole run whose completion dies: ``test_faults.py``.)

F1, F7 and F8 (inputs) share one real run; its fixture keeps what the tests check.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
import s3fs
from faultproxy import Fault, FaultProxy

from batch.cli import main
from batch.config import Config, load_config
from batch.errors import SlideChangedError, decode_error, encode_error
from batch.ids import slide_id_for
from batch.inputs import resolve_inputs
from batch.run import tasks
from batch.run.columns import batch_error, rows_to_batch, unpack
from batch.run.pipeline import run_pipeline
from batch.run.provenance import trained_mpp
from batch.run.sink import OutputStore, cells_schema, read_table
from batch.run.tasks import DetectStage, plan_slide, read_tiles
from batch.slides import open_slide
from batch.synth import synth_slides

BUCKET = "slides"
SIDE = 1024
GOOD = ("in/slide_0000.tif", "in/slide_0001.tif")
DENIED = "in/denied/slide_0000.tif"
CHANGING = "in/changing.tif"
OUT = f"s3://{BUCKET}/out"


def _uri(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("storage-faults")
    synth_slides(d, slides=2, width=SIDE, height=SIDE, seed=5, kind="marrow")
    return d


def _fresh_bucket(endpoint: str) -> s3fs.S3FileSystem:
    """Moto reset to one empty bucket; a filesystem that talks to it directly (no proxy)."""
    requests.post(f"{endpoint}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    return fs


def _plan(uri: str, config: Config) -> list[dict[str, Any]]:
    return plan_slide(
        {"slide_id": slide_id_for(uri), "slide_uri": uri}, config, trained_mpp(config)[0]
    )


def _clean_cell_ids(uris: list[str], config: Config) -> set[str]:
    """The cell ids of a clean computation: plan, read and detect in this process, no faults.

    With the run's torch threads (``execution.torch_threads``): the detector's float
    sums, and so a box rounding at the edge of a 0.01 px step, depend on them.
    """
    import torch

    rows = [r for uri in uris for r in _plan(uri, config)]
    threads = torch.get_num_threads()
    try:
        out = DetectStage(config, config.execution.torch_threads)(
            read_tiles(rows_to_batch(rows), config)
        )
    finally:
        torch.set_num_threads(threads)
    assert set(out["kind"]) == {"tile"}
    return {cid for cells in out["cells"] for cid in unpack(cells).column("cell_id").to_pylist()}


class _RewriteOnce:
    """Proxy hook: rewrite ``key`` with ``data`` just before its ``after + 1``-th forwarded GET."""

    def __init__(self, fs: s3fs.S3FileSystem, key: str, data: bytes, after: int) -> None:
        self.fs, self.key, self.data, self.after = fs, key, data, after
        self.path = f"/{BUCKET}/{key}"
        self.gets = 0
        self.done = False
        self._lock = threading.Lock()

    def __call__(self, method: str, path: str, fault: str | None) -> None:
        if method != "GET" or path != self.path or fault is not None:
            return
        with self._lock:
            self.gets += 1
            if self.gets == self.after + 1 and not self.done:
                self.fs.pipe_file(f"{BUCKET}/{self.key}", self.data)
                self.done = True


class _CountGets:
    def __init__(self, key: str) -> None:
        self.path, self.gets = f"/{BUCKET}/{key}", 0

    def __call__(self, method: str, path: str, fault: str | None) -> None:
        self.gets += method == "GET" and path == self.path and fault is None


#: F1's schedule. Targeted rules first: each commit write (cells file), slides row and
#: failures row fails on its first try; then a share of everything else.
F1_FAULTS = [
    Fault("deny", "*", prefix=f"/{BUCKET}/in/denied/"),  # F8: a bucket policy on a prefix
    Fault("lost_reply", "PUT", prefix=f"/{BUCKET}/out/cells/"),
    Fault("reset", "PUT", prefix=f"/{BUCKET}/out/slides/"),
    Fault("lost_reply", "PUT", prefix=f"/{BUCKET}/out/failures/"),
    Fault("slowdown", "PUT", every=3),
    Fault("slowdown", "GET", every=6),
    Fault("reset", "GET", every=7),
    Fault("slowdown", "HEAD", every=4),
]
#: The run's settings: one torch thread per detector actor on any machine (see _clean_cell_ids),
#: and one model actor (placement only; an actor's start is most of this small run).
RUN_SETTINGS = ["execution.torch_threads=1", "detect.actors=1"]


@pytest.fixture(scope="module")
def faulty_run(s3_server: str, ray_local: None, synth_dir: Path) -> dict[str, Any]:
    """One run through the fault proxy: two good slides, one denied, one rewritten mid-run."""
    fs = _fresh_bucket(s3_server)
    for key in GOOD:
        fs.put(str(synth_dir / Path(key).name), f"{BUCKET}/{key}")
    fs.put(str(synth_dir / "slide_0000.tif"), f"{BUCKET}/{DENIED}")
    fs.put(str(synth_dir / "slide_0000.tif"), f"{BUCKET}/{CHANGING}")
    direct = load_config(None, [f"storage.endpoint_url={s3_server}", *RUN_SETTINGS])
    clean = _clean_cell_ids([_uri(k) for k in GOOD], direct)

    with FaultProxy(s3_server) as proxy:
        config = load_config(None, [f"storage.endpoint_url={proxy.endpoint}", *RUN_SETTINGS])
        # How many GETs planning the changing slide takes: the next one is a read after its plan.
        counter = _CountGets(CHANGING)
        proxy.hook = counter
        _plan(_uri(CHANGING), config)
        rewrite = _RewriteOnce(
            fs, CHANGING, (synth_dir / "slide_0001.tif").read_bytes(), counter.gets
        )
        proxy.hook = rewrite
        proxy.faults = list(F1_FAULTS)
        inputs = resolve_inputs(
            [f"s3://{BUCKET}/in/"], storage_options=config.storage.storage_options()
        )
        result = run_pipeline(inputs, OUT, config)
        injected = dict(proxy.injected)

    out_opts = direct.storage.storage_options()
    return {
        "result": result,
        "clean": clean,
        "injected": injected,
        "rewritten": rewrite.done,
        "inputs": {s.uri: s.slide_id for s in inputs},
        "cells": read_table(OUT, "cells", storage_options=out_opts).select(["cell_id", "slide_id"]).to_pandas(),
        "slides": read_table(OUT, "slides", storage_options=out_opts).to_pandas(),
        "failures": read_table(OUT, "failures", storage_options=out_opts).to_pandas(),
        "leases": fs.find(f"{BUCKET}/out/leases"),
    }  # fmt: skip


def _failure(run: dict[str, Any], key: str) -> pd.Series:
    failures = run["failures"]
    rows = failures[failures.slide_id.astype(str) == run["inputs"][_uri(key)]]
    assert len(rows) == 1, rows  # exactly one row for the bad slide
    return rows.iloc[0]


# ------------------------------------------------------------------ F1


def test_f1_throttling_and_resets_on_reads_and_commit_writes(faulty_run: dict[str, Any]) -> None:
    run, result = faulty_run, faulty_run["result"]
    good = {run["inputs"][_uri(k)] for k in GOOD}
    assert set(result.committed) == good and result.exit_code == 2
    assert set(result.failed) == {run["inputs"][_uri(k)] for k in (DENIED, CHANGING)}
    assert not result.unrecorded  # every slides and failures row was written despite the faults
    cells = run["cells"]
    assert cells.cell_id.is_unique  # nothing written twice
    assert set(cells.slide_id.astype(str)) == good
    assert set(cells.cell_id) == run["clean"]
    slides = run["slides"]
    assert slides.slide_id.astype(str).is_unique and len(slides) == 4
    assert set(slides.slide_id[slides.status == "committed"].astype(str)) == good
    assert run["failures"].slide_id.astype(str).is_unique and len(run["failures"]) == 2
    assert not run["leases"]  # every lease released
    injected = run["injected"]
    for fault in [("GET", "slowdown"), ("GET", "reset"), ("HEAD", "slowdown"),
                  ("PUT", "slowdown"), ("PUT", "reset"), ("PUT", "lost_reply")]:  # fmt: skip
        assert injected.get(fault, 0) > 0, (fault, injected)


@pytest.mark.parametrize("kind", ["reset", "cut"])
def test_f1_slide_reads_survive_failing_reads(
    kind: str, s3: dict[str, Any], synth_dir: Path
) -> None:
    """Every GET of a slide (header blocks, tile ranges) fails on its first try: the same pixels.

    ``cut``: the answer breaks off mid-body, after botocore handed it over (throttled reads
    are F1's run's).
    """
    bucket, key = s3["bucket"], "in/slide.tif"
    s3["fs"].put(str(synth_dir / "slide_0000.tif"), f"{bucket}/{key}")
    with open_slide(_uri(key), storage_options=s3["storage_options"]) as slide:
        expected = slide.read_region(100, 200, 700, 600)
    with FaultProxy(s3["endpoint"], [Fault(kind, "GET")]) as proxy:
        opts = load_config(
            None, [f"storage.endpoint_url={proxy.endpoint}"]
        ).storage.storage_options()
        with open_slide(_uri(key), storage_options=opts) as slide:
            got = slide.read_region(100, 200, 700, 600)
        assert proxy.injected[("GET", kind)] >= 2  # the header's reads and the tiles'
    assert (got == expected).all()


def test_f1_every_commit_write_fails_once_and_lands_once(s3: dict[str, Any]) -> None:
    """The commit's writes, each failing on its first try: the answer lost or the connection reset.

    A retried conditional PUT (a failures row, ``If-None-Match: *``) whose first try
    landed meets its own object: it is that row, not a clash that takes the next attempt.
    """
    bucket = s3["bucket"]
    faults = [
        Fault("lost_reply", "PUT", prefix=f"/{bucket}/out/cells/"),
        Fault("reset", "PUT", prefix=f"/{bucket}/out/slides/"),
        Fault("lost_reply", "PUT", prefix=f"/{bucket}/out/failures/"),
    ]
    with FaultProxy(s3["endpoint"], faults) as proxy:
        opts = load_config(
            None, [f"storage.endpoint_url={proxy.endpoint}"]
        ).storage.storage_options()
        store = OutputStore(f"s3://{bucket}/out", storage_options=opts)
        writer = store.slide_writer("a", cells_schema({}, False))
        writer.commit({"slide_id": "a", "slide_uri": "a.tif", "status": "committed"})
        attempts = [store.write_failure("b", "b.tif", stage="open", error=OSError(f"no {i}"))
                    for i in range(2)]  # fmt: skip
        hit = {(m, p.split("/")[3], k) for m, p, k in proxy.log}
    assert hit == {("PUT", "cells", "lost_reply"), ("PUT", "slides", "reset"),
                   ("PUT", "failures", "lost_reply")}  # fmt: skip
    assert attempts == [1, 2]
    fs = s3["fs"]
    fs.invalidate_cache()
    assert sorted(p.split("/out/", 1)[1] for p in fs.find(f"{bucket}/out")) == [
        "cells/slide_id=a/part-0.parquet", "failures/b.1.parquet", "failures/b.2.parquet",
        "slides/a.parquet",
    ]  # fmt: skip
    failures = read_table(store.uri, "failures", storage_options=s3["storage_options"]).to_pandas()
    assert sorted(failures.message) == ["no 0", "no 1"]


# ------------------------------------------------------------------ F2 inside a multipart upload

#: Part size of the F2 multipart tests' uploads (and moto's minimum part size for them): a
#: cells file of tens of KB goes up in several parts, as a big slide's does in 50 MiB parts.
SMALL_PART_BYTES = 8 * 1024


class SmallParts(OutputStore):
    """A store whose files over 16 KiB go up as multipart uploads (s3fs's parts are 50 MiB)."""

    multipart_chunk_bytes = SMALL_PART_BYTES


def small_parts_on_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let moto (in this process) take `SMALL_PART_BYTES` parts; S3 wants 5 MiB but the last."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", SMALL_PART_BYTES)


def test_f2_a_part_failing_beyond_retries_aborts_the_multipart_commit(
    s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every try at one part of a multipart cells file fails: no object, no upload left behind.

    The real `SlideWriter` commit through the proxy; the same commit without the fault
    then lands whole, once. (A whole run whose completion dies: ``test_faults``' F2.)
    """
    small_parts_on_moto(monkeypatch)
    bucket, fs = s3["bucket"], s3["fs"]
    rng = np.random.default_rng(0)
    n = 2000
    x, y = rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n)
    rows = pa.table({
        "cell_id": [f"{i:024x}" for i in rng.integers(0, 2**62, n)], "level": np.zeros(n, np.int16),
        "tile_row": np.arange(n, dtype=np.int32), "tile_col": np.zeros(n, np.int32),
        "x0": x, "y0": y, "x1": x + 9, "y1": y + 9, "cx": x + 4.5, "cy": y + 4.5,
        "det_class": ["RBC"] * n, "det_confidence": rng.uniform(0, 1, n).astype(np.float32),
        "detector_version": ["test"] * n,
    })  # fmt: skip
    dies = [Fault("reset", "PUT", prefix=f"/{bucket}/out/cells/", query="partNumber=2&",
                  persistent=True)]  # fmt: skip
    with FaultProxy(s3["endpoint"], dies) as proxy:
        opts = load_config(
            None, [f"storage.endpoint_url={proxy.endpoint}", "storage.max_attempts=2"]
        ).storage.storage_options()
        store = SmallParts(f"s3://{bucket}/out", storage_options=opts)
        writer = store.slide_writer("a", cells_schema({}, False))
        writer.write(rows)
        with pytest.raises(Exception, match="partNumber=2"):
            writer.commit({"slide_id": "a", "slide_uri": "a.tif", "status": "committed"})
        assert proxy.injected[("PUT", "reset")] >= 2  # every try at part 2, then it gave up
    fs.invalidate_cache()
    assert not fs.find(f"{bucket}/out/cells")  # nothing visible: no half file
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")  # aborted

    store = SmallParts(f"s3://{bucket}/out", storage_options=s3["storage_options"])
    writer = store.slide_writer("a", cells_schema({}, False))
    writer.write(rows)
    writer.commit({"slide_id": "a", "slide_uri": "a.tif", "status": "committed"})
    landed = read_table(store.uri, "cells", storage_options=s3["storage_options"])
    assert fs.size(f"{bucket}/out/cells/slide_id=a/part-0.parquet") > 2 * SMALL_PART_BYTES
    assert sorted(landed.column("cell_id").to_pylist()) == sorted(rows.column("cell_id").to_pylist())


# ------------------------------------------------------------------ F7


def test_f7_slide_rewritten_during_its_run_is_one_failure(faulty_run: dict[str, Any]) -> None:
    assert faulty_run["rewritten"]
    row = _failure(faulty_run, CHANGING)
    assert row.error_type == "SlideChangedError" and row.stage == "read"
    assert "changed after" in row.message


def _rewrite(target: Path | tuple[s3fs.S3FileSystem, str], data: bytes) -> None:
    if isinstance(target, Path):
        target.write_bytes(data)
    else:
        target[0].pipe_file(target[1], data)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_f7_tile_reads_are_pinned_to_the_planned_version(
    where: str, synth_dir: Path, tmp_path: Path, s3: dict[str, Any]
) -> None:
    """The worker's own code path (plan_slide, read_tiles) without Ray, on S3 and on disk."""
    original = (synth_dir / "slide_0000.tif").read_bytes()
    other = (synth_dir / "slide_0001.tif").read_bytes()
    target: Path | tuple[s3fs.S3FileSystem, str]
    if where == "s3":
        s3["fs"].pipe_file(f"{BUCKET}/{CHANGING}", original)
        uri, target = _uri(CHANGING), (s3["fs"], f"{BUCKET}/{CHANGING}")
        config = load_config(None, [f"storage.endpoint_url={s3['endpoint']}"])
    else:
        path = tmp_path / "changing.tif"
        path.write_bytes(original)
        uri, target, config = str(path), path, Config()
    rows = _plan(uri, config)
    assert {r["kind"] for r in rows} == {"tile"}

    _rewrite(target, other)
    # The worker that planned it (its slide still open; the plan decoded only overview tiles)
    # and one that opens it again.
    for fresh_worker in (False, True):
        if fresh_worker:
            tasks._SLIDES.clear()
        batch = read_tiles(rows_to_batch(rows), config)
        assert set(batch["kind"]) == {"error"}, fresh_worker
        error = batch_error(batch, len(rows) - 1)
        assert isinstance(error, SlideChangedError) and error.stage == "read"
        assert error.slide == uri and "changed after" in str(error)
        assert isinstance(decode_error(encode_error(error, stage="read")), SlideChangedError)
    # A new plan (a rerun) sees the new version and reads it.
    again = _plan(uri, config)
    assert set(read_tiles(rows_to_batch(again[:1]), config)["kind"]) == {"tile"}


# ------------------------------------------------------------------ F8


def test_f8_denied_input_is_one_failure_row(faulty_run: dict[str, Any]) -> None:
    row = _failure(faulty_run, DENIED)
    assert row.error_type == "SlideAccessDeniedError" and row.stage == "open"
    assert "refused access" in row.message and "s3:GetObject" in row.message


def test_f8_denied_out_fails_before_compute_and_creates_nothing(
    s3: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    fs.pipe_file(f"{bucket}/in/a.tif", b"never read")
    with FaultProxy(s3["endpoint"], [Fault("deny", "PUT", prefix=f"/{bucket}/locked/")]) as proxy:
        code = main(["run", f"s3://{bucket}/in/a.tif", "--out", f"s3://{bucket}/locked/run1",
                     "--endpoint-url", proxy.endpoint])  # fmt: skip
        err = capsys.readouterr().err
        assert proxy.injected == {("PUT", "deny"): 1}  # the probe, and nothing after it
        assert proxy.seen["GET"] == 0  # no input was read
    assert code == 1
    assert "access denied" in err and "Nothing was created" in err and "locked/run1" in err
    fs.invalidate_cache()
    assert fs.find(bucket) == [f"{bucket}/in/a.tif"]
