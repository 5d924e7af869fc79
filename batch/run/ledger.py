"""The driver's books: each slide's lifecycle from first row to commit or failure.

A slide starts when the run begins, takes its tiles' cells as they come back
(`RunLedger.consume`), commits when all its planned tiles are in (one atomic
file, `batch.run.sink.SlideWriter.commit`) and fails on its first error row
or write error (a ``failures`` row, a ``slides`` row with status ``failed``,
nothing in ``cells``). As Ray Data's datasinks do, the lifecycle has one
method per step: `start`, `consume` (per tile), `commit`, `fail`, and
`finish` for slides the dataset never completed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from batch.calls import SlideTally
from batch.config import Config
from batch.errors import HemarayError, error_type_name
from batch.inputs import SlideInput
from batch.run.columns import batch_error, unpack
from batch.run.lease import LeaseBook
from batch.run.sink import OutputStore, SlideWriter
from batch.run.telemetry import table_lines

__all__ = [
    "EXIT_OK", "EXIT_PARTIAL", "EXIT_RUN_FAILED", "RunLedger", "RunResult", "progress_line",
    "summary_lines", "thin",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Exit codes of ``hemaray run``.
EXIT_OK, EXIT_RUN_FAILED, EXIT_PARTIAL = 0, 1, 2
#: Seconds between progress lines (printed whether or not stderr is a terminal).
PROGRESS_SECONDS = 30.0
#: Seconds between two timeline samples; the manifest keeps at most `TIMELINE_POINTS`.
TIMELINE_STEP = 0.5
TIMELINE_POINTS = 600


@dataclass
class RunResult:
    """What a run did (also written as the run manifest)."""

    run_id: str
    out: str
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: Slides left alone because another run holds their lease (slide id -> holder's run id).
    leased: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: The typed error of each failed slide.
    errors: dict[str, BaseException] = field(default_factory=dict)
    #: Books that could not be written (slide id -> what failed): a failures or slides row
    #: whose write raised. The run goes on; the slide stays failed in this result.
    unrecorded: dict[str, str] = field(default_factory=dict)
    cells_by_class: dict[str, int] = field(default_factory=dict)
    wbc_types: dict[str, int] = field(default_factory=dict)
    #: Per committed slide: its differential, blast fraction (95 % interval) and ALL call.
    slide_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0
    manifest_uri: str = ""
    #: Progress over the run: ``[seconds since start, tiles, cells, slides committed, slides
    #: failed]`` at most every `TIMELINE_STEP` s (the manifest's ``timeline``; report plots it).
    timeline: list[list[float]] = field(default_factory=list)
    #: Per stage, actor and the driver: seconds, tiles, cells, busy fractions (the manifest's
    #: ``telemetry``, schemas/manifest_telemetry.v1.json; `batch.run.telemetry`).
    telemetry: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.failed else EXIT_OK

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0


@dataclass
class _SlideState:
    uri: str
    metadata: dict[str, Any]
    writer: SlideWriter | None = None
    tally: SlideTally = field(default_factory=SlideTally)
    n_tiles: int | None = None
    done: int = 0
    #: (row, col) of every tile taken: a tile row that comes again (a retried task whose
    #: first result also arrived) is dropped, so a slide commits on distinct tiles only.
    seen: set[tuple[int, int]] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    failed: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _metadata_columns(meta: dict[str, Any]) -> dict[str, Any]:
    reserved = set(schemas.load("slides").names)
    return {
        k: (None if v is None else str(v))
        for k, v in meta.items()
        if k not in reserved and k != "mpp"
    }


class RunLedger:
    """Per-slide state of one run; writes through ``store`` with the run's cells ``schema``."""

    def __init__(
        self,
        store: OutputStore,
        schema: pa.Schema,
        result: RunResult,
        config: Config,
        echo: Callable[[str], None],
        leases: LeaseBook | None = None,
    ) -> None:
        self.store = store
        self.leases = leases
        self.schema = schema
        self.result = result
        self.config = config
        self.echo = echo
        self.states: dict[str, _SlideState] = {}
        self.progress_seconds = PROGRESS_SECONDS
        self.t0 = time.time()
        self._cells = 0
        self._last_line = self.t0

    def start(self, slides: Iterable[SlideInput]) -> None:
        """Open the books of ``slides`` (nothing is written until their rows come back)."""
        self.t0 = self._last_line = time.time()
        self.result.timeline = [[0.0, 0, 0, 0, 0]]
        for s in slides:
            self.states[s.slide_id] = _SlideState(
                s.uri, s.metadata, tally=SlideTally(self.config.calls)
            )

    def consume(self, batch: dict[str, np.ndarray]) -> None:
        """Take one batch of finished tile rows: write cells, fail or commit slides."""
        for i in range(len(batch["kind"])):
            sid = str(batch["slide_id"][i])
            st = self.states[sid]
            if st.failed:
                continue
            if batch["slide_json"][i] and not st.info:
                st.info = json.loads(batch["slide_json"][i])
            error = batch_error(batch, i)
            if error is not None:
                self.fail(sid, error.stage or "run", error)
                continue
            st.n_tiles = int(batch["n_tiles"][i])
            if batch["kind"][i] == "tile":
                key = (int(batch["row"][i]), int(batch["col"][i]))
                if key in st.seen:
                    log.warning("slide %s: tile %s came twice; the repeat is dropped", sid, key)
                    continue
                st.seen.add(key)
                try:
                    cells = unpack(batch["cells"][i])
                    if st.writer is None:
                        st.writer = self.store.slide_writer(sid, self.schema)
                    st.writer.write(cells)  # conformed to the cells schema by the writer
                except Exception as e:
                    self.fail(sid, "write", e)
                    continue
                st.tally.add(cells)
                st.done += 1
                self.result.tiles += 1
                self._cells += cells.num_rows
            if st.done >= st.n_tiles:
                self.commit(sid)
        self.tick()

    def tick(self, *, final: bool = False) -> None:
        """Sample the timeline; print a progress line every `progress_seconds`."""
        now = time.time()
        r = self.result
        t = round(now - self.t0, 3)
        if final or not r.timeline or t - r.timeline[-1][0] >= TIMELINE_STEP:
            r.timeline.append([t, r.tiles, self._cells, len(r.committed), len(r.failed)])
        if self.leases is not None and self.leases.renew_due():
            for sid in self.leases.renew():
                self.echo(f"WARNING {sid}: its lease was lost; another run may process it too")
        if not final and now - self._last_line >= self.progress_seconds:
            self._last_line = now
            self.echo(progress_line(r, len(self.states), t))

    def commit(self, sid: str) -> None:
        """Publish slide ``sid``'s cells, then its slides row (only a cells write error fails it)."""
        st = self.states[sid]
        info = st.info
        try:
            writer = st.writer or self.store.slide_writer(sid, self.schema)
            summary = st.tally.summary(info.get("analysed_um2"))
            row = {
                "slide_id": sid, "slide_uri": st.uri, "status": "committed",
                **{k: info.get(k) for k in ("format", "width", "height", "levels", "mpp", "mpp_source", "level_used", "tiles_planned", "tiles_skipped")},
                "tiles_done": st.done, **summary,
                "started_at": datetime.fromtimestamp(st.started, UTC),
                "seconds": time.time() - st.started,
            }  # fmt: skip
            extra = _metadata_columns(st.metadata)
            writer.publish(row, extra)
        except Exception as e:
            self.fail(sid, "write", e)
            return
        # The cells file is the commit: from here the slide is committed whatever happens to
        # its row (a failed row write is kept in `unrecorded`; the next run repairs it).
        st.writer = None
        self._record(sid, "writing its slides row", lambda: self.store.write_slide_row(row, extra))
        self._release(sid)
        result = self.result
        result.committed.append(sid)
        for cls, n in st.tally.classes.items():
            result.cells_by_class[cls] = result.cells_by_class.get(cls, 0) + n
        for lab, n in st.tally.wbc_type.items():
            result.wbc_types[lab] = result.wbc_types.get(lab, 0) + n
        result.slide_calls[sid] = {k: summary[k] for k in SLIDE_CALL_KEYS}
        self.echo(
            f"committed {sid}: {st.done} tiles, {summary['n_rbc']} RBC, {summary['n_wbc']} WBC, "
            f"{summary['n_platelet']} platelets, call {summary['all_subtype_call']}"
        )

    def fail(self, sid: str, stage: str, error: BaseException) -> None:
        """Record slide ``sid`` as failed at ``stage``; drop anything staged for it.

        The slide is failed in the result whatever happens to the writes: a
        failures or slides row that cannot be written is logged and kept in
        ``result.unrecorded``, and the run goes on.
        """
        st = self.states[sid]
        st.failed = True
        type_name = error_type_name(error)
        self.result.failed[sid] = f"{type_name}: {error}"
        self.result.errors[sid] = error
        self.echo(f"FAILED {sid} at {stage}: {error}")
        if st.writer is not None:
            writer, st.writer = st.writer, None
            self._record(sid, "discarding its staged cells", writer.discard)
        tile = getattr(error, "tile", None) if isinstance(error, HemarayError) else None
        self._record(
            sid, "writing its failures row",
            lambda: self.store.write_failure(sid, st.uri, stage=stage, error=error, tile=tile),
        )  # fmt: skip
        info = st.info or {}
        row = {
            "slide_id": sid, "slide_uri": st.uri, "status": "failed", "error": str(error),
            **{k: info.get(k) for k in ("format", "width", "height", "levels", "mpp", "mpp_source")},
            "started_at": datetime.fromtimestamp(st.started, UTC),
            "seconds": time.time() - st.started,
        }  # fmt: skip
        self._record(
            sid, "writing its slides row",
            lambda: self.store.write_slide_row(row, _metadata_columns(st.metadata)),
        )  # fmt: skip
        self._release(sid)

    def _release(self, sid: str) -> None:
        if self.leases is not None:
            self.leases.release(sid)

    def _record(self, sid: str, what: str, write: Callable[[], Any]) -> None:
        """Run one bookkeeping write; a failure is logged and kept, never raised."""
        try:
            write()
        except Exception as e:
            message = f"{what} failed ({type(e).__name__}: {e})"
            previous = self.result.unrecorded.get(sid)
            self.result.unrecorded[sid] = f"{previous}; {message}" if previous else message
            log.error("slide %s: %s", sid, message)
            self.echo(f"WARNING {sid}: {message}")

    def finish(self, cause: BaseException | None = None) -> None:
        """Fail the slides that never completed (only when the dataset was cut short).

        ``cause`` is why it was cut short (e.g. a worker that crashed more often
        than its retry budget allows); each unfinished slide's failure records it.
        """
        for sid, st in self.states.items():
            if not st.failed and sid not in self.result.committed:
                why = f": {type(cause).__name__}: {cause}" if cause is not None else ""
                err = RuntimeError(
                    f"slide returned {st.done} of {st.n_tiles} tiles; the run ended early{why}"
                )
                self.fail(sid, "run", err)
        self.tick(final=True)
        self.result.timeline = thin(self.result.timeline, TIMELINE_POINTS)


