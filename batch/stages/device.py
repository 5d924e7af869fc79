"""Where models run: the device choice and torch's thread count.

Both detector and classifiers use these; they import nothing from hemaray.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_torch_threads", "select_device"]


def select_device(device: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"cuda:0"`` when a GPU is visible, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


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
