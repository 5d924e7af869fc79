"""The bulk-annotation loop, small: run -> export -> scripted annotation -> import -> retrain -> rerun.

``jobs/annotation_loop.py`` on one 2560 x 2560 leukemic training slide and a
separate 2560 x 2560 evaluation slide at 0.6 um/px, where the shipped
``wbc_type`` calls about half the blasts lymphocytes: the 40 least-confident
WBCs go to Label Studio, a scripted annotator answers from the generator's
truth, the labels come back through ``import-labels`` and fine-tune
``wbc_type`` for 16 epochs (``jobs/train_classifier.py --labels``, at the
card's own input settings). Checks: the exported cells are exactly the 40
lowest ``wbc_type_confidence`` WBCs of the training slide; the imported
labels are the scripted answers, cell by cell; the training crops are the
pipeline's own crops pixel for pixel; and the retrained model types the
evaluation slide's WBCs better than the shipped one (measured here with
wbc_type v6: 0.37 -> 0.78 and 0.80 in two runs, with v8 0.41 -> 0.94, of 51 matched WBCs; CPU
training is not bit-reproducible, so the test asks for +0.15, well inside that).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from batch.datasets.folders import read_rgb
from batch.run.sink import read_table

# Run -> export -> annotate -> import -> train 16 epochs -> rerun takes ~40-100 s: outside the 20-minute
# `make test`, in `make test-extended`, which CI runs after it.
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.extended]

JOB = Path(__file__).resolve().parent.parent / "jobs" / "annotation_loop.py"
SELECT = 40


def _job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("annotation_loop", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    job = _job()
    out = tmp_path_factory.mktemp("loop")
    cfg = job.LoopConfig(
        out=out, train_slides=1, size=2560, eval_size=2560, select=SELECT, epochs=16, batch=16,
        # the run keeps its crops, which the crops cut from the labels must equal
        run_set=["export.crops=true"],
    )  # fmt: skip
    figures: dict[str, Any] = job.run_loop(cfg)
    return figures, out


def test_exported_cells_are_the_least_confident_wbcs(loop: tuple[dict[str, Any], Path]) -> None:
    figures, out = loop
    cells = read_table(str(out / "run"), "cells").to_pandas()
    cells["slide_id"] = cells["slide_id"].astype(str)
    train = cells[cells["slide_id"].str.startswith("train") & (cells["det_class"] == "WBC")]
    assert len(train) > 1.3 * SELECT
    expected = train.sort_values(["wbc_type_confidence", "cell_id"]).head(SELECT)
    chosen = pd.read_parquet(out / "labelstudio" / "selection.parquet")
    assert list(chosen["cell_id"]) == list(expected["cell_id"])
    assert chosen["score"].max() <= train["wbc_type_confidence"].drop(expected.index).min()
    # ... and every one of them is a box of some Label Studio task
    tasks = json.loads((out / "labelstudio" / "tasks.json").read_text())
    boxed = {r["id"] for t in tasks for r in t["predictions"][0]["result"]}
    assert set(chosen["cell_id"]) <= boxed
    assert figures["exported"] == SELECT


def test_imported_labels_are_the_scripted_answers(loop: tuple[dict[str, Any], Path]) -> None:
    _, out = loop
    answers = pd.read_parquet(out / "answers.parquet")
    labels = pd.read_parquet(out / "labels.parquet")
    assert len(answers) >= SELECT - 5  # a few ambiguous boxes may be deleted
    got = labels.set_index("cell_id")
    assert got.index.is_unique
    row = got.loc[answers["cell_id"]]
    assert (row["match"] == "id").all()
    assert list(row["label"]) == list(answers["label"])
    assert list(row["wbc_type"]) == list(answers["label"])  # every answer is a WBC type


def test_training_crops_are_the_pipeline_crops(loop: tuple[dict[str, Any], Path]) -> None:
    _, out = loop
    cells = read_table(str(out / "run"), "cells").to_pandas().set_index("cell_id")
    crops = sorted((out / "retrain" / "labels_data").glob("*/*.png"))
    answers = pd.read_parquet(out / "answers.parquet")
    assert len(crops) == len(answers)
    for path in crops:
        cell_id = path.stem.rsplit("_", 1)[-1]
        stored = cells.loc[cell_id, "crop_png"]
        pipeline = cv2.imdecode(np.frombuffer(stored, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert np.array_equal(read_rgb(path), pipeline), path.name


def test_retrained_wbc_type_is_better_on_a_separate_slide(
    loop: tuple[dict[str, Any], Path],
) -> None:
    figures, _ = loop
    before, after = figures["eval_wbc_type_before"], figures["eval_wbc_type_after"]
    assert before["matched"] == after["matched"] >= 40  # the same detector: the same cells
    assert before["accuracy"] < 0.75  # the shipped model is weak at 0.6 um/px ...
    assert after["accuracy"] >= before["accuracy"] + 0.15  # ... and the corrections fix much of it
