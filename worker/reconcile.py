"""The reconciler: find jobs whose message was lost and publish them again, dead-letter the hopeless.

Messages can vanish without the database knowing: the broker restarted without persistence, a publish
failed after the commit, a worker host disappeared with the message unacknowledged. The database knows every
job that is not finished, so a periodic pass compares it with the broker:

* a ``queued`` or ``routing`` job untouched for ``reconcile_after_s`` (doubling with each re-publication)
  whose id is in neither its queue nor the broker's unacknowledged set is re-published to the step it needs;
* a ``generating`` job whose lease has expired is re-published to its tier;
* a job re-published ``max_redeliveries`` times is dead-lettered (failed, replayable with
  ``routet2i dlq replay``).

Re-publishing is always safe, because every step is idempotent; looking in the broker first only keeps a
job that is merely waiting in a long queue from being published twice.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.jobs import transition
from db.models import Job, JobStatus, utcnow
from db.pagination import as_utc
from db.session import transaction
from worker.app import GENERATE_TASKS, QUEUES, ROUTE_TASK, publish
from worker.budget_store import SpendLedger, give_back, hold_reservation, take_reservation

log = logging.getLogger(__name__)

BATCH = 500
"""Jobs examined per pass; a backlog of stuck jobs is worked off over several passes."""

UNACKED_KEY = "unacked"
"""Where kombu's Redis transport keeps delivered, unacknowledged messages (a hash: tag -> message)."""


@dataclass
class ReconcileReport:
    examined: int = 0
    republished: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    still_queued: int = 0
    """Stale jobs found in the broker (waiting in a long queue or being worked on), left alone."""

    def to_dict(self) -> dict[str, object]:
        return {
            "examined": self.examined,
            "republished": self.republished,
            "dead_lettered": self.dead_lettered,
            "still_queued": self.still_queued,
        }


