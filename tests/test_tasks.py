"""The worker callables of a run (plan, read, detect, segment, classify), called without Ray.

What the pipeline places on Ray is tested here as plain functions on a real
synthetic slide with the shipped models: the plan stage emits exactly the
tile plan, a bad slide is one typed error row, detection keeps only the cells
whose centre the tile's core owns, classification labels exactly the WBCs,
and the fused chain (`CellStage`) writes the same cells as the stages one by one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batch.config import Config
from batch.errors import UnsupportedSlideError
from batch.run.columns import TILE_BOX_COLUMNS, batch_error, rows_to_batch, task_at, unpack
from batch.run.provenance import trained_mpp
from batch.run.tasks import (
    CellStage,
    ClassifyStage,
    DetectStage,
    plan_slide,
    read_tiles,
    segment_tiles,
)
from batch.slides import open_slide
from batch.synth import synth_slides
from batch.tiling import plan_tiles


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (path,) = synth_slides(tmp_path_factory.mktemp("tasks"), slides=1, width=1280, height=1280, seed=5)
    return path


@pytest.fixture(scope="module")
def config() -> Config:
    return Config()


def _rows(slide: Path, config: Config) -> list[dict[str, object]]:
    return plan_slide({"slide_id": "s", "slide_uri": str(slide)}, config, trained_mpp(config)[0])


def test_plan_stage_emits_the_tile_plan(slide: Path, config: Config) -> None:
    rows = _rows(slide, config)
    with open_slide(slide) as opened:
        plan = plan_tiles(opened, config.tiling, slide_id="s", target_mpp=trained_mpp(config)[0])
    assert len(plan.tasks) > 1
    assert [r["kind"] for r in rows] == ["tile"] * len(plan.tasks)
    assert {r["n_tiles"] for r in rows} == {len(plan.tasks)}
    batch = rows_to_batch(rows)
    assert [task_at(batch, i) for i in range(len(rows))] == list(plan.tasks)


def test_plan_stage_turns_a_bad_slide_into_one_typed_error_row(tmp_path: Path, config: Config) -> None:
    bad = tmp_path / "notes.tif"
    bad.write_text("this is not a slide")
    rows = plan_slide({"slide_id": "notes", "slide_uri": str(bad)}, config, None)
    assert len(rows) == 1 and rows[0]["kind"] == "error"
    error = batch_error(rows_to_batch(rows), 0)
    assert isinstance(error, UnsupportedSlideError) and error.stage == "open"
    assert error.slide == str(bad)


def test_stages_one_by_one_and_fused_write_the_same_cells(slide: Path, config: Config) -> None:
    rows = _rows(slide, config)
    read = read_tiles(rows_to_batch(rows), config)
    assert read["image"].shape == (len(rows), config.tiling.tile_size, config.tiling.tile_size, 3)
    detected = DetectStage(config)(read)
    assert "image" not in detected and "wbc_crops" in detected  # pixels stop at the detector
    staged = ClassifyStage(config)(segment_tiles(detected, config))
    fused = CellStage(config, read=True)(rows_to_batch(rows))
    n_wbc = 0
    for i in range(len(rows)):
        cells = unpack(staged["cells"][i])
        # Every kept cell's centre lies in this tile's core: a seam cell belongs to one tile.
        assert task_at(staged, i).owns(cells.column("cx"), cells.column("cy")).all()
        assert not set(TILE_BOX_COLUMNS) & set(cells.column_names)
        is_wbc = np.asarray(cells.column("det_class").to_pylist()) == "WBC"
        n_wbc += int(is_wbc.sum())
        # wbc_type labels every WBC; all_subtype exactly the cells wbc_type called a blast.
        typed = cells.column("wbc_type_label").is_valid().to_numpy(zero_copy_only=False)
        assert (typed == is_wbc).all()
        blast = np.asarray(cells.column("wbc_type_label").to_pylist()) == "blast"
        subtyped = cells.column("all_subtype_label").is_valid().to_numpy(zero_copy_only=False)
        assert (subtyped == blast).all()
        assert not np.isnan(cells.column("nucleus_area_um2").to_numpy(zero_copy_only=False)[is_wbc]).any()
        assert isinstance(fused["cells"][i], bytes)  # objects inside the worker, bytes out
        assert unpack(fused["cells"][i]).equals(cells)
    assert n_wbc > 0
    all_ids = pa.concat_tables([unpack(c) for c in staged["cells"]]).column("cell_id").to_pylist()
    assert len(all_ids) == len(set(all_ids)) > 50
