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
