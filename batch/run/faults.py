"""Testing hooks that must hold across worker processes (`execution.inject_fault`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from batch.config import Config
from batch.run.columns import Batch, tile_name

__all__ = ["INJECTED_CRASH_EXIT", "first_crash", "inject_fault"]

#: Exit status of a worker killed by ``execution.inject_fault=crash:...``.
INJECTED_CRASH_EXIT = 77


def first_crash(fault: str) -> bool:
    """True the first time any process on this machine asks for ``fault``, False after.

    ``crash_once:SLIDE:ROW:COL`` kills the worker at that tile once: the restarted
    worker's retry must go through. A marker file created exclusively in the
    temp folder remembers the crash (slide ids hash the slide's path, so another
    test's fault names another marker).
    """
    marker = Path(tempfile.gettempdir()) / f"hemaray-crashed-{hashlib.sha256(fault.encode()).hexdigest()[:16]}"
    try:
        marker.open("x").close()
    except FileExistsError:
        return False
    return True


def inject_fault(config: Config, stage: str, batch: Batch, i: int) -> None:
    """Raise if ``execution.inject_fault`` names ``stage`` and row ``i``'s tile (testing hook)."""
    fault = config.execution.inject_fault
    if stage == "crash" and fault == f"crash_once:{tile_name(batch, i)}" and first_crash(fault):
        os._exit(INJECTED_CRASH_EXIT)  # once: the restarted worker's retry goes through
    if fault is None or fault != f"{stage}:{tile_name(batch, i)}":
        return
    if stage == "crash":
        os._exit(INJECTED_CRASH_EXIT)  # a segfault or OOM kill, as the worker's supervisor sees it
    message = f"injected {stage} fault at tile {fault.split(':', 1)[1]} (execution.inject_fault)"
    raise OSError(message) if stage == "read" else RuntimeError(message)
