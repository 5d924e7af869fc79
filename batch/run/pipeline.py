"""The Ray Data pipeline: slides in, per-cell Parquet out. Wiring and placement only.

    slides -> plan (flat_map, CPU) -> read/decode (map_batches, CPU tasks)
           -> detect + crop WBCs -> segment -> classify
           -> driver: per-slide books and atomic commits (batch.run.ledger, batch.run.sink)

The per-tile work has two placements (``execution.placement``):

- ``staged`` (the default on GPU clusters): read/decode in CPU tasks, detect
  + crop in an actor pool with ``num_gpus`` per actor, segmentation in a
  small CPU actor pool, classification in an actor pool with a GPU fraction
  per actor.
- ``fused`` (the default on CPU-only clusters): the plan is cut into read
  batches and one single-threaded actor per core reads, detects, crops,
  segments and classifies its own tiles (`batch.run.tasks.CellStage`).
  On 2 cores this removed three worker processes (reader, segmentation,
  classifier), three operators from Ray Data's scheduling loop and every
  hand-off of pixels, crops and cell tables through the object store.

All image logic lives in ``batch.stages`` and the per-tile callables in
``batch.run.tasks``; this module chooses resources and wires them. The
driver's books (`batch.run.ledger`): a slide commits when all its planned
tiles have come back, and fails (a ``failures`` row, nothing in ``cells``)
on its first error.
Many slides stream through one dataset, so actors never wait at a slide
boundary; Ray Data provides backpressure, retries and progress bars.

A node that leaves the cluster mid-run (a preempted or failed machine) takes
its actors and the tiles they held. Their calls wait for the actor to come
back: Ray restarts it on a node left once one has room (the pool releases its
idle actors when the inputs run out), the calls are retried there, and the
run commits every slide with the cell ids it would have had. An actor's
restarts stay bounded (``execution.max_worker_restarts``): past them, as
after a crash that recurs, the run fails its unfinished slides with the
cause recorded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from batch.config import Config
from batch.inputs import SlideInput
from batch.run.lease import LeaseBook
from batch.run.ledger import RunLedger, RunResult
from batch.run.provenance import classifier_runtimes, label_sets, run_manifest, trained_mpp
from batch.run.sink import OutputStore, cells_schema
from batch.run.tasks import (
    CellStage,
    ClassifyStage,
    DetectStage,
    SegmentStage,
    plan_slide,
    read_tiles,
)
from batch.run.telemetry import Telemetry
from batch.stages.autoruntime import runtime_record
from batch.storage import check_out_writable

__all__ = ["run_pipeline", "Resources", "cluster_resources", "placement"]

log = logging.getLogger(__name__)

#: Ray Data's default block size cap (bytes), if the context has none.
DEFAULT_BLOCK_BYTES = 128 * 2**20
#: Decoded-tile blocks the object store may hold per model actor (see execution.object_store_mb).
BLOCKS_AHEAD_PER_ACTOR = 4
#: Floor of the derived object store budget of a run.
MIN_OBJECT_STORE_BYTES = 256 * 2**20
#: Detector batches per actor task in the fused placement (execution.read_batch_size 0).
FUSED_DETECT_BATCHES = 2
#: Default cap on CPU detector actors (one per core below it).
MAX_CPU_DETECTORS = 16


@dataclass
class Resources:
    """What the cluster offers, read once at the start of a run."""

    cpus: float
    gpus: float


def cluster_resources() -> Resources:
    import ray

    res = ray.cluster_resources()
    return Resources(cpus=float(res.get("CPU", 1)), gpus=float(res.get("GPU", 0)))


def run_pipeline(
    slides: list[SlideInput],
    out: str,
    config: Config,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> RunResult:
    """Process ``slides`` into ``out`` on the current Ray cluster (``ray.init`` done by the caller).

    Returns the run's result; slides that failed are in ``result.failed`` and
    the ``failures`` table. Already committed slides are skipped unless
    ``overwrite``.
    """
    import ray

    t0 = time.time()
    started_at = datetime.now(UTC)
    run_id = started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    # Before any compute, and before OutputStore makes folders (which creates a missing bucket).
    check_out_writable(out, storage_options=config.storage.storage_options())
    store = OutputStore(out, storage_options=config.storage.storage_options())
    result = RunResult(run_id=run_id, out=store.uri)
    repaired = store.repair_slide_rows()
    if repaired:
        echo(f"repaired slides rows of {len(repaired)} committed slide(s)")
    committed = set() if overwrite else store.committed()
    todo = [s for s in slides if s.slide_id not in committed]
    # One run at a time per slide: take each slide's lease, then look again for slides another
    # run committed in the meantime (their leases are dropped at once).
    leases = LeaseBook(store.fs, store.root, run_id)
    for s in todo:
        holder = leases.acquire(s.slide_id)
        if holder is not None:
            result.leased[s.slide_id] = holder
    if not overwrite:
        for sid in store.committed() & set(leases.held):
            committed.add(sid)
            leases.release(sid)
    todo = [s for s in todo if s.slide_id in leases.held]
    result.skipped = sorted(s.slide_id for s in slides if s.slide_id in committed)
    if result.skipped:
        echo(f"skipping {len(result.skipped)} slide(s) already committed in {store.uri}")
    if result.leased:
        echo(
            f"skipping {len(result.leased)} slide(s) another run is processing now "
            f"(leases in {store.uri}/leases; e.g. {next(iter(result.leased.values()))})"
        )

    detector_mpp, detector_file = trained_mpp(config)
    labels = label_sets(config)
    manifest = run_manifest(
        run_id, started_at, n_inputs=len(slides), out=store.uri, config=config,
        detector_trained_mpp=detector_mpp, labels=labels,
    )  # fmt: skip
    if todo:  # which runtime the detectors run in, and why (exports it once, cached, for `auto`)
        device = "cuda:0" if _uses_gpu(config, cluster_resources()) else "cpu"
        runtime = runtime_record(detector_file, config.detect.runtime, device)
        manifest["detect_runtime"] = runtime
        echo(f"detector runtime: {runtime['runtime']} on {device} ({runtime['reason']})")
        manifest["classify_runtime"] = classifier_runtimes(config, device)
        echo(
            "classifier runtime: "
            + ", ".join(f"{k} {v['runtime']}" for k, v in manifest["classify_runtime"].items())
        )
    ledger = RunLedger(
        store, cells_schema(labels, config.export.crops), result, config, echo, leases
    )
    ledger.start(todo)
    telemetry = Telemetry()
    cut_short: Exception | None = None
    if todo:
        saved = ray.data.DataContext.get_current().copy()
        try:
            ds = _build_dataset(todo, config, detector_mpp)
            batches = ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=2)
            for batch in telemetry.timed_batches(batches):
                ledger.consume(batch)
        except Exception as e:  # e.g. a worker that crashed beyond its retries: fail, not crash
            cut_short = e
            log.error("the dataset ended with an error; failing the unfinished slides: %s", e)
            echo(f"the run was cut short ({type(e).__name__}: {e})")
        finally:  # the run's block size and budget must not leak into the caller's datasets
            ray.data.DataContext._set_current(saved)
    # Slides that never returned a row cannot happen unless the dataset was cut short: record them.
    try:
        ledger.finish(cut_short)
    finally:
        leases.release_all()

    result.seconds = time.time() - t0
    written = sum(result.cells_by_class.values())
    result.telemetry = telemetry.report(tiles=result.tiles, cells=written)
    manifest.update(
        finished_at=datetime.now(UTC).isoformat(),
        seconds=round(result.seconds, 3),
        committed=result.committed,
        skipped=result.skipped,
        leased=result.leased,
        failed=result.failed,
        unrecorded=result.unrecorded,
        tiles=result.tiles,
        cells_by_class=result.cells_by_class,
        timeline=result.timeline,
        telemetry=result.telemetry,
    )
    result.manifest_uri = store.write_manifest(
        run_id, manifest, yaml.safe_dump(config.to_dict(), sort_keys=False)
    )
    return result


def _uses_gpu(config: Config, res: Resources) -> bool:
    return res.gpus > 0 and config.detect.device != "cpu"


def placement(config: Config, res: Resources) -> str:
    """``execution.placement`` resolved: "staged" on GPU clusters, "fused" on CPU-only ones."""
    chosen = config.execution.placement
    if chosen == "auto":
        return "staged" if _uses_gpu(config, res) else "fused"
    return chosen


def _build_dataset(todo: list[SlideInput], config: Config, detector_mpp: float | None) -> Any:
    import ray

    res = cluster_resources()
    ex = config.execution
    use_gpu = _uses_gpu(config, res)
    if use_gpu:
        det_actors = config.detect.actors or max(1, int(res.gpus / config.detect.gpus_per_actor))
        threads = 0
    else:
        # CPU only: data-parallel detection, one single-threaded actor per core (up to
        # MAX_CPU_DETECTORS). Independent actors keep both cores busy; one actor with two intra-op
        # threads stalls at every layer's barrier whenever another process takes a core
        # (measured here: 2 x 1 thread ~20 % faster end to end than 1 x 2 threads).
        det_actors = config.detect.actors or max(1, min(int(res.cpus), MAX_CPU_DETECTORS))
        threads = ex.torch_threads or max(1, (os.cpu_count() or 1) // det_actors)
    cls_actors = ex.classify_actors or (max(1, int(res.gpus)) if use_gpu else 1)
    cls_threads = ex.classify_threads or max(1, math.ceil(ex.cpu_per_classifier))
    fused = placement(config, res) == "fused"
    # Fused: each actor task reads and runs FUSED_DETECT_BATCHES detector batches, which halves
    # Ray Data's tasks and the driver's batches (measured on the 4x bench slide, alternating:
    # 84.5 / 106.5 s against 88.5 / 111.5 s with one batch per task).
    read_batch = ex.read_batch_size or config.detect.batch_size * (FUSED_DETECT_BATCHES if fused else 1)
    read_conc = ex.read_concurrency or max(1, int(res.cpus))
    # Crop + segment is light CPU work next to detection. It runs in a small pool of long-lived
    # workers: as plain tasks, Ray started a new worker process (seconds of imports) for nearly
    # every block once the actors filled the node's worker quota.
    seg_conc = ex.segment_concurrency or max(1, int(res.cpus) // 2)
    rows = [
        {
            "slide_id": s.slide_id,
            "slide_uri": s.uri,
            "mpp": s.mpp,
            "mpp_source": "manifest" if s.mpp is not None else None,
            "metadata_json": json.dumps(s.metadata, default=str),
        }
        for s in todo
    ]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    # One read batch of decoded tiles makes one block (Ray Data cuts a block once it passes the
    # target and slices only at 1.5x it), so the detector streams batch by batch instead of
    # waiting for 128 MiB blocks of a hundred tiles.
    tile_bytes = config.tiling.tile_size**2 * 3
    ctx.target_max_block_size = min(
        ctx.target_max_block_size or DEFAULT_BLOCK_BYTES, max(1, int(0.75 * read_batch * tile_bytes))
    )
    # Bounded memory: decoded tiles may run only so far ahead of the models, whatever the slide
    # size. Without a cap Ray Data lets a fast reader fill its share of the object store (GBs),
    # so peak memory grew with the slide.
    budget = ex.object_store_mb * 2**20 or max(
        MIN_OBJECT_STORE_BYTES, BLOCKS_AHEAD_PER_ACTOR * det_actors * read_batch * tile_bytes
    )
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(
        object_store_memory=min(limits.object_store_memory, budget)
    )
    # Ray Data polls every map worker's USS (reading /proc smaps) once a second by default;
    # the run does not use those figures.
    ctx.memory_usage_poll_interval_s = None
    # Finite retries: a worker that crashes on a slide is restarted (and its work retried) a
    # bounded number of times, then the dataset raises and the run fails the unfinished slides.
    retries = ex.max_worker_restarts
    task_retries: dict[str, Any] = {"max_retries": retries}
    # An actor's calls are retried for as long as the actor can come back: its restarts are the
    # bound (max_task_retries -1). A call to an actor whose node just left fails as unavailable
    # until the cluster declares the node dead (~15 s); a finite count ran out in seconds, and
    # the run failed every unfinished slide where the actor would have been restarted on a
    # node left (F4).
    actor_retries: dict[str, Any] = {"max_restarts": retries, "max_task_retries": -1}
    ds: Any = ray.data.from_items(rows, override_num_blocks=min(len(rows), 200))
    actors, tasks = ray.data.ActorPoolStrategy, ray.data.TaskPoolStrategy
    # Planning opens headers (and may load a detector to estimate an unknown mpp): CPU tasks.
    ds = ds.flat_map(
        plan_slide,
        fn_kwargs={"config": config, "trained_mpp": detector_mpp},
        compute=tasks(size=read_conc),
        num_cpus=ex.cpu_per_task,
        **task_retries,
    )
    det_res: dict[str, Any] = (
        {"num_gpus": config.detect.gpus_per_actor} if use_gpu else {"num_cpus": ex.cpu_per_actor}
    ) | actor_retries
    if fused:
        # One worker per core takes its tiles through the whole chain, the read included: no
        # pixels, crops or cell tables through the object store, and no reader, segmentation or
        # classifier processes competing with the detectors for the cores (measured: see the
        # module docstring). A slide's plan is one block; cut it into read batches so every
        # actor gets tiles of it.
        ds = ds.repartition(target_num_rows_per_block=read_batch)
        return ds.map_batches(
            CellStage, fn_constructor_args=(config, threads), fn_constructor_kwargs={"read": True},
            batch_size=read_batch, compute=actors(size=det_actors), batch_format="numpy", **det_res,
        )  # fmt: skip
    ds = ds.map_batches(
        read_tiles, fn_kwargs={"config": config}, batch_size=read_batch,
        num_cpus=ex.cpu_per_task, compute=tasks(size=read_conc), batch_format="numpy",
        **task_retries,
    )  # fmt: skip
    ds = ds.map_batches(
        DetectStage, fn_constructor_args=(config, threads),
        batch_size=config.detect.batch_size, compute=actors(size=det_actors), batch_format="numpy", **det_res,
    )  # fmt: skip
    ds = ds.map_batches(
        SegmentStage, fn_constructor_args=(config,), batch_size=config.detect.batch_size,
        num_cpus=ex.cpu_per_task, compute=actors(size=seg_conc), batch_format="numpy",
        **actor_retries,
    )  # fmt: skip
    cls_res: dict[str, Any] = (
        {"num_gpus": ex.gpus_per_classifier} if use_gpu else {"num_cpus": ex.cpu_per_classifier}
    ) | actor_retries
    ds = ds.map_batches(
        ClassifyStage, fn_constructor_args=(config, 0 if use_gpu else cls_threads),
        batch_size=config.detect.batch_size, compute=actors(size=cls_actors), batch_format="numpy", **cls_res,
    )  # fmt: skip
    return ds
