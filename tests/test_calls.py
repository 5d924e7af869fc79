"""Per-slide calls: which WBCs vote, the blast fraction and the ALL call, worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from batch.calls import NO_ALL_CALL, SlideTally, counted_wbcs, wilson_interval
from batch.config import CallsConfig, ClassifierSpec, Config
from batch.errors import ConfigError
from batch.stages.hierarchy import ChainLink, classify_chain

# Seven rows: a clear blast, a WBC the detector is unsure of, a "WBC" with a pale (red-cell)
# centre, a WBC whose segmentation found no nucleus, an RBC, an artefact the type classifier
# calls "other", and a second blast.
CELLS = pa.table(
    {
        "det_class": ["WBC", "WBC", "WBC", "WBC", "RBC", "WBC", "WBC"],
        "det_confidence": pa.array([0.9, 0.3, 0.8, 0.95, 0.99, 0.9, 0.85], pa.float32()),
        "nucleus_area_um2": [40.0, 35.0, 30.0, None, None, 40.0, 38.0],
        "nucleus_mean_a": [35.0, 30.0, 8.0, None, None, 40.0, 33.0],
        "wbc_type_label": ["blast", "lymphocyte", "neutrophil", "monocyte", None, "other", "blast"],
        "all_subtype_label": ["pro_b", None, None, None, None, None, "pre_b"],
    }
)


def test_only_real_leukocytes_vote() -> None:
    # Default: a purple nucleus of at least 15 um^2, and not an artefact of the type classifier.
    assert counted_wbcs(CELLS, CallsConfig()).tolist() == [1, 1, 0, 0, 0, 0, 1]
    sure = CallsConfig(min_wbc_confidence=0.6)
    assert counted_wbcs(CELLS, sure).tolist() == [1, 0, 0, 0, 0, 0, 1]
    everyone = CallsConfig(
        min_wbc_confidence=0, min_nucleus_um2=0, min_nucleus_a=0, not_leukocytes=[]
    )
    assert counted_wbcs(CELLS, everyone).tolist() == [1, 1, 1, 1, 0, 1, 1]


def test_blast_fraction_interval_and_call() -> None:
    tally = SlideTally(CallsConfig())
    tally.add(CELLS.slice(0, 4))  # batches add up
    tally.add(CELLS.slice(4))
    s = tally.summary()
    assert (s["n_wbc"], s["n_rbc"], s["n_wbc_counted"], s["n_wbc_excluded"]) == (6, 1, 3, 1)
    assert json.loads(s["wbc_differential"]) == {"blast": 0.666667, "lymphocyte": 0.333333}
    assert s["n_blasts"] == 2 and s["blast_fraction"] == pytest.approx(2 / 3)
    assert (s["blast_fraction_low"], s["blast_fraction_high"]) == pytest.approx(
        wilson_interval(2, 3)
    )
    # Two subtyped blasts, one vote each: the tie breaks by label name.
    assert s["all_subtype_call"] == "pre_b" and s["all_subtype_share"] == 0.5
    assert s["all_subtype_n"] == 2
    assert s["all_subtype_share_low"] < 0.5 < s["all_subtype_share_high"]

    # Under the WHO threshold there is no ALL call, whatever the subtypes say.
    high_bar = SlideTally(CallsConfig(min_blast_fraction=0.7))
    high_bar.add(CELLS)
    s = high_bar.summary()
    assert s["all_subtype_call"] == NO_ALL_CALL and s["blast_fraction"] == pytest.approx(2 / 3)
    assert s["all_subtype_share"] is None and s["all_subtype_n"] is None


def test_blood_without_blasts_is_called_none_and_empty_slides_get_no_call() -> None:
    normal = CELLS.filter(pa.array([False, True, False, False, True, False, False]))
    tally = SlideTally(CallsConfig())
    tally.add(normal)
    s = tally.summary()
    assert s["n_wbc_counted"] == 1 and s["blast_fraction"] == 0.0
    assert s["all_subtype_call"] == NO_ALL_CALL
    empty = SlideTally(CallsConfig()).summary()
    assert empty["all_subtype_call"] is None and empty["blast_fraction"] is None


def test_without_a_type_classifier_blasts_are_the_non_benign_subtypes() -> None:
    legacy = CELLS.drop(["wbc_type_label"])
    legacy = legacy.set_column(
        legacy.schema.get_field_index("all_subtype_label"),
        "all_subtype_label",
        pa.array(["pro_b", "benign", None, None, None, "benign", "pre_b"]),
    )
    tally = SlideTally(CallsConfig())
    tally.add(legacy)
    s = tally.summary()
    # counted: rows 0, 1, 5, 6 (no type label to exclude the artefact); 2 of 4 subtyped are blasts
    assert s["n_wbc_counted"] == 4 and s["n_wbc_excluded"] is None
    assert s["blast_fraction"] == 0.5 and s["all_subtype_call"] == "benign"


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


class _Fixed:
    """A classifier stand-in that labels crops by their first pixel and counts its calls."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seen: list[int] = []
        self.mpp: list[float | None] = []

    def classify(self, crops, masks=None, mpp=None):  # type: ignore[no-untyped-def]
        idx = [int(c[0, 0, 0]) % len(self.names) for c in crops]
        self.seen += [int(c[0, 0, 0]) for c in crops]
        self.mpp += list(mpp) if mpp is not None else [None] * len(crops)
        probs = np.eye(len(self.names), dtype=np.float32)[idx]
        return [self.names[i] for i in idx], probs.max(axis=1), probs


def test_chain_runs_children_only_on_their_parent_labels() -> None:
    crops = [np.full((4, 4, 3), v, np.uint8) for v in range(5)]
    types = _Fixed(["blast", "lymphocyte", "neutrophil"])
    subtypes = _Fixed(["early_pre_b", "pre_b"])
    out = classify_chain(
        [ChainLink("wbc_type", types), ChainLink("all_subtype", subtypes, "wbc_type", ("blast",))],
        crops,
        mpp=[0.25, 0.25, 0.25, 0.4, 0.4],  # two slides' crops at their own mpp
    )
    assert out[0][0] == ["blast", "lymphocyte", "neutrophil", "blast", "lymphocyte"]
    assert subtypes.seen == [0, 3]  # only the two blasts reach the subtype classifier
    assert types.mpp == [0.25, 0.25, 0.25, 0.4, 0.4] and subtypes.mpp == [0.25, 0.4]
    labels, conf, probs = out[1]
    assert labels == ["early_pre_b", None, None, "pre_b", None]
    assert np.isnan(conf[[1, 2, 4]]).all() and probs[1] is None and probs[3] is not None


def test_config_checks_the_hierarchy() -> None:
    Config().validate()  # the default chain: wbc_type -> all_subtype on blasts
    orphan = Config(
        classifiers=[ClassifierSpec("all_subtype", parent="wbc_type", parent_labels=["blast"])]
    )
    with pytest.raises(ConfigError, match="earlier classifier"):
        orphan.validate()
    with pytest.raises(ConfigError, match="go together"):
        ClassifierSpec("x", parent="wbc_type").validate()
