"""Fallback: a job whose tier fails it for good runs on the next tier of its chain instead of failing.

Each tier has a fallback chain (``ROUTET2I_<TIER>__FALLBACK``; by default the next cheaper tier, then the dearer
ones, cheapest first). When a tier's generator failed a routed job for good on a fault of the tier (unreachable,
429, 5xx or a timeout, its retries spent), or the tier's circuit breaker is open when its worker takes the job, the job goes to the first tier of the chain that it has not
been on yet, whose breaker is not open and, with a spend limit, whose image the period can still pay for. The
job's history and its decision record the fallback and why; a job with nowhere left to go fails as before. A
prompt the tier refused (an HTTP 400, a content filter) fails: another tier must not get round the refusal.

Jobs whose tier the caller forced never fall back (the caller asked for that tier), nor do escalated jobs, which
deliver the image the escalation was to replace (:func:`db.lifecycle.deliver_replaced`).
"""

from __future__ import annotations

import logging
import uuid

import redis.exceptions

from db.breaker import OPEN, BreakerState
from db.generations import replaced_generation
from db.jobs import get_job
from db.lifecycle import fall_back, is_done, owns_reservation, take_reservation, tiers_tried
from db.models import JobStatus
from db.redis_state import give_back
from db.session import transaction
from router.cost import reserved_usd
from worker.context import WorkerContext
from worker.transport import generate_task, publish

log = logging.getLogger(__name__)


def record_failure(ctx: WorkerContext, tier: str) -> None:
    """Count a generation that failed for good on a retryable fault towards ``tier``'s circuit breaker."""
    try:
        ctx.breaker().failure(tier)
    except redis.exceptions.RedisError as exc:
        log.warning("circuit breaker not updated: Redis unreachable", extra={"tier": tier, "error": str(exc)})


def record_success(ctx: WorkerContext, tier: str) -> None:
    """An image was produced on ``tier``: its breaker closes."""
    try:
        ctx.breaker().success(tier)
    except redis.exceptions.RedisError as exc:
        log.warning("circuit breaker not updated: Redis unreachable", extra={"tier": tier, "error": str(exc)})


def breaker_open(ctx: WorkerContext, tier: str) -> bool:
    """Whether ``tier``'s breaker is open now (Redis unreachable: not open, and the generator is tried)."""
    try:
        return ctx.breaker().states([tier])[tier].state == OPEN
    except redis.exceptions.RedisError:
        return False


def try_fallback(ctx: WorkerContext, job_id: str, tier: str, error: str, *, waiting: bool = False) -> str | None:
    """Send ``job_id``, which ``tier`` failed for good with ``error``, to its next fallback tier (``waiting``: only
    if it still waits on ``tier``'s queue, no delivery generating it).

    Returns:
        The tier it now waits on, or None when it may not or cannot fall back (the caller fails it).
    """
    key = uuid.UUID(job_id)
    settings = ctx.settings
    chain = settings.fallback_chain(tier)
    if not chain:
        return None
    try:
        states = ctx.breaker().states(settings.tier_names)
    except redis.exceptions.RedisError:
        states = {}
    ledger = ctx.spend_ledger()
    released: tuple[str, float] | None = None
    charged = 0.0
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        if job is None or is_done(job) or job.tier != tier or job.requested_tier is not None:
            return None
        if waiting and job.status != JobStatus.QUEUED:
            return None
        if replaced_generation(session, job_id=key) is not None:
            return None
        tried = tiers_tried(session, job)
        spent = ledger.spent() if ledger is not None else 0.0
        target = _next_tier(ctx, chain, tried, states, spent)
        if target is None:
            return None
        if owns_reservation(job):
            released = take_reservation(job)
            spent -= released[1] if released else 0.0
        price = reserved_usd(settings.tier(target)) if target != settings.cheapest else 0.0
        reservation = None
        if ledger is not None and price > 0:
            reservation = (ledger.key(), price)
            charged = price
        fall_back(session, job, tier=target, error=error, reservation=reservation)
        if charged and ledger is not None:
            ledger.add(charged)  # before the commit, as a replay's: a failed commit leaves money unspent, never more
    if released is not None:
        give_back(ledger, *released, job_id=job_id)
    publish(ctx.app, generate_task(target), job_id)
    return target


def _next_tier(
    ctx: WorkerContext, chain: tuple[str, ...], tried: set[str], states: dict[str, BreakerState], spent: float
) -> str | None:
    """The first tier of ``chain`` not ``tried``, not down, and affordable within the spend limit."""
    settings = ctx.settings
    limit = settings.cloud_spend_limit_usd
    for candidate in chain:
        if candidate in tried:
            continue
        if candidate in states and states[candidate].state == OPEN:
            continue
        price = reserved_usd(settings.tier(candidate)) if candidate != settings.cheapest else 0.0
        if limit is not None and price > 0 and spent + price > limit:
            continue
        return candidate
    return None
