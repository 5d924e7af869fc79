"""Evaluation commands on generated data: the image-level chain agrees with `hemaray run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from batch.cli import main
from batch.config import load_config
from batch.eval.images import call_images, eval_images
from batch.inputs import resolve_inputs
from batch.run.pipeline import run_pipeline
from batch.run.sink import read_table
from batch.synth import synth_slides


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic marrow fields as PNGs, filed under their dominant subtype (ImageFolder)."""
    src = tmp_path_factory.mktemp("fields")
    synth_slides(src, slides=4, width=640, height=480, seed=21, kind="marrow", format="png")
    truth = pd.read_parquet(src / "ground_truth.parquet")
    wbc = truth[truth["class"] == "WBC"]
    root = tmp_path_factory.mktemp("folder")
    for sid, group in wbc.groupby("slide_id"):
        label = group.subtype.value_counts().idxmax()
        (root / label).mkdir(exist_ok=True)
        shutil.copy(src / f"{sid}.png", root / label / f"{sid}.png")
    return root


def test_eval_images_matches_run_calls(image_folder: Path, tmp_path: Path, ray_local: None) -> None:
    config = load_config(None, ["mpp=0.25"])
    paths = sorted(image_folder.glob("*/*.png"))
    calls = call_images(paths, config)
    out = tmp_path / "out"
    result = run_pipeline(resolve_inputs([str(image_folder)]), str(out), config)
    assert len(result.committed) == len(paths)
    slides = read_table(str(out), "slides").to_pandas().set_index("slide_uri")
    for p in paths:
        row = slides.loc[str(p)]
        assert row.all_subtype_call == calls[str(p)]["all_subtype_call"]
        assert row.n_wbc == calls[str(p)]["n_wbc"]
        assert row.mpp_source == "config"
    scored = eval_images(image_folder, config)
    assert scored["n_images"] == len(paths)
    assert 0.0 <= scored["accuracy"] <= 1.0
    assert set(scored["per_class"]) == {p.parent.name for p in paths}


def test_eval_images_cli_prints_json_last(
    image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "images", "--data", str(image_folder), "--mpp", "0.25", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    data = json.loads(last)
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(data)


def test_eval_classifier_on_crops(
    image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "reliability.png"
    argv = ["eval", "classifier", "--model", "all_subtype", "--data", str(image_folder), "--json"]
    assert main([*argv, "--png", str(png)]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["n"] == len(list(image_folder.glob("*/*.png")))
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} & set(data)
    # Calibration: the card's temperature (1.0 when it has none) and the ECE at T = 1 and at T.
    assert data["temperature"] > 0 and 0 <= data["ece"] <= 1 and 0 <= data["ece_before"] <= 1
    if data["temperature"] == 1.0:
        assert data["ece"] == data["ece_before"]
    assert data["reliability_png"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_eval_synthetic_cli_scores_detection_and_segmentation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["eval", "synthetic", "--seed", "5", "--slides", "1", "--size", "2048", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["per_class"]) == {"RBC", "WBC", "platelet"}
    wbc = result["per_class"]["WBC"]
    assert wbc["n_true"] > 0 and result["seg_cells"] == wbc["n_true"]
    # The shipped detector finds the generator's WBCs, each once; the seeds' segmentation fits.
    assert result["wbc_f1"] >= 0.8 and result["wbc_duplicates"] == 0
    assert 0.8 <= result["seg_dice"] <= 1.0 and 0.0 < result["seg_iou"] <= result["seg_dice"]
    # WBC types and slide figures are reported next to them (their values depend on the models).
    assert {"wbc_type_accuracy", "differential_max_error_pp", "call_accuracy"} <= set(result)


def test_eval_synthetic_scores_types_and_slide_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring without models: a stand-in chain that reports the truth gives perfect scores."""
    import pyarrow as pa

    import batch.eval.synthetic as synthetic

    def truthful_chain(paths: list[Path], config: object, progress: object = None):  # type: ignore[no-untyped-def]
        truth = pd.read_parquet(Path(paths[0]).parent / "ground_truth.parquet")
        for p in paths:
            t = truth[truth.slide_id == Path(p).stem]
            wbc = t["class"] == "WBC"
            yield str(p), pa.Table.from_pandas(
                pd.DataFrame(
                    {
                        "det_class": t["class"], "x0": t.x0, "y0": t.y0, "x1": t.x1, "y1": t.y1,
                        "det_confidence": 0.9, "nucleus_area_um2": 40.0, "nucleus_mean_a": 40.0,
                        "wbc_type_label": t["wbc_type"].where(wbc),
                        "all_subtype_label": t["subtype"].where(t["wbc_type"] == "blast"),
                    }
                ),
                preserve_index=False,
            )  # fmt: skip

    monkeypatch.setattr(synthetic, "chain_cells", truthful_chain)
    result = synthetic.eval_synthetic(
        load_config(None, []), seed=3, slides=2, width=1024, height=1024, kind="leukemia",
        blast_fraction=0.5, workdir=tmp_path,
    )  # fmt: skip
    assert result["kind"] == "leukemia" and result["blast_fraction_generated"] == 0.5
    assert result["wbc_f1"] == 1.0 and result["wbc_type_accuracy"] == 1.0
    assert result["wbc_type_macro_recall"] == 1.0
    assert result["differential_max_error_pp"] == 0.0
    assert result["blast_fraction_max_abs_error"] == 0.0
    assert result["call_accuracy"] == 1.0
    assert set(result["differential"]) == set(result["calls"]) == {"slide_0000", "slide_0001"}
    assert all(c["truth"] in {"early_pre_b", "pre_b", "pro_b"} for c in result["calls"].values())
