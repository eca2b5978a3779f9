"""Data access for jobs: create, read, list and lock them (every change of state is :mod:`db.lifecycle`'s)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import ColumnElement, Table, and_, insert, or_, select
from sqlalchemy.orm import Session, make_transient_to_detached

from db.models import Decision, Job, JobEvent, JobStatus, Tenant, utcnow
from db.pagination import Page, paginate

_INSERT_JOB = insert(cast(Table, Job.__table__))
_INSERT_EVENT = insert(cast(Table, JobEvent.__table__))


@dataclass(frozen=True)
class NewJob:
    """What a submission asks for (see :class:`db.models.Job` for the fields)."""

    prompt: str
    seed: int
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    idempotency_key: str | None = None
    requested_tier: str | None = None
    deadline_at: datetime | None = None
    webhook_url: str | None = None


def create_job(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    prompt: str,
    seed: int,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    idempotency_key: str | None = None,
    requested_tier: str | None = None,
    deadline_at: datetime | None = None,
    webhook_url: str | None = None,
) -> Job:
    """Insert a queued job and its first event in ``session``'s transaction (the caller commits)."""
    (job,) = create_jobs(
        session,
        tenant_id=tenant_id,
        jobs=[NewJob(prompt, seed, steps, width, height, idempotency_key, requested_tier, deadline_at, webhook_url)],
    )
    return job


def create_jobs(session: Session, *, tenant_id: uuid.UUID, jobs: Sequence[NewJob]) -> list[Job]:
    """Insert queued jobs and their first events in ``session``'s transaction (the caller commits).

    Submission is the API's hot path, so the rows go in as plain INSERT statements rather than through the
    unit of work, one statement per table however many jobs (executemany); the returned jobs are attached to
    the session as the persistent rows they now are.
    """
    now = utcnow()
    rows = [
        {
            "id": uuid.uuid4(),
            "tenant_id": tenant_id,
            "prompt": job.prompt,
            "seed": job.seed,
            "steps": job.steps,
            "width": job.width,
            "height": job.height,
            "idempotency_key": job.idempotency_key,
            "requested_tier": job.requested_tier,
            "status": JobStatus.QUEUED.value,
            "tier": None,
            "error": None,
            "attempts": 0,
            "redeliveries": 0,
            "created_at": now,
            "updated_at": now,
            "routed_at": None,
            "started_at": None,
            "finished_at": None,
            "enqueued_at": now,
            "lease_owner": None,
            "lease_until": None,
            "dead_lettered_at": None,
            "deadline_at": job.deadline_at,
            "webhook_url": job.webhook_url,
        }
        for job in jobs
    ]
    if not rows:
        return []
    # Values go as parameters of statements built once: ``insert(...).values(...)`` would coerce every value
    # into a new statement on each call (about a seventh of a submission's CPU time).
    session.execute(_INSERT_JOB, rows if len(rows) > 1 else rows[0])
    events = [{"job_id": row["id"], "status": JobStatus.QUEUED.value, "at": now} for row in rows]
    session.execute(_INSERT_EVENT, events if len(events) > 1 else events[0])
    created = []
    for row in rows:
        job = Job(**row)
        make_transient_to_detached(job)
        session.add(job)
        created.append(job)
    return created


def get_job(session: Session, job_id: uuid.UUID, *, for_update: bool = False) -> Job | None:
    query = select(Job).where(Job.id == job_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def get_jobs_by_idempotency_keys(session: Session, *, tenant_id: uuid.UUID, keys: Sequence[str]) -> dict[str, Job]:
    """The tenant's jobs submitted with any of ``keys``, by key."""
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key.in_(keys)))
    return {job.idempotency_key: job for job in jobs if job.idempotency_key is not None}


def list_jobs(
    session: Session,
    *,
    tenant_id: uuid.UUID | None = None,
    status: str | None = None,
    tier: str | None = None,
    dead_lettered: bool | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Job]:
    """Jobs newest first; ``tenant_id`` None lists every tenant's (admin views)."""
    query = select(Job)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if dead_lettered is not None:
        query = query.where(Job.dead_lettered_at.is_not(None) if dead_lettered else Job.dead_lettered_at.is_(None))
    if status is not None:
        query = query.where(Job.status == status)
    if tier is not None:
        query = query.where(Job.tier == tier)
    return paginate(session, query, Job, limit=limit, cursor=cursor)


def list_events(session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def lock_jobs(session: Session, keys: Sequence[uuid.UUID]) -> list[Job]:
    """The jobs ``keys`` with their rows locked, in id order (so two batches never wait on each other in a cycle)."""
    if not keys:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(keys)).order_by(Job.id).with_for_update()))


def lock_jobs_with_tenant_budgets(session: Session, keys: Sequence[uuid.UUID]) -> list[tuple[Job, float | None]]:
    """The jobs ``keys`` locked as :func:`lock_jobs` does, each with its tenant's own cloud budget (None: the
    deployment's)."""
    rows = session.execute(
        select(Job, Tenant.cloud_budget)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(Job.id.in_(keys))
        .order_by(Job.id)
        .with_for_update(of=Job)
    )
    return [(job, budget) for job, budget in rows]


def tenant_budgets_unless_shadowed(
    session: Session, keys: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[uuid.UUID, float | None]]:
    """Per job of ``keys`` that was not shadow-sampled: its tenant and the tenant's own cloud budget."""
    rows = session.execute(
        select(Job.id, Job.tenant_id, Tenant.cloud_budget, Decision.shadow)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .outerjoin(Decision, Decision.job_id == Job.id)
        .where(Job.id.in_(keys))
    )
    return {job_id: (tenant_id, budget) for job_id, tenant_id, budget, shadow in rows if not shadow}


def _stale(now: datetime, reconcile_after_s: float) -> ColumnElement[bool]:
    """SQL conditions of a job that may have lost its message."""
    base = now - timedelta(seconds=reconcile_after_s)
    waiting = and_(
        Job.status.in_((JobStatus.QUEUED, JobStatus.ROUTING)),
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < base),
    )
    orphaned = and_(Job.status == JobStatus.GENERATING, or_(Job.lease_until.is_(None), Job.lease_until < now))
    return or_(waiting, orphaned)


def lock_stale_jobs(session: Session, *, now: datetime, reconcile_after_s: float, limit: int) -> list[Job]:
    """Up to ``limit`` unfinished jobs, oldest first, that may have lost their message: queued or routing
    and untouched for ``reconcile_after_s``, or generating past their lease. On PostgreSQL their rows are locked,
    skipping rows another pass holds."""
    query = select(Job).where(_stale(now, reconcile_after_s)).order_by(Job.created_at).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def lock_overdue_jobs(session: Session, *, now: datetime, limit: int) -> list[Job]:
    """Up to ``limit`` unfinished jobs whose deadline has passed, their rows locked (on PostgreSQL, skipping rows
    another transaction holds)."""
    unfinished = (JobStatus.QUEUED, JobStatus.ROUTING, JobStatus.GENERATING)
    query = (
        select(Job)
        .where(Job.deadline_at.is_not(None), Job.deadline_at < now, Job.status.in_(unfinished))
        .order_by(Job.deadline_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def list_dead_letters(session: Session, *, limit: int = 100) -> list[Job]:
    """Dead-lettered jobs, most recent first."""
    return list(
        session.scalars(
            select(Job).where(Job.dead_lettered_at.is_not(None)).order_by(Job.dead_lettered_at.desc()).limit(limit)
        )
    )
