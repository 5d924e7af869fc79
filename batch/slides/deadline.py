"""A deadline for calls into code that cannot be stopped from outside (slide parsers)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["within_deadline"]

T = TypeVar("T")


def within_deadline(fn: Callable[[], T], seconds: float, timeout_error: Exception) -> T:
    """``fn()``, or ``timeout_error`` raised once ``seconds`` have passed.

    ``fn`` runs in a daemon thread: third-party parsing code cannot be stopped
    from outside, so a call past its deadline is abandoned, not killed. It may
    finish later in the background; its result is dropped. Its exception, if it
    raises in time, is raised here.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name="hemaray-deadline")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise timeout_error
    if "error" in box:
        raise box["error"]
    return cast(T, box["value"])
