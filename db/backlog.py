"""What the database says is waiting on each queue: the job counts and the oldest waiting job.

A queued job without a tier waits on the ``route`` queue (since its submission); a queued job with a tier
waits on that tier's queue (since its routing decision). The database is the source of truth, so these
figures hold even when the broker lost its messages, which makes them the right base for alerting on age.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.settings import QUEUES
from db.models import Job, JobStatus
from db.pagination import as_utc


@dataclass(frozen=True)
class Backlog:
    """Jobs waiting on one queue according to the database."""

    queue: str
    waiting: int
    oldest_job_id: uuid.UUID | None
    oldest_since: datetime | None
    """When the oldest waiting job joined this queue (submission for ``route``, routing for a tier)."""


def _queue_of(tier: str | None) -> str:
    return "route" if tier is None else tier


def waiting_backlog(session: Session, queues: Sequence[str] = QUEUES) -> dict[str, Backlog]:
    """The backlog of every queue of ``queues`` (those with nothing waiting included, with ``waiting=0``)."""
    since = func.coalesce(Job.routed_at, Job.created_at)
    counts = {
        _queue_of(tier): int(count)
        for tier, count in session.execute(
            select(Job.tier, func.count()).where(Job.status == JobStatus.QUEUED).group_by(Job.tier)
        )
    }
    backlog: dict[str, Backlog] = {}
    for queue in queues:
        oldest = None
        if counts.get(queue):
            tier_clause = Job.tier.is_(None) if queue == "route" else Job.tier == queue
            oldest = session.execute(
                select(Job.id, since.label("since"))
                .where(Job.status == JobStatus.QUEUED, tier_clause)
                .order_by(since, Job.id)
                .limit(1)
            ).first()
        backlog[queue] = Backlog(
            queue=queue,
            waiting=counts.get(queue, 0),
            oldest_job_id=oldest.id if oldest is not None else None,
            oldest_since=as_utc(oldest.since) if oldest is not None else None,
        )
    return backlog
