"""Scoring code on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

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
