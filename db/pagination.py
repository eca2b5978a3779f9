"""Keyset pagination over ``(created_at, id)``, newest first, with opaque cursors."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

T = TypeVar("T")

MAX_PAGE_SIZE = 500
"""Upper bound on ``limit`` for every listing endpoint."""


class InvalidCursor(ValueError):
    """The cursor was not produced by this API."""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime. SQLite hands back naive datetimes; everything the project stores is UTC."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{as_utc(created_at).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|")
        return as_utc(datetime.fromisoformat(created)), uuid.UUID(row_id)
    except (
        ValueError,
        UnicodeDecodeError,
        OverflowError,
    ) as exc:  # OverflowError: a time near year 1 shifted by its offset
        raise InvalidCursor("cursor is not valid") from exc


def paginate(session: Session, query: Select[Any], model: Any, *, limit: int, cursor: str | None) -> Page[Any]:
    """Run ``query`` newest first, one page of ``limit`` rows after ``cursor``."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < row_id)))
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return Page(items=rows[:limit], next_cursor=next_cursor)
