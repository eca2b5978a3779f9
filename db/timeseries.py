"""Per-bucket series of routing, spend and job outcomes, for the dashboard's charts over time."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.expression import ColumnElement

from core.settings import TIERS
from db.models import TERMINAL, CostEntry, Decision, Job
from db.sqltime import bucket_index

BUCKET_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
"""Bucket widths the API offers."""


@dataclass
class Bucket:
    """One time bucket: routing by tier, spend, device time, submissions and outcomes."""

    start: datetime
    tiers: Sequence[str] = TIERS
    """The deployment's tiers, cheapest first: each has an entry (0 when it had nothing)."""
    routed: dict[str, int] = field(default_factory=dict)
    spend_usd: dict[str, float] = field(default_factory=dict)
    gpu_s: dict[str, float] = field(default_factory=dict)
    submitted: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {str(status): 0 for status in sorted(TERMINAL)})

    def __post_init__(self) -> None:
        for table, zero in ((self.routed, 0), (self.spend_usd, 0.0), (self.gpu_s, 0.0)):
            for tier in self.tiers:
                table.setdefault(tier, zero)  # type: ignore[arg-type]

    @property
    def cloud_fraction(self) -> float | None:
        """The share of routed jobs sent to a tier above the cheapest."""
        total = sum(self.routed.values())
        return 1.0 - self.routed.get(self.tiers[0], 0) / total if total else None


@dataclass(frozen=True)
class Series:
    width_s: int
    buckets: list[Bucket]
    spend_before_usd: float
    """Spend before the first bucket, so a chart of cumulative spend starts at the right level."""


def aligned_window(*, width_s: int, count: int, until: datetime) -> tuple[datetime, datetime]:
    """``count`` whole buckets ending with the one that contains ``until`` (aligned to the epoch)."""
    end_epoch = (int(until.timestamp()) // width_s + 1) * width_s
    end = datetime.fromtimestamp(end_epoch, UTC)
    return end - timedelta(seconds=width_s * count), end


@dataclass(frozen=True)
class _Window:
    start: datetime
    end: datetime
    width_s: int
    tenant_id: uuid.UUID | None


def _scoped(query: Select[Any], model: Any, tenant_id: uuid.UUID | None) -> Select[Any]:
    """``query`` restricted to one tenant's jobs (rows of other tables through their job)."""
    if tenant_id is None:
        return query
    if model is Job:
        return query.where(Job.tenant_id == tenant_id)
    return query.join(Job, Job.id == model.job_id).where(Job.tenant_id == tenant_id)


def _per_bucket(
    session: Session,
    column: InstrumentedAttribute[Any],
    window: _Window,
    *,
    keys: Sequence[InstrumentedAttribute[Any]],
    values: Sequence[ColumnElement[Any]],
    where: Sequence[ColumnElement[bool]] = (),
) -> list[tuple[Any, ...]]:
    """Rows of ``(bucket index, *keys, *values)`` for rows whose ``column`` falls in the window."""
    index = bucket_index(column, start=window.start.timestamp(), width_s=window.width_s)
    query = select(index, *keys, *values).where(column >= window.start, column < window.end, *where)
    query = _scoped(query, column.class_, window.tenant_id).group_by(index, *keys)
    return [tuple(row) for row in session.execute(query)]


def timeseries(
    session: Session,
    *,
    width_s: int,
    count: int,
    until: datetime,
    tenant_id: uuid.UUID | None = None,
    tiers: Sequence[str] = TIERS,
) -> Series:
    """The series over ``count`` buckets of ``width_s`` seconds ending at the bucket containing ``until``.

    Args:
        session: an open session.
        width_s: bucket width in seconds.
        count: number of buckets.
        until: the last bucket is the one containing this instant.
        tenant_id: one tenant's series; None for the whole deployment.
        tiers: the deployment's tiers, cheapest first.
    """
    start, end = aligned_window(width_s=width_s, count=count, until=until)
    buckets = [Bucket(start=start + timedelta(seconds=width_s * i), tiers=tiers) for i in range(count)]
    window = _Window(start=start, end=end, width_s=width_s, tenant_id=tenant_id)

    def at(index: int) -> Bucket:
        # SQLite's timestamps are exact to the millisecond only: keep a row on the window's edge inside it.
        return buckets[min(max(int(index), 0), count - 1)]

    for index, tier, n in _per_bucket(
        session, Decision.created_at, window, keys=[Decision.tier], values=[func.count()]
    ):
        at(index).routed[tier] = at(index).routed.get(tier, 0) + int(n)
    for index, tier, usd, gpu_s in _per_bucket(
        session,
        CostEntry.created_at,
        window,
        keys=[CostEntry.tier],
        values=[func.sum(CostEntry.usd), func.sum(CostEntry.gpu_s)],
    ):
        at(index).spend_usd[tier] = at(index).spend_usd.get(tier, 0.0) + float(usd or Decimal(0))
        at(index).gpu_s[tier] = at(index).gpu_s.get(tier, 0.0) + float(gpu_s or 0.0)
    for index, n in _per_bucket(session, Job.created_at, window, keys=[], values=[func.count()]):
        at(index).submitted += int(n)
    for index, status, n in _per_bucket(
        session,
        Job.finished_at,
        window,
        keys=[Job.status],
        values=[func.count()],
        where=[Job.status.in_(sorted(TERMINAL))],
    ):
        at(index).finished[status] += int(n)

    before = session.scalar(
        _scoped(select(func.coalesce(func.sum(CostEntry.usd), 0)), CostEntry, tenant_id).where(
            CostEntry.created_at < start
        )
    )
    return Series(width_s=width_s, buckets=buckets, spend_before_usd=float(before or 0))
