"""The detector comparison grid of seed 000, trained in parallel as Ray tasks.

Seed 000 compared YOLOv8 n/s/m/l/x, each fine-tuned three ways (all layers,
the last 10, the last 3; see `batch.train.common.freeze_layers`). ``run_sweep``
trains every (size, freeze) pair of a grid as one Ray task calling
`batch.train.detector.train_detector` and writes one results table,
``results.parquet`` and ``results.csv``, with the seed's metrics per trial.

Placement: a trial asks for ``gpus_per_trial`` GPUs (and ``cpus_per_trial``
CPUs) when the cluster has GPUs, else ``cpus_per_trial`` CPUs, so as many
trials run at once as the cluster has GPUs (or CPUs). A trial that fails
becomes a row with ``status = "failed"`` and its error; the others finish.

Storage: ``--data`` folders may be local paths (present on every node) or
``s3://`` prefixes, which each trial downloads to its node first. ``--out``
may be a local folder (single machine, or a shared filesystem) or an
``s3://`` prefix: each trial trains in a scratch folder on its node and
uploads its weights, model card and metrics to ``OUT/<trial>/``; the driver
writes the results table to ``OUT/``. Models: ``model_template`` with a
``{size}`` placeholder, e.g. ``yolov8{size}.yaml`` (random init; offline) or
``/weights/yolov8{size}.pt`` / ``s3://bucket/yolov8{size}.pt`` (pretrained
weights the user provides: nothing is downloaded from a hub).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.train.common import FREEZE_STRATEGIES
from batch.train.detector import TrainDetectorConfig, train_detector
from batch.train.detector_data import DEFAULT_IMGSZ, DEFAULT_TRAINED_MPP

__all__ = [
    "RESULTS_SCHEMA",
    "SWEEP_FREEZES",
    "SWEEP_SIZES",
    "SweepConfig",
    "Trial",
    "build_parser",
    "main",
    "plan_trials",
    "results_table",
    "run_sweep",
    "run_trial",
    "write_results",
]

log = logging.getLogger(__name__)

#: YOLOv8 sizes compared by seed 000.
SWEEP_SIZES: tuple[str, ...] = ("n", "s", "m", "l", "x")
#: Fine-tuning strategies compared by seed 000 (`batch.train.common.FREEZE_STRATEGIES`).
SWEEP_FREEZES: tuple[str, ...] = ("all", "last10", "last3")
#: Default model file per size: built from the ultralytics yaml, so nothing is downloaded.
DEFAULT_MODEL_TEMPLATE = "yolov8{size}.yaml"
#: Files of a trained trial that are kept in ``OUT/<trial>/``.
TRIAL_ARTIFACTS = ("detector.pt", "detector.json", "detector.md", "metrics.json", "data_report.json")
#: Ray retries of a trial whose worker died (node lost); errors raised by training are not retried.
TRIAL_MAX_RETRIES = 1
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"


def _f(name: str, type_: pa.DataType, unit: str, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"unit": unit, "doc": doc})


#: One row per trial (the seed's comparison table).
RESULTS_SCHEMA = pa.schema(
    [
        _f("model", pa.string(), "", "model name, e.g. yolov8n"),
        _f("freeze", pa.string(), "", "fine-tuning strategy: all, last10 or last3 (which part trains)"),
        _f("precision", pa.float64(), "fraction [0,1]", "validation precision at the detector's confidence threshold"),
        _f("recall", pa.float64(), "fraction [0,1]", "validation recall at the detector's confidence threshold"),
        _f("f1", pa.float64(), "fraction [0,1]", "harmonic mean of precision and recall"),
        _f("map50", pa.float64(), "fraction [0,1]", "mean average precision at IoU 0.5"),
        _f("map50_95", pa.float64(), "fraction [0,1]", "mean average precision over IoU 0.5:0.95"),
        _f("train_time_s", pa.float64(), "s", "ultralytics training time (results.csv 'time')"),
        _f("started_at", pa.timestamp("us", tz="UTC"), "UTC", "when the trial started on its node"),
        _f("wall_time_s", pa.float64(), "s", "whole trial: data download, training, evaluation, upload"),
        _f("epochs", pa.int64(), "", "epochs requested"),
        _f("status", pa.string(), "", "ok or failed"),
        _f("error", pa.string(), "", "the failure, when status is failed"),
        _f("weights", pa.string(), "", "URI of the trial's detector.pt"),
        _f("node", pa.string(), "", "host name of the node that ran the trial"),
        _f("source_model", pa.string(), "", "the model file or yaml the trial started from"),
    ],
    metadata={"table": "detector_sweep", "version": "1"},
)  # fmt: skip


@dataclass
class SweepConfig:
    """Arguments of a sweep (mirrors ``jobs/sweep_detector.py``)."""

    data: list[str]
    out: str
    sizes: Sequence[str] = SWEEP_SIZES
    freezes: Sequence[str] = SWEEP_FREEZES
    model_template: str = DEFAULT_MODEL_TEMPLATE
    epochs: int = 60
    imgsz: int = DEFAULT_IMGSZ
    batch: int = 16
    workers: int = 1
    target_mpp: float = DEFAULT_TRAINED_MPP
    synth_slides: int = 0
    seed: int = 0
    patience: int = 100
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0
    #: S3-compatible endpoint for s3:// data, models and output (credentials: AWS chain).
    endpoint_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def storage_options(self) -> dict[str, Any]:
        """fsspec options (endpoint only; never credentials)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}

    def validate(self) -> SweepConfig:
        """Check the grid; raise ``ValueError`` naming the bad value."""
        bad_sizes = [s for s in self.sizes if s not in SWEEP_SIZES]
        if bad_sizes or not self.sizes:
            raise ValueError(f"--sizes must be a non-empty subset of {SWEEP_SIZES}, got {list(self.sizes)}")
        bad_freezes = [f for f in self.freezes if f not in FREEZE_STRATEGIES]
        if bad_freezes or not self.freezes:
            raise ValueError(
                f"--freezes must be a non-empty subset of {sorted(FREEZE_STRATEGIES)}, got {list(self.freezes)}"
            )
        if "{size}" not in self.model_template:
            raise ValueError(f"--model-template needs a {{size}} placeholder, got {self.model_template!r}")
        if not self.data and not self.synth_slides:
            raise ValueError("give --data (a detection dataset) or --synth-slides")
        return self


