"""``bench_placement``: detector actors x threads per inference runtime, as a CPU run places them.

A run on a CPU-only node starts detector actors (`batch.run.pipeline`: one per
core by default) and each runs its runtime on some threads
(``detect.runtime_threads``). This bench times the detector stage alone under
such placements: for each ``(actors, threads)`` it starts ``actors`` processes,
each loading the detector in ``runtime`` with ``threads`` threads (0: the
runtime's default, every core), splits the same decoded tiles between them in
batches, releases them together and takes tiles over the wall time from the
first start to the last finish. Placements alternate within each round (a
slow spell of a shared machine hits all of them); each keeps its best.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

__all__ = ["bench_placement"]

#: Rounds: every placement once per round, alternating; best of each.
BENCH_PLACEMENT_ROUNDS = 2
#: Placements timed by default: (actors, threads per actor; 0 = the runtime's default).
DEFAULT_PLACEMENTS: tuple[tuple[int, int], ...] = ((2, 1), (2, 0), (1, 0))


def _actor(
    runtime: str, threads: int, tiles_file: str, share: list[int], batch_size: int,
    ready: Any, go: Any, out: Any,
) -> None:  # fmt: skip
    import numpy as np
    import torch

    from batch.stages.detect import CellDetector

    if threads:
        torch.set_num_threads(threads)
    tiles = np.load(tiles_file)
    detector = CellDetector(device="cpu", runtime=runtime, threads=threads, batch_size=batch_size)
    mine = [tiles[i] for i in share]
    detector.detect(mine[:batch_size])  # warm-up
    ready.wait()
    go.wait()
    t0 = time.perf_counter()
    detector.detect(mine)
    out.put((t0, time.perf_counter()))


def bench_placement(
    *,
    runtime: str = "openvino",
    placements: tuple[tuple[int, int], ...] = DEFAULT_PLACEMENTS,
    width: int = 4096,
    height: int = 4096,
    seed: int = 0,
    max_tiles: int = 48,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Detector-stage tiles/s of ``runtime`` per ``(actors, threads)`` placement.

    Returns
    -------
    dict
        ``<actors>x<threads>_tiles_per_s`` (threads 0 written ``default``) and
        ``..._seconds_each`` per placement, ``best``, ``runtime``, ``tiles``,
        ``cpu_count``.
    """
    import os

    import numpy as np

    from batch.config import Config
    from batch.models import DEFAULT_DETECTOR, read_model_card
    from batch.run.columns import rows_to_batch
    from batch.run.tasks import PlanStage, read_tiles
    from batch.stages.runtime import exported_model
    from batch.synth import synth_slides

    config = Config()
    batch_size = config.detect.batch_size
    with ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hemaray-benchpl-"))
        work = Path(workdir)
        (slide,) = synth_slides(work, slides=1, width=width, height=height, seed=seed)
        card = read_model_card(DEFAULT_DETECTOR)
        rows = PlanStage(config, card.trained_mpp if card else None)(
            {"slide_id": slide.stem, "slide_uri": str(slide)}
        )[:max_tiles]
        batch = read_tiles(rows_to_batch(rows), config)
        tiles_file = work / "tiles.npy"
        np.save(tiles_file, np.stack([batch["image"][i] for i in range(len(rows))]))
        exported_model(DEFAULT_DETECTOR, runtime)  # export (first use only) before timing
        ctx = multiprocessing.get_context("spawn")
        seconds: dict[str, list[float]] = {}
        for _ in range(BENCH_PLACEMENT_ROUNDS):
            for actors, threads in placements:
                name = f"{actors}x{threads or 'default'}"
                starts = list(range(0, len(rows), batch_size))
                shares = [
                    [i for s in starts[a::actors] for i in range(s, min(s + batch_size, len(rows)))]
                    for a in range(actors)
                ]
                ready, go, out = ctx.Barrier(actors + 1), ctx.Barrier(actors + 1), ctx.Queue()
                procs = [
                    ctx.Process(
                        target=_actor,
                        args=(runtime, threads, str(tiles_file), share, batch_size, ready, go, out),
                    )
                    for share in shares
                ]
                for p in procs:
                    p.start()
                ready.wait()  # every actor loaded and warmed up
                go.wait()
                times = [out.get() for _ in procs]
                for p in procs:
                    p.join()
                    if p.exitcode != 0:
                        raise RuntimeError(f"placement {name}: an actor exited {p.exitcode}")
                wall = max(t[1] for t in times) - min(t[0] for t in times)
                seconds.setdefault(name, []).append(wall)
        result: dict[str, Any] = {}
        for name, each in seconds.items():
            result[f"{name}_tiles_per_s"] = round(len(rows) / min(each), 3)
            result[f"{name}_seconds_each"] = [round(x, 3) for x in each]
        best = max(seconds, key=lambda n: len(rows) / min(seconds[n]))
        result.update(best=best, runtime=runtime, tiles=len(rows), cpu_count=os.cpu_count())
        return result
