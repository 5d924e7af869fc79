"""The fault suite: a bad slide or a failing stage costs that slide, never the run.

Contracts, each asserted exactly:

- an exception in any stage (read, detect, crop, segment, classify) on one
  tile fails that tile's slide at that stage, typed; every other tile keeps
  exactly a clean run's cell ids (stages called without Ray, and in real runs);
- a model call over a batch that fails is retried tile by tile, so a
  batch-level failure (a CUDA OOM, say) costs nothing when tiles pass alone;
- a failures or slides row that cannot be written is logged and kept in the
  result; the run goes on;
- F3: a model actor killed once mid-batch is restarted and its batch retried:
  every slide commits with a clean run's ids;
- F3: a worker that crashes on every attempt at a tile is restarted
  ``execution.max_worker_restarts`` times, then the run ends: its unfinished
  slides get a failures row recording the crash, the manifest is written, exit 2;
- B1-B8 in one mixed folder: one ``hemaray run`` exits 2, commits every good
  slide with exactly the ``cell_id`` set of a clean run of the good slides
  alone, and writes exactly one failures row per bad slide with its typed error;
- F2, with OUT on S3 (moto over HTTP) and the cells files sent as multipart
  uploads: the store dies inside one slide's upload (its
  ``CompleteMultipartUpload`` reset on every try): that slide is one failures
  row with its typed error, nothing of it is visible and no upload is left;
  the store dies after another slide's cells file and before its slides row:
  that slide stays committed (the lost row reported). The next run, whose
  completions lose their first answer, commits the first slide once and
  restores the second's row: a clean run's ids, nothing twice;
- F5: ``hemaray run`` killed with SIGKILL mid-run, then the same command again:
  the dead driver's leases are free at once, every slide commits once;
- F6: two ``hemaray run`` processes on the same inputs and OUT at once, one
  pair on a local OUT and one on S3 (moto over HTTP), all four at once: each
  slide is committed by exactly one run of its pair (leases), with a clean
  run's ids, no failures row and no lease left.

Elsewhere: F1, F7, F8 and a multipart part failing beyond its retries in
``test_storage_faults.py``; F4 (a worker node removed mid-run) in
``test_multinode.py``, on its 3-node cluster.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tifffile
from faultproxy import Fault, FaultProxy
from test_slide_errors import append_pages, write_tiled, zero_tile_table
from test_storage_faults import SmallParts, small_parts_on_moto

from batch.cli import main
from batch.config import Config, load_config
from batch.errors import StageError
from batch.ids import slide_id_for
from batch.inputs import resolve_inputs
from batch.run import pipeline
from batch.run.columns import batch_error, rows_to_batch, tile_name, unpack
from batch.run.faults import first_crash
from batch.run.ledger import RunLedger, RunResult
from batch.run.pipeline import run_pipeline
from batch.run.provenance import trained_mpp
from batch.run.sink import OutputStore, cells_schema, read_table
from batch.run.tasks import CellStage, DetectStage, plan_slide
from batch.slides import open_slide
from batch.synth import synth_slides

SIDE = 1024
GOOD = ("slide_0000", "slide_0001")
#: The real runs here start one model actor, not one per core: an actor's start (imports, four
#: models) is most of a run of 8 tiles, and the count is placement only (not in the cell ids).
#: Every run here uses it, so all compare with a clean run of the same threads per actor (the
#: detector's float outputs, and so a rare id, can move with its thread count); test_pipeline
#: and test_multinode run the default pools.
ONE_ACTOR = "detect.actors=1"


def _stem(slide_id: Any) -> str:
    """A run's slide id without its URI hash (``slide_0000-1a2b3c4d`` -> ``slide_0000``)."""
    return str(slide_id).rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("good")
    synth_slides(d, slides=2, width=SIDE, height=SIDE, seed=5, kind="marrow")
    return d


# ------------------------------------------------------------------ stages without Ray