@dataclass(frozen=True)
class Trial:
    """One cell of the grid."""

    size: str
    freeze: str
    model: str

    @property
    def model_name(self) -> str:
        return f"yolov8{self.size}"

    @property
    def name(self) -> str:
        return f"{self.model_name}-{self.freeze}"


def plan_trials(cfg: SweepConfig) -> list[Trial]:
    """The grid in seed order: sizes outer, freeze strategies inner."""
    cfg.validate()
    return [
        Trial(size, freeze, cfg.model_template.format(size=size))
        for size in cfg.sizes
        for freeze in cfg.freezes
    ]


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _download(uri: str, dest: Path, storage_options: dict[str, Any]) -> Path:
    """Copy a remote file or folder to ``dest`` (a folder) and return the local copy."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    target = dest / Path(path.rstrip("/")).name
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get(path, str(target))
    return target


def _join(base: str, *parts: str) -> str:
    if _is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(_local(base), *parts))


def _upload(local_dir: Path, dest: str, storage_options: dict[str, Any]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(dest, **storage_options)
    for name in TRIAL_ARTIFACTS:
        src = local_dir / name
        if src.is_file():
            fs.put(str(src), f"{path.rstrip('/')}/{name}")


def _threads(cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(cpus)))


def run_trial(trial: Trial, cfg: SweepConfig, *, device: str = "auto") -> dict[str, Any]:
    """Train and evaluate one trial; return its results row (never raises for a training error).

    Runs anywhere (no Ray needed): remote data and models are downloaded to a
    scratch folder first; a remote ``cfg.out`` receives the trial's artifacts.
    """
    t0 = time.time()
    opts = cfg.storage_options()
    started = datetime.now(UTC)
    dest = _join(cfg.out, trial.name)
    row: dict[str, Any] = {
        "model": trial.model_name, "freeze": trial.freeze, "epochs": cfg.epochs,
        "weights": _join(dest, "detector.pt"), "node": socket.gethostname(),
        "source_model": trial.model, "status": "ok", "error": None, "started_at": started,
    }  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix=f"hemaray-sweep-{trial.name}-"))
    try:
        data = [
            _download(d, scratch / "data" / str(i), opts) if _is_remote(d) else Path(_local(d))
            for i, d in enumerate(cfg.data)
        ]
        model = (
            str(_download(trial.model, scratch / "model", opts))
            if _is_remote(trial.model)
            else _local(trial.model)
        )
        out_dir = scratch / "out" if _is_remote(cfg.out) else Path(dest)
        train_cfg = TrainDetectorConfig(
            data=data, out=out_dir, model=model, freeze=trial.freeze, epochs=cfg.epochs,
            imgsz=cfg.imgsz, batch=cfg.batch, device=device, workers=cfg.workers,
            target_mpp=cfg.target_mpp, synth_slides=cfg.synth_slides, seed=cfg.seed,
            patience=cfg.patience, work_dir=scratch / "work",
            command=f"hemaray sweep trial {trial.name}", extra={"sweep": trial.name, **cfg.extra},
        )  # fmt: skip
        metrics = train_detector(train_cfg)
        row.update({k: float(metrics[k]) for k in ("precision", "recall", "f1", "map50", "map50_95")})
        row["train_time_s"] = float(metrics.get("training_time_s", 0.0))
        if _is_remote(cfg.out):
            _upload(out_dir, dest, opts)
    except Exception as e:  # a failed trial is a row, not a failed sweep
        log.error("trial %s failed: %s", trial.name, traceback.format_exc())
        row.update(status="failed", error=f"{type(e).__name__}: {e}", weights=None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    row["wall_time_s"] = round(time.time() - t0, 3)
    return row


def _trial_task(trial: Trial, cfg: SweepConfig, cpus: float) -> dict[str, Any]:
    """The Ray task body: pin torch threads to the CPUs Ray reserved, then train."""
    _threads(cpus)
    return run_trial(trial, cfg)


def results_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows (any order) as a ``RESULTS_SCHEMA`` table in grid order."""
    size_rank = {s: i for i, s in enumerate(SWEEP_SIZES)}
    freeze_rank = {f: i for i, f in enumerate(SWEEP_FREEZES)}
    ordered = sorted(
        rows, key=lambda r: (size_rank.get(r["model"][-1:], 99), freeze_rank.get(r["freeze"], 99))
    )
    return pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in RESULTS_SCHEMA} for r in ordered], schema=RESULTS_SCHEMA
    )


