"""Synthetic smears: file layout, determinism, ground truth, WBC types, realism, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from batch.errors import ConfigError
from batch.synth import (
    BLAST_SUBTYPES,
    CLASSES,
    DOMINANT_FRACTION_RANGE,
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_SCHEMA,
    NORMAL_WBC_TYPES,
    SUBTYPES,
    WBC_TYPE_MEANS,
    WBC_TYPES,
    ZONES,
    ground_truth_table,
    make_slide,
    pyramid_shapes,
    render_region,
    synth_slides,
)

W, H = 2048, 1536  # small slide: 2 levels, 12 level-0 tiles
SEED = 11


def _mask(png: bytes) -> np.ndarray:
    mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask is not None
    return mask


def _imread_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[0].asarray()


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L* 0-100, a*, b*) of uint8 RGB pixels, shape (..., 3)."""
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(rgb.shape)


@pytest.fixture(scope="module")
def blood(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], pa.Table]:
    out = tmp_path_factory.mktemp("blood")
    messages: list[str] = []
    paths = synth_slides(out, slides=2, width=W, height=H, seed=SEED, progress=messages.append)
    assert any("level 1" in m for m in messages)
    return paths, pq.read_table(out / GROUND_TRUTH_FILE)


def test_files_levels_tiles_compression_mpp(blood: tuple[list[Path], pa.Table]) -> None:
    paths, _ = blood
    assert [p.name for p in paths] == ["slide_0000.tif", "slide_0001.tif"]
    with tifffile.TiffFile(paths[0]) as tif:
        assert tif.is_bigtiff
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(1536, 2048, 3), (768, 1024, 3)]
        page = tif.pages.first
        assert len(page.subifds or ()) == 1
        assert (page.tilewidth, page.tilelength) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.dtype == np.uint8 and page.samplesperpixel == 3
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        for k, lv in enumerate(levels):
            p = lv.keyframe
            assert isinstance(p, tifffile.TiffPage)
            assert p.tilewidth == 512
            num, den = p.tags["XResolution"].value
            assert 1e4 / (num / den) == pytest.approx(0.25 * 2**k)
            if k:
                assert p.subfiletype == tifffile.FILETYPE.REDUCEDIMAGE


def test_pyramid_rule() -> None:
    assert pyramid_shapes(8192, 6144) == [
        (8192, 6144),
        (4096, 3072),
        (2048, 1536),
        (1024, 768),
    ]
    assert len(pyramid_shapes(32768, 32768)) == 7
    assert pyramid_shapes(640, 480) == [(640, 480)]
    assert pyramid_shapes(1025, 100) == [(1025, 100)]
    assert pyramid_shapes(2049, 1024)[-1] == (1025, 512)


def test_deterministic(blood: tuple[list[Path], pa.Table], tmp_path: Path) -> None:
    paths, table = blood
    again = synth_slides(tmp_path / "same", slides=1, width=W, height=H, seed=SEED)
    same = pq.read_table(tmp_path / "same" / GROUND_TRUTH_FILE)
    first = table.filter(pa.compute.equal(table["slide_id"], "slide_0000"))
    assert same.equals(first)
    assert np.array_equal(_level0(again[0]), _level0(paths[0]))

    other = synth_slides(tmp_path / "other", slides=1, width=W, height=H, seed=SEED + 1)
    assert not pq.read_table(tmp_path / "other" / GROUND_TRUTH_FILE).equals(first)
    assert not np.array_equal(_level0(other[0]), _level0(paths[0]))
    # Slides of one run differ from each other.
    second = table.filter(pa.compute.equal(table["slide_id"], "slide_0001"))
    assert second.num_rows != first.num_rows or not np.array_equal(
        second["x0"].to_numpy(), first["x0"].to_numpy()
    )


