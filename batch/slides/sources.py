"""Where a slide's bytes come from, and what a storage failure means.

Byte sources give the slide readers a file object for header parsing and
ranged reads for tiles: :class:`LocalSource` (``os.pread``),
:class:`StreamSource` (a caller's file object, under a lock) and
:class:`FsspecSource` (``s3://`` and any other fsspec URL, concurrent ranged
GETs); :func:`open_source` picks one for a path, URL or file object.
:func:`storage_error` turns an OS / fsspec / s3fs / botocore exception into the
typed :class:`~batch.errors.SlideReadError` that says what to change.

Pinning
-------
A source records at open the version of the bytes it reads (:attr:`pin`): a
local file's size and modification time, an object's ETag (and VersionId on
a versioned bucket), taken from the same ``stat`` / HEAD the open uses. Every
later read is held to it, so the header parsed at open always describes the
bytes a tile read returns:

- S3: every ranged GET (header blocks and tiles) carries ``If-Match: <ETag>``;
  an object rewritten since answers 412, a :class:`SlideChangedError`;
- a local file is ``fstat``-ed after each read: a file rewritten in place is
  a :class:`SlideChangedError` (one replaced by a rename is not seen: the open
  descriptor still reads the old, consistent file);
- a process that opens the slide again (a Ray worker reading tiles the planner
  planned) passes the planner's pin to :func:`open_source` and gets a
  :class:`SlideChangedError` if the file or object is not that version now.

Other fsspec file systems are pinned by what their ``info`` reports (size,
ETag / mtime where given), checked at open only. A caller's file object is
not pinned.

This module may import only :mod:`batch.errors`, :mod:`batch.slides.limits`
and third-party libraries (fsspec, imported when a URL needs it).
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol, cast
from urllib.parse import unquote, urlparse

from batch.errors import (
    SlideAccessDeniedError,
    SlideChangedError,
    SlideNotFoundError,
    SlideReadError,
    UnsupportedSlideError,
)
from batch.slides.limits import BODY_READ_ATTEMPTS, BODY_RETRY_BASE_S, HEADER_BLOCK_SIZE

__all__ = [
    "ByteSource",
    "FsspecSource",
    "LocalSource",
    "StreamSource",
    "current_pin",
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
#: A conditional request's condition failed: the object is not the version pinned at open.
_S3_CHANGED_CODES = frozenset({"412", "PreconditionFailed"})


# ------------------------------------------------------------------- byte sources


class ByteSource(Protocol):
    """Where a slide's bytes come from; ranges are half-open ``(start, end)``."""

    size: int
    #: The version of the bytes read (see "Pinning"); None when it cannot be known.
    pin: str | None

    def header_file(self) -> BinaryIO: ...

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    def read_all(self) -> bytes: ...

    def close(self) -> None: ...


def _stat_pin(st: os.stat_result) -> str:
    return f"size:{st.st_size};mtime_ns:{st.st_mtime_ns}"


class LocalSource:
    """A local file: ``os.pread`` for ranges, so concurrent reads need no lock.

    Pinned to its size and modification time at open; each read checks them
    after reading (see "Pinning").
    """

    def __init__(self, path: str, uri: str) -> None:
        self._uri = uri
        self._file = open(path, "rb")  # noqa: SIM115 - owned until close()
        self._fd = self._file.fileno()
        st = os.fstat(self._fd)
        self.size = st.st_size
        self.pin: str | None = _stat_pin(st)

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        out = [self._pread(start, end - start) for start, end in ranges]
        now = _stat_pin(os.fstat(self._fd))  # after the reads: a change during them shows too
        if now != self.pin:
            raise SlideChangedError(
                self._uri,
                f"the file changed after it was opened (pinned {self.pin}, now {now}): it "
                "was rewritten while the run read it, so its header no longer describes its "
                "bytes; process the slide again once nothing writes to it",
            )
        return out

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
        return self.read_ranges([(0, self.size)])[0]

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
        self.pin: str | None = None  # a file object has no version to pin

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


