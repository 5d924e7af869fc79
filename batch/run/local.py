"""The Ray-free runner: a run's per-tile stages chained in this process.

`chain_cells` plans each image or slide and sends its tiles through the very
callables the pipeline places on Ray (`batch.run.tasks.plan_slide` and
`CellStage`), in batches of `CHUNK` tiles. The evaluations use it, so what
they score is what ``hemaray run`` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.config import Config
from batch.errors import error_type_name
from batch.ids import slide_id_for
from batch.run.columns import batch_error, rows_to_batch, unpack
from batch.run.provenance import trained_mpp
from batch.run.tasks import CellStage, plan_slide

__all__ = ["CHUNK", "chain_cells"]

log = logging.getLogger(__name__)

#: Tiles per stage call.
CHUNK = 16


def chain_cells(
    paths: list[Path], config: Config, *, progress: Callable[[int, int], None] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """Run the chain over every tile of each image or slide; yield ``(path, cells of one tile)``.

    A slide or tile that fails gets no cells (as a run's failures do) and a
    warning naming the typed error.
    """
    detector_mpp, _ = trained_mpp(config)
    chain = CellStage(config, read=True)
    rows: list[dict[str, Any]] = []
    for p in paths:
        rows.extend(
            plan_slide({"slide_id": slide_id_for(str(p)), "slide_uri": str(p)}, config, detector_mpp)
        )
    done = 0
    for start in range(0, len(rows), CHUNK):
        batch = chain(rows_to_batch(rows[start : start + CHUNK]))
        for i, kind in enumerate(batch["kind"]):
            error = batch_error(batch, i)
            if error is not None:
                log.warning(
                    "%s: %s at %s: %s",
                    batch["slide_uri"][i], error_type_name(error), error.stage, error,
                )  # fmt: skip
            if kind == "tile" and batch["cells"][i]:
                yield str(batch["slide_uri"][i]), unpack(batch["cells"][i])
        done += len(batch["kind"])
        if progress:
            progress(done, len(rows))
