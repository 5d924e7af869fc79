"""batch.bench.bench_io on a small generated slide: the figures exist and are sane.

No timing assertions: the machine is shared. The over-read bound is loose on
purpose (10 regions carry all of the header reads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile

from batch.bench import bench_io, write_bench_slide
from batch.slides import open_slide

KEYS = {
    "regions",
    "region_size",
    "slide_width",
    "slide_height",
    "s3_bytes",
    "tile_bytes",
    "s3_overread_ratio",
    "s3_gets",
    "s3_gets_per_region",
    "hemaray_regions_per_s",
    "tifffile_regions_per_s",
    "s3_regions_per_s",
    "read_vs_tifffile",
}


def test_bench_io_small_slide(tmp_path: Path) -> None:
    result = bench_io(width=4096, height=4096, regions=10, region_size=640, workdir=tmp_path)
    json.dumps(result)
    assert KEYS - result.keys() == set()
    assert (result["regions"], result["region_size"]) == (10, 640)
    assert (result["slide_width"], result["slide_height"]) == (4096, 4096)
    ratio = result["s3_overread_ratio"]
    assert math.isfinite(ratio) and 1.0 <= ratio < 2.0
    assert result["s3_bytes"] >= result["tile_bytes"] > 0
    # one GET per tile row a region touches (at most 3 for 640 px over 512 px tiles) + header
    assert 1 <= result["s3_gets_per_region"] <= 3 + result["s3_open_gets"] / 10
    for key in ("hemaray_regions_per_s", "tifffile_regions_per_s", "s3_regions_per_s"):
        assert result[key] > 0
    assert result["read_vs_tifffile"] > 0
    # the generated slide stays in workdir and is reused
    assert (tmp_path / "bench_4096x4096_seed0.tif").exists()


def test_bench_slide_is_a_jpeg_pyramid_with_mpp(tmp_path: Path) -> None:
    path = write_bench_slide(tmp_path / "s.tif", width=2000, height=1300, seed=3)
    with open_slide(path) as slide:
        info = slide.info
        assert (info.width, info.height, info.compression) == (2000, 1300, "jpeg")
        assert info.tile_size == (512, 512)
        assert [(lv.width, lv.height) for lv in info.levels] == [(2000, 1300), (1000, 650)]
        assert info.mpp == 0.25
        region = slide.read_region(0, 0, 512, 512)
    assert region.std() > 5  # textured, not blank
    with tifffile.TiffFile(path) as tif:
        np.testing.assert_array_equal(region, tif.pages[0].asarray()[:512, :512])
    again = write_bench_slide(tmp_path / "t.tif", width=2000, height=1300, seed=3)
    assert again.read_bytes() == path.read_bytes()  # deterministic from the seed
