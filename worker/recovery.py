"""Failures and recovery: end a job that failed, give back what it reserved, find jobs whose message was lost,
and replay dead letters.

**The reconciler.** Messages can vanish without the database knowing: the broker restarted without
persistence, a publish failed after the commit, a worker host disappeared with the message unacknowledged. The
database knows every job that is not finished, so a periodic pass compares it with the broker:

* a ``queued`` or ``routing`` job untouched for ``reconcile_after_s`` (doubling with each re-publication)
  whose id is in neither its queue nor the broker's unacknowledged set is re-published to the step it needs;
* a ``generating`` job whose lease has expired is re-published to its tier;
* a job re-published ``max_redeliveries`` times is dead-lettered (failed, replayable with
  ``routet2i dlq replay``).

Re-publishing is always safe, because every step is idempotent; looking in the broker first only keeps a
job that is merely waiting in a long queue from being published twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db import lifecycle
from db.generations import get_generation
from db.jobs import get_job, lock_overdue_jobs, lock_stale_jobs
from db.lifecycle import hold_reservation, is_done, take_reservation
from db.models import Job, JobStatus, utcnow
from db.pagination import as_utc
from db.redis_state import SpendLedger, WorkerRegistry, connect, give_back
from db.session import transaction
from worker.context import WorkerContext
from worker.transport import ROUTE_TASK, broker_job_ids, generate_task, publish, republish_orphans

log = logging.getLogger(__name__)

BATCH = 500
"""Jobs examined per reconciler pass; a backlog of stuck jobs is worked off over several passes."""


def fail_job(
    ctx: WorkerContext,
    job_id: str,
    error: str,
    *,
    stage: str,
    dead_letter: bool = False,
    release_reservation: bool = False,
) -> bool:
    """Mark a job failed with a reason the user can read (an escalated job whose cloud generation fails
    delivers its edge image instead). Returns False if it had already ended.

    Args:
        ctx: the worker process's resources.
        job_id: the job.
        error: what went wrong, for the user.
        stage: ``routing`` or ``generation``.
        dead_letter: the failure may pass (exhausted retries of a transient fault): keep the job replayable
            with ``routet2i dlq replay``.
        release_reservation: the tier's generator raised on every attempt, so no image was produced or
            billed: the reservation of a job failing on the cloud goes back to the spend ledger. (Other
            failures keep it: an image may have been billed before the failure. A job failing on the edge
            keeps its shadow's reservation: the shadow is generated whatever becomes of the job.)
    """
    released: tuple[str, float] | None = None
    failed = False
    with transaction(ctx.sessions) as session:
        job = get_job(session, uuid.UUID(job_id), for_update=True)
        if job is not None and lifecycle.is_stopped(job) and stage == "generation":
            # Cancelled or expired while its generation failed: a reservation nothing was billed against goes back.
            released = lifecycle.discard(job, billed=not release_reservation)
        elif job is not None and not is_done(job):
            released = _fail(session, job, error, stage=stage, dead_letter=dead_letter, release=release_reservation)
            failed = True
    if released is not None:
        give_back(ctx.spend_ledger(), *released, job_id=job_id)
    return failed


def _fail(
    session: Session, job: Job, error: str, *, stage: str, dead_letter: bool, release: bool
) -> tuple[str, float] | None:
    """:func:`fail_job`'s change of the job; returns the reservation to give back once committed."""
    released: tuple[str, float] | None = None
    detail: dict[str, Any] = {"stage": stage}
    if release and lifecycle.owns_reservation(job):
        released = take_reservation(job)
        if released is not None:
            detail["released_usd"] = released[1]
    delivered = stage == "generation" and lifecycle.deliver_replaced(session, job, error, detail)
    if not delivered and dead_letter:
        lifecycle.dead_letter(session, job, error, stage=stage, detail=detail)
    elif not delivered:
        lifecycle.fail(session, job, error, detail=detail)
        log.warning("job failed", extra={"job_id": str(job.id), "stage": stage, "error": error})
    return released


def shadow_failed(ctx: WorkerContext, job_id: str, tier: str, error: str) -> bool:
    """A shadow generation's generator raised on every attempt: no image was produced or billed, so the
    reservation the job holds for a cloud shadow goes back to the spend ledger (once: the job's reservation is
    cleared in the same transaction). The job itself is left as it is.

    Returns:
        True when a reservation was given back.
    """
    key = uuid.UUID(job_id)
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        # The reservation must be the shadow's (on ``tier``, not the job's own); a shadow image recorded (by an
        # earlier delivery of the same message) was billed.
        if job is None or job.tier == tier or job.reserved_tier != tier:
            return False
        if get_generation(session, job_id=key, tier=tier) is not None:
            return False
        released = take_reservation(job)
    if released is None:
        return False
    log.warning("shadow generation failed for good", extra={"job_id": job_id, "tier": tier, "error": error})
    give_back(ctx.spend_ledger(), *released, job_id=job_id)
    return True


# --- the reconciler -------------------------------------------------------------------------------------


@dataclass
class ReconcileReport:
    examined: int = 0
    republished: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    still_queued: int = 0
    """Stale jobs found in the broker (waiting in a long queue or being worked on), left alone."""
    orphaned: list[str] = field(default_factory=list)
    """Jobs whose messages a dead worker had taken, published again."""
    expired: list[str] = field(default_factory=list)
    """Unfinished jobs whose deadline had passed, ended ``expired``."""

    def to_dict(self) -> dict[str, object]:
        return {
            "examined": self.examined,
            "republished": self.republished,
            "dead_lettered": self.dead_lettered,
            "still_queued": self.still_queued,
            "orphaned": self.orphaned,
            "expired": self.expired,
        }


FORGET_DEAD_AFTER_S = 3600.0
"""A dead worker's last heartbeat is kept this long (``routet2i queues`` shows it), then forgotten."""


def sweep_dead_workers(client: redis.Redis, registry: WorkerRegistry, settings: Settings) -> list[str]:
    """Publish again the messages that workers which stopped beating had taken (prefetched or running), and
    forget workers dead for long. Returns the ids of the jobs those messages carry.

    A message counts as a dead worker's when it was delivered more than ``worker_dead_after_s`` ago and no
    live worker listed it in its last heartbeat (each lists every message it holds, every
    ``heartbeat_interval_s``).
    """
    beats = registry.heartbeats()
    now = registry.now()
    held = {tag for beat in beats if beat.age(now) <= settings.worker_dead_after_s for tag in beat.held}
    jobs = republish_orphans(client, held=held, delivered_before=time.time() - settings.worker_dead_after_s)
    registry.forget(
        beat.node for beat in beats if beat.age(now) > max(FORGET_DEAD_AFTER_S, settings.worker_dead_after_s)
    )
    if jobs:
        log.warning("jobs of dead workers published again", extra={"jobs": jobs})
    return jobs


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
    registry: WorkerRegistry | None = None,
) -> ReconcileReport:
    """One reconciler pass; safe to run from several processes at once (rows are locked, skipping locked).

    It first publishes again what dead workers had taken (:func:`sweep_dead_workers`; ``registry``: the workers'
    heartbeats, by default in the settings' state Redis), then compares the unfinished jobs with the broker.
    """
    now = now or utcnow()
    report = ReconcileReport()
    registry = registry or WorkerRegistry(connect(settings.state_redis_url))
    report.orphaned = sweep_dead_workers(client, registry, settings)
    report.expired = expire_overdue(sessions, SpendLedger.for_settings(settings, registry.client), now=now)
    in_broker: set[str] | None = None
    to_publish: list[tuple[str, str]] = []

    with transaction(sessions) as session:
        for job in lock_stale_jobs(session, now=now, reconcile_after_s=settings.reconcile_after_s, limit=BATCH):
            report.examined += 1
            if not _due(job, settings, now):
                continue
            if job.status != JobStatus.GENERATING:
                if in_broker is None:
                    in_broker = broker_job_ids(client, settings.queues)
                if str(job.id) in in_broker:
                    report.still_queued += 1
                    continue
            if job.redeliveries >= settings.max_redeliveries:
                reason = f"lost {job.redeliveries + 1} times (last seen {job.status})"
                lifecycle.dead_letter(session, job, reason, stage="reconcile", at=now)
                report.dead_lettered.append(str(job.id))
                continue
            # The job's tier, which an escalation may have changed since its decision.
            task = generate_task(job.tier) if job.tier is not None else ROUTE_TASK
            lifecycle.requeue(session, job, task=task, now=now)
            to_publish.append((task, str(job.id)))

    for task, job_id in to_publish:  # after the commit, so a worker never sees the job before its new state
        publish(app, task, job_id)
        report.republished.append(job_id)
    if report.republished or report.dead_lettered or report.orphaned or report.expired:
        log.warning("reconciled", extra=report.to_dict())
    return report


