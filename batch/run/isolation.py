"""Per-tile fault isolation: a stage's failure costs the tiles it failed on, never the batch.

`by_tile` runs a model over a batch's rows and, when the batch call raises,
finds the rows that fail alone; `batch_guard` fails every tile row of a batch
whose whole-batch step raised. Failed rows carry their typed error
(`batch.run.columns.set_error`) to the driver, which writes them as that
slide's failures row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batch.run.columns import Batch, object_array, set_error

__all__ = ["batch_guard", "by_tile"]


def by_tile(
    batch: Batch, rows: list[int], stage: str, run: Callable[[list[int], frozenset[int]], list[Any]]
) -> dict[int, Any]:
    """``run`` over ``rows`` at once; if that raises, find and fail the rows that fail alone.

    ``run(rows, blank)`` returns one result per row; rows in ``blank`` get a
    placeholder input and their results are dropped. After a failure the
    batch is run again with the failing rows blanked, so the others are
    computed in a batch of the size a clean run had (on CPU a warm detector's
    boxes were measured identical batched and alone, but GPU kernels may pick
    other algorithms by batch size); if that fails too, the rows' results from
    their single-row runs are used.
    """
    if not rows:
        return {}
    none: frozenset[int] = frozenset()
    try:
        return dict(zip(rows, run(rows, none), strict=True))
    except Exception:
        alone: dict[int, Any] = {}
        for i in rows:
            try:
                alone[i] = run([i], none)[0]
            except Exception as e:  # this tile's slide fails; the batch's other tiles go on
                set_error(batch, i, stage, e)
        failed = frozenset(rows) - alone.keys()
        if not failed or not alone:
            return alone
        try:
            results = run(rows, failed)
        except Exception:
            return alone
        return {i: r for i, r in zip(rows, results, strict=True) if i not in failed}


def batch_guard(
    stage: str, batch: Batch, call: Callable[[Batch], Batch], *, drop: tuple[str, ...],
    add: tuple[str, ...],
) -> Batch:  # fmt: skip
    """``call(batch)``; if it raises, every tile row of the batch fails at ``stage``.

    The failed batch leaves with the columns the stage would have left it
    with (``drop`` removed, ``add`` present), so batches still concatenate.
    """
    try:
        return call(batch)
    except Exception as e:
        for i, kind in enumerate(batch["kind"]):
            if kind == "tile":
                set_error(batch, i, stage, e)
        n = len(batch["kind"])
        out = {k: v for k, v in batch.items() if k not in drop}
        for name in add:
            if name not in out:
                out[name] = object_array([b""] * n)
        return out