def _info_pin(info: dict[str, Any]) -> str | None:
    """The pin of an fsspec ``info`` entry: ETag and VersionId (S3), else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        version = info.get("VersionId")
        return f"etag:{etag}" + (f";version:{version}" if version and version != "null" else "")
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"size:{info.get('size')};mtime:{stamp}" if stamp is not None else None


def _is_s3(fs: Any) -> bool:
    return hasattr(fs, "_call_s3") and hasattr(fs, "split_path")


async def _s3_get_range(fs: Any, bucket: str, key: str, start: int, end: int, etag: str) -> bytes:
    """Bytes ``[start, end)`` of the object if its ETag is still ``etag`` (else 412 raises).

    botocore retries the request (throttling, resets before the answer); a body
    that breaks off mid-transfer is fetched again here, up to
    :data:`~batch.slides.limits.BODY_READ_ATTEMPTS` times.
    """
    if end <= start:
        return b""
    for attempt in range(BODY_READ_ATTEMPTS):
        resp = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag
        )
        body = resp["Body"]
        try:
            data = bytes(await body.read())
            if len(data) == end - start:
                return data
            broke: BaseException = OSError(
                f"expected {end - start} bytes, the body had {len(data)}"
            )
        except Exception as e:  # the request went through; its body broke off
            broke = e
        finally:
            body.close()
        if attempt + 1 == BODY_READ_ATTEMPTS:
            raise broke
        await asyncio.sleep(BODY_RETRY_BASE_S * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


class FsspecSource:
    """A file on an fsspec file system (s3://, gs://, memory://...).

    On S3 every ranged read is conditional on the ETag seen at open (see "Pinning").
    """

    def __init__(self, fs: Any, path: str, uri: str) -> None:
        self._fs = fs
        self._path = path
        self._uri = uri
        # The open's HEAD, not a listing cached earlier (a listing has no VersionId).
        fs.invalidate_cache(path)
        # Small blocks, no big read-ahead: header parsing touches a few KiB at a few places.
        self._file = cast(
            BinaryIO,
            fs.open(path, "rb", block_size=HEADER_BLOCK_SIZE, cache_type="readahead"),
        )
        details = getattr(self._file, "details", None)
        info = details if isinstance(details, dict) else fs.info(path)
        size = getattr(self._file, "size", None)
        self.size = int(size) if size is not None else int(info["size"])
        self.pin: str | None = _info_pin(info)
        etag = info.get("ETag")
        self._etag: str | None = str(etag) if etag and _is_s3(fs) else None

    def header_file(self) -> BinaryIO:
        return self._file

    def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        if self._etag is None:  # not S3: fsspec's concurrent ranged reads
            n = len(ranges)
            return cast(
                list[bytes],
                self._fs.cat_ranges(
                    [self._path] * n,
                    [start for start, _ in ranges],
                    [end for _, end in ranges],
                    on_error="raise",
                ),
            )
        from fsspec.asyn import sync

        bucket, key, _ = self._fs.split_path(self._path)

        async def fetch_all() -> list[bytes]:
            gets = [_s3_get_range(self._fs, bucket, key, s, e, self._etag or "") for s, e in ranges]
            return list(await asyncio.gather(*gets))

        try:
            return cast(list[bytes], sync(self._fs.loop, fetch_all))
        except Exception as e:
            if _error_code(e) in _S3_CHANGED_CODES:
                raise self._changed() from e
            raise

    def _changed(self) -> SlideChangedError:
        try:
            now = _info_pin(self._fs.info(self._path, refresh=True)) or "unknown"
        except Exception as e:  # deleted meanwhile, or the HEAD failed: say so, keep the 412
            now = f"unknown ({type(e).__name__})"
        return SlideChangedError(
            self._uri,
            f"the object changed after it was opened (pinned {self.pin}, now {now}): it was "
            "rewritten while the run read it, so its header no longer describes its bytes; "
            "process the slide again once nothing writes to it",
        )

    def read_all(self) -> bytes:
        return self.read_ranges([(0, self.size)])[0]

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
    if code in _S3_CHANGED_CODES:  # a conditional read (If-Match: the pinned ETag) failed
        return SlideChangedError(
            uri,
            f"the object changed after it was opened ({doing}: {name}: {exc}); it was "
            "rewritten while the run read it: process the slide again once nothing writes to it",
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


def _locate(path: str, uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(None, local path)`` for a path or ``file://`` URL, else ``(fsspec filesystem, its path)``."""
    protocol = path.split("://", 1)[0].lower() if "://" in path else "file"
    if protocol == "file":
        return None, unquote(urlparse(path).path) if "://" in path else path
    try:
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise UnsupportedSlideError(
            uri,
            f"cannot open {protocol}:// URLs ({type(e).__name__}: {e}); use a local path, "
            "file://, s3:// or another installed fsspec protocol",
        ) from e
    return fs, fs_path


def open_source(
    src: str | os.PathLike[str] | BinaryIO,
    uri: str,
    storage_options: dict[str, Any] | None,
    *,
    pin: str | None = None,
) -> ByteSource:
    """The byte source of ``src`` (named ``uri`` in errors).

    A file object becomes a :class:`StreamSource`, a local path or ``file://``
    URL a :class:`LocalSource`, any other URL an :class:`FsspecSource` built
    with ``storage_options``. With ``pin`` (a source's :attr:`pin` from an
    earlier open) the file or object must still be that version.

    Raises
    ------
    SlideChangedError
        ``pin`` is given and the file or object is another version now.
    SlideReadError
        One of its subclasses when the storage fails (see :func:`storage_error`).
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
    fs, path = _locate(os.fspath(src), uri, storage_options)
    source: ByteSource
    try:
        source = LocalSource(path, uri) if fs is None else FsspecSource(fs, path, uri)
    except Exception as e:
        raise storage_error(
            uri, e, "opening the file" if fs is None else "opening the object"
        ) from e
    if pin is not None and source.pin != pin:
        now = source.pin
        source.close()
        raise SlideChangedError(
            uri,
            f"the {'file' if fs is None else 'object'} changed after the run first opened it "
            f"(pinned {pin}, now {now}): it was rewritten during the run, so the run's plan "
            "no longer describes it; process the slide again once nothing writes to it",
        )
    return source


def current_pin(uri: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The pin (see "Pinning") the file or object at ``uri`` has now: one ``stat`` or HEAD.

    Raises
    ------
    SlideReadError
        One of its subclasses when the storage fails (see :func:`storage_error`).
    """
    fs, path = _locate(uri, uri, storage_options)
    try:
        if fs is None:
            return _stat_pin(os.stat(path))
        fs.invalidate_cache(path)
        return _info_pin(fs.info(path))
    except Exception as e:
        raise storage_error(
            uri, e, "looking the file up" if fs is None else "looking the object up"
        ) from e
