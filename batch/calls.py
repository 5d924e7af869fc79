"""Per-slide (or per-image) calls from per-cell rows.

One piece of code aggregates cells into the ``slides`` table's counts, WBC
differential, blast fraction, ALL call and platelet estimate; ``hemaray run``
and ``hemaray eval images`` both use it, so a folder of images run through the
pipeline gets exactly the per-image calls the evaluation scores.

The taxonomy (`batch.config.CallsConfig`): a detector WBC that passes the
gates (confidence, a purple nucleus) is *counted* unless the type classifier
calls it a non-leukocyte (``other`` artefacts, ``platelet`` clumps,
``erythroblast``). The differential is over the counted leukocytes; the blast
fraction is blasts / counted leukocytes with a 95 % Wilson interval; the ALL
call is the dominant subtype among the subtyped blasts, made only when the
blast fraction reaches ``calls.min_blast_fraction`` (0.20, the WHO threshold)
and otherwise ``none``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batch.config import CallsConfig

__all__ = [
    "SlideTally",
    "LEGACY_BLAST_SUBTYPES",
    "NO_ALL_CALL",
    "OIL_FIELD_UM2",
    "Z95",
    "counted_wbcs",
    "wilson_interval",
]

#: The call of a slide whose blasts stay under ``calls.min_blast_fraction``.
NO_ALL_CALL = "none"
#: all_subtype labels counted as blasts when no type classifier ran (older configs).
LEGACY_BLAST_SUBTYPES = frozenset({"early_pre_b", "pre_b", "pro_b"})
#: Area of one 100x oil-immersion field (diameter ~0.18 mm; ~1/15,000 uL of blood).
OIL_FIELD_UM2 = 3.1416 * 90.0**2
#: Detector classes, in the order of the slides table's count columns.
COUNT_COLUMNS = {"RBC": "n_rbc", "WBC": "n_wbc", "platelet": "n_platelet"}
#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (NaN, NaN when n == 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def counted_wbcs(cells: pa.Table, gate: CallsConfig) -> npt.NDArray[np.bool_]:
    """Rows that vote in the calls: WBCs passing ``gate`` (a missing figure fails it).

    Rows the type classifier calls a non-leukocyte (``gate.not_leukocytes``) do not vote.
    """
    gated, excluded = _gate_masks(cells, gate)
    return np.asarray(gated & ~excluded)


def _gate_masks(
    cells: pa.Table, gate: CallsConfig
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """WBCs passing the confidence and nucleus gates; rows typed a non-leukocyte."""

    def at_least(col: str, floor: float) -> npt.NDArray[np.bool_]:
        if floor <= 0:
            return np.ones(cells.num_rows, bool)
        if col not in cells.column_names:
            return np.zeros(cells.num_rows, bool)
        v = cells.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.asarray(np.nan_to_num(v, nan=-np.inf) >= floor)

    is_wbc = pc.equal(cells.column("det_class"), "WBC").fill_null(False).to_numpy()
    gated = (
        is_wbc
        & at_least("det_confidence", gate.min_wbc_confidence)
        & at_least("nucleus_area_um2", gate.min_nucleus_um2)
        & at_least("nucleus_mean_a", gate.min_nucleus_a)
    )
    excluded = np.zeros(cells.num_rows, bool)
    type_col = f"{gate.type_classifier}_label"
    if gate.not_leukocytes and type_col in cells.column_names:
        hit = pc.is_in(cells.column(type_col), pa.array(gate.not_leukocytes, pa.string()))
        excluded = np.asarray(hit.fill_null(False).to_numpy(zero_copy_only=False))
    return np.asarray(gated), excluded


def _share(k: int, n: int) -> dict[str, Any]:
    """``k`` of ``n`` as a share with its 95 % Wilson interval (all None when n == 0)."""
    if n == 0:
        return {"share": None, "low": None, "high": None}
    low, high = wilson_interval(k, n)
    return {"share": k / n, "low": low, "high": high}


@dataclass
class SlideTally:
    """Running counts over one slide's cell rows (feed it batches; ask for the summary).

    Every detection counts in the class counts; only counted WBCs
    (`counted_wbcs`) count in the differential, the blast fraction and the call.
    """

    gate: CallsConfig = field(default_factory=CallsConfig)
    classes: Counter[str] = field(default_factory=Counter)
    wbc_type: Counter[str] = field(default_factory=Counter)
    all_subtype: Counter[str] = field(default_factory=Counter)
    wbc_counted: int = 0
    wbc_excluded: int = 0
    blasts: int = 0
    typed: bool = False

    def add(self, cells: pa.Table) -> None:
        if cells.num_rows == 0:
            return
        g = self.gate
        self.classes.update(cells.column("det_class").to_pylist())
        gated, excluded = _gate_masks(cells, g)
        type_col, sub_col = f"{g.type_classifier}_label", f"{g.subtype_classifier}_label"
        counted = cells.filter(pa.array(gated & ~excluded))
        self.wbc_counted += counted.num_rows
        if type_col in cells.column_names:
            self.typed = True
            self.wbc_excluded += int((gated & excluded).sum())
            types = [v for v in counted.column(type_col).to_pylist() if v is not None]
            self.wbc_type.update(types)
            self.blasts += sum(t in g.blast_labels for t in types)
        if sub_col in counted.column_names:
            subs = [v for v in counted.column(sub_col).to_pylist() if v is not None]
            self.all_subtype.update(subs)
            if not self.typed:  # no type classifier: blasts are the non-benign subtype calls
                self.blasts += sum(s in LEGACY_BLAST_SUBTYPES for s in subs)

    @staticmethod
    def _fractions(counter: Counter[str]) -> dict[str, float]:
        total = sum(counter.values())
        return {k: round(v / total, 6) for k, v in sorted(counter.items())} if total else {}

    def summary(self, analysed_um2: float | None = None) -> dict[str, Any]:
        """The slides-table figures for this tally.

        ``analysed_um2`` (the area of the tiles processed) gives the platelet
        estimate per oil field; without it that figure is null.
        """
        out: dict[str, Any] = {
            col: int(self.classes.get(cls, 0)) for cls, col in COUNT_COLUMNS.items()
        }
        sub = self.all_subtype
        n_sub = sum(sub.values())
        # Blasts over the counted leukocytes; without a type classifier, over the subtyped cells.
        n_base = self.wbc_counted if self.typed else n_sub
        blast = _share(self.blasts, n_base)
        dominant, n_dom = (None, 0)
        if n_sub:  # ties break by label name so the call is deterministic
            dominant, n_dom = min(sub.items(), key=lambda kv: (-kv[1], kv[0]))
        call = dominant
        if blast["share"] is not None and blast["share"] < self.gate.min_blast_fraction:
            call = NO_ALL_CALL
        call_share = _share(n_dom, n_sub) if call not in (None, NO_ALL_CALL) else _share(0, 0)
        out.update(
            n_wbc_counted=self.wbc_counted,
            n_wbc_excluded=self.wbc_excluded if self.typed else None,
            wbc_differential=json.dumps(self._fractions(self.wbc_type)) if self.wbc_type else None,
            all_subtype_distribution=json.dumps(self._fractions(sub)) if n_sub else None,
            all_subtype_call=call,
            all_subtype_share=call_share["share"],
            all_subtype_share_low=call_share["low"],
            all_subtype_share_high=call_share["high"],
            all_subtype_n=n_sub if call not in (None, NO_ALL_CALL) else None,
            n_blasts=self.blasts if n_base else None,
            blast_fraction=blast["share"],
            blast_fraction_low=blast["low"],
            blast_fraction_high=blast["high"],
            platelets_per_field=(
                out["n_platelet"] * OIL_FIELD_UM2 / analysed_um2 if analysed_um2 else None
            ),
        )
        return out
