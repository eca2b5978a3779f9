"""The job's status document: what ``GET /v1/jobs/<id>`` answers and what a job's webhook posts, built from its
rows. One definition serves both, so a webhook receiver reads exactly what a client polling the job reads.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy.orm import Session

from core.tier_settings import TIER_NAME
from db.decisions import get_decision
from db.generations import job_costs, primary_generation
from db.jobs import list_events
from db.models import Decision, Generation, Job, JobEvent, JobStatus, WebhookDelivery
from db.pagination import as_utc

StatusName = Literal["queued", "routing", "generating", "succeeded", "failed", "cancelled", "expired"]
TierName = Annotated[str, StringConstraints(pattern=TIER_NAME.pattern)]
"""One of the deployment's tiers (``ROUTET2I_TIERS``)."""


class EventOut(BaseModel):
    status: StatusName
    at: datetime
    detail: dict[str, Any] | None = None


class DecisionOut(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    job_url: str
    tier: TierName
    router: str
    router_version: str
    score: float
    threshold: float | None
    budget: float
    budget_state: dict[str, Any]
    reason: str
    inputs: dict[str, Any]
    predicted: dict[str, Any] | None
    explanation: dict[str, Any] | None
    shadow: bool
    latency_ms: float
    created_at: datetime


class ResultOut(BaseModel):
    tier: TierName
    image_url: str
    image_sha256: str
    backend: str
    model_id: str
    device: str
    seed: int
    steps: int
    width: int
    height: int
    wall_s: float
    gpu_s: float
    cost_usd: float | None
    quality: dict[str, Any] | None


class TimingsOut(BaseModel):
    route_wait_s: float | None = Field(description="Submission to the start of routing.")
    routing_s: float | None = Field(description="Routing decision, including the budget transaction.")
    tier_wait_s: float | None = Field(description="Waiting on the tier queue for a generation worker.")
    generating_s: float | None = Field(description="Generation, scoring and storage.")
    total_s: float | None = Field(description="Submission to the terminal state.")


class JobOut(BaseModel):
    id: uuid.UUID
    url: str
    tenant_id: uuid.UUID
    status: StatusName
    tier: TierName | None
    requested_tier: TierName | None
    prompt: str
    seed: int
    steps: int | None
    width: int | None
    height: int | None
    idempotency_key: str | None
    attempts: int
    redeliveries: int
    dead_lettered: bool
    error: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    timings: TimingsOut
    decision: DecisionOut | None = None
    result: ResultOut | None = None
    events: list[EventOut] | None = None


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None = Field(description="The receiver's HTTP status; null when it could not be reached.")
    error: str | None
    duration_ms: float


class DeliveryOut(BaseModel):
    id: uuid.UUID
    event: StatusName = Field(description="The job's terminal state the delivery announces.")
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When it is tried next (pending deliveries only).")
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[AttemptOut]


class DeliveryPage(BaseModel):
    items: list[DeliveryOut]


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((as_utc(end) - as_utc(start)).total_seconds(), 6)


def timings(job: Job, events: list[JobEvent] | None) -> TimingsOut:
    routing_started = next((e.at for e in events or [] if e.status == JobStatus.ROUTING), None)
    return TimingsOut(
        route_wait_s=_seconds(job.created_at, routing_started),
        routing_s=_seconds(routing_started, job.routed_at),
        tier_wait_s=_seconds(job.routed_at, job.started_at),
        generating_s=_seconds(job.started_at, job.finished_at) if job.status == JobStatus.SUCCEEDED else None,
        total_s=_seconds(job.created_at, job.finished_at),
    )


def decision_out(row: Decision, *, job_url: str) -> DecisionOut:
    return DecisionOut(
        id=row.id,
        job_id=row.job_id,
        job_url=job_url,
        tier=row.tier,
        router=row.router_name,
        router_version=row.router_version,
        score=row.score,
        threshold=row.threshold,
        budget=row.budget,
        budget_state=row.budget_state,
        reason=row.reason,
        inputs=row.inputs,
        predicted=row.predicted,
        explanation=row.explanation,
        shadow=row.shadow,
        latency_ms=row.latency_ms,
        created_at=as_utc(row.created_at),
    )


def result_out(row: Generation, *, image_url: str, cost_usd: float | None) -> ResultOut:
    return ResultOut(
        tier=row.tier,
        image_url=image_url,
        image_sha256=row.image_sha256,
        backend=row.backend,
        model_id=row.model_id,
        device=row.device,
        seed=row.seed,
        steps=row.steps,
        width=row.width,
        height=row.height,
        wall_s=row.wall_s,
        gpu_s=row.gpu_s,
        cost_usd=cost_usd,
        quality=row.quality,
    )


def job_out(
    job: Job,
    *,
    url: str,
    events: list[JobEvent] | None = None,
    decision: DecisionOut | None = None,
    result: ResultOut | None = None,
) -> JobOut:
    return JobOut(
        id=job.id,
        url=url,
        tenant_id=job.tenant_id,
        status=job.status,  # type: ignore[arg-type]
        tier=job.tier,
        requested_tier=job.requested_tier,
        prompt=job.prompt,
        seed=job.seed,
        steps=job.steps,
        width=job.width,
        height=job.height,
        idempotency_key=job.idempotency_key,
        attempts=job.attempts,
        redeliveries=job.redeliveries,
        dead_lettered=job.dead_lettered_at is not None,
        error=job.error,
        created_at=as_utc(job.created_at),
        updated_at=as_utc(job.updated_at),
        finished_at=as_utc(job.finished_at) if job.finished_at else None,
        timings=timings(job, events),
        decision=decision,
        result=result,
        events=[EventOut(status=e.status, at=as_utc(e.at), detail=e.detail) for e in events]  # type: ignore[arg-type]
        if events is not None
        else None,
    )


def job_url(job_id: uuid.UUID) -> str:
    """The job's address in the API (relative to its root)."""
    return f"/v1/jobs/{job_id}"


def job_document(session: Session, job: Job) -> JobOut:
    """The job's whole status document: history, routing decision, delivered image with its cost, timings."""
    events = list_events(session, job.id)
    url = job_url(job.id)
    decision = get_decision(session, job_id=job.id)
    generation = primary_generation(session, job_id=job.id)
    result = None
    if generation is not None:
        cost = sum(float(c.usd) for c in job_costs(session, job_id=job.id) if c.tier == generation.tier)
        result = result_out(generation, image_url=url + "/image", cost_usd=cost)
    return job_out(
        job, url=url, events=events, decision=decision_out(decision, job_url=url) if decision else None, result=result
    )


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=row.id,
        event=row.event,  # type: ignore[arg-type]
        url=row.url,
        state=row.state,  # type: ignore[arg-type]
        attempts=row.attempts,
        next_attempt_at=as_utc(row.next_attempt_at) if row.state == "pending" else None,
        created_at=as_utc(row.created_at),
        delivered_at=as_utc(row.delivered_at) if row.delivered_at else None,
        attempt_log=[
            AttemptOut(
                attempt=a.attempt,
                at=as_utc(a.at),
                status_code=a.status_code,
                error=a.error,
                duration_ms=a.duration_ms,
            )
            for a in row.attempt_log
        ],
    )
