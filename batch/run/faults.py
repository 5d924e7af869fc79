"""Testing hooks that must hold across worker processes (`execution.inject_fault`)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

__all__ = ["first_crash"]


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