@pytest.fixture(scope="module")
def chain(good_dir: Path) -> tuple[CellStage, Config, list[dict[str, Any]]]:
    """One fused chain over two slides' planned rows; tests set ``inject_fault`` on its config."""
    config = Config()
    mpp = trained_mpp(config)[0]
    rows = [
        r
        for sid in GOOD
        for r in plan_slide(
            {"slide_id": sid, "slide_uri": str(good_dir / f"{sid}.tif")}, config, mpp
        )
    ]
    assert {r["kind"] for r in rows} == {"tile"}
    return CellStage(config, read=True), config, rows


@pytest.fixture(scope="module")
def clean_cells(chain: tuple[CellStage, Config, list[dict[str, Any]]]) -> list[pa.Table]:
    stage, _, rows = chain
    # The detector's first call fuses its layers (ultralytics), which moves its float outputs
    # in the last bits: compare warm calls only.
    stage(rows_to_batch(rows))
    out = stage(rows_to_batch(rows))
    assert set(out["kind"]) == {"tile"}
    return [unpack(c) for c in out["cells"]]


def _ids(cells: pa.Table) -> list[tuple[str, str]]:
    """A tile's cells as (cell_id, class): what batching must not change.

    Coordinates are compared through the ids (rounded to 0.01 px): the detector's
    float32 outputs move in the last bits with the batch's composition.
    """
    ids, classes = cells.column("cell_id").to_pylist(), cells.column("det_class").to_pylist()
    return sorted(zip(ids, classes, strict=True))


def _with_wbc(cells: list[pa.Table], rows: list[dict[str, Any]], slide: str) -> int:
    """Index of a tile of ``slide`` with at least one WBC (so every stage has work on it)."""
    for i, (t, r) in enumerate(zip(cells, rows, strict=True)):
        if r["slide_id"] == slide and "WBC" in t.column("det_class").to_pylist():
            return i
    raise AssertionError(f"no tile of {slide} has a WBC")


@pytest.mark.slow  # five stages, each with the shipped models: kept out of make test-fast
@pytest.mark.parametrize("stage", ["read", "detect", "crop", "segment", "classify"])
def test_stage_fault_fails_only_its_tile(
    chain: tuple[CellStage, Config, list[dict[str, Any]]], clean_cells: list[pa.Table], stage: str
) -> None:
    cell_stage, config, rows = chain
    bad = _with_wbc(clean_cells, rows, "slide_0001")
    batch = rows_to_batch(rows)
    config.execution.inject_fault = f"{stage}:{tile_name(batch, bad)}"
    try:
        out = cell_stage(batch)
    finally:
        config.execution.inject_fault = None
    for i in range(len(rows)):
        if i == bad:
            error = batch_error(out, i)
            assert isinstance(error, StageError), error
            assert (error.stage, error.slide, error.tile) == (
                stage,
                "slide_0001",
                tile_name(out, i),
            )
            assert "injected" in str(error)
        else:
            assert out["kind"][i] == "tile"
            assert _ids(unpack(out["cells"][i])) == _ids(clean_cells[i]), f"row {i} changed"


