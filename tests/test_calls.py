"""Per-slide calls: which WBCs vote, worked out by hand on a small cells table."""

from __future__ import annotations

import json

import pyarrow as pa

from batch.calls import SlideTally, counted_wbcs
from batch.config import CallsConfig

# Five rows: a clear blast, a WBC the detector is unsure of, a "WBC" with a pale (red-cell)
# centre, a WBC whose segmentation found no nucleus, and an RBC.
CELLS = pa.table(
    {
        "det_class": ["WBC", "WBC", "WBC", "WBC", "RBC"],
        "det_confidence": pa.array([0.9, 0.3, 0.8, 0.95, 0.99], pa.float32()),
        "nucleus_area_um2": [40.0, 35.0, 30.0, None, None],
        "nucleus_mean_a": [35.0, 30.0, 8.0, None, None],
        "all_subtype_label": ["pro_b", "pre_b", "benign", "benign", None],
        "wbc_type_label": ["lymphocyte", "lymphocyte", "neutrophil", "monocyte", None],
    }
)


def test_only_real_wbcs_vote() -> None:
    # Default: a purple nucleus of at least 15 um^2, whatever the detector's confidence.
    assert counted_wbcs(CELLS, CallsConfig()).tolist() == [True, True, False, False, False]
    sure = CallsConfig(min_wbc_confidence=0.6)
    assert counted_wbcs(CELLS, sure).tolist() == [True, False, False, False, False]
    everyone = CallsConfig(min_wbc_confidence=0, min_nucleus_um2=0, min_nucleus_a=0)
    assert counted_wbcs(CELLS, everyone).tolist() == [True, True, True, True, False]


def test_tally_counts_every_cell_but_calls_from_counted_wbcs() -> None:
    tally = SlideTally(CallsConfig(min_wbc_confidence=0.6))
    tally.add(CELLS)
    s = tally.summary()
    assert (s["n_wbc"], s["n_rbc"], s["n_wbc_counted"]) == (4, 1, 1)
    assert s["all_subtype_call"] == "pro_b" and s["all_subtype_share"] == 1.0
    assert s["blast_fraction"] == 1.0
    assert json.loads(s["wbc_differential"]) == {"lymphocyte": 1.0}

    # Default gate: two blasts vote (a tie, broken by label name).
    tally = SlideTally(CallsConfig())
    tally.add(CELLS)
    s = tally.summary()
    assert s["n_wbc_counted"] == 2
    assert s["all_subtype_call"] == "pre_b" and s["all_subtype_share"] == 0.5
    assert s["blast_fraction"] == 1.0

    # Ungated, the two benign votes of the false and nucleus-less WBCs win the call.
    loose = SlideTally(CallsConfig(min_wbc_confidence=0, min_nucleus_um2=0, min_nucleus_a=0))
    loose.add(CELLS)
    s = loose.summary()
    assert s["n_wbc_counted"] == 4
    assert s["all_subtype_call"] == "benign" and s["all_subtype_share"] == 0.5
    assert s["blast_fraction"] == 0.5
