"""Data access for routing decisions: the audit trail."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Decision, Job, utcnow
from db.pagination import Page, as_utc, paginate
from router.types import RoutingDecision


def record_decision(session: Session, *, job: Job, decision: RoutingDecision) -> Decision:
    """Store ``decision`` for ``job`` (one per job, enforced by a unique key) and set the job's tier."""
    row = Decision(
        job_id=job.id,
        router_name=decision.router_name,
        router_version=decision.router_version,
        inputs=dict(decision.inputs),
        predicted=dict(decision.predicted) if decision.predicted is not None else None,
        score=decision.score,
        threshold=decision.threshold,
        budget=decision.budget,
        budget_state=dict(decision.budget_state),
        tier=decision.tier,
        reason=decision.reason,
        explanation=dict(decision.explanation) if decision.explanation is not None else None,
        shadow=decision.shadow,
        latency_ms=decision.latency_ms,
        created_at=utcnow(),
    )
    session.add(row)
    job.tier = decision.tier
    job.routed_at = row.created_at
    return row


def get_decision(session: Session, *, job_id: object) -> Decision | None:
    return session.scalars(select(Decision).where(Decision.job_id == job_id)).first()


def list_decisions(
    session: Session,
    *,
    tenant_id: uuid.UUID | None = None,
    tier: str | None = None,
    router_name: str | None = None,
    router_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page[Decision]:
    query = select(Decision)
    if tenant_id is not None:
        query = query.join(Job, Job.id == Decision.job_id).where(Job.tenant_id == tenant_id)
    if tier is not None:
        query = query.where(Decision.tier == tier)
    if router_name is not None:
        query = query.where(Decision.router_name == router_name)
    if router_version is not None:
        query = query.where(Decision.router_version == router_version)
    if since is not None:
        query = query.where(Decision.created_at >= as_utc(since))
    if until is not None:
        query = query.where(Decision.created_at < as_utc(until))
    return paginate(session, query, Decision, limit=limit, cursor=cursor)