def job_ids_of(raw: bytes | str) -> list[str]:
    """The job ids carried by a Celery message as kombu's Redis transport stores it (its arguments, read from
    the body: the ``argsrepr`` header is cut short for a message carrying many ids)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [str(a) for a in args] if isinstance(args, list) else []
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return []


def broker_job_ids(client: redis.Redis) -> set[str]:
    """Ids of every job with a message waiting in a queue or delivered but not yet acknowledged."""
    ids: set[str] = set()
    for queue in QUEUES:
        for raw in client.lrange(queue, 0, -1):
            ids.update(job_ids_of(raw))
    for raw in client.hvals(UNACKED_KEY):
        ids.update(job_ids_of(raw))
    return ids


def _stale(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """SQL conditions of a job that may have lost its message."""
    base = now - timedelta(seconds=settings.reconcile_after_s)
    waiting = and_(
        Job.status.in_((JobStatus.QUEUED, JobStatus.ROUTING)),
        or_(Job.enqueued_at.is_(None), Job.enqueued_at < base),
    )
    orphaned = and_(Job.status == JobStatus.GENERATING, or_(Job.lease_until.is_(None), Job.lease_until < now))
    return or_(waiting, orphaned)


def _due(job: Job, settings: Settings, now: datetime) -> bool:
    """Apply the per-job backoff: each re-publication doubles the wait before the next one."""
    if job.status == JobStatus.GENERATING:
        return True
    wait = timedelta(seconds=settings.reconcile_after_s * 2**job.redeliveries)
    return job.enqueued_at is None or as_utc(job.enqueued_at) < now - wait


def reconcile(
    sessions: sessionmaker[Session],
    app: Celery,
    client: redis.Redis,
    settings: Settings,
    *,
    now: datetime | None = None,
) -> ReconcileReport:
    """One reconciler pass; safe to run from several processes at once (rows are locked, skipping locked)."""
    now = now or utcnow()
    report = ReconcileReport()
    in_broker: set[str] | None = None
    to_publish: list[tuple[str, str]] = []

    with transaction(sessions) as session:
        query = select(Job).where(_stale(settings, now)).order_by(Job.created_at).limit(BATCH)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        for job in session.scalars(query):
            report.examined += 1
            if not _due(job, settings, now):
                continue
            if job.status != JobStatus.GENERATING:
                if in_broker is None:
                    in_broker = broker_job_ids(client)
                if str(job.id) in in_broker:
                    report.still_queued += 1
                    continue
            if job.redeliveries >= settings.max_redeliveries:
                job.dead_lettered_at = now
                job.lease_owner = job.lease_until = None
                transition(
                    session,
                    job,
                    JobStatus.FAILED,
                    detail={"stage": "reconcile", "dead_lettered": True},
                    error=f"dead-lettered: lost {job.redeliveries + 1} times (last seen {job.status})",
                )
                report.dead_lettered.append(str(job.id))
                continue
            # The job's tier, which an escalation may have changed since its decision.
            task = GENERATE_TASKS[job.tier] if job.tier is not None else ROUTE_TASK
            was = job.status
            job.redeliveries += 1
            job.enqueued_at = now
            job.lease_owner = job.lease_until = None
            transition(session, job, JobStatus.QUEUED, detail={"stage": "reconciled", "was": was, "task": task})
            to_publish.append((task, str(job.id)))

    for task, job_id in to_publish:  # after the commit, so a worker never sees the job before its new state
        publish(app, task, job_id)
        report.republished.append(job_id)
    if report.republished or report.dead_lettered:
        log.warning("reconciled", extra=report.to_dict())
    return report


def replay_dead_letters(
    sessions: sessionmaker[Session],
    app: Celery,
    job_ids: Iterable[uuid.UUID],
    *,
    tier: str | None = None,
    ledger: SpendLedger | None = None,
    cloud_price_usd: float = 0.0,
) -> list[tuple[str, str]]:
    """Revive dead-lettered jobs: reset their counters and publish them to the step they need.

    With a spend ledger, a routed job replayed to the cloud that holds no reservation (its generator's
    refusal gave it back) reserves ``cloud_price_usd`` again in the current period, and a job sent to the edge
    instead gives back the reservation it holds. A job that was on the edge holds its cloud shadow's
    reservation, if any: it keeps it (the shadow is generated whatever becomes of the job) and, replayed to
    the cloud, reserves its own image as well. A replay is an operator's decision: it is counted, not refused,
    when the period's limit is reached.

    Args:
        sessions: session factory.
        app: the Celery app to publish with.
        job_ids: jobs to replay; each must be dead-lettered.
        tier: send the jobs straight to this tier's queue instead of routing them (again).
        ledger: the deployment's spend ledger (None: no spend limit).
        cloud_price_usd: what one cloud image reserves.

    Returns:
        (job id, task name) per replayed job.

    Raises:
        ValueError: a job is unknown or not dead-lettered (nothing is replayed then).
        redis.RedisError: the ledger could not be charged (nothing is replayed then).
    """
    to_publish: list[tuple[str, str]] = []
    released: list[tuple[str, tuple[str, float]]] = []
    charges = 0.0
    with transaction(sessions) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise ValueError(f"no job with id {job_id}")
            if job.dead_lettered_at is None:
                raise ValueError(f"job {job_id} is not dead-lettered (status {job.status})")
            shadows = job.tier == "edge" and job.reserved_usd > 0  # the reservation is its cloud shadow's
            if tier is not None:
                job.tier = tier
            task = GENERATE_TASKS[job.tier] if job.tier is not None else ROUTE_TASK
            detail: dict[str, Any] = {"stage": "replayed", "task": task}
            if ledger is not None and task != GENERATE_TASKS["cloud"]:
                held = None if shadows else take_reservation(job)
                if held is not None:
                    released.append((str(job.id), held))
                    detail["released_usd"] = held[1]
            elif (
                ledger is not None
                and job.requested_tier is None
                and (job.reserved_usd <= 0 or shadows)
                and cloud_price_usd
            ):
                hold_reservation(job, ledger.key(), cloud_price_usd)
                charges += cloud_price_usd
                detail["reserved_usd"] = cloud_price_usd
            job.dead_lettered_at = None
            job.error = None
            job.finished_at = None
            job.attempts = job.redeliveries = 0
            job.lease_owner = job.lease_until = None
            job.enqueued_at = utcnow()
            transition(session, job, JobStatus.QUEUED, detail=detail)
            to_publish.append((str(job.id), task))
        if ledger is not None and charges:
            # Before the commit: if Redis refuses the charge, nothing is replayed; if the commit then fails,
            # the period counts a reservation no job holds, which errs towards spending less.
            ledger.add(charges)
    for owner, held in released:
        give_back(ledger, *held, job_id=owner)
    for replayed, task in to_publish:
        publish(app, task, replayed)
    return to_publish


def list_dead_letters(session: Session, *, limit: int = 100) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.dead_lettered_at.is_not(None)).order_by(Job.dead_lettered_at.desc()).limit(limit)
        )
    )
