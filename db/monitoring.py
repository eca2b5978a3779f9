"""Aggregates behind the Prometheus ``/metrics`` endpoint, computed by the database at scrape time.

Every figure is derived from the tables, which every API and worker process shares, so any API process
answering a scrape reports the same numbers: no per-process counters to merge under gunicorn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import FromClause, case, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement

from core.settings import TIERS
from db.models import CostEntry, Decision, Generation, Job, JobEvent, JobStatus
from db.sqltime import seconds_between

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
"""Upper bounds of the latency histogram buckets, from a fast route decision to an hour-long backlog."""

STAGES = ("route_wait", "routing", "tier_wait", "generating", "total")
"""Pipeline stages, as in a job's ``timings``: submission -> routing starts -> routed -> generation starts
-> finished. ``generating`` counts succeeded jobs only; ``total`` counts every finished job."""

NO_TIER = "none"
"""Label value for jobs that have no tier (not routed yet, or failed before routing)."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts of one stage for one tier, in Prometheus's shape."""

    stage: str
    tier: str
    buckets: tuple[tuple[float, int], ...]
    """``(upper bound, jobs at or below it)`` for each bound, ``+Inf`` excluded."""
    count: int
    sum_s: float


@dataclass(frozen=True)
class CostTotal:
    tier: str
    usd: float
    gpu_s: float
    images: int


def jobs_by_status_and_tier(session: Session, tiers: Sequence[str] = TIERS) -> dict[tuple[str, str], int]:
    """Job counts for every (status, tier) pair of the deployment's ``tiers``, zeros included so that series
    never vanish."""
    counts = {(status.value, tier): 0 for status in JobStatus for tier in (NO_TIER, *tiers)}
    for status, tier, count in session.execute(
        select(Job.status, Job.tier, func.count()).group_by(Job.status, Job.tier)
    ):
        counts[(status, tier or NO_TIER)] = int(count)
    return counts


def decisions_by_router(session: Session) -> dict[tuple[str, str, str], int]:
    """Decision counts keyed by (tier, router name, router version)."""
    rows = session.execute(
        select(Decision.tier, Decision.router_name, Decision.router_version, func.count()).group_by(
            Decision.tier, Decision.router_name, Decision.router_version
        )
    )
    return {(tier, name, version): int(count) for tier, name, version, count in rows}


def recent_cloud_fraction(session: Session, *, window: int, cheapest: str = TIERS[0]) -> tuple[float | None, int]:
    """Share of the last ``window`` decisions (the budget's window) sent to a tier above the ``cheapest``, and how
    many there were."""
    recent = select(Decision.tier).order_by(Decision.created_at.desc()).limit(window).subquery()
    total, cloud = session.execute(
        select(func.count(), func.coalesce(func.sum(case((recent.c.tier != cheapest, 1), else_=0)), 0))
    ).one()
    return (int(cloud) / int(total) if total else None), int(total)


def cost_totals(session: Session, tiers: Sequence[str] = TIERS) -> dict[str, CostTotal]:
    """Money, device seconds and billed images per tier of ``tiers`` (and any other in the ledger)."""
    totals = {tier: CostTotal(tier, 0.0, 0.0, 0) for tier in tiers}
    for tier, usd, gpu_s, images in session.execute(
        select(CostEntry.tier, func.sum(CostEntry.usd), func.sum(CostEntry.gpu_s), func.count()).group_by(
            CostEntry.tier
        )
    ):
        totals[tier] = CostTotal(tier, float(usd or 0.0), float(gpu_s or 0.0), int(images))
    return totals


def images_by_role(session: Session) -> dict[str, int]:
    """Images stored per role: ``primary`` (delivered), ``shadow`` (labels) and ``replaced`` (escalated)."""
    counts = {role: 0 for role in ("primary", "shadow", "replaced")}
    for role, count in session.execute(select(Generation.role, func.count()).group_by(Generation.role)):
        counts[role] = int(count)
    return counts


def _stage(stage: str) -> tuple[ColumnElement[float], FromClause, list[ColumnElement[bool]]]:
    """The duration of ``stage``, the rows it is measured over and their filter."""
    jobs = Job.__table__
    if stage in ("route_wait", "routing"):
        routing = (
            select(JobEvent.job_id, func.min(JobEvent.at).label("at"))
            .where(JobEvent.status == JobStatus.ROUTING)
            .group_by(JobEvent.job_id)
            .subquery()
        )
        joined = jobs.join(routing, routing.c.job_id == Job.id)
        if stage == "route_wait":
            return seconds_between(Job.created_at, routing.c.at), joined, []
        return seconds_between(routing.c.at, Job.routed_at), joined, [Job.routed_at.is_not(None)]
    if stage == "tier_wait":
        return (
            seconds_between(Job.routed_at, Job.started_at),
            jobs,
            [Job.routed_at.is_not(None), Job.started_at.is_not(None)],
        )
    if stage == "generating":
        return (
            seconds_between(Job.started_at, Job.finished_at),
            jobs,
            [Job.status == JobStatus.SUCCEEDED, Job.started_at.is_not(None), Job.finished_at.is_not(None)],
        )
    if stage == "total":
        return seconds_between(Job.created_at, Job.finished_at), jobs, [Job.finished_at.is_not(None)]
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def stage_histograms(session: Session, stage: str) -> list[Histogram]:
    """One latency histogram per tier for ``stage``, bucketed in the database."""
    duration, source, conditions = _stage(stage)
    bucket_columns = [func.sum(case((duration <= bound, 1), else_=0)) for bound in LATENCY_BUCKETS_S]
    rows = session.execute(
        select(Job.tier, func.count(), func.coalesce(func.sum(duration), 0.0), *bucket_columns)
        .select_from(source)
        .where(*conditions)
        .group_by(Job.tier)
    )
    histograms = []
    for tier, count, total, *cumulative in rows:
        histograms.append(
            Histogram(
                stage=stage,
                tier=tier or NO_TIER,
                buckets=tuple((bound, int(n or 0)) for bound, n in zip(LATENCY_BUCKETS_S, cumulative, strict=True)),
                count=int(count),
                sum_s=float(total or 0.0),
            )
        )
    return histograms
