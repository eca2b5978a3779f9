"""Aggregates for ``GET /v1/stats`` and the demo summary."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.settings import TIERS
from db.models import TERMINAL, CostEntry, Decision, Generation, Job, JobStatus
from db.pagination import as_utc

LATENCY_SAMPLE = 10_000
"""Percentiles are computed over at most this many of the most recently finished jobs."""


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def job_stats(session: Session, *, tenant_id: uuid.UUID | None = None, tiers: Sequence[str] = TIERS) -> dict[str, Any]:
    """Counts by status and tier, cloud share of routed jobs, spend, mean quality and latency percentiles.

    Args:
        session: an open session.
        tenant_id: one tenant's figures; None for the whole deployment.
        tiers: the deployment's tiers, cheapest first (each is listed, with 0 when it has nothing);
            ``cloud_fraction`` is the share of routed jobs sent to any but the first.
    """

    def scoped(query: Any, model: Any) -> Any:
        if tenant_id is None:
            return query
        if model is Job:
            return query.where(Job.tenant_id == tenant_id)
        return query.join(Job, Job.id == model.job_id).where(Job.tenant_id == tenant_id)

    by_status = {s.value: 0 for s in JobStatus}
    for status, count in session.execute(scoped(select(Job.status, func.count()), Job).group_by(Job.status)):
        by_status[status] = count
    dead_lettered = session.scalar(
        scoped(select(func.count()).select_from(Job), Job).where(Job.dead_lettered_at.is_not(None))
    )

    by_tier = dict.fromkeys(tiers, 0)
    for tier, count in session.execute(scoped(select(Decision.tier, func.count()), Decision).group_by(Decision.tier)):
        by_tier[tier] = count
    routed = sum(by_tier.values())

    spend = dict.fromkeys(tiers, 0.0)
    gpu_s = dict.fromkeys(tiers, 0.0)
    for tier, usd, seconds in session.execute(
        scoped(select(CostEntry.tier, func.sum(CostEntry.usd), func.sum(CostEntry.gpu_s)), CostEntry).group_by(
            CostEntry.tier
        )
    ):
        spend[tier] = float(usd or 0.0)
        gpu_s[tier] = float(seconds or 0.0)

    quality_sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tier, quality in session.execute(
        scoped(select(Generation.tier, Generation.quality), Generation).where(Generation.quality.is_not(None))
    ):
        for metric, value in (quality or {}).get("values", {}).items():
            quality_sums[tier][metric].append(float(value))
    mean_quality = {
        tier: {metric: sum(v) / len(v) for metric, v in metrics.items()} for tier, metrics in quality_sums.items()
    }

    finished = session.execute(
        scoped(select(Job.created_at, Job.finished_at), Job)
        .where(Job.status == JobStatus.SUCCEEDED, Job.finished_at.is_not(None))
        .order_by(Job.finished_at.desc())
        .limit(LATENCY_SAMPLE)
    ).all()
    latencies = sorted((as_utc(end) - as_utc(start)).total_seconds() for start, end in finished if end is not None)

    return {
        "jobs": {"total": sum(by_status.values()), "by_status": by_status, "dead_lettered": dead_lettered or 0},
        "routed": {
            "total": routed,
            "by_tier": by_tier,
            "cloud_fraction": 1.0 - by_tier.get(tiers[0], 0) / routed if routed else 0.0,
        },
        "spend_usd": {"total": sum(spend.values()), "by_tier": spend},
        "gpu_seconds": {"total": sum(gpu_s.values()), "by_tier": gpu_s},
        "mean_quality": mean_quality,
        "latency_s": {
            "count": len(latencies),
            "p50": percentile(latencies, 0.50),
            "p90": percentile(latencies, 0.90),
            "p99": percentile(latencies, 0.99),
        },
    }


def _more_than_one(session: Session, model: Any, tenant_id: uuid.UUID) -> int:
    """Jobs of the tenant with more than one row of ``model`` (decisions, generations or cost entries)."""
    per_job = (
        select(model.job_id, func.count().label("n"))
        .join(Job, Job.id == model.job_id)
        .where(Job.tenant_id == tenant_id)
        .group_by(model.job_id)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(per_job).where(per_job.c.n > 1)) or 0)


def tenant_audit(session: Session, tenant_id: uuid.UUID) -> dict[str, Any]:
    """What a load test checks of one tenant's jobs: counts by status, duplicates (decisions, generations,
    cost entries: each must be 0), succeeded jobs without an image (must be 0), the cloud share of its
    decisions, and every finished job's latency from submission, sorted."""
    by_status = dict(
        session.execute(select(Job.status, func.count()).where(Job.tenant_id == tenant_id).group_by(Job.status)).all()
    )
    without_image = session.scalar(
        select(func.count())
        .select_from(Job)
        .outerjoin(Generation, Generation.job_id == Job.id)
        .where(Job.tenant_id == tenant_id, Job.status == JobStatus.SUCCEEDED, Generation.id.is_(None))
    )
    cloud = session.scalar(
        select(func.count()).select_from(Decision).join(Job).where(Job.tenant_id == tenant_id, Decision.tier == "cloud")
    )
    decided = session.scalar(select(func.count()).select_from(Decision).join(Job).where(Job.tenant_id == tenant_id))
    times = session.execute(
        select(Job.created_at, Job.finished_at).where(Job.tenant_id == tenant_id, Job.finished_at.is_not(None))
    ).all()
    return {
        "by_status": by_status,
        "duplicate_decisions": _more_than_one(session, Decision, tenant_id),
        "duplicate_generations": _more_than_one(session, Generation, tenant_id),
        "duplicate_costs": _more_than_one(session, CostEntry, tenant_id),
        "succeeded_without_image": int(without_image or 0),
        "cloud_fraction": (cloud or 0) / decided if decided else 0.0,
        "latencies": sorted((as_utc(end) - as_utc(start)).total_seconds() for start, end in times if end is not None),
    }


def finished_jobs(session: Session, tenant_id: uuid.UUID) -> int:
    """How many of the tenant's jobs have ended."""
    ended = sorted(TERMINAL)
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ended))
    return int(session.scalar(query) or 0)
