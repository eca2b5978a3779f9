"""Typed SQLAlchemy 2.0 models: the database is the source of truth for every job.

A job's whole life can be audited from these tables alone: what was asked (``jobs``), every state it went
through (``job_events``), why it went to its tier (``decisions``), what was produced (``generations``) and
what it cost (``cost_entries``).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments INTEGER PRIMARY KEY columns.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class JobStatus(enum.StrEnum):
    """The states a user sees. ``queued`` covers both the route queue and a tier queue (``tier`` tells);
    db/lifecycle.py holds the moves between them."""

    QUEUED = "queued"
    ROUTING = "routing"
    GENERATING = "generating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    """The client cancelled it before it ended."""
    EXPIRED = "expired"
    """Its deadline passed before it ended."""

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})
"""States a job never leaves (but a dead-lettered failure, which ``routet2i dlq replay`` revives)."""


class Tier(enum.StrEnum):
    EDGE = "edge"
    CLOUD = "cloud"


class Tenant(Base):
    """A customer of the service: owns jobs, holds API keys, may have its own cloud budget and rate limit."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    """Admins see every tenant's jobs and decisions."""
    cloud_budget: Mapped[float | None] = mapped_column(Float)
    """The tenant's own ρ, held over its own window; None: the deployment's budget."""
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    """Job submissions allowed per minute; None: the deployment's default."""
    forced_tiers: Mapped[str] = mapped_column(String(400), default="")
    """Comma-separated tiers the tenant may force instead of routing (e.g. ``"edge,cloud"``)."""
    webhook_hosts: Mapped[str] = mapped_column(String(1024), default="")
    """Comma-separated hosts (``host`` or ``host:port``) the tenant's job webhooks may call; empty: none."""
    webhook_secret: Mapped[str | None] = mapped_column(String(128))
    """The key its webhooks are signed with (HMAC-SHA256); the tenant verifies signatures with it."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")

    def may_force(self, tier: str) -> bool:
        return tier in {t for t in self.forced_tiers.split(",") if t}

    @property
    def allowed_webhook_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip())


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the secret (keys are 256-bit random, so no slow hash is needed)."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The first characters of the key, shown in listings to tell keys apart."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT", name="fk_jobs_tenant_id")
    )
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    requested_tier: Mapped[str | None] = mapped_column(String(32))
    """A tier forced by the caller; routing then records the decision without choosing."""
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    tier: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Generation attempts started (a redelivered or retried job counts each)."""
    redeliveries: Mapped[int] = mapped_column(Integer, default=0)
    """Times the reconciler re-published the job after finding it stuck."""
    enqueued_at: Mapped[datetime | None]
    """When the job's current step was last published to a queue."""
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    """The delivery (Celery task id) generating the job; a redelivery of the same id takes over."""
    lease_until: Mapped[datetime | None]
    """Until when that delivery is presumed alive; after it, the reconciler re-publishes the job."""
    dead_lettered_at: Mapped[datetime | None]
    """Set when the job failed because retries or redeliveries were exhausted; ``routet2i dlq replay`` revives it."""
    reserved_usd: Mapped[float] = mapped_column(Float, default=0.0)
    """Money the job's routed image on a paid tier holds in the spend ledger (0: none, or given back): the image
    it delivers, or its shadow image on the other tier (``reserved_tier`` tells which)."""
    reserved_period: Mapped[str | None] = mapped_column(String(128))
    """The spend ledger's counter (the period) that holds ``reserved_usd``."""
    reserved_tier: Mapped[str | None] = mapped_column(String(32))
    """The tier of the image ``reserved_usd`` pays for: the job's own tier, or its shadow's."""
    deadline_at: Mapped[datetime | None]
    """The job ends ``expired`` if it has not ended by then, and never starts generating after it."""
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    """Where each terminal state of the job is posted (``webhook_deliveries``)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    routed_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )
    decision: Mapped[Decision | None] = relationship(back_populates="job", uselist=False)
    generations: Mapped[list[Generation]] = relationship(back_populates="job", order_by="Generation.created_at")

    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_dead_lettered", "dead_lettered_at"),
        Index("ix_jobs_tier_created", "tier", "created_at"),
        Index("ix_jobs_created", "created_at"),
        Index("ix_jobs_deadline", "deadline_at"),
    )


class JobEvent(Base):
    """One row per state change: the job's history with timestamps."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[dict[str, Any] | None]

    job: Mapped[Job] = relationship(back_populates="events")