class _FlakyDetector:
    """Fails any call over more than one tile (a batch-level fault such as a CUDA OOM)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def detect(self, images: list[Any]) -> Any:
        if len(images) > 1:
            raise MemoryError("out of memory for a batch")
        return self._inner.detect(images)


class _BrokenDetector(_FlakyDetector):
    def detect(self, images: list[Any]) -> Any:
        raise RuntimeError("the model is broken")


def test_batch_level_model_fault_is_retried_tile_by_tile(
    chain: tuple[CellStage, Config, list[dict[str, Any]]], clean_cells: list[pa.Table]
) -> None:
    """A call that fails only batched fails no tile; one that always fails fails every tile."""
    cell_stage, _, rows = chain
    detector = cell_stage.detect.detector
    try:
        cell_stage.detect.detector = _FlakyDetector(detector)
        out = cell_stage(rows_to_batch(rows))
        assert set(out["kind"]) == {"tile"}
        assert [_ids(unpack(c)) for c in out["cells"]] == [_ids(t) for t in clean_cells]
        cell_stage.detect.detector = _BrokenDetector(detector)
        out = cell_stage(rows_to_batch(rows))
    finally:
        cell_stage.detect.detector = detector
    errors = [batch_error(out, i) for i in range(len(rows))]
    assert all(isinstance(e, StageError) and e.stage == "detect" for e in errors)


class _ExplodingDetectStage(DetectStage):
    """A stage whose own code fails outside the per-tile work."""

    def _detect_and_crop(self, batch: Any) -> Any:
        raise ValueError("bad batch")


def test_stage_failure_outside_tiles_fails_the_batch_only(
    chain: tuple[CellStage, Config, list[dict[str, Any]]],
) -> None:
    cell_stage, config, rows = chain
    exploding = _ExplodingDetectStage.__new__(_ExplodingDetectStage)
    exploding.__dict__.update(cell_stage.detect.__dict__)
    batch = rows_to_batch(rows)
    batch["image"] = np.zeros((len(rows), 8, 8, 3), np.uint8)
    out = exploding(batch)
    assert "image" not in out and {"cells", "wbc_crops"} <= set(out)  # the stage's columns
    errors = [batch_error(out, i) for i in range(len(rows))]
    assert all(isinstance(e, StageError) and e.type_name == "ValueError" for e in errors)


# ------------------------------------------------------------------ the driver's books


class _NoBooks(OutputStore):
    """An output store whose failures and slides writes fail (storage down for the books)."""

    def write_failure(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("failures table unreachable")

    def write_slide_row(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("slides table unreachable")


def test_failed_bookkeeping_writes_are_kept_not_raised(tmp_path: Path) -> None:
    config = Config()
    store = _NoBooks(str(tmp_path / "out"))
    result = RunResult(run_id="r", out=store.uri)
    ledger = RunLedger(store, cells_schema({}, False), result, config, echo=lambda _: None)
    [slide] = resolve_inputs([str(write_tiled(tmp_path / "a.tif"))])
    ledger.start([slide])
    ledger.fail(slide.slide_id, "read", RuntimeError("boom"))
    ledger.finish()
    assert list(result.failed) == [slide.slide_id] and result.exit_code == 2
    assert "failures row failed" in result.unrecorded[slide.slide_id]
    assert "slides row failed" in result.unrecorded[slide.slide_id]


# ------------------------------------------------------------------ real runs


def _cell_ids(out: Path, slides: set[str]) -> set[str]:
    cells = read_table(str(out), "cells").select(["cell_id", "slide_id"]).to_pandas()
    assert cells.cell_id.is_unique
    return set(cells[cells.slide_id.astype(str).isin(slides)].cell_id)


@pytest.fixture(scope="module")
def clean_run(good_dir: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(["run", str(good_dir), "--out", str(out), "--set", ONE_ACTOR]) == 0
    return out


# One real run per placement's path: the fused chain's fault path is test_pipeline's
# read fault; every stage alone is test_stage_fault_fails_only_its_tile (no Ray).
@pytest.mark.parametrize(("stage", "placement"), [("classify", "staged")])
def test_stage_fault_in_a_run_fails_only_that_slide(
    good_dir: Path, clean_run: Path, tmp_path: Path, stage: str, placement: str
) -> None:
    clean = read_table(str(clean_run), "cells").to_pandas()
    s0, s1 = (slide_id_for(str(good_dir / f"{sid}.tif")) for sid in GOOD)
    wbc = clean[(clean.slide_id.astype(str) == s1) & (clean.det_class == "WBC")].iloc[0]
    fault = f"{stage}:{s1}:{wbc.tile_row}:{wbc.tile_col}"
    config = load_config(
        None, [f"execution.inject_fault={fault}", f"execution.placement={placement}", ONE_ACTOR]
    )
    out = tmp_path / "out"
    result = run_pipeline(resolve_inputs([str(good_dir)]), str(out), config)
    assert result.exit_code == 2 and result.committed == [s0]
    assert list(result.failed) == [s1]
    failures = read_table(str(out), "failures").to_pandas()
    assert failures.stage.tolist() == [stage] and failures.error_type.tolist() == ["RuntimeError"]
    assert failures.tile.tolist() == [fault.split(":", 1)[1]]
    assert _cell_ids(out, {s0}) == _cell_ids(clean_run, {s0})
    assert (out / "runs" / result.run_id / "manifest.json").is_file()


# ------------------------------------------------------------------ B1-B8 in one folder


def _write_pyramid(path: Path, rgb: np.ndarray, mpp: float | None) -> Path:
    """A zlib-compressed tiled pyramid (3 levels); resolution tags only when ``mpp`` is given."""
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    with tifffile.TiffWriter(path) as tif:
        for k, img in enumerate(levels):
            extra: dict[str, Any] = {"subifds": 2} if k == 0 else {"subfiletype": 1}
            if mpp is not None:
                extra.update(resolution=(1e4 / (mpp * 2**k),) * 2, resolutionunit="CENTIMETER")
            tif.write(
                np.ascontiguousarray(img), tile=(256, 256), compression="zlib",
                photometric="rgb", metadata=None, **extra,
            )  # fmt: skip
    return path


def _make_b_cases(src: Path, d: Path) -> dict[str, str]:
    """Write the bad slides (B1-B7) into ``d``; returns slide id -> expected error type."""
    (d / "b1_text.tif").write_text("patient 12, smear 3: see attached\n")
    (d / "b2_empty.tif").write_bytes(b"")
    whole = write_tiled(d / "b3_truncated.tif")
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    zero_tile_table(write_tiled(d / "b4_zeroed.tif"), "TileByteCounts")
    with open_slide(src) as slide:
        rgb = slide.read_level(0)
    flipped = _write_pyramid(d / "b5_flipped.tif", rgb, 0.25)
    _flip_centre_tiles(flipped)  # of every level: whichever level the plan reads is damaged
    huge = write_tiled(d / "b6_huge.tif", levels=1)
    with tifffile.TiffFile(huge) as tif:
        at = [tif.pages[0].tags[t].valueoffset for t in ("ImageWidth", "ImageLength")]
    with open(huge, "r+b") as fh:
        for offset in at:
            fh.seek(offset)
            fh.write(struct.pack("<I", 1_000_000))
    append_pages(write_tiled(d / "b7_cycle.tif"), 150, loop_back=True)
    append_pages(write_tiled(d / "b7_pages.tif"), 100_000)
    return {
        "b1_text": "UnsupportedSlideError",
        "b2_empty": "CorruptSlideError",
        "b3_truncated": "CorruptSlideError",
        "b4_zeroed": "CorruptSlideError",
        "b5_flipped": "CorruptSlideError",
        "b6_huge": "SlideTooLargeError",
        "b7_cycle": "CorruptSlideError",
        "b7_pages": "CorruptSlideError",
    }


def _flip_centre_tiles(path: Path) -> None:
    """Invert 64 bytes inside the compressed data of the centre tile of every level."""
    with tifffile.TiffFile(path) as tif:
        spans = []
        for page in (tif.pages[0], *(tif.pages[0].pages or [])):
            across = -(-page.imagewidth // page.tilewidth)
            down = -(-page.imagelength // page.tilelength)
            k = (down // 2) * across + across // 2
            spans.append((page.dataoffsets[k], page.databytecounts[k]))
    with open(path, "r+b") as fh:
        for start, count in spans:
            fh.seek(start + count // 3)
            data = fh.read(64)
            fh.seek(start + count // 3)
            fh.write(bytes(b ^ 0xFF for b in data))


def test_b1_to_b8_in_one_mixed_folder(good_dir: Path, clean_run: Path, tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    bad = _make_b_cases(good_dir / "slide_0000.tif", d)
    # B8: no mpp in the file (estimated from the cells), and a slide without WBCs.
    with open_slide(good_dir / "slide_0001.tif") as slide:
        rgb = slide.read_level(0)
    _write_pyramid(d / "b8_no_mpp.tif", rgb, None)
    truth = pd.read_parquet(good_dir / "ground_truth.parquet")
    no_wbc = rgb.copy()
    wbcs = truth[(truth.slide_id == "slide_0001") & (truth["class"] == "WBC")]
    for box in wbcs[["x0", "y0", "x1", "y1"]].to_numpy():
        x0, y0, x1, y1 = (int(v) for v in box)
        no_wbc[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = 235
    _write_pyramid(d / "b8_no_wbc.tif", no_wbc, 0.25)

    out = tmp_path / "out"
    # The good slides are the clean run's own files (ids hash the URI), listed with the bad ones.
    good = [str(good_dir / f"{sid}.tif") for sid in GOOD]
    assert main(["run", *good, str(d), "--out", str(out), "--set", ONE_ACTOR]) == 2
    failures = read_table(str(out), "failures").to_pandas()
    assert failures.slide_id.astype(str).is_unique  # exactly one row per bad slide
    assert {_stem(k): v for k, v in zip(failures.slide_id, failures.error_type, strict=True)} == bad
    slides = read_table(str(out), "slides").to_pandas()
    slides.index = [_stem(i) for i in slides.slide_id]
    committed = set(slides.index[slides.status == "committed"])
    assert committed == {*GOOD, "b8_no_mpp", "b8_no_wbc"}
    good_ids = {slide_id_for(p) for p in good}
    assert _cell_ids(out, good_ids) == _cell_ids(clean_run, good_ids)
    assert slides.loc["b8_no_mpp", "mpp_source"] == "estimated"
    assert slides.loc["b8_no_wbc", "n_wbc"] == 0 and slides.loc["b8_no_wbc", "n_rbc"] > 0


def test_f3_deterministic_crash_is_retried_finitely_then_fails_its_slides(
    good_dir: Path, clean_run: Path, tmp_path: Path
) -> None:
    """A worker killed on every attempt at one tile: bounded restarts, then failures rows, exit 2."""
    clean = read_table(str(clean_run), "cells").to_pandas()
    s1 = slide_id_for(str(good_dir / "slide_0001.tif"))
    tile = clean[clean.slide_id.astype(str) == s1].iloc[0]
    fault = f"crash:{s1}:{tile.tile_row}:{tile.tile_col}"
    config = load_config(
        None, [f"execution.inject_fault={fault}", "execution.max_worker_restarts=1", ONE_ACTOR]
    )
    out = tmp_path / "out"
    result = run_pipeline(resolve_inputs([str(good_dir)]), str(out), config)
    assert result.exit_code == 2 and s1 in result.failed
    failures = read_table(str(out), "failures").to_pandas()
    # One failures row per failed slide (slide_0000 too when it was in flight).
    assert sorted(failures.slide_id.astype(str)) == sorted(result.failed)
    message = failures.set_index(failures.slide_id.astype(str)).loc[s1, "message"]
    assert "ended early" in message and "died" in message.lower(), message
    assert _cell_ids(out, set(result.committed)) == _cell_ids(clean_run, set(result.committed))
    assert (out / "runs" / result.run_id / "manifest.json").is_file()


# ------------------------------------------------------------------ F2, F5, F6: the commit and the driver


class _MultipartRowFails(SmallParts):
    """Multipart commits (files over 16 KiB); the committed row of each slide in ``rows_fail``
    fails once: the store dies right after that slide's cells file."""

    rows_fail: set[str] = set()

    def write_slide_row(self, row: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        if row["status"] == "committed" and row["slide_id"] in self.rows_fail:
            self.rows_fail.discard(row["slide_id"])
            raise OSError("slides table unreachable (injected after the cells file)")
        super().write_slide_row(row, extra)


def test_f2_commit_dies_inside_a_multipart_upload_or_before_the_slides_row(
    good_dir: Path, clean_run: Path, s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """F2 at both points of the commit, with OUT on S3 (moto over HTTP) and multipart cells files.

    Slide A: the store dies at its ``CompleteMultipartUpload`` (reset on every try): A
    fails, one failures row, nothing visible. Slide B: its cells file lands, its slides
    row does not: B stays committed (the lost row reported). The next run, whose
    completions each lose their first answer, commits A once and restores B's row.
    """
    a, b = (slide_id_for(str(good_dir / f"{sid}.tif")) for sid in GOOD)
    fs, bucket, opts = s3["fs"], s3["bucket"], s3["storage_options"]
    out = f"s3://{bucket}/out"
    small_parts_on_moto(monkeypatch)
    monkeypatch.setattr(pipeline, "OutputStore", _MultipartRowFails)
    monkeypatch.setattr(_MultipartRowFails, "rows_fail", {b})
    cells = f"/{bucket}/out/cells/slide_id="
    dies = [Fault("reset", "POST", prefix=f"{cells}{a}/", query="uploadId=", persistent=True)]
    # Each dead call fails after 2 tries (botocore's backoff between them stays short).
    settings = ["storage.max_attempts=2", ONE_ACTOR]
    with FaultProxy(s3["endpoint"], dies) as proxy:
        config = load_config(None, [f"storage.endpoint_url={proxy.endpoint}", *settings])
        first = run_pipeline(resolve_inputs([str(good_dir)]), out, config)
        assert proxy.injected[("POST", "reset")] >= 2  # every try at A's completion reset
    assert first.committed == [b] and set(first.failed) == {a} and first.exit_code == 2
    assert set(first.unrecorded) == {b}  # B's lost row is reported, not hidden
    fs.invalidate_cache()
    # A left nothing: no object (half or whole), no upload (s3fs aborted it).
    assert [p.split("slide_id=")[1] for p in fs.find(f"{bucket}/out/cells")] == [
        f"{b}/part-0.parquet"
    ]
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    failures = read_table(out, "failures", storage_options=opts).to_pandas()
    assert list(failures.slide_id.astype(str)) == [a] and list(failures.stage) == ["write"]
    assert list(failures.error_type) == ["EndpointConnectionError"], failures.error_type

    lost = [Fault("lost_reply", "POST", prefix=cells, query="uploadId=")]
    with FaultProxy(s3["endpoint"], lost) as proxy:
        config = load_config(None, [f"storage.endpoint_url={proxy.endpoint}", *settings])
        again = run_pipeline(resolve_inputs([str(good_dir)]), out, config)
        assert proxy.injected[("POST", "lost_reply")] == 1  # A's completion, answered on retry
    assert again.committed == [a] and again.skipped == [b] and not again.failed
    cells_table = read_table(out, "cells", storage_options=opts).to_pandas()
    assert cells_table.cell_id.is_unique  # nothing twice
    assert set(cells_table.cell_id) == _cell_ids(clean_run, {a, b})
    slides = read_table(out, "slides", storage_options=opts).to_pandas()
    assert sorted(slides.slide_id.astype(str)) == sorted([a, b])
    assert (slides.status == "committed").all()
    assert read_table(out, "failures", storage_options=opts).num_rows == 1  # run 1's, only
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    fs.invalidate_cache()
    assert not fs.find(f"{bucket}/out/leases")


def _run_cmd(inputs: Path, out: Path | str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batch", "run", str(inputs), "--out", str(out), *extra]


def test_f6_two_runs_at_once_on_local_and_s3_out_process_each_slide_once(
    good_dir: Path, clean_run: Path, s3: dict[str, Any], tmp_path: Path
) -> None:
    """Two ``hemaray run`` processes on the same inputs and OUT: every slide committed by one.

    Twice at once, one pair per kind of OUT: a local folder (leases by hard link) and S3
    over HTTP (moto; leases by conditional PUT). Four drivers, each with its own Ray.
    """
    ids = {slide_id_for(str(good_dir / f"{sid}.tif")) for sid in GOOD}
    fs, bucket, opts = s3["fs"], s3["bucket"], s3["storage_options"]
    local, remote = tmp_path / "out", f"s3://{bucket}/out"
    # One detector actor per driver (placement only, not in the cell ids): four drivers on two
    # cores start four model actors, not eight.
    one_actor = ("--set", ONE_ACTOR)
    cmds = {
        "local": _run_cmd(good_dir, local, *one_actor),
        "s3": _run_cmd(good_dir, remote, "--endpoint-url", s3["endpoint"], *one_actor),
    }
    procs = [
        (kind, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for kind, cmd in cmds.items()
        for _ in range(2)
    ]
    logs = {f"{kind}{i}": p.communicate(timeout=600)[0] for i, (kind, p) in enumerate(procs)}
    assert [p.returncode for _, p in procs] == [0] * 4, logs
    fs.invalidate_cache()
    manifests = {
        "local": [json.loads(m.read_text()) for m in local.glob("runs/*/manifest.json")],
        "s3": [json.loads(fs.cat_file(m)) for m in fs.glob(f"{bucket}/out/runs/*/manifest.json")],
    }
    tables = {"local": (str(local), None), "s3": (remote, opts)}
    for kind, runs in manifests.items():
        committed = [set(r["committed"]) for r in runs]
        assert len(runs) == 2 and not committed[0] & committed[1], (kind, logs)  # none twice
        assert committed[0] | committed[1] == ids, kind
        # A slide the other run held or had committed is skipped, never processed twice.
        for r in runs:
            assert set(r["committed"]) | set(r["skipped"]) | set(r["leased"]) == ids, kind
        out, options = tables[kind]
        cells = read_table(out, "cells", storage_options=options).to_pandas()
        assert cells.cell_id.is_unique, kind
        assert set(cells.cell_id) == _cell_ids(clean_run, ids), kind
        assert read_table(out, "failures", storage_options=options).num_rows == 0, kind
    assert not list((local / "leases").iterdir())  # every lease released
    assert not fs.find(f"{bucket}/out/leases")


def test_f5_driver_killed_then_the_same_command_again(
    good_dir: Path, clean_run: Path, tmp_path: Path
) -> None:
    """SIGKILL of ``hemaray run`` mid-run (with its local Ray); the same command again finishes."""
    ids = {slide_id_for(str(good_dir / f"{sid}.tif")) for sid in GOOD}
    out = tmp_path / "out"
    proc = subprocess.Popen(_run_cmd(good_dir, out, "--set", ONE_ACTOR), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "leases").glob("*.json")):
        time.sleep(0.2)
    assert list((out / "leases").glob("*.json")), "the run never took its leases"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = {p.stem for p in (out / "leases").glob("*.json")}
    assert left  # the killed driver could not release its leases
    assert main(["run", str(good_dir), "--out", str(out), "--set", ONE_ACTOR]) == 0  # leases free
    slides = read_table(str(out), "slides").to_pandas()
    assert set(slides.slide_id) == ids and (slides.status == "committed").all()
    assert _cell_ids(out, ids) == _cell_ids(clean_run, ids)
    assert not list((out / "leases").glob("*.json"))


def test_f3_model_actor_killed_mid_batch_is_restarted_and_loses_nothing(
    good_dir: Path, clean_run: Path, tmp_path: Path
) -> None:
    """The fused model actor dies (``os._exit``) once, mid-batch: restarted, retried, all commit."""
    ids = {slide_id_for(str(good_dir / f"{sid}.tif")) for sid in GOOD}
    s1 = slide_id_for(str(good_dir / "slide_0001.tif"))
    clean = read_table(str(clean_run), "cells").to_pandas()
    tile = clean[clean.slide_id.astype(str) == s1].iloc[-1]
    fault = f"crash_once:{s1}:{tile.tile_row}:{tile.tile_col}"
    out = tmp_path / "out"
    config = load_config(None, [f"execution.inject_fault={fault}", ONE_ACTOR])
    result = run_pipeline(resolve_inputs([str(good_dir)]), str(out), config)
    assert not first_crash(fault)  # the worker really died once
    assert result.exit_code == 0 and set(result.committed) == ids and not result.failed
    assert _cell_ids(out, ids) == _cell_ids(clean_run, ids)
    assert read_table(str(out), "failures").num_rows == 0
