"""Run telemetry: per stage wall and CPU seconds, tiles, cells and batches; per actor busy time.

Workers: every stage callable of `batch.run.tasks` is wrapped in `timed`,
which measures one call (wall: ``time.perf_counter``; CPU: ``time.process_time``,
so a detector's intra-op threads count) and appends one record, a JSON line,
to the ``telemetry`` column of the batch's first row. The records travel with
the rows to the driver, as ``cells`` does. Calls nest: the crop runs inside
the detector's call, and a parent's figures exclude its children's, so
nothing is counted twice. The fused actor runs several stages in one process;
each is still measured on its own.

Driver: `Telemetry.timed_batches` wraps the dataset's batch iterator and
measures the time blocked waiting for the next batch (``wait_s``) against the
time spent taking it (the ``write`` stage, `batch.run.ledger.RunLedger.consume`);
`Telemetry.report` folds the records into the manifest's ``telemetry``
(``schemas/manifest_telemetry.v1.json``): per stage totals, per actor busy and
idle seconds (idle: the gaps between its calls, waiting for input or held back
by a full output), and GPU utilisation and memory where NVML
(``nvidia-ml-py``) finds the actor's GPU. `table_lines` is the end-of-run table.

Telemetry never fails a tile: a count that cannot be taken is logged and left at 0.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import schemas
from batch.run.columns import Batch, as_arrays, as_table, has_value, object_array

__all__ = [
    "COLUMN", "SCHEMA_VERSION", "STAGES", "Telemetry", "gpu_sample", "schema", "table_lines",
    "timed",
]  # fmt: skip

log = logging.getLogger(__name__)

#: The carried column that holds the stage records (JSON lines).
COLUMN = "telemetry"
#: The stages of a run, in order; ``write`` is the driver's.
STAGES = ("plan", "read", "detect", "crop", "segment", "classify", "write")
#: Stages whose calls sample the actor's GPU (when NVML finds one).
GPU_STAGES = frozenset({"detect", "classify"})
#: Version of the manifest's ``telemetry`` object (``schemas/manifest_telemetry.v<N>.json``).
SCHEMA_VERSION = 1
_SCHEMA_FILE = f"manifest_telemetry.v{SCHEMA_VERSION}.json"

P = ParamSpec("P")
R = TypeVar("R")


# --- workers: one record per stage call ---------------------------------------------------


@dataclass
class _Frame:
    start: float
    t0: float
    c0: float
    child_wall: float = 0.0
    child_cpu: float = 0.0


class _Stack(threading.local):
    frames: list[_Frame]

    def __init__(self) -> None:
        self.frames = []


_ACTIVE = _Stack()


@functools.cache
def _identity(pid: int) -> tuple[str, str | None]:
    """``(host:pid, Ray actor id or None)`` of this process."""
    actor = None
    ray = sys.modules.get("ray")  # never imported here: Ray-free callers stay Ray-free
    if ray is not None and ray.is_initialized():
        try:
            actor = ray.get_runtime_context().get_actor_id()
        except Exception:  # a driver or task has no actor id
            actor = None
    return f"{socket.gethostname()}:{pid}", actor


def _tile_rows(out: Any) -> list[int]:
    if isinstance(out, list):
        return [i for i, r in enumerate(out) if r.get("kind") == "tile"]
    return [i for i, k in enumerate(out.get("kind", ())) if k == "tile"]


def _table_rows(batch: Batch, column: str, rows: list[int]) -> int:
    return sum(as_table(batch[column][i]).num_rows for i in rows if has_value(batch[column][i]))


def _npz_rows(batch: Batch, column: str, rows: list[int]) -> int:
    return sum(len(as_arrays(batch[column][i])["rows"]) for i in rows if has_value(batch[column][i]))


#: Cells a stage call handled, from its input and output batch and its output tile rows:
#: detections kept (detect), WBC crops cut (crop), WBCs segmented (segment) and classified.
_CELLS: dict[str, Callable[[Batch, Batch, list[int]], int]] = {
    "detect": lambda _in, out, rows: _table_rows(out, "cells", rows),
    "crop": lambda _in, out, rows: _npz_rows(out, "wbc_crops", rows),
    "segment": lambda _in, out, rows: _npz_rows(out, "crops", rows),
    "classify": lambda batch_in, _out, rows: _npz_rows(batch_in, "crops", rows),
}


def timed(stage: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Measure each call of a stage callable; append its record to the output's first row.

    The callable takes a tile batch (or, for ``plan``, a slide row) as its
    first argument after ``self`` and returns a tile batch (or a list of
    rows). Its record: wall and CPU seconds (a nested timed call's excluded),
    output tile rows, cells handled, and a GPU sample for `GPU_STAGES`.
    """
    if stage not in STAGES:
        raise ValueError(f"telemetry: unknown stage {stage!r}; expected one of {STAGES}")
    count = _CELLS.get(stage)

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            frames = _ACTIVE.frames
            frame = _Frame(time.time(), time.perf_counter(), time.process_time())
            frames.append(frame)
            try:
                out = fn(*args, **kwargs)
            finally:
                frames.pop()
                wall = time.perf_counter() - frame.t0
                cpu = time.process_time() - frame.c0
                if frames:
                    frames[-1].child_wall += wall
                    frames[-1].child_cpu += cpu
            worker, actor = _identity(os.getpid())
            rows = _tile_rows(out)
            cells = 0
            if count is not None:
                batch_in = args[0] if isinstance(args[0], dict) else args[1]
                try:
                    cells = count(batch_in, out, rows)  # type: ignore[arg-type]
                except Exception as e:  # a count is not worth a tile
                    log.debug("telemetry: no cell count for %s: %s", stage, e)
            record: dict[str, Any] = {
                "stage": stage, "worker": worker, "actor": actor, "start": round(frame.start, 6),
                "end": round(frame.start + wall, 6), "wall": round(wall - frame.child_wall, 6),
                "cpu": round(cpu - frame.child_cpu, 6), "tiles": len(rows), "cells": cells,
            }  # fmt: skip
            if stage in GPU_STAGES and (sample := gpu_sample()) is not None:
                record["gpu_util"], record["gpu_mem_mib"] = sample
            _attach(out, json.dumps(record, separators=(",", ":")) + "\n")
            return out

        return call

    return wrap


