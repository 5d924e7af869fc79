"""Detector runtimes: exported once into the cache, the same boxes as PyTorch, chosen by config."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.config import load_config
from batch.errors import ConfigError, ModelLoadError
from batch.eval.metrics import detection_parity
from batch.models import DEFAULT_DETECTOR
from batch.run.tasks import model_key
from batch.slides import open_slide
from batch.stages.detect import CellDetector
from batch.stages.runtime import export_key, exported_model
from batch.synth import synth_slides

#: Boxes of an exported runtime match PyTorch's at least this well (same class).
PARITY_IOU = 0.9
PARITY_CONF = 0.02


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> list[object]:
    (path,) = synth_slides(tmp_path_factory.mktemp("rt"), slides=1, width=1280, height=1280, seed=2)
    with open_slide(path) as slide:
        return [slide.read_region(x, y, 640, 640) for x in (0, 640) for y in (0, 640)]


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown runtime"):
        exported_model(DEFAULT_DETECTOR, "tensorflow")
    with pytest.raises(ConfigError, match="detect.runtime"):
        load_config(None, ["detect.runtime=tensorflow"])
    assert exported_model(DEFAULT_DETECTOR, "torch") == DEFAULT_DETECTOR


def test_the_export_key_follows_weights_and_runtime() -> None:
    a = export_key("a" * 64, "openvino")
    assert a != export_key("b" * 64, "openvino") and a != export_key("a" * 64, "onnxruntime")
    assert a == export_key("a" * 64, "openvino")


def test_cell_ids_of_torch_runs_do_not_depend_on_the_runtime_key() -> None:
    torch_cfg, ov_cfg = load_config(), load_config(None, ["detect.runtime=openvino"])
    assert model_key(torch_cfg, "s" * 64) == model_key(load_config(), "s" * 64)
    assert model_key(ov_cfg, "s" * 64) != model_key(torch_cfg, "s" * 64)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtime_gives_torch_boxes(
    runtime: str, tiles: list[object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEMARAY_CACHE_DIR", str(tmp_path))
    reference = CellDetector(device="cpu").detect(tiles, 0.25)
    exported = CellDetector(device="cpu", runtime=runtime)
    parity = detection_parity(reference, exported.detect(tiles, 0.25))
    assert parity["n_reference"] > 100
    assert parity["matched_fraction"] == 1.0 and parity["n_other"] == parity["n_reference"]
    assert parity["worst_iou"] >= PARITY_IOU and parity["max_conf_diff"] <= PARITY_CONF
    # Exported once: the second detector loads the cached export, untouched.
    path = exported_model(DEFAULT_DETECTOR, runtime)
    stamp = path.stat().st_mtime_ns
    CellDetector(device="cpu", runtime=runtime)
    assert exported_model(DEFAULT_DETECTOR, runtime) == path and path.stat().st_mtime_ns == stamp
    assert path.is_relative_to(tmp_path / "exports")
