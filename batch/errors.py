"""Typed errors for hemaray.

Every error that concerns one slide names it (``slide``) and, where it
applies, the tile (``tile``); the message says what was expected, what was
found, and what to change. Callers chain the cause with ``raise ... from e``.
"""

from __future__ import annotations

__all__ = [
    "HemarayError",
    "ConfigError",
    "SlideReadError",
    "SlideNotFoundError",
    "SlideAccessDeniedError",
    "UnsupportedSlideError",
    "CorruptSlideError",
    "SlideTooLargeError",
]


class HemarayError(Exception):
    """Base class of every error hemaray raises on purpose."""


class ConfigError(HemarayError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class SlideReadError(HemarayError):
    """A slide could not be opened or read.

    Parameters
    ----------
    slide
        The slide's URI as the user gave it.
    message
        What went wrong and what to change.
    tile
        The tile (``"level L tile (row, col)"`` or a region) where it applies.
    """

    def __init__(self, slide: str, message: str, *, tile: str | None = None) -> None:
        self.slide = str(slide)
        self.tile = tile
        self.detail = message
        where = f"{self.slide}" + (f" [{tile}]" if tile else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the keyword-only argument across pickling (Ray ships errors between processes).
        return (_rebuild, (type(self), self.slide, self.detail, self.tile))


def _rebuild(
    cls: type[SlideReadError], slide: str, message: str, tile: str | None
) -> SlideReadError:
    return cls(slide, message, tile=tile)


class SlideNotFoundError(SlideReadError):
    """The slide's path or object does not exist."""


class SlideAccessDeniedError(SlideReadError):
    """The storage refused access (permissions, credentials, bucket policy)."""


class UnsupportedSlideError(SlideReadError):
    """The file is not an image format hemaray reads (or not an image at all)."""


class CorruptSlideError(SlideReadError):
    """The file is a slide but its bytes are damaged: truncated, bad offsets, bad tile data."""


class SlideTooLargeError(SlideReadError):
    """The header declares more pixels than the configured per-slide budget."""