def _attach(out: Any, line: str) -> None:
    """Append ``line`` to the telemetry of the first row of ``out`` (a batch or a list of rows)."""
    if isinstance(out, list):
        if out:
            out[0][COLUMN] = (out[0].get(COLUMN) or "") + line
        return
    n = len(out.get("kind", ()))
    if n == 0:
        return
    column = out.get(COLUMN)
    values = object_array(list(column) if column is not None else [""] * n)
    values[0] = (values[0] or "") + line
    out[COLUMN] = values  # a new array: Ray may hand a stage read-only columns


# --- GPU ------------------------------------------------------------------------------------


_NVML: dict[int, Any] = {}


def _nvml_handle() -> Any:
    """The NVML handle of this process's GPU, or None (no pynvml, no driver, no visible GPU).

    Ray gives a GPU actor ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs) and a CPU
    one an empty value; the first visible device is the one sampled.
    """
    pid = os.getpid()
    if pid in _NVML:
        return _NVML[pid]
    handle = None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip():
        try:
            import pynvml

            pynvml.nvmlInit()
            first = (visible or "0").split(",")[0].strip()
            if first.startswith(("GPU-", "MIG-")):
                handle = pynvml.nvmlDeviceGetHandleByUUID(first)
            elif pynvml.nvmlDeviceGetCount() > int(first):
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        except Exception as e:  # no nvidia-ml-py, no driver, or no such device: no GPU figures
            log.debug("telemetry: no NVML: %s", e)
            handle = None
    _NVML[pid] = handle
    return handle


