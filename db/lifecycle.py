"""A job's life cycle: its states, the transitions between them, and every change to its lease, dead letter,
queue hand-off and cloud reservation.

Every change of a job's status goes through :func:`transition`, which refuses a move the table
:data:`TRANSITIONS` does not hold and appends the job's history (``job_events``). The other functions are the
life cycle's steps, each a few field changes and one or two transitions in the caller's transaction (the caller
commits, then publishes or touches Redis: a worker never sees a job before its new state is committed)::

    queued ──▶ routing ──▶ queued (on its tier) ──▶ generating ──▶ succeeded
       │          │              ▲        │               │
       │          │              └────────┴── escalated, re-published
       └──────────┴──────────────────────────────────────┴──▶ failed ──▶ queued (dead letter replayed)

``queued`` covers both the route queue (no tier yet) and a tier's queue (``tier`` tells which).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from db.decisions import get_decision, record_decision
from db.generations import replaced_generation
from db.models import Job, JobEvent, JobStatus, utcnow
from db.pagination import as_utc
from db.webhooks import enqueue_delivery
from router.types import RoutingDecision

log = logging.getLogger(__name__)

QUEUED, ROUTING, GENERATING = JobStatus.QUEUED, JobStatus.ROUTING, JobStatus.GENERATING
SUCCEEDED, FAILED = JobStatus.SUCCEEDED, JobStatus.FAILED
CANCELLED, EXPIRED = JobStatus.CANCELLED, JobStatus.EXPIRED

_STOPPED = {
    CANCELLED: "the client cancels it",
    EXPIRED: "its deadline passes",
}

TRANSITIONS: dict[JobStatus, dict[JobStatus, str]] = {
    QUEUED: {
        ROUTING: "a router takes the job",
        GENERATING: "a tier worker takes its generation lease",
        QUEUED: "the reconciler publishes it again (its message was lost), or its tier's circuit breaker is open and "
        "it falls back to another tier",
        SUCCEEDED: "a generation that outlived its lease is recorded, or an escalated job whose cloud attempts ran "
        "out delivers its edge image",
        FAILED: "it cannot be enqueued, routed or generated, or is dead-lettered",
        **_STOPPED,
    },
    ROUTING: {
        QUEUED: "routed: handed to its tier's queue (or published again by the reconciler)",
        FAILED: "routing failed",
        **_STOPPED,
    },
    GENERATING: {
        GENERATING: "a redelivery of the lease holder's message, or any delivery after the lease ran out, takes over",
        SUCCEEDED: "its image is recorded",
        QUEUED: "escalated to the cloud, failed for good and fell back to another tier, or published again after its "
        "lease ran out",
        FAILED: "generation failed, or the job is dead-lettered",
        CANCELLED: "the client cancels it (the image being generated is discarded)",
        EXPIRED: "its deadline passes (the image being generated is discarded)",
    },
    SUCCEEDED: {},
    FAILED: {
        QUEUED: "a dead-lettered job is replayed (routet2i dlq replay)",
    },
    CANCELLED: {},
    EXPIRED: {},
}
"""``TRANSITIONS[from][to]``: why a job may move from one status to another. Nothing else is allowed."""


class IllegalTransition(RuntimeError):
    """A status change the life cycle does not allow (a bug in the caller, never a user's error)."""


def is_done(job: Job | None) -> bool:
    """Whether there is nothing left to do for ``job`` (it ended, or no longer exists)."""
    return job is None or JobStatus(job.status).terminal


def check_transition(job: Job, status: JobStatus) -> None:
    """Raise :class:`IllegalTransition` unless ``job`` may move to ``status`` now."""
    current = JobStatus(job.status)
    if status not in TRANSITIONS[current]:
        allowed = ", ".join(TRANSITIONS[current]) or "none: it has ended"
        raise IllegalTransition(f"job {job.id} cannot go from {current} to {status} (allowed: {allowed})")
    if current == FAILED and job.dead_lettered_at is None:
        raise IllegalTransition(f"job {job.id} failed for good; only a dead-lettered job is replayed")


def transition(
    session: Session,
    job: Job,
    status: JobStatus,
    *,
    detail: dict[str, Any] | None = None,
    error: str | None = None,
    at: datetime | None = None,
) -> None:
    """Move ``job`` to ``status``, stamping its timestamps and appending to its history (``at``: when it
    happened, if not now).

    Raises:
        IllegalTransition: the table does not allow the move.
    """
    check_transition(job, status)
    now = at or utcnow()
    job.status = status
    job.updated_at = now
    if status == GENERATING:
        job.started_at = now
    if status.terminal:
        job.finished_at = now
    if error is not None:
        job.error = error
    session.add(JobEvent(job_id=job.id, status=status, at=now, detail=detail))
    if status.terminal and job.webhook_url is not None:
        enqueue_delivery(session, job, status)


# --- routing --------------------------------------------------------------------------------------------


def mark_routed(session: Session, job: Job, decision: RoutingDecision, *, started: datetime) -> None:
    """Record ``decision`` for ``job`` (routing since ``started``) and queue the job on its tier; a cloud image
    the decision reserved from the spend limit (delivered, or a shadow) is held by the job."""
    transition(session, job, ROUTING, at=started)
    record_decision(session, job=job, decision=decision)
    state = decision.budget_state
    if state.get("spend_period") and state.get("reserved_usd"):
        reserved_for = str(state.get("reserved_tier", decision.tier))  # the shadow's tier when it is the shadow's
        hold_reservation(job, str(state["spend_period"]), float(state["reserved_usd"]), tier=reserved_for)
    job.enqueued_at = utcnow()
    transition(session, job, QUEUED, detail={"stage": "routed", "tier": decision.tier})


# --- generation -----------------------------------------------------------------------------------------


def claim_lease(session: Session, job: Job, *, tier: str, delivery: str, lease_s: float, batch: int) -> bool:
    """Take the generation lease for ``delivery`` (a Celery task id; a redelivery keeps it) until ``lease_s``
    from now; False when another delivery holds a live lease. ``batch``: how many jobs the worker took together
    (recorded in the job's history)."""
    now = utcnow()
    if (
        job.status == GENERATING
        and job.lease_owner not in (None, delivery)
        and job.lease_until is not None
        and as_utc(job.lease_until) > now
    ):
        return False
    job.attempts += 1
    job.lease_owner = delivery
    job.lease_until = now + timedelta(seconds=lease_s)
    transition(session, job, GENERATING, detail={"tier": tier, "attempt": job.attempts, "batch": batch})
    return True


def renew_leases(session: Session, leases: Sequence[tuple[uuid.UUID, str]], *, lease_s: float) -> int:
    """Extend to ``lease_s`` from now the leases of jobs still generating under the given ``(job, delivery)``
    pairs (the worker generating them is alive). Returns how many were renewed: a job whose lease another
    delivery took over, or that ended, is left alone."""
    until = utcnow() + timedelta(seconds=lease_s)
    renewed = 0
    for key, delivery in leases:
        result = session.execute(
            update(Job)
            .where(Job.id == key, Job.lease_owner == delivery, Job.status == GENERATING)
            .values(lease_until=until)
        )
        renewed += cast(CursorResult[Any], result).rowcount
    return renewed


def release_lease(job: Job) -> None:
    job.lease_owner = None
    job.lease_until = None


def succeed(session: Session, job: Job, *, detail: dict[str, Any]) -> None:
    """The job's image was recorded: it is delivered."""
    release_lease(job)
    transition(session, job, SUCCEEDED, detail=detail)


def escalate(session: Session, job: Job, *, tier: str, detail: dict[str, Any], reservation: dict[str, Any]) -> None:
    """Queue ``job`` on ``tier`` again, from a fresh count of attempts: its image scored so badly that the user
    receives that tier's image instead. ``reservation``: the escalation's verdict, with ``spend_period`` and
    ``reserved_usd`` when the new image reserved its price."""
    release_lease(job)
    job.tier = tier
    job.attempts = 0
    job.enqueued_at = utcnow()
    if reservation.get("spend_period"):
        hold_reservation(job, str(reservation["spend_period"]), float(reservation["reserved_usd"]), tier=tier)
    transition(session, job, QUEUED, detail={**detail, "stage": "escalated"})


def deliver_replaced(session: Session, job: Job, error: str, detail: dict[str, Any]) -> bool:
    """If ``job`` was escalated and its cloud generation failed for good, deliver the edge image the
    escalation was to replace (the job succeeds on the edge, the failure in its history). Returns whether it
    did; False for any other job, which fails."""
    if job.requested_tier is not None:
        return False
    replaced = replaced_generation(session, job_id=job.id)
    if replaced is None:
        return False
    replaced.role = "primary"
    job.tier = replaced.tier
    release_lease(job)
    transition(session, job, SUCCEEDED, detail={**detail, "stage": "escalation failed", "error": error})
    log.warning("escalation failed; the edge image is delivered", extra={"job_id": str(job.id), "error": error})
    return True


# --- failure and recovery -------------------------------------------------------------------------------


def fail(session: Session, job: Job, error: str, *, detail: dict[str, Any]) -> None:
    """End ``job`` as failed, with a reason the user can read."""
    release_lease(job)
    transition(session, job, FAILED, detail=detail, error=error)


def dead_letter(
    session: Session,
    job: Job,
    reason: str,
    *,
    stage: str,
    detail: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> None:
    """Fail ``job`` as a dead letter: its failure may pass (retries or redeliveries ran out), so
    ``routet2i dlq replay`` can revive it."""
    job.dead_lettered_at = at or utcnow()
    release_lease(job)
    transition(
        session,
        job,
        FAILED,
        detail={"stage": stage, **(detail or {}), "dead_lettered": True},
        error=f"dead-lettered: {reason}",
        at=at,
    )
    log.error("job dead-lettered", extra={"job_id": str(job.id), "stage": stage, "reason": reason})


def requeue(session: Session, job: Job, *, task: str, now: datetime) -> None:
    """Count a re-publication of ``job``, whose message was lost (or whose lease ran out), to ``task``."""
    was = job.status
    job.redeliveries += 1
    job.enqueued_at = now
    release_lease(job)
    transition(session, job, QUEUED, detail={"stage": "reconciled", "was": was, "task": task})


def fall_back(session: Session, job: Job, *, tier: str, error: str, reservation: tuple[str, float] | None) -> None:
    """Queue ``job`` on ``tier``, its fallback, from a fresh count of attempts: its own tier failed it for good
    (``error``) or is down. The decision's record gains the fallback and why. ``reservation``: the period and
    amount the new tier's image reserved, if it did (the caller took the old tier's reservation back first)."""
    was = job.tier
    release_lease(job)
    job.tier = tier
    job.attempts = 0
    job.enqueued_at = utcnow()
    if reservation is not None:
        hold_reservation(job, reservation[0], reservation[1], tier=tier)
    decision = get_decision(session, job_id=job.id)
    if decision is not None:
        fallbacks = [*decision.budget_state.get("fallbacks", []), {"from": was, "to": tier, "reason": error}]
        decision.budget_state = {**decision.budget_state, "fallbacks": fallbacks}
    transition(session, job, QUEUED, detail={"stage": "fallback", "from": was, "tier": tier, "reason": error})
    log.warning("job falls back to another tier", extra={"job_id": str(job.id), "from": was, "to": tier})


def tiers_tried(session: Session, job: Job) -> set[str]:
    """The tiers ``job`` was routed or fell back to so far."""
    decision = get_decision(session, job_id=job.id)
    tried = {job.tier} if job.tier is not None else set()
    if decision is not None:
        tried.add(decision.tier)
        tried.update(str(step.get("to")) for step in decision.budget_state.get("fallbacks", []))
    return tried


def replay(session: Session, job: Job, *, detail: dict[str, Any]) -> None:
    """Revive a dead-lettered ``job`` with fresh counters; the caller publishes it."""
    transition(session, job, QUEUED, detail=detail)
    job.dead_lettered_at = None
    job.error = None
    job.finished_at = None
    job.attempts = job.redeliveries = 0
    release_lease(job)
    job.enqueued_at = utcnow()


# --- job control ----------------------------------------------------------------------------------------


def stop(session: Session, job: Job, status: JobStatus, reason: str) -> tuple[str, float] | None:
    """End an unfinished ``job`` as cancelled or expired, with ``reason`` for the user.

    A job not generating yet never will: the reservation of its cloud image is taken (the caller gives it back
    once this is committed) and returned. A generating job keeps its lease and reservation: the worker
    generating it discards the image when it is done, and settles the reservation (:func:`discard`).
    An edge job's reservation is its cloud shadow's, which is generated whatever becomes of the job: it stays.
    """
    assert status in _STOPPED
    released = take_reservation(job) if job.status != GENERATING and owns_reservation(job) else None
    detail: dict[str, Any] = {"stage": str(status), "was": job.status}
    if released is not None:
        detail["released_usd"] = released[1]
    transition(session, job, status, detail=detail, error=reason)
    return released


def expire_if_overdue(session: Session, job: Job, *, now: datetime | None = None) -> tuple[str, float] | None:
    """Expire ``job`` if its deadline has passed and it has not ended (:func:`stop`); returns the reservation
    to give back. A job with no deadline, ended, or not overdue is left alone (None)."""
    now = now or utcnow()
    if job.deadline_at is None or is_done(job) or as_utc(job.deadline_at) > now:
        return None
    return stop(session, job, EXPIRED, f"expired: its deadline passed at {as_utc(job.deadline_at).isoformat()}")


def is_stopped(job: Job) -> bool:
    """Whether the job was cancelled or expired (its running generation, if any, is to be discarded)."""
    return job.status in _STOPPED


def discard(job: Job, *, billed: bool) -> tuple[str, float] | None:
    """A generation finished for a job cancelled or expired meanwhile: its image is not delivered. When it was
    not ``billed`` (no money spent on it), the job's cloud reservation is taken and returned for the caller to give
    back after the commit; when it was, the reservation stays spent."""
    release_lease(job)
    return None if billed or not owns_reservation(job) else take_reservation(job)


# --- cloud reservations ---------------------------------------------------------------------------------


def hold_reservation(job: Job, period: str, usd: float, *, tier: str) -> None:
    """Record that ``job``'s image on ``tier`` (the one it delivers, or its shadow on the other tier) holds
    ``usd`` in the spend ledger's counter ``period``."""
    job.reserved_usd = float(usd)
    job.reserved_period = period
    job.reserved_tier = tier


def owns_reservation(job: Job) -> bool:
    """Whether ``job`` holds a reservation for the image it is to deliver (not for its shadow)."""
    return job.reserved_usd > 0 and job.reserved_tier == job.tier


def take_reservation(job: Job) -> tuple[str, float] | None:
    """Clear the cloud reservation ``job`` holds; returns its ledger period and amount, or None if it holds
    none. The caller gives it back (:func:`db.redis_state.give_back`) once the change is committed."""
    if job.reserved_usd <= 0 or job.reserved_period is None:
        return None
    released = (job.reserved_period, float(job.reserved_usd))
    job.reserved_usd = 0.0
    job.reserved_period = None
    job.reserved_tier = None
    return released