def write_results(table: pa.Table, out: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write ``results.parquet`` and ``results.csv`` into ``out``; return their URIs."""
    import fsspec
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    opts = storage_options or {}
    fs, base = fsspec.core.url_to_fs(out, **opts)
    fs.makedirs(base, exist_ok=True)
    uris = []
    for name in (RESULTS_PARQUET, RESULTS_CSV):
        path = f"{base.rstrip('/')}/{name}"
        with fs.open(path, "wb") as fh:
            if name.endswith(".parquet"):
                pq.write_table(table, fh)
            else:
                pacsv.write_csv(table, fh)
        uris.append(_join(out, name))
    return uris


def run_sweep(cfg: SweepConfig, *, echo: Callable[[str], None] | None = None) -> pa.Table:
    """Train the grid as parallel Ray tasks (``ray.init`` done by the caller) and write the table.

    Returns
    -------
    pyarrow.Table
        One ``RESULTS_SCHEMA`` row per trial, also written to ``cfg.out``.
    """
    import ray

    say = echo or (lambda s: print(s, file=sys.stderr))
    trials = plan_trials(cfg)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    resources: dict[str, float] = {"num_cpus": cfg.cpus_per_trial}
    if gpus > 0:
        resources["num_gpus"] = cfg.gpus_per_trial
    say(f"sweep: {len(trials)} trial(s), each {resources}, cluster GPUs {gpus:g}")
    task = ray.remote(_trial_task).options(max_retries=TRIAL_MAX_RETRIES, **resources)
    refs = {task.remote(t, cfg, cfg.cpus_per_trial): t for t in trials}
    rows: list[dict[str, Any]] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        trial = refs[done[0]]
        try:
            row = ray.get(done[0])
        except Exception as e:  # the worker died beyond its retries
            row = {
                "model": trial.model_name, "freeze": trial.freeze, "epochs": cfg.epochs,
                "status": "failed", "error": f"{type(e).__name__}: {e}", "source_model": trial.model,
            }  # fmt: skip
        rows.append(row)
        say(
            f"trial {trial.name}: {row['status']}"
            + (f" mAP50 {row.get('map50', 0):.3f} in {row.get('wall_time_s', 0):.0f} s" if row["status"] == "ok" else f" ({row.get('error')})")
        )  # fmt: skip
    table = results_table(rows)
    for uri in write_results(table, cfg.out, storage_options=cfg.storage_options()):
        say(f"wrote {uri}")
    return table


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``jobs/sweep_detector.py``."""
    p = argparse.ArgumentParser(
        prog="sweep_detector",
        description="Seed 000's detector comparison: YOLOv8 sizes x fine-tuning strategies, "
        "trained in parallel as Ray tasks; writes OUT/results.parquet and OUT/results.csv.",
    )
    p.add_argument(
        "--data", action="append", default=[],
        help="YOLO or VOC dataset folder, local (on every node) or s3:// prefix; repeat to merge",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--sizes", default=",".join(SWEEP_SIZES), help="comma list of n,s,m,l,x")
    p.add_argument("--freezes", default=",".join(SWEEP_FREEZES), help="comma list of all,last10,last3")
    p.add_argument(
        "--model-template", default=DEFAULT_MODEL_TEMPLATE,
        help="model per size with a {size} placeholder: yolov8{size}.yaml, /w/yolov8{size}.pt, s3://.../yolov8{size}.pt",
    )  # fmt: skip
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--imgsz", type=int, default=DEFAULT_IMGSZ)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per trial")
    p.add_argument("--mpp", type=float, default=DEFAULT_TRAINED_MPP, dest="target_mpp")
    p.add_argument("--synth-slides", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=1.0, help="used when the cluster has GPUs")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint; credentials come from the AWS chain")
    p.add_argument("--address", help="Ray address (default: the job's cluster, or a local Ray)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/sweep_detector.py``; prints the results as JSON lines.

    Returns 0 when every trial trained, 2 when some failed (their rows say why).
    """
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = SweepConfig(
        data=list(args.data), out=args.out,
        sizes=[s for s in args.sizes.split(",") if s], freezes=[f for f in args.freezes.split(",") if f],
        model_template=args.model_template, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
        workers=args.workers, target_mpp=args.target_mpp, synth_slides=args.synth_slides,
        seed=args.seed, patience=args.patience, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, endpoint_url=args.endpoint_url,
    ).validate()  # fmt: skip
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=args.address, configure_logging=False)
    table = run_sweep(cfg)
    for row in table.to_pylist():
        print(json.dumps(row, default=str))
    failed = sum(1 for s in table.column("status").to_pylist() if s != "ok")
    return 2 if failed else 0