def gpu_sample() -> tuple[float, float] | None:
    """``(utilisation %, memory used MiB)`` of this process's GPU now, or None without one.

    Utilisation is NVML's: the share of its last sample period (1/6 to 1 s) a
    kernel ran; memory is the device's, all processes on it.
    """
    handle = _nvml_handle()
    if handle is None:
        return None
    try:
        import pynvml

        util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        mem = float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20
    except Exception as e:
        log.debug("telemetry: NVML sample failed: %s", e)
        return None
    return util, round(mem, 1)


# --- driver: the records folded into the manifest ------------------------------------------


@dataclass
class _StageSums:
    wall: float = 0.0
    cpu: float = 0.0
    tiles: int = 0
    cells: int = 0
    batches: int = 0
    workers: set[str] = field(default_factory=set)
    gpu_util: list[float] = field(default_factory=list)
    gpu_mem: list[float] = field(default_factory=list)


@dataclass
class _WorkerBook:
    actor: str
    stages: set[str] = field(default_factory=set)
    spans: list[tuple[float, float]] = field(default_factory=list)
    gpu_util: list[float] = field(default_factory=list)

    def busy_idle(self) -> tuple[float, float]:
        """Seconds inside calls (their union) and between them (first start to last end)."""
        busy = 0.0
        cur_start, cur_end = None, None
        for start, end in sorted(self.spans):
            if cur_end is None or start > cur_end:
                if cur_start is not None and cur_end is not None:
                    busy += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_start is not None and cur_end is not None:
            busy += cur_end - cur_start
        whole = max(e for _, e in self.spans) - min(s for s, _ in self.spans)
        return busy, max(0.0, whole - busy)


def _fraction(part: float, whole: float) -> float | None:
    return round(min(1.0, max(0.0, part / whole)), 3) if whole > 0 else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


