"""Tile planning: cores partition the slide; owners hold their cells whole."""

from __future__ import annotations

import numpy as np
import pytest

from batch.tiling import _axis_grid, choose_level


@pytest.mark.parametrize("extent", [1, 300, 639, 640, 641, 1151, 4096, 10_001])
@pytest.mark.parametrize(("tile", "overlap"), [(640, 128), (512, 0), (640, 254)])
def test_axis_grid_cores_partition_and_sit_inside_reads(extent: int, tile: int, overlap: int) -> None:
    starts, edges = _axis_grid(extent, tile, overlap)
    assert edges[0] == 0 and edges[-1] == extent
    assert all(a < b for a, b in zip(edges, edges[1:], strict=False))
    assert len(edges) == len(starts) + 1
    half = overlap // 2
    for i, s in enumerate(starts):
        # A core lies inside its read region with >= overlap/2 margin toward neighbours.
        lo, hi = edges[i], edges[i + 1]
        assert s <= lo and hi <= s + tile
        if i > 0:
            assert lo - s >= half
        if i < len(starts) - 1:
            assert s + tile - hi >= half
    # The last read reaches the end of the slide.
    assert starts[-1] + tile >= extent


def test_choose_level_picks_coarsest_fine_enough() -> None:
    ds = [1.0, 2.0, 4.0, 8.0]
    assert choose_level(ds, 0.25, 0.5) == (1, 1.0)
    level, scale = choose_level(ds, 0.25, 0.8)
    assert level == 1 and scale == pytest.approx(0.625)
    assert choose_level(ds, 0.25, 0.25) == (0, 1.0)
    assert choose_level(ds, 0.25, 0.1) == (0, 1.0)  # finer than level 0: no upsampling level exists
    assert choose_level(ds, None, 0.5) == (0, 1.0)
    assert choose_level(ds, 0.25, None) == (0, 1.0)
    # Scanner rounding: 0.2525 um/px at level 1 still counts as 0.5.
    assert choose_level(ds, 0.2525 / 2 * 2, 0.5)[0] == 1
    assert np.isclose(choose_level(ds, 0.26, 0.5)[1], 1.0)


def test_a_very_coarse_slide_is_upsampled_to_the_detectors_range() -> None:
    """Coarser than ``target / min_cell_scale``: upsampled to that mpp; finer: cut as it is."""
    ds = [1.0, 2.0, 4.0]
    # The ALL set's ~0.55 um/px fields for a 0.15 um/px detector: up to 0.25 um/px (x2.2).
    assert choose_level(ds, 0.55, 0.15, min_cell_scale=0.6) == (0, pytest.approx(2.2))
    # 0.25 um/px (cells at 0.6x) and anything finer are not upsampled; nor is anything at 0.
    assert choose_level(ds, 0.25, 0.15, min_cell_scale=0.6) == (0, 1.0)
    assert choose_level(ds, 0.2, 0.15, min_cell_scale=0.6) == (0, 1.0)
    assert choose_level(ds, 0.55, 0.15) == (0, 1.0)
    # Levels are still chosen first: a fine slide's coarse level is downsampled, never upsampled.
    level, scale = choose_level(ds, 0.1, 0.25, min_cell_scale=0.6)
    assert level == 1 and scale == pytest.approx(0.8)


# --- on generated slides, against their exact ground truth -------------------

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from batch.config import TilingConfig  # noqa: E402
from batch.slides import open_slide  # noqa: E402
from batch.synth import synth_slides  # noqa: E402
from batch.tiling import plan_tiles  # noqa: E402


@pytest.fixture(scope="module")
def smear(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("smear")
    paths = synth_slides(out, slides=1, width=3000, height=2200, seed=11, blank_fraction=0.4)
    truth = pd.read_parquet(out / "ground_truth.parquet")
    return paths[0], truth[truth.slide_id == paths[0].stem]


@pytest.mark.parametrize(
    ("target_mpp", "tile_size"), [(None, 640), (0.25, 512), (0.5, 640), (0.4, 320)]
)
def test_every_cell_owned_once_and_whole(
    smear: tuple[Path, pd.DataFrame], target_mpp: float | None, tile_size: int
) -> None:
    path, truth = smear
    assert len(truth) > 100
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TilingConfig(tile_size=tile_size), slide_id=path.stem, target_mpp=target_mpp)
    tasks = list(plan.all_tasks())
    cx, cy = truth.cx.to_numpy(), truth.cy.to_numpy()
    owners = np.stack([t.owns(cx, cy) for t in tasks])
    # Exactly one owner per cell centre, and it agrees with the vectorised lookup.
    assert (owners.sum(axis=0) == 1).all()
    row, col = plan.owner(cx, cy)
    by_pos = {(t.row, t.col): i for i, t in enumerate(tasks)}
    idx = np.array([by_pos[(r, c)] for r, c in zip(row, col, strict=True)])
    assert (owners.argmax(axis=0) == idx).all()
    # The owner's read region holds the whole box (boxes are smaller than the overlap).
    ds = plan.downsample
    for j, i in enumerate(idx):
        t = tasks[i]
        x0, y0, x1, y1 = truth.iloc[j][["x0", "y0", "x1", "y1"]]
        assert t.x * ds <= x0 and x1 <= (t.x + t.w) * ds, (t, x0, x1)
        assert t.y * ds <= y0 and y1 <= (t.y + t.h) * ds, (t, y0, y1)


