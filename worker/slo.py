"""Load-aware routing in the route task: the live tier state read once per batch, tiers held out for load before
the router decides, and the plan (:func:`router.load.plan`) applied to its decisions after.

Nothing here runs unless a latency SLO is set (``ROUTET2I_LATENCY_SLO_S``) or a job of the batch has a deadline:
without them routing is load-blind and costs nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import redis
from sqlalchemy.orm import Session

from db.load import BurstAllowance, tier_loads
from db.models import Job, utcnow
from db.pagination import as_utc
from router.load import LoadJob, LoadPlan, LoadVerdict, TierLoad, held_out_for_load, plan
from router.types import RoutingDecision
from worker.context import WorkerContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveLoad:
    """A batch's view of the tiers: their state and the SLO it is judged against."""

    loads: list[TierLoad]
    slo_s: float | None
    now: datetime

    def held_out(self) -> dict[str, str]:
        return held_out_for_load(self.loads, self.slo_s) if self.slo_s is not None else {}

    def left_s(self, job: Job) -> float | None:
        """Seconds the job has left: the SLO from its submission, or less before its own deadline."""
        left = None
        if self.slo_s is not None:
            left = self.slo_s - (self.now - as_utc(job.created_at)).total_seconds()
        if job.deadline_at is not None:
            until = (as_utc(job.deadline_at) - self.now).total_seconds()
            left = until if left is None else min(left, until)
        return left


def read_load(ctx: WorkerContext, session: Session, jobs: Sequence[Job]) -> LiveLoad | None:
    """The tiers' live state, when the batch is judged against an SLO or a deadline (None otherwise, or when
    Redis cannot be read: the batch is then routed blind to load, logged)."""
    slo = ctx.settings.latency_slo_s
    if slo is None and all(job.deadline_at is None for job in jobs):
        return None
    first = jobs[0] if jobs else None  # the batch's wait is predicted for its first job's image size
    try:
        loads = tier_loads(
            session,
            ctx.state_redis(),
            ctx.settings,
            width=first.width if first is not None else None,
            height=first.height if first is not None else None,
        )
    except redis.RedisError as exc:
        log.warning("tier load not read: routing blind to load", extra={"error": str(exc)})
        return None
    return LiveLoad(loads, slo, utcnow())


def correct_for_load(
    ctx: WorkerContext,
    live: LiveLoad,
    jobs: Sequence[Job],
    decisions: Sequence[RoutingDecision],
    held_out: dict[str, str],
) -> list[RoutingDecision]:
    """The router's decisions corrected for load: spilled, degraded or marked late (:mod:`router.load`), the
    spills paid from the burst allowance, and every decision's ``budget_state["load"]`` saying what the tiers
    looked like and why."""
    asked = [
        LoadJob(decision.tier, _gains(ctx, decision), live.left_s(job), _movable(job, decision))
        for job, decision in zip(jobs, decisions, strict=True)
    ]
    allowance = BurstAllowance(ctx.state_redis(), ctx.settings, ctx.spend_ledger())
    options: dict[str, Any] = {
        "prices": ctx.settings.prices,
        "degrade_steps": ctx.settings.slo_degrade_steps,
        "held_out": held_out,
    }
    spend_key: str | None = None
    try:
        left = allowance.left() if allowance.usd > 0 else 0.0
        chosen = plan(asked, live.loads, allowance_usd=left, **options)
        if chosen.spill_usd:
            taken, spend_key = allowance.take(chosen.spill_usd)
            if taken < len(chosen.spill_usd):  # another router took part of it meanwhile: spill only what was taken
                chosen = plan(asked, live.loads, allowance_usd=sum(chosen.spill_usd[:taken]), **options)
    except redis.RedisError as exc:
        log.warning("burst allowance not read: no spilling in this batch", extra={"error": str(exc)})
        chosen = plan(asked, live.loads, allowance_usd=0.0, **options)
    return _apply(ctx, live, jobs, decisions, chosen, spend_key)


def _gains(ctx: WorkerContext, decision: RoutingDecision) -> dict[str, float]:
    """Per tier, the router's predicted gain over the cheapest: its utilities (more than two tiers) or its score."""
    utilities = (decision.explanation or {}).get("utilities")
    if isinstance(utilities, dict) and len(ctx.settings.tier_names) > 2:
        return {tier: float(value) for tier, value in utilities.items()}
    return {ctx.settings.cheapest: 0.0, ctx.settings.dearest: float(decision.score)}


def _movable(job: Job, decision: RoutingDecision) -> bool:
    return job.requested_tier is None and not decision.shadow


def _apply(
    ctx: WorkerContext,
    live: LiveLoad,
    jobs: Sequence[Job],
    decisions: Sequence[RoutingDecision],
    chosen: LoadPlan,
    spend_key: str | None,
) -> list[RoutingDecision]:
    tiers = {load.tier: load.describe() for load in live.loads}
    corrected = []
    for job, decision, verdict in zip(jobs, decisions, chosen.verdicts, strict=True):
        state = dict(decision.budget_state)
        state["load"] = {
            "slo_s": live.slo_s,
            "left_s": _round(live.left_s(job)),
            "action": verdict.action,
            "predicted_s": _round(verdict.predicted_s),
            "tiers": tiers,
        }
        reason = decision.reason
        if verdict.reason:
            reason = f"{reason}; {verdict.reason}"
        if verdict.action == "spilled":
            state["load"]["spill_usd"] = verdict.spill_usd
            if spend_key is not None:
                state.update(spend_period=spend_key, reserved_usd=verdict.spill_usd, reserved_tier=verdict.tier)
        if verdict.action == "degraded":
            _degrade(ctx, job, verdict)
            state["load"]["steps"] = job.steps
        corrected.append(replace(decision, tier=verdict.tier, reason=reason, budget_state=state))
    return corrected


def _degrade(ctx: WorkerContext, job: Job, verdict: LoadVerdict) -> None:
    """Fewer steps for the job on its tier: the per-job knob load-aware routing turns before queuing it late."""
    steps = job.steps or ctx.settings.tier(verdict.tier).steps
    job.steps = max(1, round(steps * verdict.steps_share))


def _round(value: float | None) -> float | None:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return round(value, 3)
