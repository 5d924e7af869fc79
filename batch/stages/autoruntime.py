"""``detect.runtime = auto``: the fastest runtime for the device that keeps the detector's boxes.

The choice is the first runtime of a fixed preference order for the device
(:data:`PREFERENCE`) whose package is installed, whose export succeeds and
whose export passed its parity check against PyTorch
(`batch.stages.runtime`: checked once when the export is made, kept beside
it). PyTorch ends every order and needs no check.

Why an order measured once, not a timing at run time: cell ids depend on the
runtime (another runtime's float rounding moves boxes a hair), so the choice
must be the same on every node of a cluster and on every rerun of a run. A
timing taken by each actor would differ between nodes and between a quiet
and a busy minute, and one run could then write cells of two runtimes. The
order comes from ``hemaray bench detector`` (same tiles, side by side); the
parity check is what makes it safe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batch.errors import ModelLoadError
from batch.stages.runtime import DeviceFacts, device_facts, exported_model, read_parity

__all__ = ["PREFERENCE", "RuntimeChoice", "choose_runtime", "runtime_record"]

#: Runtimes ``auto`` tries, fastest first, per device kind.
#: CPU: measured with ``hemaray bench detector --json`` on this project's 2-core AVX2 machine
#: (48 tiles of 640 px, side by side, best of 3): OpenVINO INT8 1.94x PyTorch, OpenVINO FP32
#: 1.21x, ONNX Runtime 1.09x. INT8 is taken when its export passed the quantized parity rule
#: (the same cells as PyTorch, and map50 on the parity slide's ground truth within 0.01 of
#: PyTorch's, `batch.stages.parity`); its accuracy on real labelled data is in that module
#: (map50 within 0.004 of PyTorch's). Its first use on a host quantizes the FP32
#: export once (NNCF, 320 calibration tiles; a few minutes on 2 cores), then it is cached.
#: CUDA: a TensorRT FP16 engine when TensorRT is installed, else PyTorch (FP16 on CUDA,
#: `batch.stages.detect.CellDetector`'s ``half="auto"``), the standard order on NVIDIA GPUs.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("openvino-int8", "openvino", "onnxruntime", "torch"),
    "cuda": ("tensorrt", "torch"),
}


@dataclass(frozen=True)
class RuntimeChoice:
    """What ``auto`` chose, on which device, and why (the run manifest records it)."""

    runtime: str
    device: str
    reason: str
    #: Runtimes tried before the chosen one, each with why it was passed over.
    passed_over: dict[str, str] = field(default_factory=dict)
    #: The chosen export's parity figures against PyTorch (None for torch).
    parity: dict[str, Any] | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parity_summary(parity: dict[str, Any]) -> str:
    summary = (
        f"{parity.get('rule', 'fp32')} rule: matched {parity['matched_fraction']:.4f} of "
        f"{parity['n_reference']} boxes at IoU >= {parity.get('iou', 0.9)}, worst IoU "
        f"{parity['worst_iou']}, confidences within {parity['max_conf_diff']}"
    )
    if "truth" in parity:
        summary += (
            f"; map50 on the slide's ground truth {parity['truth']['map50']} vs torch's "
            f"{parity['truth_torch']['map50']}"
        )
    return summary


def choose_runtime(
    weights: str | Path,
    device: str,
    *,
    facts: DeviceFacts | None = None,
    cache_dir: Path | None = None,
) -> RuntimeChoice:
    """The runtime ``auto`` means for ``weights`` on ``device`` (``"cpu"``, ``"cuda:N"``).

    Exports the candidates it tries (once; cached) and reads their parity
    records. ``facts`` default to this host's (`batch.stages.runtime.device_facts`).
    """
    facts = facts or device_facts(device)
    order = PREFERENCE["cuda" if facts.cuda else "cpu"]
    passed_over: dict[str, str] = {}
    for runtime in order:
        if runtime == "torch":
            return RuntimeChoice(
                "torch", facts.device,
                f"first of {list(order)} on {facts.device} that is installed and keeps torch's "
                "boxes (torch is the reference)",
                passed_over, None, facts.to_dict(),
            )  # fmt: skip
        if not facts.installed(runtime):
            passed_over[runtime] = "not installed"
            continue
        try:
            export = exported_model(weights, runtime, facts=facts, cache_dir=cache_dir)
            parity = read_parity(export)
        except ModelLoadError as e:
            passed_over[runtime] = f"export failed: {e}"
            continue
        if not parity.get("passed"):
            passed_over[runtime] = f"failed its parity check: {_parity_summary(parity)}"
            continue
        return RuntimeChoice(
            runtime, facts.device,
            f"first of {list(order)} on {facts.device} that is installed and passed its parity "
            f"check against torch ({_parity_summary(parity)} on {parity['tiles']} tiles)",
            passed_over, {k: v for k, v in parity.items() if k != "facts"}, facts.to_dict(),
        )  # fmt: skip
    raise ModelLoadError(f"no runtime in {order} could be chosen: {passed_over}")


def runtime_record(weights: str | Path, runtime: str, device: str) -> dict[str, Any]:
    """The run manifest's ``detect_runtime``: the runtime a run's detector runs in, and why.

    ``runtime`` is ``detect.runtime``; ``device`` the detectors' (``"cpu"`` or
    ``"cuda:N"``). ``auto`` is resolved here as every detector actor resolves
    it (the same facts give the same answer, see the module docstring),
    unless the detectors run on CUDA and this host (the driver) has none: then
    each GPU node resolves it and the record gives the order it follows.
    """
    if runtime != "auto":
        return {"runtime": runtime, "device": device, "reason": "set in detect.runtime"}
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return {
                "runtime": "auto", "device": device,
                "reason": f"resolved on each GPU node: the first of {list(PREFERENCE['cuda'])} "
                "that is installed and passes its parity check against torch",
            }  # fmt: skip
    return choose_runtime(weights, device).to_dict()