def test_ground_truth_sanity(blood: tuple[list[Path], pa.Table]) -> None:
    _, table = blood
    assert table.schema.equals(GROUND_TRUTH_SCHEMA)
    df = table.to_pandas()
    assert set(df["slide_id"]) == {"slide_0000", "slide_0001"}
    assert set(df["class"]) == set(CLASSES)
    assert set(df["zone"]) <= set(ZONES)
    assert (df["mpp"] == 0.25).all()
    for _, g in df.groupby("slide_id"):
        assert g["object_id"].is_unique
    assert ((df.x0 >= 0) & (df.y0 >= 0) & (df.x1 <= W) & (df.y1 <= H)).all()
    assert ((df.x1 > df.x0) & (df.y1 > df.y0)).all()
    assert np.allclose(df.cx, (df.x0 + df.x1) / 2) and np.allclose(df.cy, (df.y0 + df.y1) / 2)
    wbc = df[df["class"] == "WBC"]
    rest = df[df["class"] != "WBC"]
    assert rest["subtype"].isna().all() and rest["nucleus_mask"].isna().all()
    assert rest["wbc_type"].isna().all() and wbc["wbc_type"].notna().all()
    assert set(wbc["wbc_type"]) <= set(NORMAL_WBC_TYPES)  # blood: no blasts
    assert wbc["subtype"].isna().all()  # subtypes are for blasts and hematogones
    assert 3 <= len(wbc) / 2 <= 60  # "several" WBCs on a 2048 x 1536 blood field
    for row in wbc.itertuples():
        m = _mask(row.nucleus_mask)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert m.shape == (row.y1 - row.y0, row.x1 - row.x0)
        assert m.sum() > 0
    # RBC size at 0.25 um/px: ~7-8.5 um, i.e. ~30 px (boxes of uncut cells).
    rbc = rest[
        (rest["class"] == "RBC") & (rest.x0 > 0) & (rest.y0 > 0) & (rest.x1 < W) & (rest.y1 < H)
    ]
    size_um = 0.25 * (rbc.x1 - rbc.x0 + rbc.y1 - rbc.y0) / 2
    assert 7.0 <= size_um.median() <= 9.0
    # The smear zones are all present along the slide, thick body first.
    zx = df[df["class"] == "RBC"].groupby("zone")["cx"].median()
    assert zx["thick"] < zx["monolayer"] < zx["feathered"]
    # Objects straddle tile seams (downstream tests rely on it).
    assert ((df.x0 < 512) & (df.x1 > 512)).any()


def test_boxes_are_drawn_extents() -> None:
    slide = make_slide("s", 1024, 1024, seed=2)
    img = render_region(slide, 0, 0, 1024, 1024).astype(np.int16)
    darkest = img.min(axis=2)
    covered = np.zeros(darkest.shape, dtype=bool)
    for r in ground_truth_table(slide).to_pandas().itertuples():
        assert darkest[r.y0 : r.y1, r.x0 : r.x1].min() < 200  # something is drawn in every box
        covered[max(r.y0 - 2, 0) : r.y1 + 2, max(r.x0 - 2, 0) : r.x1 + 2] = True  # + optical blur
    assert darkest[~covered].min() > 210  # nothing is drawn outside the boxes


