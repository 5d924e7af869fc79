"""Per-slide (or per-image) calls from per-cell rows.

One piece of code aggregates cells into the ``slides`` table's counts,
WBC differential, ALL-subtype distribution, dominant call, blast fraction
and platelet estimate; ``hemaray run`` and ``hemaray eval images`` both use it,
so a folder of images run through the pipeline gets exactly the per-image
calls the evaluation scores.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batch.config import CallsConfig

__all__ = ["SlideTally", "BLAST_LABELS", "OIL_FIELD_UM2", "counted_wbcs"]

#: all_subtype labels counted as blasts (everything but benign hematogones).
BLAST_LABELS = frozenset({"early_pre_b", "pre_b", "pro_b"})
#: Area of one 100x oil-immersion field (diameter ~0.18 mm; ~1/15,000 uL of blood).
OIL_FIELD_UM2 = 3.1416 * 90.0**2
#: Detector classes, in the order of the slides table's count columns.
COUNT_COLUMNS = {"RBC": "n_rbc", "WBC": "n_wbc", "platelet": "n_platelet"}


def counted_wbcs(cells: pa.Table, gate: CallsConfig) -> npt.NDArray[np.bool_]:
    """Rows that vote in the calls: WBCs passing ``gate`` (a missing figure fails it)."""

    def at_least(col: str, floor: float) -> npt.NDArray[np.bool_]:
        if floor <= 0:
            return np.ones(cells.num_rows, bool)
        if col not in cells.column_names:
            return np.zeros(cells.num_rows, bool)
        v = cells.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.asarray(np.nan_to_num(v, nan=-np.inf) >= floor)

    is_wbc = pc.equal(cells.column("det_class"), "WBC").fill_null(False).to_numpy()
    return np.asarray(
        is_wbc
        & at_least("det_confidence", gate.min_wbc_confidence)
        & at_least("nucleus_area_um2", gate.min_nucleus_um2)
        & at_least("nucleus_mean_a", gate.min_nucleus_a)
    )


@dataclass
class SlideTally:
    """Running counts over one slide's cell rows (feed it batches; ask for the summary).

    Every detection counts in the class counts; only WBCs passing ``gate``
    (`counted_wbcs`) count in the WBC differential and the ALL-subtype vote.
    """

    gate: CallsConfig = field(default_factory=CallsConfig)
    classes: Counter[str] = field(default_factory=Counter)
    wbc_type: Counter[str] = field(default_factory=Counter)
    all_subtype: Counter[str] = field(default_factory=Counter)
    wbc_counted: int = 0

    def add(self, cells: pa.Table) -> None:
        if cells.num_rows == 0:
            return
        self.classes.update(cells.column("det_class").to_pylist())
        counted = cells.filter(pa.array(counted_wbcs(cells, self.gate)))
        self.wbc_counted += counted.num_rows
        for name, counter in (("wbc_type", self.wbc_type), ("all_subtype", self.all_subtype)):
            col = f"{name}_label"
            if col in counted.column_names:
                counter.update(v for v in counted.column(col).to_pylist() if v is not None)

    @staticmethod
    def _fractions(counter: Counter[str]) -> dict[str, float]:
        total = sum(counter.values())
        return {k: round(v / total, 6) for k, v in sorted(counter.items())} if total else {}

    def summary(self, analysed_um2: float | None = None) -> dict[str, Any]:
        """The slides-table figures for this tally.

        ``analysed_um2`` (the area of the tiles processed) gives the platelet
        estimate per oil field; without it that figure is null.
        """
        out: dict[str, Any] = {col: int(self.classes.get(cls, 0)) for cls, col in COUNT_COLUMNS.items()}
        sub = self.all_subtype
        n_sub = sum(sub.values())
        call, share = (None, None)
        if n_sub:
            # Ties break by label name so the call is deterministic.
            call, top = min(sub.items(), key=lambda kv: (-kv[1], kv[0]))
            share = top / n_sub
        out.update(
            n_wbc_counted=self.wbc_counted,
            wbc_differential=json.dumps(self._fractions(self.wbc_type)) if self.wbc_type else None,
            all_subtype_distribution=json.dumps(self._fractions(sub)) if n_sub else None,
            all_subtype_call=call,
            all_subtype_share=share,
            blast_fraction=(sum(v for k, v in sub.items() if k in BLAST_LABELS) / n_sub) if n_sub else None,
            platelets_per_field=(
                out["n_platelet"] * OIL_FIELD_UM2 / analysed_um2 if analysed_um2 else None
            ),
        )
        return out
