"""Run telemetry (batch.run.telemetry): stage records, their aggregation, the manifest and the summary.

Unit: hand-made records fold into exact stage totals and actor busy / idle
seconds; a nested timed call is excluded from its parent's figures; cells are
counted from the stage's columns; NVML is sampled only where a GPU is visible.
One small run (one 1024 px slide, fused placement, read batches of 2 tiles):
every stage is in the manifest, each passed on exactly the run's tiles, the
cell counts agree with the cells table, the manifest validates against
``schemas/manifest_telemetry.v1.json`` and the summary prints the table.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pyarrow as pa
import pytest

from batch.config import load_config
from batch.inputs import resolve_inputs
from batch.run import telemetry
from batch.run.columns import Batch, object_array, pack, rows_to_batch
from batch.run.ledger import RunResult, summary_lines
from batch.run.pipeline import run_pipeline
from batch.run.sink import read_table
from batch.run.telemetry import STAGES, Telemetry, schema, table_lines, timed
from batch.synth import synth_slides

SIDE = 1024


def _record(stage: str, worker: str, actor: str | None, start: float, end: float, **kw: Any) -> dict[str, Any]:
    return {
        "stage": stage, "worker": worker, "actor": actor, "start": start, "end": end,
        "wall": kw.get("wall", end - start), "cpu": kw.get("cpu", 0.5 * (end - start)),
        "tiles": kw.get("tiles", 4), "cells": kw.get("cells", 10), **kw.get("extra", {}),
    }  # fmt: skip


def _tiles(n: int) -> Batch:
    rows = [{"slide_id": "s", "slide_uri": "s.tif", "kind": "tile", "row": 0, "col": i, "n_tiles": n} for i in range(n)]
    return rows_to_batch(rows)


def _records(batch: Batch) -> list[dict[str, Any]]:
    return [json.loads(line) for text in batch["telemetry"] for line in text.splitlines()]


# ------------------------------------------------------------------ unit


def test_aggregation_of_hand_made_records() -> None:
    t = Telemetry()
    # A plan task (no actor), then one fused actor: two calls of read + detect (crop nested
    # inside detect's span), 1 s apart; a second actor with one call.
    t.add(_record("plan", "h:1", None, 0.0, 0.5, tiles=8, cells=0))
    for start in (10.0, 13.0):
        t.add(_record("read", "h:2", "A", start, start + 0.5))
        t.add(_record("detect", "h:2", "A", start + 0.5, start + 2.0, wall=1.0))
        t.add(_record("crop", "h:2", "A", start + 1.5, start + 2.0, cells=3))
    t.add(_record("detect", "h:3", "B", 11.0, 12.0, extra={"gpu_util": 80.0, "gpu_mem_mib": 900.0}))
    t.add(_record("detect", "h:3", "B", 12.0, 12.0, extra={"gpu_util": 40.0, "gpu_mem_mib": 1200.0}))
    t.wait_s, t.write_s, t.write_cpu_s, t.batches, t.first_batch_s = 9.0, 1.0, 0.5, 3, 8.0
    report = t.report(tiles=8, cells=20)
    jsonschema.validate(report, schema())

    stages = report["stages"]
    assert list(stages) == list(STAGES)
    assert stages["plan"] == {
        "wall_s": 0.5, "cpu_s": 0.25, "tiles": 8, "cells": 0, "batches": 1, "workers": 1,
        "idle_s": None, "busy_fraction": None, "gpu_util_mean": None, "gpu_mem_max_mib": None,
    }  # fmt: skip
    assert stages["detect"]["wall_s"] == 2 * 1.0 + 1.0 + 0.0
    assert stages["detect"]["tiles"] == 16 and stages["detect"]["batches"] == 4
    assert stages["detect"]["workers"] == 2
    assert stages["detect"]["gpu_util_mean"] == 60.0 and stages["detect"]["gpu_mem_max_mib"] == 1200.0
    assert stages["crop"]["cells"] == 6
    assert stages["segment"]["batches"] == 0 and stages["segment"]["busy_fraction"] is None

    # Actor A: busy 2 s per call (the crop is inside detect's span), idle 1 s between calls.
    actors = {a["id"]: a for a in report["actors"]}
    assert set(actors) == {"A", "B"}  # the plan task is no actor
    a = actors["A"]
    assert a["stages"] == ["read", "detect", "crop"]
    assert (a["busy_s"], a["idle_s"], a["busy_fraction"]) == (4.0, 1.0, 0.8)
    b = actors["B"]
    assert (b["busy_s"], b["idle_s"], b["busy_fraction"]) == (1.0, 0.0, 1.0)
    assert b["gpu_util_mean"] == 60.0 and a["gpu_util_mean"] is None
    # Per stage: busy over the actors that ran it; the driver is the write stage.
    assert stages["read"]["busy_fraction"] == 0.8 and stages["read"]["idle_s"] == 1.0
    assert stages["detect"]["busy_fraction"] == round(5.0 / 6.0, 3)
    assert stages["write"] == {
        "wall_s": 1.0, "cpu_s": 0.5, "tiles": 8, "cells": 20, "batches": 3, "workers": 1,
        "idle_s": 9.0, "busy_fraction": 0.1, "gpu_util_mean": None, "gpu_mem_max_mib": None,
    }  # fmt: skip
    assert report["driver"] == {
        "wait_s": 9.0, "write_s": 1.0, "write_cpu_s": 0.5, "batches": 3, "first_batch_s": 8.0
    }


def test_unreadable_or_unknown_records_are_skipped() -> None:
    t = Telemetry()
    good = json.dumps(_record("read", "h:1", None, 0.0, 1.0))
    bad_stage = json.dumps(_record("nope", "h:1", None, 0.0, 1.0))
    t.take({"telemetry": object_array([good + "\n" + "{broken\n" + bad_stage + "\n", ""])})
    assert t.report(tiles=0, cells=0)["stages"]["read"]["batches"] == 1


def test_timed_calls_nest_and_count_cells() -> None:
    """A timed call inside another is its own record; its parent's figures exclude it."""
    cells = pa.table({"det_class": ["WBC", "RBC", "WBC"]})

    @timed("crop")
    def crop(batch: Batch) -> Batch:
        buf = io.BytesIO()
        np.savez(buf, rows=np.array([0, 2]))
        return {**batch, "wbc_crops": object_array([buf.getvalue()] + [b""] * (len(batch["kind"]) - 1))}

    class Detect:
        @timed("detect")
        def __call__(self, batch: Batch) -> Batch:
            packed = object_array([pack(cells)] * len(batch["kind"]))
            return crop({**batch, "cells": packed})

    out = Detect()(_tiles(3))
    records = _records(out)
    assert [r["stage"] for r in records] == ["crop", "detect"]
    inner, outer = records
    assert inner["tiles"] == outer["tiles"] == 3
    assert (inner["cells"], outer["cells"]) == (2, 9)  # WBC crops cut; detections kept
    # The parent's wall is its span less the child's (rounded to microseconds).
    assert outer["wall"] + inner["wall"] == pytest.approx(outer["end"] - outer["start"], abs=1e-5)
    assert outer["start"] <= inner["start"] and inner["end"] <= outer["end"] + 1e-5
    assert all(r["actor"] is None for r in records)  # no Ray actor in this process
    assert all(text == "" for text in out["telemetry"][1:])  # one row carries the batch's records


