"""Scoring code on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batch.eval.metrics import dice, iou, macro_f1
from batch.eval.run import evaluate_run, match_boxes


def _boxes(rows: list[tuple[str, str, float, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["slide_id", "cls", "x0", "y0", "x1", "y1"])


def test_match_boxes_is_one_to_one_and_greedy_by_iou() -> None:
    truth = _boxes([("s", "WBC", 0, 0, 10, 10)])
    # Two predictions on one true box: IoU 1.0 and IoU 81/100 -> only the better one matches.
    pred = _boxes([("s", "WBC", 1, 1, 10, 10), ("s", "WBC", 0, 0, 10, 10)])
    mp, mt = match_boxes(pred, truth)
    assert mp.tolist() == [1] and mt.tolist() == [0]
    # IoU 50/150 = 1/3 is below 0.5: no match.
    far = _boxes([("s", "WBC", 5, 0, 15, 10)])
    assert len(match_boxes(far, truth)[0]) == 0


def test_evaluate_run_counts_by_hand() -> None:
    truth = pd.DataFrame(
        {
            "slide_id": ["a", "a", "a", "b"],
            "class": ["WBC", "WBC", "RBC", "WBC"],
            "subtype": ["pre_b", "pro_b", None, "benign"],
            "x0": [0, 100, 200, 0], "y0": [0, 0, 0, 0],
            "x1": [20, 120, 210, 20], "y1": [20, 20, 10, 20],
        }
    )  # fmt: skip
    cells = pd.DataFrame(
        {
            # a: WBC 0 found twice (two tiles), WBC 1 missed, RBC found, one false WBC;
            # b: its WBC found once, as the wrong subtype.
            "slide_id": ["a", "a", "a", "a", "b"],
            "det_class": ["WBC", "WBC", "RBC", "WBC", "WBC"],
            "all_subtype_label": ["pre_b", "pre_b", None, "benign", "pro_b"],
            "tile_row": [0, 0, 0, 0, 0],
            "tile_col": [0, 1, 0, 0, 0],
            "x0": [0, 1, 200, 300, 0], "y0": [0, 1, 0, 300, 0],
            "x1": [20, 21, 210, 320, 20], "y1": [20, 21, 10, 320, 20],
        }
    )  # fmt: skip
    r = evaluate_run(cells, truth)
    wbc = r["per_class"]["WBC"]
    # 4 predicted WBCs, 3 true; 2 one-to-one matches (a: WBC 0, b: WBC 0).
    assert (wbc["tp"], wbc["n_pred"], wbc["n_true"]) == (2, 4, 3)
    assert wbc["precision"] == 0.5 and wbc["recall"] == pytest.approx(0.6667, abs=1e-4)
    assert wbc["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), abs=1e-4)
    assert r["per_class"]["RBC"]["f1"] == 1.0
    assert r["wbc_duplicates"] == 1 and r["wbc_seam_duplicates"] == 1
    # Matched WBCs: a's (pre_b == pre_b) and b's (pro_b != benign).
    assert r["subtype_accuracy"] == 0.5 and r["subtype_matched"] == 2


def test_dice_and_iou_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, :3] = True  # 6 px, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 10)
    assert iou(a, b) == pytest.approx(4 / 6)
    assert dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError):
        dice(a, np.zeros((3, 3)))


def test_image_level_macro_f1_by_hand() -> None:
    truth = ["x", "x", "y", "y"]
    pred = ["x", "y", "y", "no_call"]
    macro, per = macro_f1(truth, pred, ["x", "y"])
    # x: P 1/1, R 1/2 -> F1 2/3; y: P 1/2, R 1/2 -> F1 1/2.
    assert per["x"]["recall"] == 0.5 and per["x"]["precision"] == 1.0
    assert per["y"]["precision"] == 0.5 and per["y"]["recall"] == 0.5
    assert macro == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-4)


def _typed_case() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two slides' truth, cells and slides rows for the WBC-type and slide-figure scores.

    a (leukemic): blasts pre_b, pre_b, pro_b, a neutrophil, a lymphocyte (blast fraction
    0.6, call pre_b); b (marrow-like): three hematogones (lymphocyte / benign), two
    neutrophils, one pro_b blast (blast fraction 1/6 < 0.2, call none).
    """
    x0 = [0, 100, 200, 300, 400, 500, 0, 100, 200, 300, 400, 500]
    truth = pd.DataFrame(
        {
            "slide_id": ["a"] * 6 + ["b"] * 6,
            "class": ["WBC"] * 5 + ["RBC"] + ["WBC"] * 6,
            "wbc_type": ["blast", "blast", "blast", "neutrophil", "lymphocyte", None,
                         "lymphocyte", "lymphocyte", "lymphocyte", "neutrophil", "neutrophil", "blast"],
            "subtype": ["pre_b", "pre_b", "pro_b", None, None, None,
                        "benign", "benign", "benign", None, None, "pro_b"],
            "x0": x0, "y0": [0] * 12, "x1": [x + 20 for x in x0], "y1": [20] * 12,
        }
    )  # fmt: skip
    # a: every WBC found (w1, a blast, called lymphocyte), plus one false WBC;
    # b: the third hematogone called blast, the second neutrophil ig, the blast missed.
    cx0 = [0, 100, 200, 300, 400, 600, 0, 100, 200, 300, 400]
    cells = pd.DataFrame(
        {
            "slide_id": ["a"] * 6 + ["b"] * 5,
            "det_class": ["WBC"] * 11,
            "wbc_type_label": ["blast", "lymphocyte", "blast", "neutrophil", "lymphocyte", "monocyte",
                               "lymphocyte", "lymphocyte", "blast", "neutrophil", "ig"],
            "x0": cx0, "y0": [0] * 11, "x1": [x + 20 for x in cx0], "y1": [20] * 11,
        }
    )  # fmt: skip
    slides = pd.DataFrame(
        {
            "slide_id": ["a", "b"],
            "n_wbc_counted": [4, 5],
            "wbc_differential": [
                '{"blast": 0.5, "lymphocyte": 0.25, "neutrophil": 0.25}',
                '{"blast": 0.2, "ig": 0.2, "lymphocyte": 0.4, "neutrophil": 0.2}',
            ],
            "blast_fraction": [0.5, 0.2],
            "blast_fraction_low": [0.15, 0.04],
            "blast_fraction_high": [0.85, 0.62],
            "all_subtype_call": ["pre_b", "pro_b"],
        }
    )
    return truth, cells, slides


