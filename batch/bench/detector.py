"""``bench_detector``: detector tiles/s in each inference runtime on the same tiles, and parity."""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

__all__ = ["bench_detector"]

#: Rounds of ``bench_detector``: every runtime once per round, alternating; best of each.
BENCH_DETECTOR_ROUNDS = 3


#: Runtimes timed by default, per device kind (those whose package is missing are reported
#: under ``<runtime>_error``).
DEFAULT_RUNTIMES: dict[str, tuple[str, ...]] = {
    "cpu": ("torch", "onnxruntime", "openvino", "openvino-int8"),
    "cuda": ("torch", "tensorrt"),
}


def bench_detector(
    *,
    width: int = 4096,
    height: int = 4096,
    seed: int = 0,
    max_tiles: int = 48,
    runtimes: tuple[str, ...] | None = None,
    device: str = "cpu",
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Detector tiles/s in each inference runtime on the same tiles, side by side, and parity.

    The tiles are a synthetic slide's planned tiles, read and resized to the
    detector's input as a run does (`batch.run.tasks.read_tiles`), at most
    ``max_tiles``. Each runtime is loaded (exported on first use), warmed up
    on one batch, then timed over all tiles :data:`BENCH_DETECTOR_ROUNDS`
    times, the runtimes alternating within each round so a slow spell of
    the machine hits all of them; each keeps its best. ``<runtime>_over_torch``
    is the ratio of tiles/s; ``<runtime>_parity`` compares its boxes with
    PyTorch's (`batch.stages.parity.detection_parity`; ``passed``: within the
    tolerance ``detect.runtime = auto`` requires). A runtime that cannot load
    (package missing, no CUDA for TensorRT) is reported under
    ``<runtime>_error``. ``auto_runtime`` / ``auto_reason``: what ``auto``
    picks on ``device`` (`batch.stages.autoruntime`). On CUDA, torch runs in
    FP16 (``CellDetector``'s ``half="auto"``) and TensorRT is an FP16 engine.
    """
    import torch

    from batch.config import Config
    from batch.errors import ModelLoadError
    from batch.run.columns import rows_to_batch
    from batch.run.tasks import PlanStage, read_tiles
    from batch.stages.autoruntime import choose_runtime
    from batch.stages.detect import load_detector
    from batch.stages.parity import detection_parity
    from batch.stages.runtime import judge_parity, parity_iou
    from batch.synth import synth_slides

    chosen = runtimes or DEFAULT_RUNTIMES["cuda" if device.startswith("cuda") else "cpu"]
    if "torch" not in chosen:
        chosen = ("torch", *chosen)
    with ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="hemaray-benchd-"))
        (slide,) = synth_slides(Path(workdir), slides=1, width=width, height=height, seed=seed)
        config = Config()
        detectors: dict[str, Any] = {}
        result: dict[str, Any] = {}
        for rt in chosen:
            try:
                detectors[rt] = load_detector(device=device, runtime=rt)
            except ModelLoadError as e:
                result[f"{rt}_error"] = str(e)
        torch_det = detectors["torch"]
        choice = choose_runtime(torch_det.weights_path, torch_det.device)
        rows = PlanStage(config, torch_det.trained_mpp)(
            {"slide_id": slide.stem, "slide_uri": str(slide)}
        )[:max_tiles]
        batch = read_tiles(rows_to_batch(rows), config)
        tiles = [batch["image"][i] for i in range(len(rows))]
        for det in detectors.values():
            det.detect(tiles[: det.batch_size])  # warm-up
        seconds: dict[str, list[float]] = {rt: [] for rt in detectors}
        outputs: dict[str, Any] = {}
        for _ in range(BENCH_DETECTOR_ROUNDS):
            for rt, det in detectors.items():
                t0 = time.perf_counter()
                outputs[rt] = det.detect(tiles)
                seconds[rt].append(time.perf_counter() - t0)
        torch_tps = len(tiles) / min(seconds["torch"])
        for rt, each in seconds.items():
            tps = len(tiles) / min(each)
            result[f"{rt}_tiles_per_s"] = round(tps, 3)
            result[f"{rt}_seconds_each"] = [round(x, 3) for x in each]
            if rt != "torch":
                result[f"{rt}_over_torch"] = round(tps / torch_tps, 3)
                parity = detection_parity(outputs["torch"], outputs[rt], iou=parity_iou(rt))
                result[f"{rt}_parity"] = judge_parity(rt, parity)
        result.update(
            auto_runtime=choice.runtime, auto_reason=choice.reason,
            tiles=len(tiles), tile_size=config.tiling.tile_size, device=torch_det.device,
            batch_size=torch_det.batch_size, torch_threads=torch.get_num_threads(),
        )  # fmt: skip
        return result