def test_plan_records_ride_on_the_first_row() -> None:
    @timed("plan")
    def plan(row: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"kind": "tile", "telemetry": ""}, {"kind": "tile", "telemetry": ""}]

    rows = plan({"slide_id": "s"})
    (record,) = [json.loads(line) for line in rows[0]["telemetry"].splitlines()]
    assert record["stage"] == "plan" and record["tiles"] == 2 and rows[1]["telemetry"] == ""
    with pytest.raises(ValueError, match="unknown stage"):
        timed("dance")


def test_gpu_sampled_only_where_nvml_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetHandleByUUID=lambda u: u,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=73),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(telemetry, "_NVML", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert telemetry.gpu_sample() == (73.0, 3072.0)

    @timed("classify")
    def classify(batch: Batch) -> Batch:
        return batch

    (record,) = _records(classify(_tiles(1)))
    assert (record["gpu_util"], record["gpu_mem_mib"]) == (73.0, 3072.0)
    # Ray gives a CPU actor an empty CUDA_VISIBLE_DEVICES: no GPU figures there.
    monkeypatch.setattr(telemetry, "_NVML", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert telemetry.gpu_sample() is None
    (record,) = _records(classify(_tiles(1)))
    assert "gpu_util" not in record


def test_table_lines() -> None:
    t = Telemetry()
    t.add(_record("detect", "h:2", "A", 0.0, 2.0, tiles=4, cells=7))
    t.batches, t.write_s, t.wait_s = 1, 0.1, 0.9
    lines = table_lines(t.report(tiles=4, cells=7))
    assert lines[1].split() == ["stage", "wall", "s", "CPU", "s", "tiles", "cells", "busy"]
    assert [line.split()[0] for line in lines[2:]] == ["detect", "write"]
    assert lines[2].split() == ["detect", "2.0", "1.0", "4", "7", "100%"]
    assert lines[3].split()[-1] == "10%"
    assert table_lines(Telemetry().report(tiles=0, cells=0)) == []


def test_schema_names_every_stage() -> None:
    spec = schema()
    assert spec["properties"]["stages"]["required"] == list(STAGES)
    jsonschema.Draft202012Validator.check_schema(spec)


# ------------------------------------------------------------------ one small run


@pytest.fixture(scope="module")
def small_run(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    d = tmp_path_factory.mktemp("telemetry-slides")
    synth_slides(d, slides=1, width=SIDE, height=SIDE, seed=11, kind="marrow")  # many WBCs
    out = tmp_path_factory.mktemp("telemetry-run") / "out"
    # Read batches of 2 tiles: more than one actor call (the slide has 4 tiles).
    config = load_config(None, ["execution.read_batch_size=2"])
    result = run_pipeline(resolve_inputs([str(d)]), str(out), config, echo=lambda s: None)
    return result, out


def test_run_manifest_holds_per_stage_telemetry(small_run: tuple[RunResult, Path]) -> None:
    result, out = small_run
    assert result.committed and not result.failed
    manifest = json.loads(next(out.glob("runs/*/manifest.json")).read_text())
    # The detector's runtime and why: auto on a CPU with OpenVINO installed (a dependency): INT8.
    runtime = manifest["detect_runtime"]
    assert (runtime["runtime"], runtime["device"]) == ("openvino-int8", "cpu") and runtime["reason"]
    # Each classifier's runtime and why: auto on a CPU takes OpenVINO once its export kept torch's
    # probabilities (batch.stages.classify_runtime).
    for name in ("wbc_type", "all_subtype"):
        choice = manifest["classify_runtime"][name]
        assert choice["runtime"] == "openvino" and choice["parity"]["passed"] is True, name
        assert "passed its parity check" in choice["reason"], name
    tel = manifest["telemetry"]
    jsonschema.validate(tel, schema())
    assert tel == result.telemetry

    stages = tel["stages"]
    assert list(stages) == list(STAGES)
    for name, s in stages.items():
        assert s["batches"] > 0, name
        assert s["tiles"] == result.tiles > 1, name  # every stage passed on every tile
        assert s["wall_s"] >= 0 and s["cpu_s"] >= 0, name
    cells = read_table(str(out), "cells").to_pandas()
    n_wbc = int((cells.det_class == "WBC").sum())
    assert stages["detect"]["cells"] == stages["write"]["cells"] == len(cells) > 0
    assert stages["crop"]["cells"] == stages["segment"]["cells"] == stages["classify"]["cells"] == n_wbc > 0
    assert stages["plan"]["cells"] == stages["read"]["cells"] == 0

    # Fused placement: the actors run read through classify; plan runs as Ray tasks.
    assert tel["actors"]
    for actor in tel["actors"]:
        assert actor["stages"] == ["read", "detect", "crop", "segment", "classify"]
        assert 0.0 <= actor["busy_fraction"] <= 1.0
    assert stages["plan"]["busy_fraction"] is None
    for name in ("read", "detect", "crop", "segment", "classify", "write"):
        assert 0.0 <= stages[name]["busy_fraction"] <= 1.0, name
    driver = tel["driver"]
    assert driver["batches"] == stages["write"]["batches"]
    # One thread cannot use more CPU than wall time (1 ms of clock granularity).
    assert driver["write_cpu_s"] <= driver["write_s"] + 1e-3
    assert driver["first_batch_s"] is not None and driver["first_batch_s"] <= driver["wait_s"]


def test_summary_prints_the_stage_table(small_run: tuple[RunResult, Path]) -> None:
    result, _ = small_run
    lines = list(summary_lines(result))
    (i,) = [k for k, line in enumerate(lines) if line.split()[:1] == ["stage"]]
    assert lines[i].split() == ["stage", "wall", "s", "CPU", "s", "tiles", "cells", "busy"]
    assert [line.split()[0] for line in lines[i + 1 : i + 1 + len(STAGES)]] == list(STAGES)
    print("\n".join(lines))
