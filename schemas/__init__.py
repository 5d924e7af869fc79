"""The one source of truth for every table hemaray writes.

Each table is a versioned JSON file ``<table>.v<N>.json`` in this folder that
lists every field with its Arrow type, nullability, unit and meaning. Writers
and readers call :func:`load` and never spell a schema out themselves.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

__all__ = ["TABLES", "load", "field_docs", "latest_version", "conform", "conform_to"]

SCHEMA_DIR = Path(__file__).parent
TABLES = ("cells", "slides", "failures", "labels")
_LIST_RE = re.compile(r"^list<(.+)>$")
_TS_RE = re.compile(r"^timestamp\[(\w+)(?:, tz=(.+))?\]$")


def _arrow_type(spec: str) -> pa.DataType:
    if m := _LIST_RE.match(spec):
        return pa.list_(_arrow_type(m.group(1)))
    if m := _TS_RE.match(spec):
        return pa.timestamp(m.group(1), tz=m.group(2))
    if spec == "string":
        return pa.string()
    if spec == "binary":
        return pa.binary()
    return pa.type_for_alias(spec)


def latest_version(table: str) -> int:
    """Highest version of ``table`` shipped in this folder."""
    versions = [int(p.stem.split(".v")[1]) for p in SCHEMA_DIR.glob(f"{table}.v*.json")]
    if not versions:
        raise KeyError(f"no schema named {table!r} in {SCHEMA_DIR}; known: {', '.join(TABLES)}")
    return max(versions)


@cache
def _spec(table: str, version: int) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{table}.v{version}.json"
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


@cache
def load(table: str, version: int | None = None) -> pa.Schema:
    """The Arrow schema of ``table`` (latest version unless given).

    Field metadata carries ``unit`` and ``doc``; schema metadata carries
    ``hemaray.table`` and ``hemaray.version``.
    """
    version = latest_version(table) if version is None else version
    spec = _spec(table, version)
    fields = [
        pa.field(
            f["name"],
            _arrow_type(f["type"]),
            nullable=f["nullable"],
            metadata={"unit": f["unit"] or "", "doc": f["doc"]},
        )
        for f in spec["fields"]
    ]
    return pa.schema(
        fields,
        metadata={"hemaray.table": table, "hemaray.version": str(version), "doc": spec["doc"]},
    )


def field_docs(table: str, version: int | None = None) -> dict[str, tuple[str | None, str]]:
    """``{field name: (unit, doc)}`` for ``table``."""
    version = latest_version(table) if version is None else version
    return {f["name"]: (f["unit"], f["doc"]) for f in _spec(table, version)["fields"]}


def conform(table: pa.Table, name: str, *, extra_ok: bool = True) -> pa.Table:
    """Cast ``table`` to schema ``name``: schema fields first, in order, then extras.

    Missing nullable fields become nulls; a missing non-nullable field is an
    error. Extra columns (dynamic classifier columns, manifest metadata) are
    kept after the schema's fields when ``extra_ok``, else they are an error.
    """
    return conform_to(table, load(name), extras="keep" if extra_ok else "error", name=name)


def conform_to(
    table: pa.Table,
    schema: pa.Schema,
    *,
    extras: Literal["keep", "drop", "error"] = "keep",
    name: str = "cells",
) -> pa.Table:
    """Cast ``table`` to ``schema``: the one schema-conforming routine of the project.

    Schema fields come first, in order, cast where their type differs; a
    missing nullable field becomes nulls, a missing non-nullable one is an
    error. Columns the schema lacks are kept after them (``"keep"``),
    dropped (``"drop"``) or refused (``"error"``).
    """
    columns: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    names = set(table.column_names)
    for field in schema:
        if field.name in names:
            col = table.column(field.name)
            columns.append(col if col.type == field.type else col.cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, type=field.type))
        else:
            raise ValueError(
                f"table {name!r}: required column {field.name!r} missing; got {table.column_names}"
            )
        fields.append(field)
    rest = [c for c in table.column_names if c not in schema.names]
    if rest and extras == "error":
        raise ValueError(f"table {name!r}: unexpected columns {rest}")
    if extras == "keep":
        for c in rest:
            columns.append(table.column(c))
            fields.append(table.schema.field(c))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=schema.metadata))
