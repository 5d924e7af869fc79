"""``bench_gpu``: the detector-only and end-to-end comparisons on the CUDA device this host has.

One command for a GPU machine: the detector in PyTorch FP16 and as a TensorRT
FP16 engine (when ``tensorrt`` is installed) on the same tiles, with parity
(`batch.bench.detector.bench_detector` on ``cuda:0``), what ``detect.runtime
= auto`` picks there and why, and ``hemaray run`` on GPU against the bare
detector (`batch.bench.pipeline.bench_pipeline` with ``gpu=True``: the staged
placement, detector actors with ``num_gpus = detect.gpus_per_actor``).

Without a CUDA device nothing is measured: the answer says so, with what
was looked at (torch's CUDA build, the device count, TensorRT), and the
command exits :data:`NO_CUDA_EXIT`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NO_CUDA_EXIT", "bench_gpu", "cuda_facts"]

#: Exit code of ``hemaray bench gpu`` on a host without a CUDA device (nothing measured).
NO_CUDA_EXIT = 3


def cuda_facts() -> dict[str, Any]:
    """What this host offers for CUDA inference: torch's CUDA build, devices, TensorRT."""
    import torch

    from batch.stages.runtime import device_facts

    available = bool(torch.cuda.is_available())
    facts = device_facts("cuda:0" if available else "cpu")
    return {
        "cuda": available,
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "device_count": int(torch.cuda.device_count()) if available else 0,
        "gpu_name": facts.gpu_name,
        "tensorrt": facts.versions.get("tensorrt"),
    }


def bench_gpu(*, pipeline: bool = True, max_tiles: int = 96) -> tuple[dict[str, Any], int]:
    """Run the GPU comparisons; return the result and the command's exit code.

    Parameters
    ----------
    pipeline
        Also run ``bench_pipeline(gpu=True)`` (four ``hemaray run`` s; minutes).
    max_tiles
        Tiles of the detector-only comparison.
    """
    from batch.bench.detector import bench_detector
    from batch.bench.pipeline import bench_pipeline

    facts = cuda_facts()
    if not facts["cuda"]:
        reason = (
            "torch is built without CUDA"
            if facts["torch_cuda_build"] is None
            else "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
        )
        return {**facts, "measured": False, "reason": f"no CUDA device: {reason}"}, NO_CUDA_EXIT
    result: dict[str, Any] = {**facts, "measured": True}
    result["detector"] = bench_detector(device="cuda:0", max_tiles=max_tiles)
    if pipeline:
        result["pipeline"] = bench_pipeline(gpu=True)
    return result, 0
