"""WBC crops: margins, clipping at tile edges, padding, letterbox."""

from __future__ import annotations

import numpy as np
import pytest

from batch.stages.crop import WHITE, crop_regions, crop_wbcs, estimate_background, letterbox

BG = (230, 225, 220)


def _tile(h: int = 100, w: int = 120) -> np.ndarray:
    tile = np.empty((h, w, 3), dtype=np.uint8)
    tile[:] = BG
    # A unique value per pixel in channel 0 so positions can be checked exactly.
    tile[..., 0] = (np.arange(h * w).reshape(h, w) % 200).astype(np.uint8)
    return tile


def test_regions_add_margin_on_each_side() -> None:
    regions = crop_regions([[10, 20, 30, 60]], margin=0.15)
    # w = 20 -> 3 px, h = 40 -> 6 px on each side.
    assert regions.tolist() == [[7, 14, 33, 66]]


def test_regions_round_outwards_and_never_empty() -> None:
    r = crop_regions(np.array([[10.4, 10.6, 20.2, 20.2], [5, 5, 5, 5]]), margin=0.0)
    assert r.tolist() == [[10, 10, 21, 21], [5, 5, 6, 6]]
    with pytest.raises(ValueError, match="margin"):
        crop_regions([[0, 0, 1, 1]], margin=-0.1)


def test_inner_crop_is_exact_copy() -> None:
    tile = _tile()
    (crop,) = crop_wbcs(tile, np.array([[40, 30, 60, 50]]), margin=0.1)
    assert crop.shape == (24, 24, 3)
    np.testing.assert_array_equal(crop, tile[28:52, 38:62])
    crop[:] = 0  # a copy, not a view
    assert tile[30, 40, 1] == BG[1]


@pytest.mark.parametrize(
    "box",
    [[-5, -5, 15, 15], [110, 90, 125, 105], [0, 40, 10, 60], [100, 0, 120, 10]],
)
def test_edge_crops_keep_their_size_and_pad_with_background(box: list[int]) -> None:
    tile = _tile()
    fill = (1, 2, 3)
    (crop,) = crop_wbcs(tile, np.array([box], dtype=float), margin=0.25, background=fill)
    x0, y0, x1, y1 = crop_regions([box], margin=0.25)[0].tolist()
    assert crop.shape == (y1 - y0, x1 - x0, 3)
    h, w = tile.shape[:2]
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    assert (~inside).any()
    np.testing.assert_array_equal(crop[~inside], np.broadcast_to(fill, crop[~inside].shape))
    np.testing.assert_array_equal(crop[inside], tile[ys[inside], xs[inside]])


def test_default_padding_is_the_tiles_background() -> None:
    tile = _tile()
    tile[..., 0] = BG[0]
    tile[40:60, 40:60] = (90, 40, 150)  # a purple cell
    (crop,) = crop_wbcs(tile, np.array([[-10, -10, 10, 10]]), margin=0.0)
    assert tuple(crop[0, 0]) == BG
    assert estimate_background(tile) == BG
    assert estimate_background(np.zeros((0, 0, 3), np.uint8)) == WHITE


def test_out_size_letterboxes_keeping_aspect() -> None:
    tile = _tile()
    tile[..., 0] = BG[0]
    crops = crop_wbcs(tile, np.array([[10, 10, 50, 30], [0, 0, 5, 5]]), margin=0.0, out_size=32)
    assert [c.shape for c in crops] == [(32, 32, 3), (32, 32, 3)]
    boxed = letterbox(np.zeros((10, 40, 3), np.uint8), 32, (255, 255, 255))
    # 40 x 10 -> 32 x 8, centred vertically: rows 12..19 black, the rest white.
    assert (boxed[12:20] == 0).all()
    assert (boxed[:12] == 255).all() and (boxed[20:] == 255).all()


def test_no_boxes_and_bad_tiles() -> None:
    assert crop_wbcs(_tile(), np.zeros((0, 4))) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        crop_wbcs(np.zeros((10, 10), np.uint8), np.array([[0, 0, 5, 5]]))


def test_crop_tiles_ships_crops_not_tiles_and_segment_reads_them() -> None:
    """The tile image stops at the detector stage: only the WBC crops travel on, unchanged."""
    import io

    import pyarrow as pa

    from batch.config import Config
    from batch.run.columns import pack, rows_to_batch
    from batch.run.tasks import crop_tiles, segment_tiles

    rng = np.random.default_rng(0)
    tile = np.full((64, 64, 3), 235, np.uint8)
    tile[20:40, 10:30] = rng.integers(60, 120, (20, 20, 3), dtype=np.uint8)
    cells = pa.table(
        {
            "det_class": ["RBC", "WBC"],
            "tx0": [0.0, 10.0], "ty0": [0.0, 20.0], "tx1": [8.0, 30.0], "ty1": [8.0, 40.0],
        }
    )  # fmt: skip
    batch = rows_to_batch([{"slide_id": "s", "slide_uri": "s.tif", "kind": "tile", "n_tiles": 1}])
    batch = {**batch, "image": tile[None], "cells": np.array([pack(cells)], dtype=object)}
    out = crop_tiles(batch, Config())
    assert "image" not in out
    z = np.load(io.BytesIO(out["wbc_crops"][0]))
    assert z["rows"].tolist() == [1]  # only the WBC row is cropped
    bg = tuple(int(v) for v in z["bg"])
    expected = crop_wbcs(tile, [[10, 20, 30, 40]], margin=Config().segmentation.crop_margin, background=bg)
    np.testing.assert_array_equal(z["crop0"], expected[0])
    seg = segment_tiles(out, Config())
    assert "wbc_crops" not in seg and seg["crops"][0]