@pytest.mark.parametrize("kind", ["marrow", "leukemia"])
def test_nucleus_mask_is_the_drawn_nucleus(kind: str) -> None:
    from batch.synth import _render_wbc

    # Leukemia: every type equally often, so lobed, kidney and granular cells are all checked.
    mix = {t: 1.0 for t in WBC_TYPES} if kind == "leukemia" else None
    slide = make_slide("s", 1024, 1024, seed=6, kind=kind, wbc_mix=mix)  # type: ignore[arg-type]
    df = ground_truth_table(slide).to_pandas()
    wbc = df[df["class"] == "WBC"]
    assert len(wbc) > 10
    if kind == "leukemia":
        assert set(wbc["wbc_type"]) == set(WBC_TYPES)
    refs = slide.objects["ref"][wbc["object_id"].to_numpy()]
    for r, ref in zip(wbc.itertuples(), refs.tolist(), strict=True):
        dens, i0, j0 = _render_wbc(slide.wbc(ref), level=0)
        drawn = np.zeros((1024, 1024), dtype=bool)  # azure (nuclear) stain, clipped to the image
        y0, x0 = max(j0, 0), max(i0, 0)
        part = dens[1, y0 - j0 : 1024 - j0, x0 - i0 : 1024 - i0] > 0
        drawn[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = part
        assert np.array_equal(drawn[r.y0 : r.y1, r.x0 : r.x1], _mask(r.nucleus_mask).astype(bool))
        assert drawn.sum() == _mask(r.nucleus_mask).sum()  # nothing outside the box


def test_nucleus_pixels_are_purple_blue(blood: tuple[list[Path], pa.Table]) -> None:
    paths, table = blood
    df = table.to_pandas()
    wbc = df[(df["class"] == "WBC") & (df.slide_id == "slide_0000")]
    img = _level0(paths[0])
    lab = _lab(img)
    nuc = np.concatenate(
        [
            lab[r.y0 : r.y1, r.x0 : r.x1][_mask(r.nucleus_mask).astype(bool)]
            for r in wbc.itertuples()
        ]
    )
    rbc = df[(df["class"] == "RBC") & (df.slide_id == "slide_0000")]
    covered = np.zeros(img.shape[:2], dtype=bool)
    for r in rbc.itertuples():
        covered[max(r.y0 - 4, 0) : r.y1 + 4, max(r.x0 - 4, 0) : r.x1 + 4] = True
    background = lab[~covered]
    a_nuc, b_nuc = nuc[:, 1].mean(), nuc[:, 2].mean()
    a_bg, b_bg = background[:, 1].mean(), background[:, 2].mean()
    assert a_nuc > a_bg + 20 and b_nuc < b_bg - 25  # reference stain: nucleus a* +37, b* -49
    assert nuc[:, 0].mean() < background[:, 0].mean() - 20


def _near_white_tiles(img: np.ndarray, tile: int = 256) -> list[bool]:
    """Per tile: is it bare glass (what a background-skip step looks for)?"""
    out = []
    for y in range(0, img.shape[0], tile):
        for x in range(0, img.shape[1], tile):
            t = img[y : y + tile, x : x + tile].astype(np.int16)
            out.append(bool(np.mean(t.min(axis=2) > 210) > 0.995 and t.std() < 8))
    return out


def test_blank_fraction(tmp_path: Path) -> None:
    paths = synth_slides(
        tmp_path, slides=1, width=2048, height=2048, seed=3, blank_fraction=0.5, format="png"
    )
    img = _imread_rgb(paths[0])
    white = _near_white_tiles(img)
    assert 0.35 <= np.mean(white) <= 0.6
    # No object touches the glass (beyond the feathered edge).
    df = pq.read_table(tmp_path / GROUND_TRUTH_FILE).to_pandas()
    g = make_slide("slide_0000", 2048, 2048, seed=3, blank_fraction=0.5).geometry
    for y in ("y0", "y1"):
        assert (df.x1 <= g.edge_x(df[y].to_numpy(np.float64)) + 1).all()
    # The glass is near-white with slight noise.
    glass = img[:, 1900:][np.asarray(white).reshape(8, 8).repeat(256, 0).repeat(256, 1)[:, 1900:]]
    assert glass.min() > 200 and 0.5 < glass.std(axis=0).max() < 6
    # Without blank_fraction no tile is empty.
    full = render_region(make_slide("s", 2048, 2048, seed=3), 0, 0, 2048, 2048)
    assert not any(_near_white_tiles(full))


def test_regions_are_seamless() -> None:
    slide = make_slide("s", 1024, 1024, seed=5)
    whole = render_region(slide, 0, 0, 1024, 1024)
    for x, y in ((0, 0), (300, 500), (512, 256)):
        assert np.array_equal(render_region(slide, x, y, 300, 260), whole[y : y + 260, x : x + 300])
    # Level 1 is rendered from the objects directly; it matches a 2x reduction of level 0.
    half = render_region(slide, 0, 0, 512, 512, level=1).astype(np.float32)
    reduced = cv2.resize(whole, (512, 512), interpolation=cv2.INTER_AREA).astype(np.float32)
    assert np.abs(half - reduced).mean() < 6.0


def test_subtypes_overlap_but_differ() -> None:
    area: dict[str, list[float]] = {s: [] for s in SUBTYPES}
    condensation: dict[str, list[float]] = {s: [] for s in SUBTYPES}
    nucleoli: dict[str, list[int]] = {s: [] for s in SUBTYPES}
    for seed in range(4):
        slide = make_slide("s", 1536, 1536, seed=seed, kind="marrow")
        # Marrow: many nucleated cells (40-60 per oil field of ~780 x 780 px).
        assert (slide.objects["cls"] == 1).sum() > 100
        df = ground_truth_table(slide).to_pandas()
        for r in df[df["class"] == "WBC"].itertuples():
            area[r.subtype].append(0.25**2 * float(_mask(r.nucleus_mask).sum()))
        for ref, sub in enumerate(slide.wbc_subtypes.tolist()):
            model = slide.wbc(ref)
            condensation[SUBTYPES[sub]].append(model.condensation)
            nucleoli[SUBTYPES[sub]].append(len(model.nucleoli))
    assert all(len(v) >= 15 for v in area.values()), {k: len(v) for k, v in area.items()}
    benign, pro_b = np.array(area["benign"]), np.array(area["pro_b"])
    assert pro_b.mean() > 1.4 * benign.mean()  # blasts are larger (um^2 of nucleus)
    assert pro_b.min() < benign.max()  # ... but the ranges overlap
    cb, ce = np.array(condensation["benign"]), np.array(condensation["early_pre_b"])
    assert cb.mean() > ce.mean() + 0.2 and cb.min() < ce.max()
    nb, npro = np.array(nucleoli["benign"]), np.array(nucleoli["pro_b"])
    assert npro.mean() > nb.mean() + 1.0 and (npro == 0).any() and (nb > 0).any()


@pytest.mark.parametrize("fmt, suffix", [("jpeg", ".jpg"), ("png", ".png")])
def test_plain_formats(tmp_path: Path, fmt: str, suffix: str) -> None:
    paths = synth_slides(tmp_path, slides=2, width=640, height=480, seed=4, format=fmt)  # type: ignore[arg-type]
    assert [p.name for p in paths] == [f"slide_0000{suffix}", f"slide_0001{suffix}"]
    rgb = _imread_rgb(paths[0])
    assert rgb.shape == (480, 640, 3)
    df = pq.read_table(tmp_path / GROUND_TRUTH_FILE).to_pandas()
    assert set(df.slide_id) == {"slide_0000", "slide_0001"} and (df["class"] == "RBC").any()
    # Slide i is drawn from (seed, i): the same content as the level 0 of a TIFF.
    for i, path in enumerate(paths):
        expected = render_region(make_slide("x", 640, 480, seed=4, index=i), 0, 0, 640, 480)
        rgb = _imread_rgb(path)
        if fmt == "png":
            assert np.array_equal(rgb, expected)
        else:
            assert np.abs(rgb.astype(np.int16) - expected).mean() < 3.0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="blank_fraction"):
        synth_slides(tmp_path, slides=1, width=256, height=256, seed=0, blank_fraction=1.0)
    with pytest.raises(ConfigError, match="tile_size"):
        synth_slides(tmp_path, slides=1, width=256, height=256, seed=0, tile_size=100)
    with pytest.raises(ConfigError, match="kind"):
        synth_slides(tmp_path, slides=1, width=256, height=256, seed=0, kind="csf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="blast_fraction applies to kind='leukemia'"):
        synth_slides(tmp_path, slides=1, width=256, height=256, seed=0, blast_fraction=0.3)
    with pytest.raises(ConfigError, match=r"blast_fraction must be in \[0, 1\]"):
        make_slide("s", 256, 256, seed=0, kind="leukemia", blast_fraction=1.5)
    with pytest.raises(ConfigError, match="wbc_mix"):
        make_slide("s", 256, 256, seed=0, kind="marrow", wbc_mix={"blast": 1.0})
    with pytest.raises(ConfigError, match="wbc_mix"):
        make_slide("s", 256, 256, seed=0, wbc_mix={"myelocyte": 1.0})


def test_written_tile_by_tile(tmp_path: Path) -> None:
    """Peak Python/numpy memory stays far below one full level, whatever the slide size."""
    synth_slides(tmp_path / "warm", slides=1, width=512, height=512, seed=1)  # imports, caches
    peaks = []
    for side in (4096, 8192):
        tracemalloc.start()
        try:
            paths = synth_slides(
                tmp_path / str(side), slides=1, width=side, height=side, seed=1, blank_fraction=0.9
            )
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    full_image = 8192 * 8192 * 3  # 192 MiB as one RGB array
    assert peaks[1] < full_image / 5, f"peak {peaks[1] / 2**20:.0f} MiB"
    assert peaks[1] < 1.5 * peaks[0]  # 4x the pixels, about the same memory
    with tifffile.TiffFile(paths[0]) as tif:
        assert tif.series[0].levels[0].shape == (8192, 8192, 3)


# ---------------------------------------------------------------------------
# WBC types: the differential per kind, blasts, subtypes, and how each type looks
# ---------------------------------------------------------------------------
#: A blood / leukemia slide's type counts follow its drawn mix within this many cells
#: (stratified assignment; placement rejections add a little noise).
COUNT_TOLERANCE = 2.5


def _wbcs(slide: object) -> pd.DataFrame:
    df = ground_truth_table(slide).to_pandas()  # type: ignore[arg-type]
    return df[df["class"] == "WBC"]


def test_normal_differential_is_drawn_around_the_reference_means() -> None:
    from batch.synth import _normal_mix

    rng = np.random.default_rng(0)
    mixes = pd.DataFrame([_normal_mix(rng) for _ in range(2000)], columns=list(NORMAL_WBC_TYPES))
    # Reference ranges (% of leukocytes); the central 95 % of slides stay inside them,
    # give or take a point for the two large classes.
    ranges = {
        "neutrophil": (0.40, 0.72),
        "lymphocyte": (0.20, 0.44),
        "monocyte": (0.02, 0.10),
        "eosinophil": (0.01, 0.06),
        "basophil": (0.005, 0.017),
    }
    for t, (lo, hi) in ranges.items():
        assert mixes[t].mean() == pytest.approx(WBC_TYPE_MEANS[t], abs=0.005), t
        q = mixes[t].quantile([0.025, 0.975])
        assert lo <= q.iloc[0] and q.iloc[1] <= hi, (t, q.tolist())
    assert mixes["neutrophil"].std() > 0.04  # slides differ


@pytest.mark.parametrize("seed", [1, 2])
def test_blood_type_counts_follow_the_slide_mix(seed: int) -> None:
    slide = make_slide("s", 4096, 4096, seed=seed, kind="blood")
    wbc = _wbcs(slide)
    n = len(wbc)
    assert 25 <= n <= 120
    counts = wbc["wbc_type"].value_counts()
    assert set(counts.index) <= set(NORMAL_WBC_TYPES)
    assert slide.type_mix["blast"] == 0.0 and slide.blast_mix == {}
    for t in NORMAL_WBC_TYPES:
        assert abs(counts.get(t, 0) - n * slide.type_mix[t]) <= COUNT_TOLERANCE, t
    assert 0.40 <= slide.type_mix["neutrophil"] <= 0.70
    assert 0.20 <= slide.type_mix["lymphocyte"] <= 0.40
    assert counts["neutrophil"] > counts.get("lymphocyte", 0) > counts.get("basophil", 0)


@pytest.mark.parametrize("seed, fraction", [(1, None), (2, 0.6), (3, 0.3), (4, 0.9)])
def test_leukemia_blast_share_and_dominant_subtype(seed: int, fraction: float | None) -> None:
    slide = make_slide("s", 2048, 2048, seed=seed, kind="leukemia", blast_fraction=fraction)
    f = 0.6 if fraction is None else fraction  # the default
    assert slide.blast_fraction == f and slide.type_mix["blast"] == f
    wbc = _wbcs(slide)
    n = len(wbc)
    assert n >= 25  # 4x the blood density: ~40 WBCs on a 2048 x 2048 field
    blasts = wbc[wbc["wbc_type"] == "blast"]
    assert abs(len(blasts) - f * n) <= COUNT_TOLERANCE
    assert abs(len(blasts) / n - f) <= 0.08
    # Blasts carry a blast subtype; the normal types none.
    assert set(blasts["subtype"]) <= set(BLAST_SUBTYPES) and blasts["subtype"].notna().all()
    assert wbc.loc[wbc["wbc_type"] != "blast", "subtype"].isna().all()
    # One dominant subtype, 60-85 % of the blasts; the other two share the rest.
    lo, hi = DOMINANT_FRACTION_RANGE
    dominant = max(slide.blast_mix, key=slide.blast_mix.__getitem__)
    assert lo <= slide.blast_mix[dominant] <= hi
    held = (blasts["subtype"] == dominant).sum()
    slack = COUNT_TOLERANCE / len(blasts)
    assert lo - slack <= held / len(blasts) <= hi + slack
    assert blasts["subtype"].value_counts().idxmax() == dominant
    # The rest are the normal types in a normal differential.
    normal = wbc[wbc["wbc_type"] != "blast"]
    assert normal["wbc_type"].value_counts().idxmax() == "neutrophil" or len(normal) < 10


def test_marrow_types_are_hematogones_and_blasts() -> None:
    wbc = _wbcs(make_slide("s", 1024, 1024, seed=6, kind="marrow"))
    assert len(wbc) > 50
    assert set(wbc["wbc_type"]) == {"lymphocyte", "blast"}
    assert (wbc["subtype"] == "benign").equals(wbc["wbc_type"] == "lymphocyte")
    assert set(wbc.loc[wbc["wbc_type"] == "blast", "subtype"]) <= set(BLAST_SUBTYPES)


def test_wbc_type_is_null_exactly_for_non_wbcs() -> None:
    for kind in ("blood", "leukemia", "marrow"):
        df = ground_truth_table(make_slide("s", 1024, 1024, seed=8, kind=kind)).to_pandas()  # type: ignore[arg-type]
        assert df["wbc_type"].isna().equals(df["class"] != "WBC"), kind
        assert set(df["wbc_type"].dropna()) <= set(WBC_TYPES)
        assert df.loc[df["class"] != "WBC", "subtype"].isna().all()


@pytest.fixture(scope="module")
def typed_cells() -> dict[str, pd.DataFrame]:
    """Per type: colour and geometry figures of uncut WBCs, measured on rendered pixels.

    A 1536 x 1536 leukemia field with every type equally often (``wbc_mix``).
    The cell region is the disc inscribed in the truth box (shrunk to 85 %);
    the cytoplasm is that disc minus the truth nucleus mask dilated by 2 px.
    """
    side = 1536
    figures: list[dict[str, object]] = []
    for seed in (0, 1):
        slide = make_slide(
            "s", side, side, seed=seed, kind="leukemia", wbc_mix={t: 1.0 for t in WBC_TYPES}
        )
        img = render_region(slide, 0, 0, side, side)
        lab = _lab(img)
        rgb = img.astype(np.float32)
        wbc = _wbcs(slide)
        inner = (wbc.x0 > 0) & (wbc.y0 > 0) & (wbc.x1 < side) & (wbc.y1 < side)
        for r in wbc[inner].itertuples():
            h, w = r.y1 - r.y0, r.x1 - r.x0
            yy, xx = np.mgrid[0:h, 0:w]
            radius = 0.25 * (h + w)
            disc = np.hypot(xx + 0.5 - w / 2, yy + 0.5 - h / 2) < 0.85 * radius
            nucleus = _mask(r.nucleus_mask).astype(bool)
            grown = cv2.dilate(nucleus.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            cyto = disc & ~grown
            crop_rgb, crop_lab = rgb[r.y0 : r.y1, r.x0 : r.x1], lab[r.y0 : r.y1, r.x0 : r.x1]
            hull = np.zeros((h, w), np.uint8)  # pixels of the nucleus's convex hull
            cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(nucleus.astype(np.uint8))), 1)
            figures.append(
                {
                    "type": r.wbc_type,
                    "cyto_red_minus_blue": float((crop_rgb[..., 0] - crop_rgb[..., 2])[cyto].mean())
                    if cyto.sum() > 20
                    else np.nan,
                    "cyto_a": float(crop_lab[..., 1][cyto].mean()) if cyto.sum() > 20 else np.nan,
                    "cyto_b": float(crop_lab[..., 2][cyto].mean()) if cyto.sum() > 20 else np.nan,
                    "cell_L": float(crop_lab[..., 0][disc].mean()),
                    "nucleus_L": float(crop_lab[..., 0][nucleus].mean()),
                    "nc": float(nucleus.sum() / (np.pi * radius**2)),
                    "solidity": float(nucleus.sum() / max(int(hull.sum()), 1)),
                    "diameter_um": 0.25 * 2 * radius,
                }
            )
    df = pd.DataFrame(figures)
    return {t: g for t, g in df.groupby("type")}


