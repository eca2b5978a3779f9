"""Time arithmetic in SQL that works on both supported databases.

Aggregates over job timestamps (latency histograms, per-minute series) run in the database so that a scrape
or a chart never loads the rows themselves. PostgreSQL and SQLite spell "seconds since the epoch"
differently; :class:`epoch` compiles to the right spelling for the engine in use.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, Integer, literal_column
from sqlalchemy.exc import CompileError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement


class epoch(FunctionElement[float]):
    """Seconds since 1970-01-01 UTC of a timestamp column, as a float."""

    type = Float()
    inherit_cache = True
    name = "epoch"


@compiles(epoch, "postgresql")
def _epoch_postgresql(element: epoch, compiler: Any, **kw: Any) -> str:
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) AS DOUBLE PRECISION)"


@compiles(epoch, "sqlite")
def _epoch_sqlite(element: epoch, compiler: Any, **kw: Any) -> str:
    # SQLAlchemy stores UTC datetimes as ISO text on SQLite; julianday() parses it (millisecond precision).
    return f"((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400.0)"


@compiles(epoch)
def _epoch_other(element: epoch, compiler: Any, **kw: Any) -> str:
    raise CompileError(f"epoch() is implemented for PostgreSQL and SQLite, not {compiler.dialect.name}")


def seconds_between(start: Any, end: Any) -> ColumnElement[float]:
    """``end - start`` in seconds."""
    return epoch(end) - epoch(start)


class floor_nonnegative(FunctionElement[int]):
    """``floor(x)`` for ``x >= 0`` (SQLite has no ``floor`` without its math extension; a cast truncates)."""

    type = Integer()
    inherit_cache = True
    name = "floor_nonnegative"


@compiles(floor_nonnegative, "postgresql")
def _floor_postgresql(element: floor_nonnegative, compiler: Any, **kw: Any) -> str:
    return f"CAST(FLOOR({compiler.process(element.clauses, **kw)}) AS BIGINT)"


@compiles(floor_nonnegative, "sqlite")
def _floor_sqlite(element: floor_nonnegative, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS INTEGER)"


@compiles(floor_nonnegative)
def _floor_other(element: floor_nonnegative, compiler: Any, **kw: Any) -> str:
    raise CompileError(f"floor_nonnegative() is implemented for PostgreSQL and SQLite, not {compiler.dialect.name}")


def bucket_index(column: Any, *, start: float, width_s: float) -> ColumnElement[int]:
    """Index of the ``width_s``-second bucket, counted from ``start`` (epoch seconds), of each row's ``column``.

    The constants are rendered into the SQL text (they are floats computed here, never user text) so that
    PostgreSQL sees the same expression in SELECT and GROUP BY.
    """
    origin: ColumnElement[float] = literal_column(repr(float(start)))
    width: ColumnElement[float] = literal_column(repr(float(width_s)))
    return floor_nonnegative((epoch(column) - origin) / width)
