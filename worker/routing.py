"""The routing stage: decide the tier of queued jobs, record the decisions, and hand the jobs to their tiers.

A batch of job ids (a router worker's batch of messages; one id when the system is idle) is routed in one
transaction: the job rows are locked, the routing policy scores every prompt in one call and checks each
against its budget window in one Redis transaction, and each decision is recorded with the job's ``routing``
and ``queued`` history entries (:func:`db.lifecycle.mark_routed`). Only then are the jobs published to their
tiers' queues. A redelivered message finds its job already routed and only repeats the hand-off.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from sqlalchemy.exc import IntegrityError

from core.settings import Settings
from db.breaker import HALF_OPEN, OPEN
from db.decisions import get_decision
from db.jobs import lock_jobs_with_tenant_budgets
from db.lifecycle import expire_if_overdue, is_done, mark_routed
from db.models import Job, utcnow
from db.session import transaction
from router.policy import RouteRequest, RoutingPolicy, shadow_sampled
from router.tier_policy import TierRouteRequest, TierRoutingPolicy
from router.tiers import budget_for_share
from worker.context import WorkerContext
from worker.slo import correct_for_load, read_load
from worker.transport import chunks, generate_task, publish_many

log = logging.getLogger(__name__)


def other_tier(settings: Settings, tier: str) -> str:
    """With two tiers (shadow labels and escalation need exactly two): the tier that is not ``tier``."""
    cheapest, dearest = settings.cheapest, settings.dearest
    return dearest if tier == cheapest else cheapest


Handoff = tuple[str, str, bool]
"""(job id, tier, shadow): a routed job to publish to its tier's queue."""


def route_job(ctx: WorkerContext, job_id: str) -> str | None:
    """Route one job (:func:`route_jobs` with one id).

    Returns:
        The chosen tier, or None when the job no longer needs routing.
    """
    return route_jobs(ctx, [job_id])[job_id]


def route_jobs(ctx: WorkerContext, job_ids: Sequence[str]) -> dict[str, str | None]:
    """Decide the tier of queued jobs, record the decisions, and enqueue their generations.

    Two batches never wait on each other in a cycle (rows are locked in id order), and a tenant with its own
    cloud budget is held to it over its own window while the others share the deployment's.

    Returns:
        Per job id, the chosen tier, or None when the job no longer needs routing.
    """
    tiers: dict[str, str | None] = dict.fromkeys(job_ids)
    keys = sorted({uuid.UUID(job_id) for job_id in job_ids})
    try:
        handoffs = _decide(ctx, keys)
    except IntegrityError:
        if len(keys) > 1:
            # Without row locks (SQLite) a concurrent delivery decided one of these first: route each alone.
            for job_id in job_ids:
                tiers.update(route_jobs(ctx, [job_id]))
            return tiers
        # A concurrent delivery of this message decided first: follow it.
        with ctx.sessions() as session:
            winner = get_decision(session, job_id=keys[0])
        if winner is None:
            raise
        handoffs = [(str(keys[0]), winner.tier, winner.shadow)]
    _hand_off(ctx, handoffs)
    given = {str(uuid.UUID(job_id)): job_id for job_id in job_ids}
    for job_id, tier, _ in handoffs:
        tiers[given[job_id]] = tier
    return tiers


