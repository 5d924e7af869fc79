"""Typed errors for hemaray.

Every error that concerns one slide names it (``slide``) and, where it
applies, the tile (``tile``); the message says what was expected, what was
found, and what to change. Callers chain the cause with ``raise ... from e``.

Errors cross Ray with their type: a worker turns the exception it caught into
bytes (`encode_error`), and the driver turns them back (`decode_error`) into
the same `HemarayError` subclass, with ``slide``, ``tile`` and ``stage`` set.
An exception that is not hemaray's own (a bug, a library's error) arrives as
a `StageError` that names the original class (``type_name``), so the failures
table's ``error_type`` is always the real class name and code can branch on
the type. This module imports nothing from hemaray.
"""

from __future__ import annotations

import pickle

__all__ = [
    "HemarayError",
    "ConfigError",
    "SlideReadError",
    "SlideNotFoundError",
    "SlideAccessDeniedError",
    "UnsupportedSlideError",
    "CorruptSlideError",
    "SlideTooLargeError",
    "SlideChangedError",
    "ModelLoadError",
    "UntrustedModelError",
    "OutputNotWritableError",
    "SubmitError",
    "StageError",
    "encode_error",
    "decode_error",
    "error_type_name",
]


class HemarayError(Exception):
    """Base class of every error hemaray raises on purpose.

    ``stage`` is the pipeline stage it happened in (``open``, ``plan``,
    ``read``, ...), set where the pipeline catches it; None elsewhere.
    """

    stage: str | None = None


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
        return (_rebuild, (type(self), self.slide, self.detail, self.tile), self.__dict__)


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


class SlideOpenTimeoutError(SlideReadError):
    """Opening the slide (its header, page chain and tile tables) took longer than allowed.

    ``slides.open_timeout_s`` bounds it: a header on a store that answers at a
    trickle, or a file built to be slow to parse, costs that slide, not the run.
    """


class SlideChangedError(SlideReadError):
    """The slide's file or object changed after the run opened it.

    Its ETag / VersionId (object storage) or size and modification time (a
    local file) differ from those pinned when the run read its header, so the
    header's tile table no longer describes the bytes: reading on would cut
    pixels of the new file along the old file's tile offsets.
    """


class ModelLoadError(HemarayError):
    """A model file could not be found, fetched, verified or read."""


class UntrustedModelError(ModelLoadError):
    """A model file failed a safety check and was not loaded.

    Its SHA-256 differs from the one pinned in the config, or its pickle names
    code outside the allow-list of model classes (loading it would run that code).
    """


class OutputNotWritableError(HemarayError):
    """The run's output location (OUT) is missing or refuses writes; checked before any compute."""


class SubmitError(HemarayError):
    """A job could not be built, submitted or followed; the message says what to change."""


class StageError(HemarayError):
    """A pipeline stage failed with an exception that is not one of hemaray's own.

    Parameters
    ----------
    type_name
        The original exception's class name (``"OSError"``, ``"ValueError"``).
    message
        The original message.
    slide, tile, stage
        Where it happened.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        *,
        slide: str | None = None,
        tile: str | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.slide = slide
        self.tile = tile
        self.stage = stage

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_stage,
            (self.type_name, str(self), self.slide, self.tile, self.stage),
            self.__dict__,
        )


def _rebuild_stage(
    type_name: str, message: str, slide: str | None, tile: str | None, stage: str | None
) -> StageError:
    return StageError(type_name, message, slide=slide, tile=tile, stage=stage)


def error_type_name(error: BaseException) -> str:
    """The class name a failures row records: the original class of a `StageError`."""
    return error.type_name if isinstance(error, StageError) else type(error).__name__


def encode_error(
    error: BaseException, *, stage: str, slide: str | None = None, tile: str | None = None
) -> bytes:
    """``error`` as bytes that `decode_error` turns back into a typed `HemarayError`.

    A `HemarayError` travels as itself (pickled, ``stage`` set); any other
    exception travels as a `StageError` naming its class, so a worker never
    ships an object the driver cannot unpickle.
    """
    if isinstance(error, HemarayError):
        try:
            error.stage = stage
            data = pickle.dumps(error)
            pickle.loads(data)  # must come back on the driver too
            return data
        except Exception:  # an unpicklable attribute: keep type name and message
            pass
    tile = tile if tile is not None else getattr(error, "tile", None)
    slide = slide if slide is not None else getattr(error, "slide", None)
    return pickle.dumps(
        StageError(error_type_name(error), str(error), slide=slide, tile=tile, stage=stage)
    )


def decode_error(data: bytes) -> HemarayError:
    """The typed error `encode_error` wrote (its ``stage`` set)."""
    error = pickle.loads(data)
    if not isinstance(error, HemarayError):
        raise TypeError(f"expected encoded HemarayError bytes, got {type(error).__name__}")
    return error
