"""Detector sweep: the seed-000 grid, trials as parallel Ray tasks, one results table.

The Ray test fine-tunes a tiny grid (YOLOv8n x {all, last3}, 1 epoch, 64 px
canvases) on four generated PNG fields converted to a YOLO dataset, starting
from the shipped detector's weights (a YOLOv8n) given as local pretrained
weights through ``--model-template DIR/yolov8{size}.pt``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from batch.train.sweep import (
    RESULTS_SCHEMA,
    SweepConfig,
    Trial,
    main,
    plan_trials,
    results_table,
    run_sweep,
    run_trial,
    write_results,
)

#: YOLO class ids of the generated dataset (TXL-PBC's order).
YOLO_NAMES = ["WBC", "RBC", "Platelets"]
FIELD_W, FIELD_H, FIELD_MPP = 256, 192, 0.25
SHIPPED_DETECTOR = Path(__file__).resolve().parents[1] / "batch" / "models" / "detector.pt"


def _yolo_dataset(root: Path) -> Path:
    """Four synthetic marrow fields (PNG) as a YOLO set: three train, one val with every class."""
    from batch.synth import synth_slides

    fields = root / "fields"
    paths = synth_slides(fields, slides=4, width=FIELD_W, height=FIELD_H, seed=3, mpp=FIELD_MPP,
                         kind="marrow", format="png")
    truth = pd.read_parquet(fields / "ground_truth.parquet")
    data = root / "yolo"
    for i, path in enumerate(paths):
        split = "val" if i == len(paths) - 1 else "train"
        (data / "images" / split).mkdir(parents=True, exist_ok=True)
        (data / "labels" / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, data / "images" / split / path.name)
        lines = []
        for row in truth[truth.slide_id == path.stem].to_dict("records"):
            cls = YOLO_NAMES.index("Platelets" if row["class"] == "platelet" else row["class"])
            cx, cy = (row["x0"] + row["x1"]) / 2 / FIELD_W, (row["y0"] + row["y1"]) / 2 / FIELD_H
            w, h = (row["x1"] - row["x0"]) / FIELD_W, (row["y1"] - row["y0"]) / FIELD_H
            lines.append(f"{cls} {cx} {cy} {w} {h}")
        (data / "labels" / split / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    (data / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(YOLO_NAMES)))
    return data


@pytest.fixture(scope="module")
def yolo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _yolo_dataset(tmp_path_factory.mktemp("sweep-data"))


def test_full_grid_is_seed_000() -> None:
    trials = plan_trials(SweepConfig(data=["d"], out="o"))
    assert [t.name for t in trials[:3]] == ["yolov8n-all", "yolov8n-last10", "yolov8n-last3"]
    assert len(trials) == 15 and {t.size for t in trials} == {"n", "s", "m", "l", "x"}
    assert trials[-1] == Trial("x", "last3", "yolov8x.yaml")
    custom = plan_trials(SweepConfig(data=["d"], out="o", sizes=["s"], model_template="s3://w/yolov8{size}.pt"))
    assert [t.model for t in custom] == ["s3://w/yolov8s.pt"] * 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sizes": ["q"]}, "--sizes"),
        ({"freezes": ["backbone"]}, "--freezes"),
        ({"model_template": "yolov8n.yaml"}, "{size}"),
        ({"data": []}, "--data"),
    ],
)
def test_bad_grids_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        plan_trials(SweepConfig(**{"data": ["d"], "out": "o", **change}))


def test_a_failed_trial_is_a_row(tmp_path: Path) -> None:
    cfg = SweepConfig(data=[str(tmp_path / "missing")], out=str(tmp_path / "out"), epochs=1)
    row = run_trial(Trial("n", "all", "yolov8n.yaml"), cfg)
    assert row["status"] == "failed" and row["weights"] is None
    assert "missing" in row["error"]
    table = results_table([row])
    assert table.schema.equals(RESULTS_SCHEMA, check_metadata=True)


def test_results_written_to_s3(s3: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = [
        {"model": "yolov8s", "freeze": "all", "status": "ok", "map50": 0.5},
        {"model": "yolov8n", "freeze": "last3", "status": "ok", "map50": 0.4},
        {"model": "yolov8n", "freeze": "all", "status": "failed", "error": "boom"},
    ]
    table = results_table(rows)
    assert [(r["model"], r["freeze"]) for r in table.to_pylist()] == [
        ("yolov8n", "all"), ("yolov8n", "last3"), ("yolov8s", "all"),
    ]  # fmt: skip
    uris = write_results(table, "s3://slides/sweep", storage_options=s3["storage_options"])
    assert uris == ["s3://slides/sweep/results.parquet", "s3://slides/sweep/results.csv"]
    with s3["fs"].open("slides/sweep/results.parquet", "rb") as fh:
        assert pq.read_table(fh).equals(table)
    with s3["fs"].open("slides/sweep/results.csv", "rb") as fh:
        assert list(pd.read_csv(fh).model) == ["yolov8n", "yolov8n", "yolov8s"]


@pytest.mark.usefixtures("ray_local")
def test_tiny_grid_trains_in_parallel_on_ray(yolo_data: Path, tmp_path: Path) -> None:
    out, weights = tmp_path / "sweep", tmp_path / "weights"
    weights.mkdir()
    (weights / "yolov8n.pt").symlink_to(SHIPPED_DETECTOR)
    cfg = SweepConfig(
        data=[str(yolo_data)], out=str(out), sizes=["n"], freezes=["all", "last3"], epochs=1,
        imgsz=64, batch=4, workers=0, cpus_per_trial=1, model_template=str(weights / "yolov8{size}.pt"),
    )  # fmt: skip
    table = run_sweep(cfg, echo=lambda s: None)
    rows = table.to_pylist()
    assert [(r["model"], r["freeze"], r["status"]) for r in rows] == [
        ("yolov8n", "all", "ok"), ("yolov8n", "last3", "ok"),
    ], rows  # fmt: skip
    for r in rows:
        for k in ("precision", "recall", "f1", "map50", "map50_95"):
            assert 0.0 <= r[k] <= 1.0
        assert r["map50"] > 0, r  # fine-tuned from trained weights: it still finds cells
        assert r["train_time_s"] >= 0 and r["epochs"] == 1
        assert Path(r["weights"]).is_file()
        assert (Path(r["weights"]).parent / "metrics.json").is_file()
    # Separate Ray tasks, each with 1 of the session's 2 CPUs: they ran at the same time.
    first, second = sorted(rows, key=lambda r: r["started_at"])
    assert (second["started_at"] - first["started_at"]).total_seconds() < first["wall_time_s"]
    assert pq.read_table(out / "results.parquet").schema.equals(RESULTS_SCHEMA, check_metadata=True)
    assert len(pd.read_csv(out / "results.csv")) == 2


def test_job_entrypoint_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, SweepConfig] = {}

    def fake_run(cfg: SweepConfig, **_: Any) -> Any:
        seen["cfg"] = cfg
        return results_table([{"model": "yolov8n", "freeze": "all", "status": "ok"}])

    monkeypatch.setattr("batch.train.sweep.run_sweep", fake_run)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    code = main(["--data", "s3://b/d", "--out", str(tmp_path), "--sizes", "n,s", "--freezes", "last3",
                 "--epochs", "2", "--endpoint-url", "http://127.0.0.1:9"])  # fmt: skip
    assert code == 0
    cfg = seen["cfg"]
    assert (cfg.sizes, cfg.freezes, cfg.epochs) == (["n", "s"], ["last3"], 2)
    assert cfg.storage_options() == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
