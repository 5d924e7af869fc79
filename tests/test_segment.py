"""Nucleus / cell segmentation: exactness of the clustering, Dice on synthetic smears, morphometrics."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from batch.config import SegmentationConfig
from batch.eval.metrics import dice, iou
from batch.eval.segmentation import eval_segmentation, summarize
from batch.stages.segment import (
    MORPHOMETRIC_KEYS,
    fill_holes,
    kmeans_1d,
    segment_wbc,
    segment_wbcs,
)

MPP = 0.25
BACKGROUND = (228, 224, 218)
CYTOPLASM = (150, 165, 215)  # pale blue
NUCLEUS = (105, 60, 170)  # purple
RBC = (200, 150, 150)  # salmon
#: Measured on this test's synthetic marrow field (seed 4, 640 x 640, 33 WBCs):
#: mean Dice 0.996, lowest 0.976 (k = 3). The bounds leave a margin for
#: platform differences in JPEG-free PNG decoding and OpenCV versions.
MIN_MEAN_DICE = 0.97
MIN_CELL_DICE = 0.90


def draw_cell(
    size: int = 80,
    r_cell: float = 24.0,
    r_nucleus: float = 15.0,
    *,
    rbc: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A WBC crop (RGB) with a round nucleus in round cytoplasm; returns (crop, exact nucleus mask)."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUND
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if rbc:
        for cx, cy in ((6, 8), (size - 6, size - 10)):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14**2] = RBC
    cell = (xx - c) ** 2 + (yy - c) ** 2 <= r_cell**2
    nucleus = (xx - c) ** 2 + (yy - c) ** 2 <= r_nucleus**2
    img[cell] = CYTOPLASM
    img[nucleus] = NUCLEUS
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), nucleus


# --------------------------------------------------------------------------- clustering


def _sse(v: np.ndarray, thresholds: list[float]) -> float:
    edges = [-np.inf, *thresholds, np.inf]
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        part = v[(v > lo) & (v <= hi)]
        if part.size:
            total += float(((part - part.mean()) ** 2).sum())
    return total


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_1d_is_the_global_optimum(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Values on the histogram grid, so binning loses nothing and brute force is exact.
    v = np.round((rng.normal(0, 2, 60) + rng.integers(0, 3, 60) * 10) * 4) / 4
    thresholds, means = kmeans_1d(v, k)
    assert len(thresholds) == k - 1 and len(means) == k
    assert means == sorted(means)
    distinct = np.unique(v)
    cuts = (distinct[:-1] + distinct[1:]) / 2
    best = min(_sse(v, list(c)) for c in itertools.combinations(cuts, k - 1))
    assert _sse(v, thresholds) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_exact_and_opencv_kmeans_agree() -> None:
    crop, _ = draw_cell()
    for k in (2, 3):
        exact = segment_wbc(crop, mpp=MPP, config=SegmentationConfig(k=k))
        cv = segment_wbc(crop, mpp=MPP, config=SegmentationConfig(k=k, kmeans="opencv"))
        assert (exact.nucleus_mask == cv.nucleus_mask).mean() > 0.99


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="k = 2 or 3"):
        segment_wbc(draw_cell()[0], mpp=MPP, config=SegmentationConfig(k=4))
    with pytest.raises(ValueError, match="mpp"):
        segment_wbc(draw_cell()[0], mpp=0.0)
    assert segment_wbc(
        draw_cell()[0], mpp=MPP, config=SegmentationConfig(k=4, kmeans="opencv")
    ).found


# --------------------------------------------------------------------------- masks


def test_drawn_cell_masks_and_morphometrics() -> None:
    crop, truth = draw_cell(r_cell=24, r_nucleus=15)
    seg = segment_wbc(crop, mpp=MPP)
    assert dice(seg.nucleus_mask, truth) > 0.97
    assert (seg.cell_mask | ~seg.nucleus_mask).all()  # the cell contains the nucleus
    m = seg.morphometrics()
    assert list(m) == list(MORPHOMETRIC_KEYS)
    assert m["nucleus_area_um2"] == pytest.approx(math.pi * 15**2 * MPP**2, rel=0.06)
    assert m["cell_area_um2"] == pytest.approx(math.pi * 24**2 * MPP**2, rel=0.10)
    assert m["nc_ratio"] == pytest.approx(15**2 / (24**2 - 15**2), rel=0.2)
    assert 0.85 < m["nucleus_circularity"] <= 1.0
    assert 0.95 < m["nucleus_solidity"] <= 1.0
    assert m["nucleus_mean_a"] > 20 and m["nucleus_mean_b"] < -20  # purple


def test_lobed_nucleus_scores_low_circularity_and_solidity() -> None:
    crop, _ = draw_cell(rbc=False)
    crop[:] = BACKGROUND
    yy, xx = np.mgrid[0:80, 0:80]
    cv2.circle(crop, (40, 40), 26, CYTOPLASM, -1)
    for cx, cy in ((28, 34), (40, 50), (52, 34)):  # three lobes joined by thin strands
        cv2.circle(crop, (cx, cy), 7, NUCLEUS, -1)
    cv2.line(crop, (28, 34), (40, 50), NUCLEUS, 2)
    cv2.line(crop, (40, 50), (52, 34), NUCLEUS, 2)
    m = segment_wbc(crop, mpp=MPP).morphometrics()
    assert m["nucleus_circularity"] < 0.6
    assert m["nucleus_solidity"] < 0.8


def test_areas_are_physical_whatever_the_resolution() -> None:
    crop, _ = draw_cell()
    fine = np.asarray(
        cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST), dtype=np.uint8
    )
    a = segment_wbc(crop, mpp=MPP).morphometrics()
    b = segment_wbc(fine, mpp=MPP / 2).morphometrics()
    for key in ("nucleus_area_um2", "cell_area_um2"):
        assert b[key] == pytest.approx(a[key], rel=0.05), key
    # The same pixels at twice the mpp: four times the area.
    c = segment_wbc(crop, mpp=MPP * 2, config=SegmentationConfig(min_nucleus_um2=0)).morphometrics()
    assert c["nucleus_area_um2"] == pytest.approx(4 * a["nucleus_area_um2"], rel=0.05)


def test_deterministic_and_batch_equals_single() -> None:
    crops = [draw_cell(seed=s)[0] for s in range(3)]
    one = [segment_wbc(c, mpp=MPP) for c in crops]
    again = segment_wbcs(crops, MPP)
    per_crop = segment_wbcs(crops, [MPP] * 3)
    for x, y, z in zip(one, again, per_crop, strict=True):
        np.testing.assert_array_equal(x.nucleus_mask, y.nucleus_mask)
        np.testing.assert_array_equal(x.cell_mask, z.cell_mask)
        assert x.morphometrics() == pytest.approx(y.morphometrics(), nan_ok=True)
    with pytest.raises(ValueError, match="mpp values"):
        segment_wbcs(crops, [MPP])


def test_blank_crop_has_no_nucleus() -> None:
    rng = np.random.default_rng(0)
    blank = np.clip(rng.normal(BACKGROUND, 3, (40, 40, 3)), 0, 255).astype(np.uint8)
    seg = segment_wbc(blank, mpp=MPP)
    assert not seg.found and not seg.cell_mask.any()
    m = seg.morphometrics()
    assert m["nucleus_area_um2"] == 0 and m["cell_area_um2"] == 0
    assert math.isnan(m["nucleus_circularity"]) and math.isnan(m["nc_ratio"])


def test_neighbour_nucleus_outside_the_box_core_is_dropped() -> None:
    crop, truth = draw_cell(size=100, r_cell=20, r_nucleus=12, rbc=False)
    cv2.circle(crop, (88, 50), 9, NUCLEUS, -1)  # a neighbour's nucleus inside the crop
    box = (30.0, 30.0, 70.0, 70.0)
    seg = segment_wbc(crop, mpp=MPP, cell_box=box)
    assert dice(seg.nucleus_mask, truth) > 0.95
    assert not seg.nucleus_mask[:, 80:].any()


def test_fill_holes() -> None:
    ring = np.zeros((20, 20), dtype=np.uint8)
    cv2.circle(ring, (10, 10), 6, 1, 2)
    filled = fill_holes(ring.astype(bool))
    assert filled[10, 10] and not filled[0, 0]


# --------------------------------------------------------------------------- Dice / IoU


def test_dice_and_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0 and iou(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shapes"):
        dice(a, np.zeros((3, 3), bool))


@pytest.fixture(scope="module")
def marrow_field(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from batch.synth import synth_slides

    out = tmp_path_factory.mktemp("seg_marrow")
    synth_slides(out, slides=1, width=640, height=640, seed=4, kind="marrow", format="png")
    return out


def test_dice_against_exact_synthetic_masks(marrow_field: Path) -> None:
    per_cell = eval_segmentation(marrow_field)
    assert len(per_cell) >= 20
    summary = summarize(per_cell)["all"]
    assert summary["found_fraction"] == 1.0
    assert summary["mean_dice"] >= MIN_MEAN_DICE, summary
    assert per_cell["dice"].min() >= MIN_CELL_DICE
    assert summary["mean_iou"] <= summary["mean_dice"]
    # Areas agree with the generator's, in um^2.
    ratio = per_cell["nucleus_area_um2"] / per_cell["true_nucleus_area_um2"]
    assert ratio.between(0.85, 1.15).all()


# --------------------------------------------------------------------------- -seg models


def test_dice_on_every_wbc_type(tmp_path: Path) -> None:
    """Lobed, kidney-shaped and granular nuclei segment as well as the lymphoid ones."""
    from batch.synth import WBC_TYPES, synth_slides

    mix = {t: 1.0 for t in WBC_TYPES}
    synth_slides(tmp_path, slides=1, width=1024, height=1024, seed=9, kind="leukemia", wbc_mix=mix,
                 format="png")  # fmt: skip
    by_type = summarize(eval_segmentation(tmp_path))["by_wbc_type"]
    assert set(by_type) == set(WBC_TYPES)
    for t, s in by_type.items():  # lobed nuclei (thin strands) score lowest: ~0.97
        assert s["found_fraction"] == 1.0 and s["mean_dice"] >= 0.95, (t, s)
