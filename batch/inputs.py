"""Turn what the user typed (paths, globs, folders, s3 prefixes, manifests) into slide inputs."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from batch.errors import ConfigError
from batch.ids import normalise_uri, safe_id, unique_slide_ids

__all__ = ["SlideInput", "resolve_inputs", "SLIDE_SUFFIXES", "MANIFEST_SUFFIXES"]

SLIDE_SUFFIXES = (
    ".tif", ".tiff", ".btf", ".svs", ".ndpi", ".ome.tif", ".ome.tiff",
    ".jpg", ".jpeg", ".png",
)  # fmt: skip
MANIFEST_SUFFIXES = (".csv", ".parquet")
#: Manifest column naming the slide; other columns are carried into the slides table.
MANIFEST_URI_COLUMN = "slide_uri"


@dataclass(frozen=True)
class SlideInput:
    """One slide to process: its URI, path-safe id and user metadata (patient, cohort, mpp...)."""

    uri: str
    slide_id: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def mpp(self) -> float | None:
        value = self.metadata.get("mpp")
        return float(value) if value not in (None, "") else None


def _is_slide(name: str) -> bool:
    return name.lower().endswith(SLIDE_SUFFIXES)


def _expand(item: str, storage_options: dict[str, Any]) -> list[str]:
    if "://" in item and not item.startswith("file://"):
        fs, path = fsspec.core.url_to_fs(item, **storage_options)
        proto = item.split("://", 1)[0]
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _is_slide(p)]
        else:
            found = [path]
        return sorted(f"{proto}://{p}" for p in found)
    local = item[len("file://") :] if item.startswith("file://") else item
    if any(ch in local for ch in "*?["):
        return sorted(p for p in glob.glob(local, recursive=True) if os.path.isfile(p))
    if os.path.isdir(local):
        return sorted(str(p) for p in Path(local).rglob("*") if p.is_file() and _is_slide(p.name))
    return [local]


def _read_manifest(item: str, storage_options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    import pandas as pd

    # pandas refuses storage options with a local path (the run's carry retry settings)
    opts = (storage_options or None) if "://" in item else None
    if item.lower().endswith(".csv"):
        df = pd.read_csv(item, storage_options=opts, dtype=str, keep_default_na=False)
    else:
        df = pd.read_parquet(item, storage_options=opts)
    if MANIFEST_URI_COLUMN not in df.columns:
        raise ConfigError(
            f"manifest {item}: needs a {MANIFEST_URI_COLUMN!r} column; found {list(df.columns)}"
        )
    rows = []
    for rec in df.to_dict(orient="records"):
        uri = str(rec.pop(MANIFEST_URI_COLUMN))
        meta = {str(k): (None if v == "" else v) for k, v in rec.items()}
        rows.append((uri, meta))
    return rows


def resolve_inputs(
    items: list[str],
    *,
    storage_options: dict[str, Any] | None = None,
    id_column: str | None = None,
    id_secret: bytes | None = None,
) -> list[SlideInput]:
    """Expand user inputs into slides with unique path-safe ids, in a stable order.

    Folders and prefixes are searched recursively for slide files; globs are
    expanded; a ``.csv``/``.parquet`` item is a manifest with a ``slide_uri``
    column whose other columns are carried along. A named file that does not
    exist is kept, so it fails visibly as that slide's failure row. One slide
    listed twice (two spellings of one path) is one input.

    Ids (`batch.ids`): ``<stem>-<hash of the normalised URI>`` by default; the
    value of the manifest column ``id_column`` if given (every slide must come
    from a manifest with it, and the values must be unique); a keyed
    pseudonym (HMAC with ``id_secret``) that carries no file name.
    """
    opts = storage_options or {}
    pairs: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if item.lower().endswith(MANIFEST_SUFFIXES):
            pairs.extend(_read_manifest(item, opts))
        else:
            expanded = _expand(item, opts)
            if not expanded and any(ch in item for ch in "*?["):
                raise ConfigError(f"{item}: the pattern matched no files")
            pairs.extend((u, {}) for u in expanded)
    seen: set[str] = set()
    unique = []
    for uri, meta in pairs:
        key = normalise_uri(uri)
        if key not in seen:
            seen.add(key)
            unique.append((uri, meta))
    if id_column is not None:
        ids = _column_ids(unique, id_column)
    else:
        ids = unique_slide_ids((u for u, _ in unique), secret=id_secret)
    return [
        SlideInput(uri=u, slide_id=i, metadata=m) for (u, m), i in zip(unique, ids, strict=True)
    ]


def _column_ids(pairs: list[tuple[str, dict[str, Any]]], column: str) -> list[str]:
    ids = []
    for uri, meta in pairs:
        value = meta.get(column)
        sid = safe_id(str(value)) if value not in (None, "") else ""
        if not sid:
            raise ConfigError(
                f"--id-column {column}: {uri} has no {column!r} value (every slide must come "
                "from a manifest with that column)"
            )
        ids.append(sid)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"--id-column {column}: values {dupes[:5]} name more than one slide")
    return ids