def _decide(ctx: WorkerContext, keys: Sequence[uuid.UUID]) -> list[Handoff]:
    """Route the jobs ``keys`` in one transaction; returns the hand-offs to publish once it is committed.

    Two tiers: the router's score against the share budget (:class:`router.policy.RoutingPolicy`); more: the
    K-tier router's utilities against the money budget (:class:`router.tier_policy.TierRoutingPolicy`). Either
    way among the tiers whose circuit breaker lets them take jobs; under a latency SLO, corrected for the tiers'
    load (:mod:`worker.slo`)."""
    handoffs: list[Handoff] = []
    many = len(ctx.settings.tier_names) > 2
    # Before the rows are locked: it may load a newly promoted router.
    policy: RoutingPolicy | TierRoutingPolicy = ctx.tier_policy() if many else ctx.policy()
    held_out = held_out_tiers(ctx)
    with transaction(ctx.sessions) as session:
        pending: list[tuple[Job, Any]] = []
        for job, tenant_budget in lock_jobs_with_tenant_budgets(session, keys):
            if is_done(job) or expire_if_overdue(session, job) or is_done(job):
                continue  # (an expired job on the route queue holds no reservation yet)
            if job.tier is not None:
                # Redelivery after the decision was committed: only the hand-off may be missing.
                existing = get_decision(session, job_id=job.id)
                handoffs.append((str(job.id), job.tier, bool(existing and existing.shadow)))
                continue
            pending.append((job, (_tier_request if many else _request)(ctx, job, tenant_budget)))
        if not pending:
            return handoffs
        started = utcnow()
        jobs = [job for job, _ in pending]
        live = read_load(ctx, session, jobs)
        held = {**(live.held_out() if live else {}), **held_out}
        decisions = policy.decide_many([request for _, request in pending], held_out=held)
        if live is not None:
            decisions = correct_for_load(ctx, live, jobs, decisions, held)
        for job, decision in zip(jobs, decisions, strict=True):
            mark_routed(session, job, decision, started=started)
            handoffs.append((str(job.id), decision.tier, decision.shadow))
            log.info(
                "routed",
                extra={
                    "job_id": str(job.id),
                    "tier": decision.tier,
                    "score": decision.score,
                    "shadow": decision.shadow,
                    "batch": len(pending),
                },
            )
    return handoffs


def _request(ctx: WorkerContext, job: Job, tenant_budget: float | None) -> RouteRequest:
    """A job to route between two tiers: against its tenant's own share budget, if it has one."""
    budget = ctx.budget(f"tenant-{job.tenant_id}", tenant_budget) if tenant_budget is not None else None
    return RouteRequest(
        job.prompt,
        requested_tier=job.requested_tier,
        budget=budget,
        shadow=job.requested_tier is None and shadow_sampled(str(job.id), ctx.shadow_rate()),
    )


def _tier_request(ctx: WorkerContext, job: Job, tenant_budget: float | None) -> TierRouteRequest:
    """A job to route among more than two tiers: a tenant's own ρ is its money budget's equivalent."""
    budget = None
    if tenant_budget is not None:
        usd = budget_for_share(list(ctx.settings.prices.values()), tenant_budget)
        budget = ctx.spend_budget(f"tenant-{job.tenant_id}", usd)
    return TierRouteRequest(job.prompt, requested_tier=job.requested_tier, budget=budget)


def held_out_tiers(ctx: WorkerContext) -> dict[str, str]:
    """The tiers routing may not send jobs to now, with why: those whose circuit breaker is open, and those
    half-open whose probe another router holds. Redis unreachable: none (the budget's own transaction fails
    next, and the batch is retried)."""
    held: dict[str, str] = {}
    breaker = ctx.breaker()
    try:
        states = breaker.states(ctx.settings.tier_names)
    except redis.exceptions.RedisError as exc:
        log.warning("circuit breakers not read: Redis unreachable", extra={"error": str(exc)})
        return held
    for tier, state in states.items():
        if state.state == OPEN:
            held[tier] = f"circuit breaker open after {state.failures} failures in a row"
        elif state.state == HALF_OPEN and not breaker.admit(tier):
            held[tier] = "circuit breaker half-open: another batch holds its probe"
    return held


def _hand_off(ctx: WorkerContext, handoffs: Sequence[Handoff]) -> None:
    """Publish routed jobs in one round trip to the broker: per tier, messages of at most as many jobs as one
    of its workers takes at once; shadow generations one per message."""
    messages: list[tuple[str, Sequence[str], dict[str, Any]]] = []
    for tier in ctx.settings.tier_names:
        ids = [job_id for job_id, chosen, _ in handoffs if chosen == tier]
        messages += [(generate_task(tier), chunk, {}) for chunk in chunks(ids, ctx.settings.tier(tier).max_batch)]
    messages += [
        (generate_task(other_tier(ctx.settings, tier)), [job_id], {"role": "shadow"})
        for job_id, tier, shadowed in handoffs
        if shadowed
    ]
    publish_many(ctx.app, messages)
