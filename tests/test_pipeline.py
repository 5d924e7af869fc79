"""End-to-end: `hemaray run` on generated slides with the shipped models on one local Ray.

Contracts of the design, each asserted on real runs: seam cells counted once,
deterministic ids, atomic per-slide commit with rerun skip, a bad slide is a
failures row, path-safe slide ids, readable by pyarrow / pandas / DuckDB.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pytest
import ray.data

import schemas
from batch.cli import main
from batch.config import load_config
from batch.errors import StageError
from batch.eval.run import align_truth_ids, evaluate_run
from batch.ids import slide_id_for
from batch.inputs import resolve_inputs
from batch.run.pipeline import cluster_resources, placement, run_pipeline
from batch.run.sink import read_table
from batch.synth import synth_slides

pytestmark = pytest.mark.usefixtures("ray_local")

# Small slides keep a run to a few tiles; a marrow slide has many WBCs, so seams get crossed.
W, H = 1400, 1100


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    synth_slides(d, slides=2, width=W, height=H, seed=5, kind="marrow")
    return d


@pytest.fixture(scope="module")
def truth(slides_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(slides_dir / "ground_truth.parquet")


@pytest.fixture(scope="module")
def first_run(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("run1") / "out"
    code = main(["run", str(slides_dir), "--out", str(out)])
    return out, code


def _stems(ids: Any) -> set[str]:
    """Slide ids without their URI hash (``slide_0000-1a2b3c4d`` -> ``slide_0000``)."""
    return {str(i).rsplit("-", 1)[0] for i in ids}


def _id(path: Path) -> str:
    return slide_id_for(str(path))


def _cells(out: Path | str, **kw: Any) -> pd.DataFrame:
    return read_table(str(out), "cells", **kw).to_pandas()


def test_run_commits_every_slide_with_schema(first_run: tuple[Path, int]) -> None:
    out, code = first_run
    assert code == 0
    cells = _cells(out)
    assert _stems(cells.slide_id) == {"slide_0000", "slide_0001"}
    assert cells.cell_id.is_unique
    schema = schemas.load("cells")
    for name in ("cell_id", "x0", "det_class", "detector_version", "wbc_type_label", "all_subtype_probs"):
        assert name in cells.columns
        assert schema.field(name) is not None
    slides = read_table(str(out), "slides").to_pandas()
    assert list(slides.status) == ["committed", "committed"]
    assert (slides.tiles_done == slides.tiles_planned - slides.tiles_skipped).all()
    assert (slides.n_wbc > 0).all()
    manifest = next(out.glob("runs/*/manifest.json"))
    assert "sha256" in manifest.read_text()
    # Every written file matches schemas/ (fields in order, types equal).
    for f in out.glob("cells/*/part-0.parquet"):
        file_schema = pads.dataset(f).schema
        for field in file_schema:
            if field.name in schema.names:
                assert field.type == schema.field(field.name).type, field.name


def test_seam_cells_counted_once(first_run: tuple[Path, int], truth: pd.DataFrame) -> None:
    out, _ = first_run
    slides = read_table(str(out), "slides").to_pandas()
    result = evaluate_run(_cells(out), align_truth_ids(truth, slides))
    assert result["wbc_true"] > 20
    assert result["wbc_seam_duplicates"] == 0
    assert result["wbc_duplicates"] == 0
    # The shipped detector finds most synthetic WBCs (figure printed for the record).
    assert result["per_class"]["WBC"]["recall"] > 0.7, result


def test_readers_agree(first_run: tuple[Path, int]) -> None:
    out, _ = first_run
    n_arrow = pads.dataset(out / "cells", format="parquet", partitioning="hive").count_rows()
    n_pandas = len(pd.read_parquet(out / "cells"))
    ((n_duck, n_ids),) = duckdb.sql(
        f"select count(*), count(distinct cell_id) from read_parquet('{out}/cells/*/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert n_arrow == n_pandas == n_duck == n_ids > 0


def test_rerun_skips_and_adds_nothing(first_run: tuple[Path, int], slides_dir: Path) -> None:
    out, _ = first_run
    before = _cells(out).sort_values("cell_id").reset_index(drop=True)
    config = load_config()
    result = run_pipeline(resolve_inputs([str(slides_dir)]), str(out), config)
    assert result.committed == [] and _stems(result.skipped) == {"slide_0000", "slide_0001"}
    after = _cells(out).sort_values("cell_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)


def test_two_runs_identical_across_placements_and_overwrite(
    first_run: tuple[Path, int], slides_dir: Path, tmp_path: Path
) -> None:
    out, _ = first_run
    other = tmp_path / "again"
    # The second run uses the other placement: the default on this CPU-only instance is "fused"
    # (one actor runs the whole chain); "staged" is the GPU wiring (separate actor pools).
    staged = load_config(None, ["execution.placement=staged"])
    assert placement(load_config(), cluster_resources()) == "fused"
    ctx = ray.data.DataContext.get_current()
    block_size, limits = ctx.target_max_block_size, ctx.execution_options.resource_limits
    result = run_pipeline(resolve_inputs([str(slides_dir)]), str(other), staged)
    assert _stems(result.committed) == {"slide_0000", "slide_0001"}
    # The run's block size and object store budget do not leak into the caller's Ray Data.
    ctx = ray.data.DataContext.get_current()
    assert ctx.target_max_block_size == block_size
    assert ctx.execution_options.resource_limits == limits
    for sid in result.committed:
        a = (out / f"cells/slide_id={sid}/part-0.parquet").read_bytes()
        b = (other / f"cells/slide_id={sid}/part-0.parquet").read_bytes()
        a_df = pd.read_parquet(out / f"cells/slide_id={sid}/part-0.parquet")
        b_df = pd.read_parquet(other / f"cells/slide_id={sid}/part-0.parquet")
        pd.testing.assert_frame_equal(a_df, b_df)
        assert len(a) > 0 and len(b) > 0
    # --overwrite reprocesses and still leaves exactly one copy of each cell.
    again = run_pipeline(resolve_inputs([str(slides_dir)]), str(other), load_config(), overwrite=True)
    assert _stems(again.committed) == {"slide_0000", "slide_0001"}
    assert _cells(other).cell_id.is_unique
    assert len(_cells(other)) == len(_cells(out))


def test_bad_slides_are_failure_rows(slides_dir: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(slides_dir / "slide_0000.tif", inputs / "good.tif")
    (inputs / "notes.tif").write_text("this is not a slide")
    data = (slides_dir / "slide_0001.tif").read_bytes()
    (inputs / "truncated.tif").write_bytes(data[: len(data) // 2])
    (inputs / "..evil name.tif").write_bytes(data)
    out = tmp_path / "out"
    code = main(["run", str(inputs), str(inputs / "missing.tif"), "--out", str(out)])
    assert code == 2
    failures = read_table(str(out), "failures").to_pandas()
    by_id = dict(zip(failures.slide_id, failures.error_type, strict=True))
    # Each error is the worker's own class, raised at open, with its slide's URI in the message.
    assert {k.rsplit("-", 1)[0]: v for k, v in by_id.items()} == {
        "notes": "UnsupportedSlideError",
        "truncated": "CorruptSlideError",
        "missing": "SlideNotFoundError",
    }
    assert (failures.stage == "open").all()
    assert failures.message.str.contains("notes.tif|truncated.tif|missing.tif").all()
    truncated = failures[failures.slide_id == _id(inputs / "truncated.tif")]
    assert truncated.message.str.contains(str(inputs / "truncated.tif"), regex=False).all()
    cells = _cells(out)
    # Failed slides leave no rows; the good ones (including the oddly named one) commit.
    assert _stems(cells.slide_id) == {"good", "evil_name"}
    evil = _id(inputs / "..evil name.tif")
    assert evil.startswith("evil_name-")
    assert not list(out.glob("cells/*..*")) and (out / "cells" / f"slide_id={evil}").is_dir()
    slides = read_table(str(out), "slides").to_pandas().set_index("slide_id")
    assert slides.loc[_id(inputs / "truncated.tif"), "status"] == "failed"
    assert slides.loc[evil, "slide_uri"].endswith("..evil name.tif")


def test_tile_failure_fails_only_that_slide(slides_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = resolve_inputs([str(slides_dir)])
    # Fault injection by flag (travels with the config to the workers): one tile of
    # slide_0001 fails to read after other tiles of that slide may already be staged.
    s0, s1 = _id(slides_dir / "slide_0000.tif"), _id(slides_dir / "slide_0001.tif")
    faulty = load_config(None, [f"execution.inject_fault=read:{s1}:1:1"])
    result = run_pipeline(inputs, str(out), faulty)
    assert result.committed == [s0]
    assert list(result.failed) == [s1]
    failures = read_table(str(out), "failures").to_pandas()
    assert failures.stage.tolist() == ["read"]
    assert set(_cells(out).slide_id.astype(str)) == {s0}
    assert "injected" in failures.message[0]
    # The worker's OSError reaches the driver typed: a StageError naming its class and tile.
    error = result.errors[s1]
    assert isinstance(error, StageError) and error.type_name == "OSError"
    assert (error.slide, error.tile, error.stage) == (s1, f"{s1}:1:1", "read")
    assert failures.error_type.tolist() == ["OSError"] and failures.tile.tolist() == [f"{s1}:1:1"]
    # Rerun without the fault: the failed slide is retried and commits; nothing doubles.
    again = run_pipeline(inputs, str(out), load_config())
    assert again.committed == [s1] and again.skipped == [s0]
    assert _cells(out).cell_id.is_unique


def test_s3_in_and_out(slides_dir: Path, s3: dict[str, Any]) -> None:
    fs, bucket = s3["fs"], s3["bucket"]
    for p in sorted(slides_dir.glob("*.tif")):
        fs.put(str(p), f"{bucket}/cohort/{p.name}")
    out = f"s3://{bucket}/results"
    code = main(["run", f"s3://{bucket}/cohort/", "--out", out, "--endpoint-url", s3["endpoint"]])
    assert code == 0
    cells = _cells(out, storage_options=s3["storage_options"])
    ids = {slide_id_for(f"s3://{bucket}/cohort/{n}.tif") for n in ("slide_0000", "slide_0001")}
    assert set(cells.slide_id.astype(str)) == ids
    assert cells.cell_id.is_unique
    assert all(fs.exists(f"{bucket}/results/slides/{i}.parquet") for i in ids)
