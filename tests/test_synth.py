"""Synthetic smears: file layout, determinism, ground truth, realism, bounded memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from batch.errors import ConfigError
from batch.synth import (
    CLASSES,
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_SCHEMA,
    SUBTYPES,
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
    assert set(wbc["subtype"]) <= set(SUBTYPES)
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


def test_nucleus_mask_is_the_drawn_nucleus() -> None:
    from batch.synth import _render_wbc

    slide = make_slide("s", 1024, 1024, seed=6, kind="marrow")
    df = ground_truth_table(slide).to_pandas()
    wbc = df[df["class"] == "WBC"]
    assert len(wbc) > 10
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