class Decision(Base):
    """Everything the router saw and concluded for one job, enough to audit it without logs."""

    __tablename__ = "decisions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    router_name: Mapped[str] = mapped_column(String(64))
    router_version: Mapped[str] = mapped_column(String(128))
    inputs: Mapped[dict[str, Any]]
    """What the router looked at (prompt features, forced tier)."""
    predicted: Mapped[dict[str, Any] | None]
    """Predicted per-metric qualities, ``{"edge": {...}, "cloud": {...}}``, when the router predicts them."""
    score: Mapped[float] = mapped_column(Float)
    """Expected cloud advantage; the job goes to the cloud when it clears ``threshold``."""
    threshold: Mapped[float | None] = mapped_column(Float)
    budget: Mapped[float] = mapped_column(Float)
    """The cloud fraction ρ in force."""
    budget_state: Mapped[dict[str, Any]]
    """The shared budget window at the moment of the decision."""
    tier: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    explanation: Mapped[dict[str, Any] | None]
    """Per-metric tokens that drove the prediction, when the router explains itself."""
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    """The job is also generated on the other tier to collect labels."""
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="decision")

    __table_args__ = (
        Index("ix_decisions_created", "created_at"),
        Index("ix_decisions_tier_created", "tier", "created_at"),
        Index("ix_decisions_router", "router_name", "router_version"),
    )


class Generation(Base):
    """One image produced for a job on one tier (a shadow-sampled job has two)."""

    __tablename__ = "generations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tier: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(8), default="primary")
    """``primary`` is what the user receives; ``shadow`` is the other tier's image, kept for training;
    ``replaced`` is an edge image that scored so badly the job was escalated to the cloud; ``wasted`` is an image
    a paid API made for a job cancelled (or expired) meanwhile: billed, never delivered."""
    backend: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(String(512))
    device: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(String(512))
    """Relative to the image directory; the file name is the content hash."""
    image_sha256: Mapped[str] = mapped_column(String(64))
    wall_s: Mapped[float] = mapped_column(Float)
    gpu_s: Mapped[float] = mapped_column(Float)
    """Seconds of device time spent in the generator (CPU seconds when ``device`` is a CPU)."""
    quality: Mapped[dict[str, Any] | None]
    """The image's quality vector, ``{"metric_set": ..., "values": {metric: score}}``."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="generations")

    __table_args__ = (UniqueConstraint("job_id", "tier", name="uq_generations_job_tier"),)


class CostEntry(Base):
    """The ledger: one row per billed generation, so a job can never be charged twice for a tier."""

    __tablename__ = "cost_entries"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    generation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    tier: Mapped[str] = mapped_column(String(32))
    usd: Mapped[Decimal] = mapped_column(Numeric(14, 6))
    gpu_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    generation: Mapped[Generation] = relationship()

    __table_args__ = (
        UniqueConstraint("job_id", "tier", name="uq_cost_entries_job_tier"),
        Index("ix_cost_entries_created", "created_at"),
    )


class WebhookDelivery(Base):
    """One terminal state of a job to post to its webhook: the outbox row, written in the same transaction as
    the state, so no delivery is ever lost; the dispatcher sends it until the receiver answers 2xx."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    """The job's terminal state the delivery announces."""
    url: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """``pending`` (to send, at ``next_attempt_at``), ``delivered`` (a 2xx answer), ``failed`` (attempts ran out)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.attempt", cascade="all, delete-orphan"
    )

    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)


class WebhookAttempt(Base):
    """One attempt to send a webhook delivery, and what the receiver answered."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    """The receiver's HTTP status; None when it could not be reached."""
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)


class RouterModel(Base):
    """A trained router in the model registry: its artifact, where it came from, how it was judged, and whether it
    routes now. Exactly one model per ``slot`` is the champion at a time (a partial unique index)."""

    __tablename__ = "router_models"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    slot: Mapped[str] = mapped_column(String(160))
    """The deployment's router it serves (``ROUTET2I_ROUTER``); its champion routes every job."""
    kind: Mapped[str] = mapped_column(String(64))
    """The artifact's own router (``routet2i``, ``blend``, a rule...)."""
    version: Mapped[str] = mapped_column(String(128))
    sha256: Mapped[str] = mapped_column(String(64))
    """Of ``artifact``."""
    encoder: Mapped[str | None] = mapped_column(String(128))
    """The encoder key the artifact was trained on (None: it uses none)."""
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    """The artifact directory as a gzip-compressed tar."""
    state: Mapped[str] = mapped_column(String(16), default="candidate")
    """``champion`` (routes now), ``retired`` (was champion), ``challenger`` (judged, not promoted), ``candidate``."""
    source: Mapped[str] = mapped_column(Text)
    """Where it came from: the labels it was trained on, a prior, the shipped artifact, an operator's upload."""
    labels: Mapped[int] = mapped_column(Integer, default=0)
    trained_from: Mapped[datetime | None]
    trained_to: Mapped[datetime | None]
    """The training labels' time range (the jobs' submission times)."""
    evaluation: Mapped[dict[str, Any] | None]
    """The verdict that judged it against the champion of its time, with the figures."""
    promoted_by: Mapped[str | None] = mapped_column(String(128))
    promoted_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_router_models_slot_created", "slot", "created_at"),
        Index(
            "uq_router_models_champion",
            "slot",
            unique=True,
            postgresql_where=text("state = 'champion'"),
            sqlite_where=text("state = 'champion'"),
        ),
    )
