"""Detector runtimes: exported once into the cache, the same boxes as PyTorch, chosen by config.

The CUDA path (TensorRT engine keys, ``auto`` on a GPU, placement) runs here on
faked device facts and a prepared cache: no test needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from batch.bench.gpu import NO_CUDA_EXIT, bench_gpu
from batch.config import load_config
from batch.errors import ConfigError, ModelLoadError
from batch.models import DEFAULT_DETECTOR, file_sha256
from batch.run.pipeline import Resources, placement
from batch.run.tasks import model_key
from batch.slides import open_slide
from batch.stages import device, quantize
from batch.stages.autoruntime import PREFERENCE, choose_runtime, runtime_record
from batch.stages.detect import CellDetector
from batch.stages.device import select_device
from batch.stages.parity import (
    PARITY_CONF,
    PARITY_IOU,
    QUANTIZED_IOU,
    detection_parity,
    parity_passed,
)
from batch.stages.runtime import (
    EXPORT_BATCH,
    EXPORTS_DIR,
    PARITY_FILE,
    DeviceFacts,
    device_facts,
    export_key,
    exported_model,
    read_parity,
)
from batch.synth import synth_slides

CPU = device_facts("cpu")
GPU = DeviceFacts("cuda:0", "NVIDIA A10G", {**CPU.versions, "tensorrt": "10.3.0"})


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> list[object]:
    (path,) = synth_slides(tmp_path_factory.mktemp("rt"), slides=1, width=1280, height=1280, seed=2)
    with open_slide(path) as slide:
        return [slide.read_region(x, y, 640, 640) for x in (0, 640) for y in (0, 640)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One model cache for this module's real exports (each runtime is exported once)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEMARAY_CACHE_DIR", str(root))
        yield root


def _fake_export(cache_dir: Path, runtime: str, facts: DeviceFacts, *, passed: bool) -> Path:
    """A cached export as `exported_model` leaves it (file + parity record), without building it."""
    name = {"tensorrt": "detector.engine", "onnxruntime": "detector.onnx"}[runtime]
    folder = cache_dir / EXPORTS_DIR / export_key(file_sha256(DEFAULT_DETECTOR), runtime, facts)
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"not a real model")
    parity = {"matched_fraction": 1.0 if passed else 0.8, "worst_iou": 0.99, "max_conf_diff": 0.001,
              "n_reference": 1000, "n_other": 1000 if passed else 800, "tiles": 16}  # fmt: skip
    (folder / PARITY_FILE).write_text(json.dumps({**parity, "passed": parity_passed(parity)}))
    return folder / name


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown runtime"):
        exported_model(DEFAULT_DETECTOR, "tensorflow")
    with pytest.raises(ConfigError, match="detect.runtime"):
        load_config(None, ["detect.runtime=tensorflow"])
    assert exported_model(DEFAULT_DETECTOR, "torch") == DEFAULT_DETECTOR
    assert load_config().detect.runtime == "auto"
    assert load_config(None, ["detect.runtime=openvino-int8"]).detect.runtime == "openvino-int8"


def test_the_export_key_follows_weights_runtime_package_and_gpu() -> None:
    a = export_key("a" * 64, "openvino", CPU)
    assert a == export_key("a" * 64, "openvino", CPU)
    assert a != export_key("b" * 64, "openvino", CPU)
    assert a != export_key("a" * 64, "onnxruntime", CPU)
    assert a != export_key("a" * 64, "openvino-int8", CPU)
    newer = replace(CPU, versions={**CPU.versions, "openvino": "9999.0"})
    assert a != export_key("a" * 64, "openvino", newer)
    # A TensorRT engine runs only on the GPU model and TensorRT version that built it...
    engine = export_key("a" * 64, "tensorrt", GPU)
    assert engine != export_key("a" * 64, "tensorrt", replace(GPU, gpu_name="NVIDIA H100"))
    assert engine != export_key(
        "a" * 64, "tensorrt", replace(GPU, versions={**GPU.versions, "tensorrt": "10.4.0"})
    )
    # ... while a CPU export does not depend on which GPU the host has.
    assert a == export_key("a" * 64, "openvino", replace(CPU, gpu_name="NVIDIA H100"))


def test_tensorrt_needs_cuda_its_package_and_a_batch_the_engine_takes(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA device"):
        exported_model(DEFAULT_DETECTOR, "tensorrt", facts=replace(GPU, device="cpu"))
    no_trt = replace(GPU, versions={**GPU.versions, "tensorrt": None})
    with pytest.raises(ModelLoadError, match="'tensorrt', which is not installed"):
        exported_model(DEFAULT_DETECTOR, "tensorrt", facts=no_trt, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="largest batch"):
        CellDetector(device="cpu", runtime="tensorrt", batch_size=EXPORT_BATCH + 1)
    # A cached engine is found by the GPU's key, not rebuilt.
    engine = _fake_export(tmp_path, "tensorrt", GPU, passed=True)
    assert exported_model(DEFAULT_DETECTOR, "tensorrt", facts=GPU, cache_dir=tmp_path) == engine


def test_auto_on_cuda_takes_tensorrt_only_when_installed_and_in_parity(tmp_path: Path) -> None:
    no_trt = replace(GPU, versions={**GPU.versions, "tensorrt": None})
    choice = choose_runtime(DEFAULT_DETECTOR, "cuda:0", facts=no_trt, cache_dir=tmp_path)
    assert choice.runtime == "torch" and choice.passed_over == {"tensorrt": "not installed"}

    _fake_export(tmp_path, "tensorrt", GPU, passed=True)
    choice = choose_runtime(DEFAULT_DETECTOR, "cuda:0", facts=GPU, cache_dir=tmp_path)
    assert (choice.runtime, choice.device) == ("tensorrt", "cuda:0")
    assert "passed its parity check" in choice.reason and choice.parity is not None

    other_gpu = replace(GPU, gpu_name="NVIDIA L4")
    _fake_export(tmp_path, "tensorrt", other_gpu, passed=False)
    choice = choose_runtime(DEFAULT_DETECTOR, "cuda:0", facts=other_gpu, cache_dir=tmp_path)
    assert choice.runtime == "torch"
    assert choice.passed_over["tensorrt"].startswith(
        "failed its parity check: fp32 rule: matched 0.8000"
    )


def test_auto_on_cpu_follows_the_order_past_a_missing_runtime(tmp_path: Path) -> None:
    no_ov = replace(CPU, versions={**CPU.versions, "openvino": None})
    _fake_export(tmp_path, "onnxruntime", no_ov, passed=True)
    choice = choose_runtime(DEFAULT_DETECTOR, "cpu", facts=no_ov, cache_dir=tmp_path)
    assert choice.runtime == "onnxruntime"
    assert choice.passed_over == {"openvino-int8": "not installed", "openvino": "not installed"}
    assert json.loads(json.dumps(choice.to_dict()))["facts"]["versions"]["openvino"] is None


def test_the_manifest_record_says_which_runtime_and_why() -> None:
    record = runtime_record(DEFAULT_DETECTOR, "openvino", "cpu")
    assert record == {"runtime": "openvino", "device": "cpu", "reason": "set in detect.runtime"}
    # GPU workers behind a driver without one: each GPU node resolves auto, in this order.
    record = runtime_record(DEFAULT_DETECTOR, "auto", "cuda:0")
    assert record["runtime"] == "auto" and str(list(PREFERENCE["cuda"])) in record["reason"]


def test_runtime_threads_are_the_actors_share_unless_set() -> None:
    from batch.run.tasks import _runtime_threads

    threads = load_config().detect.runtime_threads
    assert threads["openvino"] == threads["openvino-int8"] == 0 and threads["onnxruntime"] == -1
    assert [_runtime_threads(n, share=1) for n in (0, -1, 3)] == [1, 0, 3]
    assert _runtime_threads(0, share=0) == 0  # GPU actors: the runtime's own default
    with pytest.raises(ConfigError, match="runtime_threads"):
        load_config(None, ["detect.runtime_threads.openvino=-2"])
    with pytest.raises(ConfigError, match="runtime_threads"):
        load_config(None, ["detect.runtime_threads.tensorflow=1"])


def test_cell_ids_follow_the_runtime_auto_chose() -> None:
    auto, torch_cfg = load_config(), load_config(None, ["detect.runtime=torch"])
    ov_cfg = load_config(None, ["detect.runtime=openvino"])
    assert model_key(auto, "s" * 64, "torch") == model_key(torch_cfg, "s" * 64)
    assert model_key(auto, "s" * 64, "openvino") == model_key(ov_cfg, "s" * 64)
    assert model_key(ov_cfg, "s" * 64) != model_key(torch_cfg, "s" * 64)


def test_gpu_placement_and_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config()
    assert placement(config, Resources(cpus=16, gpus=2)) == "staged"
    assert placement(config, Resources(cpus=2, gpus=0)) == "fused"
    cpu_only = load_config(None, ["detect.device=cpu"])
    assert placement(cpu_only, Resources(cpus=16, gpus=2)) == "fused"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "cuda_possible", lambda: True)  # as on a host with a driver
    assert select_device("auto") == "cuda:0" and select_device("cpu") == "cpu"
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # GPUs hidden: "auto" is the CPU without asking torch (which would say True here).
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not device.cuda_possible() and select_device("auto") == "cpu"


def test_bench_gpu_without_a_gpu_says_so() -> None:
    result, code = bench_gpu(pipeline=False)
    assert code == NO_CUDA_EXIT and result["measured"] is False and result["cuda"] is False
    assert result["reason"].startswith("no CUDA device")


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtime_gives_torch_boxes(
    runtime: str, tiles: list[object], cache: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    torch_detector = CellDetector(device="cpu")
    reference = torch_detector.detect(tiles, 0.25)
    exported = CellDetector(device="cpu", runtime=runtime)
    parity = detection_parity(reference, exported.detect(tiles, 0.25))
    assert parity["n_reference"] > 100
    assert parity["matched_fraction"] == 1.0 and parity["n_other"] == parity["n_reference"]
    assert parity["worst_iou"] >= PARITY_IOU and parity["max_conf_diff"] <= PARITY_CONF
    # The candidates AP is measured on (every class a box scores: ultralytics' validator NMS in
    # torch, `yolo_nms(per_class=True)` around the export) agree too, and outnumber one label
    # per box; torch then runs its one-label predictor again.
    every = detection_parity(
        torch_detector.detect(tiles, 0.25, conf=0.01, per_class=True),
        exported.detect(tiles, 0.25, conf=0.01, per_class=True),
    )
    assert every["matched_fraction"] == 1.0 and every["n_other"] == every["n_reference"]
    assert every["max_conf_diff"] <= PARITY_CONF
    one_label = torch_detector.detect(tiles, 0.25, conf=0.01)
    assert every["n_reference"] > sum(len(d.boxes) for d in one_label)
    again = detection_parity(reference, torch_detector.detect(tiles, 0.25))
    assert again["matched_fraction"] == 1.0 and again["n_other"] == again["n_reference"]
    # Exported once: the second detector loads the cached export, untouched; on one thread
    # (detect.runtime_threads) it gives the same boxes.
    path = exported_model(DEFAULT_DETECTOR, runtime)
    stamp = path.stat().st_mtime_ns
    capfd.readouterr()
    one_thread = CellDetector(device="cpu", runtime=runtime, threads=1)
    # Loading an export logs through ultralytics; stdout stays for --json's one object.
    assert capfd.readouterr().out == ""
    assert exported_model(DEFAULT_DETECTOR, runtime) == path and path.stat().st_mtime_ns == stamp
    backend = one_thread._model.net  # the export in its own runtime (batch.stages.netrun)
    if runtime == "openvino":  # on its own core, not pinned to the first (another actor's)
        assert backend.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert backend.compiled.get_property("ENABLE_CPU_PINNING") is False
        # FP32 also on CPUs where OpenVINO would pick BF16 by default
        import openvino as ov

        assert backend.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    else:
        assert backend.session.get_session_options().intra_op_num_threads == 1
    same = detection_parity(exported.detect(tiles, 0.25), one_thread.detect(tiles, 0.25))
    assert same["matched_fraction"] == 1.0 and same["max_conf_diff"] <= PARITY_CONF
    assert same["n_other"] == same["n_reference"]
    if runtime == "openvino":
        # The 1-thread compile went into OpenVINO's blob cache beside the export; the next
        # actor's detector is compiled from that blob, and finds the very same boxes.
        (blob,) = (path.parent / "ov_cache").glob("*.blob")
        stamp = blob.stat().st_mtime_ns
        from_blob = CellDetector(device="cpu", runtime=runtime, threads=1)
        assert blob.stat().st_mtime_ns == stamp
        again = detection_parity(one_thread.detect(tiles, 0.25), from_blob.detect(tiles, 0.25))
        assert again["matched_fraction"] == 1.0 and again["max_conf_diff"] <= PARITY_CONF
        assert again["n_other"] == again["n_reference"]
    assert path.is_relative_to(cache / EXPORTS_DIR)
    # A CPU worker's exported detector needs neither torch nor ultralytics (their import and
    # first call were ~4.5 s of every actor's start-up): a fresh process loads none of them.
    code = (
        "import sys; from batch.stages.detect import CellDetector; "
        f"d = CellDetector(runtime={runtime!r}, threads=1); "
        "print(d.device, sorted(m for m in ('torch', 'torchvision', 'ultralytics') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.stdout.split("\n")[-2] == "cpu []"
    # The export's own parity check (made when it was exported) passed, on real boxes.
    record = read_parity(path)
    assert record["passed"] is True and record["n_reference"] > 1000


@pytest.mark.slow
def test_int8_export_quantizes_and_keeps_most_boxes(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # A small calibration set keeps the test short; the shipped one is 320 tiles.
    monkeypatch.setattr(quantize, "CALIBRATION_SLIDES", 1)
    monkeypatch.setattr(quantize, "CALIBRATION_SIDE", 1280)
    capfd.readouterr()
    path = exported_model(DEFAULT_DETECTOR, "openvino-int8")
    # Quantizing logs and draws NNCF's progress bars on stderr; stdout stays for --json.
    out, err = capfd.readouterr()
    assert out == "" and "Statistics collection" in err
    assert path.name.endswith("_int8_openvino_model") and path.is_relative_to(cache / EXPORTS_DIR)
    xml = (path / "detector.xml").read_text()
    assert "FakeQuantize" in xml  # quantized, not a copy of the FP32 model
    # Its parity record: INT8 against torch on the parity tiles, loaded through ultralytics.
    record = read_parity(path)
    assert record["n_reference"] > 1000 and record["matched_fraction"] >= 0.9, record
    assert (record["rule"], record["iou"]) == ("quantized", QUANTIZED_IOU)
    # ... and both networks scored on the parity slide's ground truth (its every drawn cell).
    truth, truth_torch = record["truth"], record["truth_torch"]
    assert set(truth["ap50"]) == set(truth_torch["ap50"]) == {"RBC", "WBC", "platelet"}
    assert truth_torch["ap50"]["RBC"] > 0.9 and 0 < truth["map50"] <= 1
    assert record["passed"] is parity_passed(record, quantized=True)


def test_the_calibration_set_is_set_by_environment_and_keyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(quantize.CALIBRATION_ENV, raising=False)
    assert quantize._calibration((5, 5120)) == (5, 5120)
    monkeypatch.setenv(quantize.CALIBRATION_ENV, "2x1920")
    assert quantize._calibration((5, 5120)) == (2, 1920)
    for bad in ("2", "0x1280", "2x320", "axb"):
        monkeypatch.setenv(quantize.CALIBRATION_ENV, bad)
        with pytest.raises(ValueError, match=quantize.CALIBRATION_ENV):
            quantize._calibration((5, 5120))
    # Another calibration set is another export: never taken for the default one.
    sha = file_sha256(DEFAULT_DETECTOR)
    keys = set()
    for slides in (5, 1):
        monkeypatch.setattr(quantize, "CALIBRATION_SLIDES", slides)
        keys.add(export_key(sha, "openvino-int8", CPU))
    assert len(keys) == 2


def test_a_quantized_runtime_must_find_the_same_cells_not_the_same_confidences() -> None:
    # INT8's figures on the shipped detector's parity tiles (matched at IoU 0.5).
    int8 = {"matched_fraction": 0.9991, "worst_iou": 0.589, "max_conf_diff": 0.5998,
            "n_reference": 2326, "n_other": 2320}  # fmt: skip
    assert parity_passed(int8, quantized=True) and not parity_passed(int8)
    lost = {**int8, "matched_fraction": 0.985}  # 35 of 2326 cells lost
    assert not parity_passed(lost, quantized=True)
    extra = {**int8, "n_other": 2380}  # 54 cells more than torch
    assert not parity_passed(extra, quantized=True)
    # Agreement is not enough: scored on ground truth it may lose at most 0.01 of map50.
    truth = {**int8, "truth_torch": {"map50": 0.6937}, "truth": {"map50": 0.6933}}
    assert parity_passed(truth, quantized=True)
    reordered = {**truth, "truth": {"map50": 0.6817}}  # same cells, confidences reordered
    assert not parity_passed(reordered, quantized=True)
    fp32 = {"matched_fraction": 1.0, "worst_iou": 0.97, "max_conf_diff": 0.004,
            "n_reference": 2326, "n_other": 2326}  # fmt: skip
    assert parity_passed(fp32) and parity_passed(fp32, quantized=True)


@pytest.mark.slow
def test_auto_picks_int8_on_this_cpu(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The INT8 export of the test above (same small calibration, same cache): auto takes it.
    monkeypatch.setattr(quantize, "CALIBRATION_SLIDES", 1)
    monkeypatch.setattr(quantize, "CALIBRATION_SIDE", 1280)
    detector = CellDetector(device="cpu", runtime="auto")
    assert detector.runtime == "openvino-int8" and detector.runtime_choice is not None
    assert detector.runtime_choice.passed_over == {}
    assert "passed its parity check against torch (quantized rule" in detector.runtime_choice.reason
    assert runtime_record(DEFAULT_DETECTOR, "auto", "cpu") == detector.runtime_choice.to_dict()