def thin(points: list[list[float]], n: int) -> list[list[float]]:
    """At most ``n`` of ``points``, evenly spaced, keeping the first and the last."""
    if len(points) <= n:
        return points
    keep = np.unique(np.linspace(0, len(points) - 1, n).round().astype(int))
    return [points[i] for i in keep]


def progress_line(result: RunResult, n_slides: int, seconds: float) -> str:
    """``progress: T s, N tiles (R tiles/s), slides C committed + F failed of S``."""
    rate = result.tiles / seconds if seconds > 0 else 0.0
    return (
        f"progress: {seconds:.0f} s, {result.tiles} tiles ({rate:.2f} tiles/s), slides "
        f"{len(result.committed)} committed + {len(result.failed)} failed of {n_slides}"
    )


#: The slides-row figures the end-of-run summary shows per slide.
SLIDE_CALL_KEYS = (
    "n_wbc_counted", "wbc_differential", "n_blasts", "blast_fraction", "blast_fraction_low",
    "blast_fraction_high", "all_subtype_call", "all_subtype_share", "all_subtype_n",
)  # fmt: skip
#: Slides listed one per line in the summary; more are counted, not listed.
SUMMARY_SLIDES = 20


def slide_call_line(sid: str, calls: dict[str, Any]) -> str:
    """One slide's differential, blast fraction with its interval, and ALL call, on one line."""
    diff = json.loads(calls.get("wbc_differential") or "{}")
    top = ", ".join(
        f"{k} {v:.0%}" for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v >= 0.005
    )
    n = calls.get("n_wbc_counted") or 0
    text = f"  {sid}: {n} leukocytes ({top or 'no differential'})"
    if calls.get("blast_fraction") is not None:
        text += (
            f"; blasts {calls['blast_fraction']:.1%} "
            f"[{calls['blast_fraction_low']:.1%}, {calls['blast_fraction_high']:.1%}]"
        )
    call = calls.get("all_subtype_call")
    text += f"; call {call}"
    if calls.get("all_subtype_share") is not None:
        text += f" ({calls['all_subtype_share']:.0%} of {calls['all_subtype_n']} blasts)"
    return text


