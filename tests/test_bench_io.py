"""batch.bench.bench_io on a small generated slide: the figures exist and are sane.

No timing assertions: the machine is shared. The over-read bound is loose on
purpose (10 regions carry all of the header reads).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from batch.bench import bench_io

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
    # the generated synthetic smear stays in workdir
    assert (tmp_path / "slide_0000.tif").exists()
