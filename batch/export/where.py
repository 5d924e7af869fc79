"""``--where``: a SQL predicate over a run's cells, run by DuckDB one slide at a time.

The predicate is one SQL expression over the cells table's columns (see
``schemas/cells.v1.json``, plus each configured classifier's ``<name>_label``,
``<name>_confidence`` and ``<name>_probs``, and ``slide_id``), e.g.
``wbc_type_label = 'blast' AND det_confidence > 0.5``. DuckDB scans the
slide's Parquet partition as a ``pyarrow.dataset`` (no extension needed) and
pushes the projection and the filter down, so only the columns the query
names are read and memory is bounded by one slide's matching rows.

A predicate that does not parse as one expression or does not bind to the
slide's columns raises `WhereError` with DuckDB's message.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
import pandas as pd
import pyarrow.dataset as pads

from batch.errors import ConfigError

__all__ = ["CellFilter", "WhereError", "parse_where"]

#: DuckDB's memory cap while filtering one slide (it spills past it).
DUCKDB_MEMORY_LIMIT = "1GB"


class WhereError(ConfigError):
    """``--where`` is not a predicate DuckDB can run over the cells' columns."""


class CellFilter:
    """A ``--where`` predicate, applied to one slide's cells file at a time.

    Parameters
    ----------
    predicate
        One SQL boolean expression over the cells columns.
    """

    def __init__(self, predicate: str) -> None:
        self.predicate = predicate.strip()
        self._con: duckdb.DuckDBPyConnection | None = None

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = duckdb.connect()
            self._con.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT}'")
        return self._con

    def apply(
        self, dataset: pads.Dataset, slide_id: str, columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The rows of one slide's ``dataset`` the predicate keeps, with ``columns`` (None: all).

        ``slide_id`` is added as a column (the partition key is not stored in
        the file), so the predicate may name it.

        Raises
        ------
        WhereError
            The predicate does not parse or bind (DuckDB's message, the slide and its columns).
        """
        con = self._connection()
        names = list(columns) if columns is not None else list(dataset.schema.names)
        rel = con.from_arrow(dataset).project(
            duckdb.StarExpression(), duckdb.ConstantExpression(slide_id).alias("slide_id")
        )
        try:
            kept = rel.filter(self.predicate)
            table = kept.project(*(duckdb.ColumnExpression(n) for n in names)).to_arrow_table()
        except duckdb.Error as e:
            available = ", ".join([*dataset.schema.names, "slide_id"])
            raise WhereError(
                f"--where {self.predicate!r} is not a predicate over slide {slide_id}'s cells: "
                f"{e}\n(columns: {available})"
            ) from e
        return table.to_pandas()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def parse_where(text: str | None) -> CellFilter | None:
    """A `CellFilter` for ``--where`` (None or blank: no filter).

    Raises
    ------
    WhereError
        The text is not one SQL expression (checked before any slide is read).
    """
    if text is None or not text.strip():
        return None
    con = duckdb.connect()
    try:
        con.sql("SELECT 1 AS one").filter(text)
    except duckdb.ParserException as e:
        raise WhereError(f"--where {text!r} is not one SQL expression: {e}") from e
    except duckdb.Error:
        pass  # names and types are checked against each slide's cells
    finally:
        con.close()
    return CellFilter(text)
