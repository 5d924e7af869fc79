"""Where models run: the device choice and torch's thread count.

Both detector and classifiers use these; they import nothing from hemaray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["cuda_possible", "keep_torch_threads", "select_device", "torch_threads_if_loaded"]


def select_device(device: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"cuda:0"`` when a GPU is visible, else ``"cpu"``.

    Torch is asked only when a GPU could be visible (:func:`cuda_possible`):
    a CPU worker whose exported detector and classifiers run without torch
    does not import it (about 2 s) to learn that it has no GPU.
    """
    if device != "auto":
        return device
    if not cuda_possible():
        return "cpu"
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def cuda_possible() -> bool:
    """False when no CUDA device can be visible to this process, known without torch.

    ``CUDA_VISIBLE_DEVICES`` set to nothing (or ``-1``) hides every GPU; on
    Linux, CUDA needs NVIDIA's kernel driver (``/proc/driver/nvidia``) or,
    under WSL 2, ``/dev/dxg``.
    True means only that torch must be asked.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/dxg")
    return True


def torch_threads_if_loaded(threads: int) -> None:
    """Give torch ``threads`` intra-op threads (0: leave its count) if a model loaded torch.

    Called after a stage built its models: a worker whose models run in
    OpenVINO or ONNX Runtime never imports torch.
    """
    if threads and "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Keep torch's intra-op thread count across an ultralytics call.

    On its first ``predict`` on CPU, ultralytics' ``select_device`` sets
    ``torch.set_num_threads(cpu_count - 1)``: one thread on a 2-core machine,
    half the speed. Whatever the process chose before (torch's default, or
    ``execution.torch_threads``) is put back afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
