"""Where a slide's bytes come from, and what a storage failure means.

Byte sources give the slide readers a file object for header parsing and
ranged reads for tiles: :class:`LocalSource` (``os.pread``),
:class:`StreamSource` (a caller's file object, under a lock) and
:class:`FsspecSource` (``s3://`` and any other fsspec URL, concurrent
``cat_ranges``); :func:`open_source` picks one for a path, URL or file object.
:func:`storage_error` turns an OS / fsspec / s3fs / botocore exception into the
typed :class:`~batch.errors.SlideReadError` that says what to change.

This module may import only :mod:`batch.errors`, :mod:`batch.slides.limits`
and third-party libraries (fsspec, imported when a URL needs it).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import unquote, urlparse

from batch.errors import (
    SlideAccessDeniedError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedSlideError,
)
from batch.slides.limits import HEADER_BLOCK_SIZE

__all__ = [
    "ByteSource",
    "FsspecSource",
    "LocalSource",
    "StreamSource",
    "open_source",
    "storage_error",
]

_S3_DENIED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)
_S3_MISSING_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})


# ------------------------------------------------------------------- byte sources


class ByteSource(Protocol):
    """Where a slide's bytes come from; ranges are half-open ``(start, end)``."""

    size: int

    def header_file(self) -> BinaryIO: ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    def read_all(self) -> bytes: ...

    def close(self) -> None: ...


class LocalSource:
    """A local file: ``os.pread`` for ranges, so concurrent reads need no lock."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - owned until close()
        self._fd = self._file.fileno()
        self.size = os.fstat(self._fd).st_size

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return [self._pread(start, end - start) for start, end in ranges]

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length or not data:
            return data
        parts = [data]  # short read (rare: signals, network file systems)
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_all(self) -> bytes:
        return self._pread(0, self.size)

    def close(self) -> None:
        self._file.close()


class StreamSource:
    """A caller's binary file object; seek+read under a lock. Never closed by us."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._file = fileobj
        self._lock = threading.Lock()
        self._file.seek(0, io.SEEK_END)
        self.size = self._file.tell()
        self._file.seek(0)

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = []
        with self._lock:
            for start, end in ranges:
                self._file.seek(start)
                out.append(self._file.read(end - start))
        return out

    def read_all(self) -> bytes:
        return self.read_ranges([(0, self.size)])[0]

    def close(self) -> None:
        """Leave the caller's file open: it is theirs."""


class FsspecSource:
    """A file on an fsspec file system (s3://, gs://, memory://...)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        # Small blocks, no big read-ahead: header parsing touches a few KiB at a few places.
        self._file = cast(
            BinaryIO,
            fs.open(path, "rb", block_size=HEADER_BLOCK_SIZE, cache_type="readahead"),
        )
        size = getattr(self._file, "size", None)
        self.size = int(size) if size is not None else int(fs.size(path))

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        n = len(ranges)
        # s3fs (async) issues these concurrently.
        return cast(
            list[bytes],
            self._fs.cat_ranges(
                [self._path] * n,
                [start for start, _ in ranges],
                [end for _, end in ranges],
                on_error="raise",
            ),
        )

    def read_all(self) -> bytes:
        return cast(bytes, self._fs.cat_file(self._path))

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- error mapping


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError anywhere in the cause chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code is not None:
                return str(code)
        cur = cur.__cause__ or cur.__context__
    return None


def storage_error(uri: str, exc: BaseException, doing: str) -> SlideReadError:
    """Translate an exception from a storage layer (OS, fsspec, s3fs, botocore)."""
    code = _error_code(exc)
    name = type(exc).__name__
    if isinstance(exc, IsADirectoryError):
        return UnsupportedSlideError(
            uri, f"is a directory, not a slide file ({doing}); pass the path of one slide file"
        )
    if isinstance(exc, FileNotFoundError) or code in _S3_MISSING_CODES:
        return SlideNotFoundError(
            uri,
            f"no such file or object ({doing}: {name}: {exc}); check the path, bucket "
            "and key, and for non-AWS object storage the endpoint_url in storage_options",
        )
    if (
        isinstance(exc, PermissionError)
        or code in _S3_DENIED_CODES
        or name in {"NoCredentialsError", "PartialCredentialsError"}
    ):
        return SlideAccessDeniedError(
            uri,
            f"the storage refused access ({doing}: {name}: {exc}); grant read access "
            "(file permissions, or s3:GetObject in the bucket/IAM policy) to the identity "
            "of the standard AWS credential chain, or copy the slide somewhere readable",
        )
    return SlideReadError(
        uri,
        f"could not read from storage ({doing}: {name}: {exc}); check the endpoint, "
        "network and storage service, then retry",
    )


# ------------------------------------------------------------------- opening


def open_source(
    src: str | os.PathLike[str] | BinaryIO, uri: str, storage_options: dict[str, Any] | None
) -> ByteSource:
    """The byte source of ``src`` (named ``uri`` in errors).

    A file object becomes a :class:`StreamSource`, a local path or ``file://``
    URL a :class:`LocalSource`, any other URL an :class:`FsspecSource` built
    with ``storage_options``.
    """
    if not isinstance(src, (str, os.PathLike)):
        if not all(hasattr(src, attr) for attr in ("read", "seek", "tell")):
            raise TypeError(
                f"open_slide takes a path, a URL or a binary file object, got {type(src).__name__}"
            )
        try:
            return StreamSource(src)
        except OSError as e:
            raise storage_error(uri, e, "seeking the file object") from e
    path = os.fspath(src)
    protocol = path.split("://", 1)[0].lower() if "://" in path else "file"
    if protocol == "file":
        if "://" in path:
            path = unquote(urlparse(path).path)
        try:
            return LocalSource(path)
        except OSError as e:
            raise storage_error(uri, e, "opening the file") from e
    try:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise UnsupportedSlideError(
            uri,
            f"cannot open {protocol}:// URLs ({type(e).__name__}: {e}); use a local path, "
            "file://, s3:// or another installed fsspec protocol",
        ) from e
    try:
        return FsspecSource(fs, fs_path)
    except Exception as e:
        raise storage_error(uri, e, "opening the object") from e
