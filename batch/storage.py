"""Storage locations the user names: no credentials in URLs, and an output checked before a run.

Credentials come from the standard AWS chain (environment, profile, instance
role), never from a URL: a URL is printed, logged and written to the run's
manifest, so ``http://user:secret@minio:9000`` would leak its secret into all
three. `refuse_credentials` turns such a URL away (naming it with the
secret masked); `redact_credentials` masks any that reach a record anyway.

`check_out_writable` proves a run's output location accepts writes before any
compute starts, without creating anything when it does not: writing the
output's folders would create a missing S3 bucket (s3fs ``makedirs`` does).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from batch.errors import ConfigError, OutputNotWritableError

__all__ = [
    "PROBE_PREFIX",
    "check_out_writable",
    "has_credentials",
    "redact_credentials",
    "redact_url",
    "refuse_credentials",
]

log = logging.getLogger(__name__)

#: Name prefix of the empty object `check_out_writable` writes into OUT and deletes again.
PROBE_PREFIX = ".hemaray-write-probe-"
#: What stands in for the user-info part (``user:password@``) of a redacted URL.
REDACTED = "***"
#: ``scheme://userinfo@`` anywhere in a string (the user-info part has no ``/``, ``@`` or space).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")

T = TypeVar("T")


def has_credentials(url: str) -> bool:
    """True when ``url`` carries user-info (``scheme://user[:password]@host...``)."""
    if "://" not in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed netloc (bad port, brackets): fall back to the pattern
        return _USERINFO.search(url) is not None
    return parts.username is not None or parts.password is not None


def redact_url(url: str) -> str:
    """``url`` with any user-info replaced by ``***`` (``http://***@host:9000``)."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", url)


def redact_credentials(value: T) -> T:
    """``value`` (a string, or lists / dicts of them) with every URL's user-info masked."""
    if isinstance(value, str):
        return redact_url(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: redact_credentials(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(redact_credentials(v) for v in value)  # type: ignore[return-value]
    return value


def refuse_credentials(url: str | os.PathLike[str] | None, what: str) -> None:
    """Raise `ConfigError` when ``url`` carries user-info; ``what`` names the setting.

    Raises
    ------
    ConfigError
        Naming the setting and the URL with its user-info masked.
    """
    if url is None:
        return
    text = os.fspath(url)
    if has_credentials(text):
        raise ConfigError(
            f"{what} must not carry credentials (user:password@), got {redact_url(text)!r}; "
            "remove them from the URL and give them through the standard AWS chain "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
        )


def check_out_writable(out: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Check that a run can write to ``out``; create nothing when it cannot.

    A local ``out`` is created (with its parents) and an empty probe file is
    written in it and removed. On object storage (``s3://``, any fsspec URL)
    an empty probe object ``OUT/.hemaray-write-probe-<id>`` is written and
    deleted; a put never creates a bucket, so a missing bucket stays missing.
    A probe that cannot be deleted (a write-only policy) is logged and left.

    Raises
    ------
    ConfigError
        If ``out`` carries credentials.
    OutputNotWritableError
        If the location (its bucket or a parent folder) does not exist or refuses the write.
    """
    import fsspec

    refuse_credentials(out, "the output location (--out)")
    probe_name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    text = out.rstrip("/")
    if "://" not in text or text.startswith("file://"):
        local = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        try:
            local.mkdir(parents=True, exist_ok=True)
            probe = local / probe_name
            with open(probe, "xb"):
                pass
            probe.unlink()
        except OSError as e:
            raise OutputNotWritableError(
                f"cannot write to the output folder {str(local)!r} ({type(e).__name__}: "
                f"{e.strerror or e}); check that the path is a folder (no part of it a file) "
                "and that this user may write there"
            ) from e
        return
    shown = redact_url(text)
    try:
        fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
    except Exception as e:  # an unknown protocol, a missing fsspec backend
        raise OutputNotWritableError(
            f"cannot open the output location {shown!r} ({type(e).__name__}: {e}); use a local "
            "folder, file:// or s3://"
        ) from e
    probe_path = f"{root.rstrip('/')}/{probe_name}"
    bucket = root.split("/", 1)[0]
    try:
        fs.pipe_file(probe_path, b"")
    except FileNotFoundError as e:
        raise OutputNotWritableError(
            f"cannot write to the output location {shown!r}: the bucket {bucket!r} does not "
            "exist (or the endpoint is not the one that holds it); create it first, or fix "
            "--out or storage.endpoint_url. Nothing was created."
        ) from e
    except PermissionError as e:
        raise OutputNotWritableError(
            f"cannot write to the output location {shown!r}: access denied ({e}); check the "
            f"policy of bucket {bucket!r} and the credentials in the environment (the AWS "
            "chain). Nothing was created."
        ) from e
    except Exception as e:  # fsspec backends raise many types; name the location and chain
        raise OutputNotWritableError(
            f"cannot write to the output location {shown!r} ({type(e).__name__}: {e}); check "
            "the URL, the endpoint (storage.endpoint_url) and the credentials in the environment"
        ) from e
    try:
        fs.rm_file(probe_path)
    except Exception as e:  # writing is what a run needs; a left-over empty probe is harmless
        log.warning("could not delete the write probe %s (%s); delete it by hand", probe_path, e)
