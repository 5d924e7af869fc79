"""Classifier runtimes: the same probabilities in PyTorch, OpenVINO and ONNX Runtime.

The shipped classifiers on crops of a synthetic smear: the hand-made input
(`to_input`) gives ultralytics' own predictions, each export gives PyTorch's
probabilities, an export is made once, and ``auto`` passes over an export
that failed its check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batch.config import load_config
from batch.errors import ConfigError
from batch.models import file_sha256
from batch.slides import open_slide
from batch.stages.classify import WbcClassifier
from batch.stages.classify_runtime import (
    PARITY_FILE,
    _export_key,
    choose_classifier_runtime,
    exported_classifier,
    to_input,
)
from batch.stages.runtime import EXPORTS_DIR
from batch.synth import synth_slides

SHIPPED = Path(__file__).resolve().parent.parent / "batch" / "models"
WBC_TYPE = SHIPPED / "wbc_type.pt"


@pytest.fixture(scope="module")
def smear(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """A 1024 px field of a synthetic leukemic smear (not the exports' parity slide)."""
    folder = tmp_path_factory.mktemp("cls-rt")
    (path,) = synth_slides(folder, slides=1, width=1024, height=1024, seed=7, kind="leukemia")
    with open_slide(path) as slide:
        return np.asarray(slide.read_region(0, 0, 1024, 1024))


def _windows(smear: np.ndarray, size: int, step: int) -> list[np.ndarray]:
    return [
        smear[y : y + size, x : x + size]
        for y in range(0, smear.shape[0] - size + 1, step)
        for x in range(0, smear.shape[1] - size + 1, step)
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cls-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEMARAY_CACHE_DIR", str(root))
        yield root


def test_the_input_is_what_ultralytics_feeds_its_network(smear: np.ndarray) -> None:
    """Squares as they are, other sizes resized and cut as ultralytics' classify transforms do."""
    from batch.models import load_yolo

    clf = WbcClassifier(WBC_TYPE, name="wbc_type", device="cpu", runtime="torch")
    yolo = load_yolo(WBC_TYPE, task="classify")
    squares = _windows(smear, clf.imgsz, 160)[:40]
    others = [smear[y : y + 70, x : x + 110] for y, x in ((0, 0), (300, 500), (700, 200))]
    others += [smear[y : y + 130, x : x + 90] for y, x in ((100, 100), (600, 800))]
    for images in (squares, others):
        ours = clf.predict_images(images, calibrated=False)
        theirs = np.stack([
            r.probs.data.float().numpy()
            for r in yolo.predict([im[..., ::-1] for im in images], imgsz=clf.imgsz,
                                  device="cpu", verbose=False)
        ])  # fmt: skip
        assert ours.shape == theirs.shape == (len(images), len(clf.class_names))
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert (ours.argmax(1) == theirs.argmax(1)).all()
    x = to_input(squares[:2], clf.imgsz)
    assert x.shape == (2, 3, clf.imgsz, clf.imgsz) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], squares[0][..., 0] / 255.0)  # channel 0 is red


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_an_export_gives_torch_probabilities_and_is_made_once(
    runtime: str, smear: np.ndarray, cache: Path
) -> None:
    reference = WbcClassifier(WBC_TYPE, name="wbc_type", device="cpu", runtime="torch")
    exported = WbcClassifier(WBC_TYPE, name="wbc_type", device="cpu", runtime=runtime, threads=1)
    assert exported.runtime == runtime and exported.runtime_choice.reason == "set in classify.runtime"
    crops = _windows(smear, 120, 60)  # rendered to the model's size, as the pipeline renders
    ref = reference.probabilities(crops, calibrated=True)
    got = exported.probabilities(crops, calibrated=True)
    assert len(crops) > 200
    assert np.abs(ref - got).max() < 1e-3
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99
    path = exported_classifier(WBC_TYPE, runtime, reference.imgsz)
    assert path.is_relative_to(cache / EXPORTS_DIR)
    record = json.loads((path.parent / PARITY_FILE).read_text())
    assert record["passed"] is True and record["crops"] > 100 and record["top1_agreement"] >= 0.99
    stamp = path.stat().st_mtime_ns
    again = WbcClassifier(WBC_TYPE, name="wbc_type", device="cpu", runtime=runtime)
    assert exported_classifier(WBC_TYPE, runtime, reference.imgsz) == path
    assert path.stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.probabilities(crops[:8]), got[:8], atol=1e-5)
    if runtime == "openvino":  # one thread, not pinned to the first core (another actor's)
        compiled = exported._forward.compiled
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert compiled.get_property("ENABLE_CPU_PINNING") is False


def _fake_export(cache: Path, runtime: str, imgsz: int, *, passed: bool) -> None:
    folder = cache / EXPORTS_DIR / _export_key(file_sha256(WBC_TYPE), runtime, imgsz)
    folder.mkdir(parents=True)
    name = {"openvino": "wbc_type_openvino_model", "onnxruntime": "wbc_type.onnx"}[runtime]
    (folder / name).mkdir() if runtime == "openvino" else (folder / name).write_bytes(b"x")
    record = {"crops": 324, "top1_agreement": 1.0 if passed else 0.9, "max_prob_diff": 0.3,
              "passed": passed}  # fmt: skip
    (folder / PARITY_FILE).write_text(json.dumps(record))


def test_auto_passes_over_an_export_that_failed_its_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEMARAY_CACHE_DIR", str(tmp_path))
    _fake_export(tmp_path, "openvino", 96, passed=False)
    _fake_export(tmp_path, "onnxruntime", 96, passed=True)
    choice = choose_classifier_runtime(WBC_TYPE, "auto", 96, "cpu")
    assert choice.runtime == "onnxruntime" and choice.parity is not None
    assert "passed its parity check" in choice.reason
    # Both failed: torch, saying why each was passed over.
    _fake_export(tmp_path, "openvino", 128, passed=False)
    _fake_export(tmp_path, "onnxruntime", 128, passed=False)
    choice = choose_classifier_runtime(WBC_TYPE, "auto", 128, "cpu")
    assert choice.runtime == "torch" and choice.parity is None
    assert "openvino: failed its parity check" in choice.reason
    assert "onnxruntime: failed its parity check" in choice.reason
    # On CUDA, torch (FP16) without exporting anything; a set runtime is taken as set.
    assert choose_classifier_runtime(WBC_TYPE, "auto", 64, "cuda:0").runtime == "torch"
    assert not list((tmp_path / EXPORTS_DIR).glob("*-64*"))
    assert choose_classifier_runtime(WBC_TYPE, "openvino", 64, "cpu").runtime == "openvino"


def test_classify_runtime_is_checked_in_config() -> None:
    assert load_config(None, []).classify.runtime == "auto"
    assert load_config(None, ["classify.runtime=openvino"]).classify.runtime == "openvino"
    with pytest.raises(ConfigError, match="classify.runtime must be one of"):
        load_config(None, ["classify.runtime=openvino-int8"])
    with pytest.raises(ValueError, match="runtime must be one of"):
        WbcClassifier(WBC_TYPE, name="w", device="cpu", runtime="tensorrt")