def expire_overdue(sessions: sessionmaker[Session], ledger: SpendLedger | None, *, now: datetime) -> list[str]:
    """End ``expired`` every unfinished job whose deadline has passed (a batch per pass), giving back the cloud
    reservations of those not generating; returns their ids. A generating one's image is discarded when its
    worker is done (:func:`db.lifecycle.stop`)."""
    released: list[tuple[str, tuple[str, float]]] = []
    expired: list[str] = []
    with transaction(sessions) as session:
        for job in lock_overdue_jobs(session, now=now, limit=BATCH):
            held = lifecycle.expire_if_overdue(session, job, now=now)
            expired.append(str(job.id))
            if held is not None:
                released.append((str(job.id), held))
    for job_id, held in released:
        give_back(ledger, *held, job_id=job_id)
    return expired


def replay_dead_letters(
    sessions: sessionmaker[Session],
    app: Celery,
    job_ids: Iterable[uuid.UUID],
    *,
    tier: str | None = None,
    ledger: SpendLedger | None = None,
    reserve_usd: Mapping[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Revive dead-lettered jobs: reset their counters and publish them to the step they need.

    With a spend ledger, a routed job replayed to a tier whose images reserve money (``reserve_usd``) and that
    holds no reservation for it (its generator's refusal gave it back, or it was on another tier) reserves that
    tier's price again in the current period, and a job sent to routing or to a tier that reserves nothing gives
    back the reservation it holds. A job holding its shadow's reservation keeps it (the shadow is generated
    whatever becomes of the job). A replay is an operator's decision: it is counted, not refused, when the
    period's limit is reached.

    Args:
        sessions: session factory.
        app: the Celery app to publish with.
        job_ids: jobs to replay; each must be dead-lettered.
        tier: send the jobs straight to this tier's queue instead of routing them (again).
        ledger: the deployment's spend ledger (None: no spend limit).
        reserve_usd: what one image of each tier reserves (a tier not named: nothing).

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
            job = get_job(session, job_id, for_update=True)
            if job is None:
                raise ValueError(f"no job with id {job_id}")
            if job.dead_lettered_at is None:
                raise ValueError(f"job {job_id} is not dead-lettered (status {job.status})")
            own = lifecycle.owns_reservation(job)  # else what it holds is its shadow's (or nothing)
            if tier is not None and tier != job.tier:
                held = take_reservation(job) if own else None  # it paid for an image on the tier left
                released += [(str(job.id), held)] if held is not None and ledger is not None else []
                own = False
                job.tier = tier
            task = generate_task(job.tier) if job.tier is not None else ROUTE_TASK
            detail: dict[str, Any] = {"stage": "replayed", "task": task}
            price = (reserve_usd or {}).get(job.tier, 0.0) if job.tier is not None else 0.0
            if ledger is not None and not price:
                held = take_reservation(job) if own else None
                if held is not None:
                    released.append((str(job.id), held))
                    detail["released_usd"] = held[1]
            elif ledger is not None and job.requested_tier is None and not own:
                assert job.tier is not None
                hold_reservation(job, ledger.key(), price, tier=job.tier)
                charges += price
                detail["reserved_usd"] = price
            lifecycle.replay(session, job, detail=detail)
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
