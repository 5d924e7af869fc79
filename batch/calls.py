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

import pyarrow as pa

__all__ = ["SlideTally", "BLAST_LABELS", "OIL_FIELD_UM2"]

#: all_subtype labels counted as blasts (everything but benign hematogones).
BLAST_LABELS = frozenset({"early_pre_b", "pre_b", "pro_b"})
#: Area of one 100x oil-immersion field (diameter ~0.18 mm; MORPHOLOGY.md: ~1/15,000 uL).
OIL_FIELD_UM2 = 3.1416 * 90.0**2
#: Detector classes, in the order of the slides table's count columns.
COUNT_COLUMNS = {"RBC": "n_rbc", "WBC": "n_wbc", "platelet": "n_platelet"}


@dataclass
class SlideTally:
    """Running counts over one slide's cell rows (feed it batches; ask for the summary)."""

    classes: Counter[str] = field(default_factory=Counter)
    wbc_type: Counter[str] = field(default_factory=Counter)
    all_subtype: Counter[str] = field(default_factory=Counter)

    def add(self, cells: pa.Table) -> None:
        if cells.num_rows == 0:
            return
        self.classes.update(cells.column("det_class").to_pylist())
        for name, counter in (("wbc_type", self.wbc_type), ("all_subtype", self.all_subtype)):
            col = f"{name}_label"
            if col in cells.column_names:
                counter.update(v for v in cells.column(col).to_pylist() if v is not None)

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
