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

from sqlalchemy.exc import IntegrityError

from db.decisions import get_decision
from db.jobs import lock_jobs_with_tenant_budgets
from db.lifecycle import expire_if_overdue, is_done, mark_routed
from db.models import utcnow
from db.session import transaction
from router.policy import RouteRequest, shadow_sampled
from worker.context import WorkerContext
from worker.transport import GENERATE_TASKS, chunks, publish_many

log = logging.getLogger(__name__)

OTHER_TIER = {"edge": "cloud", "cloud": "edge"}

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
    """Route the jobs ``keys`` in one transaction; returns the hand-offs to publish once it is committed."""
    handoffs: list[Handoff] = []
    policy = ctx.policy()  # before the rows are locked: it may load a newly promoted router
    with transaction(ctx.sessions) as session:
        pending = []
        for job, tenant_budget in lock_jobs_with_tenant_budgets(session, keys):
            if is_done(job) or expire_if_overdue(session, job) or is_done(job):
                continue  # (an expired job on the route queue holds no reservation yet)
            if job.tier is not None:
                # Redelivery after the decision was committed: only the hand-off may be missing.
                existing = get_decision(session, job_id=job.id)
                handoffs.append((str(job.id), job.tier, bool(existing and existing.shadow)))
                continue
            budget = ctx.budget(f"tenant-{job.tenant_id}", tenant_budget) if tenant_budget is not None else None
            request = RouteRequest(
                job.prompt,
                requested_tier=job.requested_tier,  # type: ignore[arg-type]
                budget=budget,
                shadow=job.requested_tier is None and shadow_sampled(str(job.id), ctx.shadow_rate()),
            )
            pending.append((job, request))
        if not pending:
            return handoffs
        started = utcnow()
        decisions = policy.decide_many([request for _, request in pending])
        for (job, _), decision in zip(pending, decisions, strict=True):
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


def _hand_off(ctx: WorkerContext, handoffs: Sequence[Handoff]) -> None:
    """Publish routed jobs in one round trip to the broker: per tier, messages of at most as many jobs as one
    of its workers takes at once; shadow generations one per message."""
    messages: list[tuple[str, Sequence[str], dict[str, Any]]] = []
    for tier, task in GENERATE_TASKS.items():
        ids = [job_id for job_id, chosen, _ in handoffs if chosen == tier]
        messages += [(task, chunk, {}) for chunk in chunks(ids, ctx.settings.tier(tier).max_batch)]
    messages += [(GENERATE_TASKS[OTHER_TIER[tier]], [job_id], {"role": "shadow"}) for job_id, tier, s in handoffs if s]
    publish_many(ctx.app, messages)