def test_evaluate_run_scores_wbc_types_and_slide_figures_by_hand() -> None:
    truth, cells, slides = _typed_case()
    r = evaluate_run(cells, truth, slides=slides)
    assert r["per_class"]["WBC"]["tp"] == 10  # the existing figures are all still there
    t = r["wbc_type"]
    # 10 matched WBCs, 7 right (a: 4 of 5, b: 3 of 5; the missed blast is not scored).
    assert (t["matched"], t["accuracy"]) == (10, 0.7)
    assert t["per_class"] == {
        "blast": {"recall": round(2 / 3, 4), "support": 3},
        "lymphocyte": {"recall": 0.75, "support": 4},  # hematogones called lymphocyte are right
        "neutrophil": {"recall": round(2 / 3, 4), "support": 3},
    }
    assert t["macro_recall"] == round((2 / 3 + 0.75 + 2 / 3) / 3, 4)
    assert t["confusion"] == {
        "blast": {"blast": 2, "lymphocyte": 1},
        "lymphocyte": {"blast": 1, "lymphocyte": 3},
        "neutrophil": {"ig": 1, "neutrophil": 2},
    }
    a, b = r["differential"]["a"], r["differential"]["b"]
    assert a["truth"] == {"blast": 0.6, "lymphocyte": 0.2, "neutrophil": 0.2}
    assert a["abs_error_pp"] == {"blast": 10.0, "lymphocyte": 5.0, "neutrophil": 5.0}
    assert (a["n_truth"], a["n_counted"]) == (5, 4)
    assert b["abs_error_pp"] == {"blast": 3.33, "ig": 20.0, "lymphocyte": 10.0, "neutrophil": 13.33}
    # ig (truth 0 %) is under the 5 % floor: the largest error that counts is b's neutrophils.
    assert r["differential_max_error_pp"] == 13.33
    assert r["blast_fraction"]["a"] == {
        "truth": 0.6, "predicted": 0.5, "low": 0.15, "high": 0.85, "abs_error": 0.1,
        "truth_in_interval": True,
    }  # fmt: skip
    assert r["blast_fraction"]["b"]["truth"] == round(1 / 6, 4)
    assert r["blast_fraction_max_abs_error"] == 0.1
    assert r["calls"] == {
        "a": {"truth": "pre_b", "predicted": "pre_b"},
        "b": {"truth": "none", "predicted": "pro_b"},
    }
    assert (r["call_accuracy"], r["call_slides"]) == (0.5, 2)