def test_background_skip_loses_no_cells(smear: tuple[Path, pd.DataFrame]) -> None:
    path, truth = smear
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TilingConfig(), slide_id=path.stem)
    assert 0.1 < plan.skip_fraction < 0.9, plan.skip_fraction
    kept = {(t.row, t.col) for t in plan.tasks}
    row, col = plan.owner(truth.cx.to_numpy(), truth.cy.to_numpy())
    owned_by_skipped = [(r, c) for r, c in zip(row, col, strict=True) if (r, c) not in kept]
    assert owned_by_skipped == []


def test_level_choice_and_scale_on_pyramid(smear: tuple[Path, pd.DataFrame]) -> None:
    path, _ = smear
    with open_slide(path) as slide:
        plan = plan_tiles(slide, TilingConfig(tile_size=640), slide_id=path.stem, target_mpp=0.5)
        assert plan.level == 1 and plan.scale == 1.0
        plan = plan_tiles(slide, TilingConfig(tile_size=640), slide_id=path.stem, target_mpp=0.4)
        assert plan.level == 0 and plan.scale == pytest.approx(0.625)
        # The detector sees tile_size px: read regions are tile_size / scale level pixels.
        assert plan.tasks[0].w == round(640 / 0.625)


def test_upsampled_tiles_read_a_smaller_region(smear: tuple[Path, pd.DataFrame]) -> None:
    """A 0.25 um/px slide for a 0.1 um/px detector at min_cell_scale 0.6: seen at 1/6 um/px."""
    path, _ = smear
    config = TilingConfig(tile_size=640, overlap_um=32.0, min_cell_scale=0.6)
    with open_slide(path) as slide:
        plan = plan_tiles(slide, config, slide_id=path.stem, target_mpp=0.1)
    assert (plan.level, plan.scale) == (0, pytest.approx(1.5))
    assert plan.tasks[0].w == round(640 / 1.5)
    # 32 um is 192 detector px at 1/6 um/px: 128 level-0 px, as at the slide's own scale.
    assert plan.overlap == 128


def test_overlap_is_in_the_pixels_the_detector_sees(smear: tuple[Path, pd.DataFrame]) -> None:
    """``overlap_um`` in the tiles' own pixels, also for a detector trained finer than the slide.

    A slide coarser than the detector is not upsampled unless its cells would be drawn at
    under ``min_cell_scale`` of their trained size: a 0.25 um/px slide goes to a 0.15 um/px
    detector at 0.25 um/px, so 32 um of overlap is 128 px, not the 213 px it would be at 0.15 um/px
    (25 % more tiles on a large slide for nothing).
    """
    path, _ = smear
    config = TilingConfig(tile_size=640, overlap_um=32.0)
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx(0.25)
        finer = plan_tiles(slide, config, slide_id=path.stem, target_mpp=0.15)
        same = plan_tiles(slide, config, slide_id=path.stem, target_mpp=0.25)
        coarser = plan_tiles(slide, config, slide_id=path.stem, target_mpp=0.4)
    assert (finer.level, finer.scale) == (0, 1.0)
    assert finer.overlap == same.overlap == 128
    assert len(finer.tasks) == len(same.tasks)
    # Downsampled tiles: 32 um at 0.4 um/px is 80 detector px, 128 level-0 px.
    assert coarser.overlap == 128


def test_the_chain_finds_the_wbcs_of_a_coarse_slide(tmp_path: Path) -> None:
    """A smear at 0.55 um/px (cells at 0.27x the detector's 0.15): found once upsampled.

    Cut at its own pixels (``min_cell_scale`` 0) the shipped detector found none of its
    10 WBCs; upsampled to 0.25 um/px (the default 0.6) it finds nearly all, each once.
    """
    import pyarrow as pa

    from batch.config import load_config
    from batch.run.local import chain_cells

    (path,) = synth_slides(tmp_path, slides=1, width=900, height=700, seed=3, mpp=0.55)
    truth = pd.read_parquet(tmp_path / "ground_truth.parquet")
    wbcs = truth[truth["class"] == "WBC"]
    assert len(wbcs) >= 8

    def found(min_cell_scale: float) -> set[int]:
        config = load_config(None, [f"tiling.min_cell_scale={min_cell_scale}"])
        cells = pa.concat_tables([t for _, t in chain_cells([path], config)]).to_pandas()
        hits: list[int] = []
        for c in cells[cells.det_class == "WBC"].itertuples():
            cx, cy = (c.x0 + c.x1) / 2, (c.y0 + c.y1) / 2
            inside = wbcs[(wbcs.x0 <= cx) & (cx <= wbcs.x1) & (wbcs.y0 <= cy) & (cy <= wbcs.y1)]
            hits += inside.object_id.tolist()
        assert len(hits) == len(set(hits))  # no WBC twice
        return set(hits)

    assert len(found(0.0)) <= len(wbcs) // 2
    assert len(found(0.6)) >= len(wbcs) - 2, len(wbcs)