class Telemetry:
    """The driver's side: takes the records of every batch, times its own waits and writes."""

    def __init__(self) -> None:
        self._stages = {s: _StageSums() for s in STAGES}
        self._workers: dict[str, _WorkerBook] = {}
        self.wait_s = 0.0
        self.write_s = 0.0
        self.write_cpu_s = 0.0
        self.first_batch_s: float | None = None
        self.batches = 0

    def add(self, record: dict[str, Any]) -> None:
        """Fold in one stage record (as `timed` writes it)."""
        sums = self._stages[record["stage"]]  # KeyError: not a stage of `STAGES`
        sums.wall += record["wall"]
        sums.cpu += record["cpu"]
        sums.tiles += record["tiles"]
        sums.cells += record["cells"]
        sums.batches += 1
        sums.workers.add(record["worker"])
        if record.get("gpu_util") is not None:
            sums.gpu_util.append(record["gpu_util"])
            sums.gpu_mem.append(record["gpu_mem_mib"])
        if record.get("actor"):
            book = self._workers.setdefault(record["worker"], _WorkerBook(record["actor"]))
            book.stages.add(record["stage"])
            book.spans.append((record["start"], record["end"]))
            if record.get("gpu_util") is not None:
                book.gpu_util.append(record["gpu_util"])

    def take(self, batch: Batch) -> None:
        """Fold in the records a batch of finished rows carries."""
        for text in batch.get(COLUMN, ()):
            for line in (text or "").splitlines():
                try:
                    self.add(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:  # never fail a run on a record
                    log.warning("telemetry: unreadable record %r: %s", line[:200], e)

    def timed_batches(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """``batches``, timing the wait for each and the consumer's time with it (``write``)."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.wait_s += time.perf_counter() - t0
                return
            waited = time.perf_counter() - t0
            self.wait_s += waited
            if self.first_batch_s is None:
                self.first_batch_s = waited
            self.take(batch)
            # The consumer runs in this (the driver's) thread; Ray Data's executor has others.
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                yield batch
            finally:
                self.write_s += time.perf_counter() - w0
                self.write_cpu_s += time.thread_time() - c0
                self.batches += 1

    def report(self, *, tiles: int, cells: int) -> dict[str, Any]:
        """The manifest's ``telemetry``; ``tiles`` and ``cells`` are what the driver wrote."""
        actors = []
        busy_by_stage: dict[str, list[float]] = {}
        idle_by_stage: dict[str, list[float]] = {}
        for worker, book in sorted(self._workers.items()):
            busy, idle = book.busy_idle()
            actors.append(
                {
                    "id": book.actor, "worker": worker,
                    "stages": [s for s in STAGES if s in book.stages],
                    "busy_s": round(busy, 3), "idle_s": round(idle, 3),
                    "busy_fraction": _fraction(busy, busy + idle) or 0.0,
                    "gpu_util_mean": _mean(book.gpu_util),
                }
            )  # fmt: skip
            for s in book.stages:
                busy_by_stage.setdefault(s, []).append(busy)
                idle_by_stage.setdefault(s, []).append(idle)
        stages: dict[str, dict[str, Any]] = {}
        for name, sums in self._stages.items():
            busy, idle = sum(busy_by_stage.get(name, [])), sum(idle_by_stage.get(name, []))
            stages[name] = {
                "wall_s": round(sums.wall, 3), "cpu_s": round(sums.cpu, 3), "tiles": sums.tiles,
                "cells": sums.cells, "batches": sums.batches, "workers": len(sums.workers),
                "idle_s": round(idle, 3) if name in busy_by_stage else None,
                "busy_fraction": _fraction(busy, busy + idle) if name in busy_by_stage else None,
                "gpu_util_mean": _mean(sums.gpu_util),
                "gpu_mem_max_mib": max(sums.gpu_mem) if sums.gpu_mem else None,
            }  # fmt: skip
        stages["write"].update(
            wall_s=round(self.write_s, 3), cpu_s=round(self.write_cpu_s, 3), tiles=tiles,
            cells=cells, batches=self.batches, workers=1 if self.batches else 0,
            idle_s=round(self.wait_s, 3),
            busy_fraction=_fraction(self.write_s, self.write_s + self.wait_s),
        )  # fmt: skip
        driver = {
            "wait_s": round(self.wait_s, 3), "write_s": round(self.write_s, 3),
            "write_cpu_s": round(self.write_cpu_s, 3), "batches": self.batches,
            "first_batch_s": None if self.first_batch_s is None else round(self.first_batch_s, 3),
        }  # fmt: skip
        return {"version": SCHEMA_VERSION, "stages": stages, "actors": actors, "driver": driver}


def table_lines(telemetry: dict[str, Any]) -> list[str]:
    """The end-of-run table: stage | wall s | CPU s | tiles | cells | busy (nothing if no work)."""
    stages = telemetry.get("stages") or {}
    if not any(s.get("batches") for s in stages.values()):
        return []
    lines = [f"  {'stage':<9}{'wall s':>9}{'CPU s':>9}{'tiles':>8}{'cells':>8}{'busy':>7}"]
    for name, s in stages.items():
        if not s.get("batches"):
            continue
        busy = "-" if s.get("busy_fraction") is None else f"{s['busy_fraction']:.0%}"
        lines.append(
            f"  {name:<9}{s['wall_s']:>9.1f}{s['cpu_s']:>9.1f}{s['tiles']:>8}{s['cells']:>8}{busy:>7}"
        )
    d = telemetry.get("driver") or {}
    first = "" if d.get("first_batch_s") is None else f", {d['first_batch_s']:.1f} s for the first"
    waited = f"the driver waited {d.get('wait_s', 0):.1f} s for batches{first}"
    return [f"per stage (busy: the actors' share of time in calls; {waited}):", *lines]


def schema() -> dict[str, Any]:
    """The JSON Schema of the manifest's ``telemetry`` (``schemas/manifest_telemetry.v1.json``)."""
    spec: dict[str, Any] = json.loads((schemas.SCHEMA_DIR / _SCHEMA_FILE).read_text())
    return spec