def test_each_type_renders_the_way_it_should(typed_cells: dict[str, pd.DataFrame]) -> None:
    assert set(typed_cells) == set(WBC_TYPES)
    assert all(len(g) >= 6 for g in typed_cells.values()), {
        t: len(g) for t, g in typed_cells.items()
    }
    med = {t: g.median(numeric_only=True) for t, g in typed_cells.items()}
    neu, lym, mono, eos, baso = (med[t] for t in NORMAL_WBC_TYPES)
    # Eosinophil cytoplasm (its granules) is orange-red; the neutrophil's pale pink-lilac.
    assert eos.cyto_red_minus_blue > neu.cyto_red_minus_blue + 50
    assert eos.cyto_a > neu.cyto_a + 10 and eos.cyto_b > neu.cyto_b + 15
    # Basophils (dark granules) are darker overall than neutrophils, monocytes, eosinophils.
    assert baso.cell_L < min(neu.cell_L, mono.cell_L, eos.cell_L) - 10
    # Lymphocytes: high N:C with a dense nucleus; monocytes: abundant cytoplasm, paler nucleus.
    assert lym.nc > mono.nc + 0.15 and lym.nc > neu.nc + 0.2
    assert mono.nucleus_L > lym.nucleus_L + 6
    # Monocyte cytoplasm is grey-blue: bluer (lower b*) than the neutrophil's.
    assert mono.cyto_b < neu.cyto_b - 6
    # Segmented and bilobed nuclei are far from convex (nucleus / convex hull pixels; medians
    # 0.72, 0.86); kidney / horseshoe monocyte nuclei less round than lymphocytes' (0.93, 0.98).
    assert neu.solidity < 0.8 and eos.solidity < 0.92 and lym.solidity > 0.95
    assert mono.solidity < lym.solidity - 0.02
    # Sizes (um): small lymphocytes < neutrophils < monocytes.
    assert lym.diameter_um < neu.diameter_um < mono.diameter_um
    assert 10.0 <= neu.diameter_um <= 14.0 and 12.0 <= mono.diameter_um <= 18.0


def test_synth_cli_kinds(tmp_path: Path) -> None:
    from batch.cli import main

    argv = ["synth", "--out", str(tmp_path), "--width", "640", "--height", "480", "--format", "png"]
    assert main([*argv, "--kind", "leukemia", "--blast-fraction", "0.5", "--seed", "3"]) == 0
    df = pq.read_table(tmp_path / GROUND_TRUTH_FILE).to_pandas()
    wbc = df[df["class"] == "WBC"]
    assert len(wbc) > 0 and set(wbc["wbc_type"]) <= set(WBC_TYPES)
    with pytest.raises(SystemExit):
        main([*argv, "--kind", "csf"])