def summary_lines(result: RunResult) -> Iterable[str]:
    """The end-of-run table people read."""
    leased = f", {len(result.leased)} held by another run" if result.leased else ""
    yield f"run {result.run_id}: {len(result.committed)} committed, {len(result.skipped)} skipped{leased}, {len(result.failed)} failed"
    for sid, msg in result.failed.items():
        yield f"  failed {sid}: {msg}"
    total = sum(result.cells_by_class.values())
    yield f"cells: {total} ({', '.join(f'{k} {v}' for k, v in sorted(result.cells_by_class.items()))})"
    n_wbc = sum(result.wbc_types.values())
    if n_wbc:
        diff = ", ".join(
            f"{k} {v / n_wbc:.0%}"
            for k, v in sorted(result.wbc_types.items(), key=lambda kv: -kv[1])
        )
        yield f"WBC differential (counted leukocytes, all slides): {diff}"
    slides = sorted(result.slide_calls.items())
    if slides:
        yield "per slide: counted leukocytes (differential); blast fraction [95% CI]; ALL call"
    for sid, calls in slides[:SUMMARY_SLIDES]:
        yield slide_call_line(sid, calls)
    if len(slides) > SUMMARY_SLIDES:
        yield f"  ... and {len(slides) - SUMMARY_SLIDES} more slides (hemaray report OUT)"
    yield from table_lines(result.telemetry)
    yield f"tiles: {result.tiles} in {result.seconds:.1f} s ({result.tiles_per_s:.2f} tiles/s)"
    yield f"output: {result.out} (cells/, slides/, failures/, manifest {result.manifest_uri})"
