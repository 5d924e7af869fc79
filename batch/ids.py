"""Deterministic, path-safe identifiers for slides and cells."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt

from batch.errors import ConfigError

__all__ = [
    "slide_id_for", "file_stem", "normalise_uri", "pseudonymous_slide_id", "safe_id",
    "unique_slide_ids", "cell_ids",
]  # fmt: skip

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Slide ids are cut to this many characters before the disambiguating hash.
MAX_SLIDE_ID = 96
#: Box coordinates are rounded to this many decimals before hashing (float noise).
CELL_ID_DECIMALS = 2


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def normalise_uri(uri: str) -> str:
    """One spelling per slide: ``file://`` + the absolute local path, or ``scheme://bucket/key``.

    ``a/b.tif``, ``./a/b.tif`` and ``file:///abs/a/b.tif`` are one slide; so are
    ``s3://bucket/a//b.tif`` and ``s3://bucket/a/b.tif``.
    """
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{re.sub('/+', '/', rest).strip('/')}"
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return "file://" + os.path.abspath(os.path.expanduser(local.replace("\\", "/")))


def file_stem(uri: str) -> str:
    """A path-safe name from a slide URI's file stem.

    Only ``[A-Za-z0-9._-]`` survive, leading dots are dropped (no ``..`` or
    hidden names), so it can be used in a path segment and a hive partition
    value. Empty results fall back to ``slide``.
    """
    path = urlparse(uri).path if "://" in uri else uri.replace("\\", "/")
    name = PurePosixPath(path).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return _UNSAFE.sub("_", stem).lstrip(".")[:MAX_SLIDE_ID].strip("_") or "slide"


def slide_id_for(uri: str) -> str:
    """``<file stem>-<8 hex of SHA-256 of the normalised URI>``: readable, stable, collision-free.

    The same file gives the same id in every run and input set (wherever it is
    listed from); ``siteA/001.tif`` and ``siteB/001.tif`` get different ids.
    """
    return f"{file_stem(uri)}-{_short_hash(normalise_uri(uri))}"


def pseudonymous_slide_id(uri: str, secret: bytes) -> str:
    """``s-<16 hex of HMAC-SHA-256(secret, normalised URI)>``: stable, carries no file name."""
    return "s-" + hmac.new(secret, normalise_uri(uri).encode(), hashlib.sha256).hexdigest()[:16]


def safe_id(value: str) -> str:
    """A user-given id (a manifest column) made path-safe as `file_stem` does."""
    return _UNSAFE.sub("_", value).lstrip(".")[:MAX_SLIDE_ID].strip("_")


def unique_slide_ids(uris: Iterable[str], *, secret: bytes | None = None) -> list[str]:
    """Slide ids for ``uris`` (`slide_id_for`, or `pseudonymous_slide_id` with ``secret``).

    Raises
    ------
    ConfigError
        If two different URIs get one id (a hash collision: never seen, but checked).
    """
    uris = list(uris)
    ids = [pseudonymous_slide_id(u, secret) if secret else slide_id_for(u) for u in uris]
    seen: dict[str, str] = {}
    for i, u in zip(ids, uris, strict=True):
        if seen.setdefault(i, normalise_uri(u)) != normalise_uri(u):
            raise ConfigError(f"slide id {i} stands for two slides: {seen[i]} and {u}")
    return ids


def cell_ids(
    slide_id: str,
    boxes: npt.NDArray[np.float64],
    classes: list[str] | npt.NDArray[np.str_],
    model_key: str,
) -> list[str]:
    """Deterministic cell ids: hash of slide, rounded level-0 box, class and model/config key.

    The same slide, config and weights give the same boxes, hence the same ids.
    """
    rounded = np.round(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), CELL_ID_DECIMALS)
    out = []
    # Python floats format as NumPy's float64 do (the same text), in a third of the time.
    for (a, b, c, d), cls in zip(rounded.tolist(), classes, strict=True):
        key = f"{slide_id}|{a:.2f},{b:.2f},{c:.2f},{d:.2f}|{cls}|{model_key}"
        out.append(hashlib.sha256(key.encode()).hexdigest()[:24])
    return out