def test_evaluate_run_without_slide_figures_gives_nulls() -> None:
    truth, cells, slides = _typed_case()
    for table in (None, slides[["slide_id", "n_wbc_counted"]], slides.iloc[:0]):
        r = evaluate_run(cells, truth, slides=table)
        assert r["wbc_type"]["accuracy"] == 0.7  # cells alone give the type scores
        assert r["differential"]["a"]["predicted"] is None
        assert r["differential"]["a"]["abs_error_pp"] is None
        assert r["differential_max_error_pp"] is None
        assert r["blast_fraction"]["a"]["predicted"] is None
        assert r["blast_fraction_max_abs_error"] is None
        assert r["calls"]["a"] == {"truth": "pre_b", "predicted": None}
        assert r["call_accuracy"] is None
    # A slide the run counted no WBC on: null figures, and its missing call counts as wrong.
    empty = slides.copy()
    empty.loc[1, ["wbc_differential", "blast_fraction", "all_subtype_call"]] = None
    r = evaluate_run(cells, truth, slides=empty)
    assert r["differential"]["b"]["abs_error_pp"] is None and r["call_accuracy"] == 0.5
    assert r["differential_max_error_pp"] == 10.0 and r["blast_fraction_max_abs_error"] == 0.1
    # Cells without wbc_type_label, truth without wbc_type (older files): null scores.
    r = evaluate_run(
        cells.drop(columns="wbc_type_label"), truth.drop(columns="wbc_type"), slides=slides
    )
    assert r["wbc_type"] is None and r["differential"] == {} and r["call_accuracy"] is None


def test_evaluate_cli_reads_the_slides_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batch.cli import main

    truth, cells, slides = _typed_case()
    out = tmp_path / "run"
    for sid, g in cells.groupby("slide_id"):
        part = out / "cells" / f"slide_id={sid}"
        part.mkdir(parents=True)
        g.drop(columns="slide_id").to_parquet(part / "part-0.parquet")
        (out / "slides").mkdir(exist_ok=True)
        slides[slides.slide_id == sid].to_parquet(out / "slides" / f"{sid}.parquet")
    truth.to_parquet(tmp_path / "ground_truth.parquet")
    assert (
        main(["evaluate", str(out), "--truth", str(tmp_path / "ground_truth.parquet"), "--json"])
        == 0
    )
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["wbc_type"]["accuracy"] == 0.7 and r["differential_max_error_pp"] == 13.33
    assert r["call_accuracy"] == 0.5 and r["blast_fraction_max_abs_error"] == 0.1
    assert {"per_class", "wbc_duplicates", "subtype_accuracy"} <= set(r)
