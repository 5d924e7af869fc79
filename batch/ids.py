"""Deterministic, path-safe identifiers for slides and cells."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from urllib.parse import urlparse

import numpy as np
import numpy.typing as npt

__all__ = ["slide_id_for", "unique_slide_ids", "cell_ids"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Slide ids are cut to this many characters before the disambiguating hash.
MAX_SLIDE_ID = 96
#: Box coordinates are rounded to this many decimals before hashing (float noise).
CELL_ID_DECIMALS = 2


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def slide_id_for(uri: str) -> str:
    """A path-safe id from a slide URI's file stem.

    Only ``[A-Za-z0-9._-]`` survive, leading dots are dropped (no ``..`` or
    hidden names), so the id can be used as a path segment and a hive
    partition value. Empty results fall back to a hash of the URI.
    """
    path = urlparse(uri).path if "://" in uri else uri.replace("\\", "/")
    name = PurePosixPath(path).name
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    safe = (
        _UNSAFE.sub("_", stem).lstrip(".")[:MAX_SLIDE_ID].strip("_") or f"slide-{_short_hash(uri)}"
    )
    return safe


def unique_slide_ids(uris: Iterable[str]) -> list[str]:
    """Slide ids for ``uris``; where two URIs share a stem, both get a hash of their URI appended."""
    uris = list(uris)
    base = [slide_id_for(u) for u in uris]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    return [
        b if counts[b] == 1 else f"{b}-{_short_hash(u)}" for b, u in zip(base, uris, strict=True)
    ]


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
    for box, cls in zip(rounded, classes, strict=True):
        key = f"{slide_id}|{box[0]:.2f},{box[1]:.2f},{box[2]:.2f},{box[3]:.2f}|{cls}|{model_key}"
        out.append(hashlib.sha256(key.encode()).hexdigest()[:24])
    return out
