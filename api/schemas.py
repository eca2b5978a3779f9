"""Request and response models at the HTTP edge (pydantic), and the functions that fill them from rows.

Request models are strict (no coercion of ``"5"`` into ``5``) and forbid unknown fields. Limits that
depend on settings (prompt length, steps, image size) are baked into the request model when the
application is created, so validation and the published schema always agree.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    create_model,
    field_validator,
)

from core.settings import Settings
from db.documents import (
    DecisionOut,
    JobOut,
    StatusName,
    TierName,
)
from db.pagination import MAX_PAGE_SIZE, as_utc
from db.webhooks import webhook_host

SIZE_MULTIPLE = 8
"""Width and height must be multiples of this (the VAE's downsampling factor)."""

MAX_SEED = 2**63 - 1

EARLIEST, LATEST = 1970, 9999
"""Years a time filter may name (both databases store them, in UTC)."""

Cursor = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[A-Za-z0-9_-]+$")]
"""An opaque ``next_cursor`` from an earlier page."""


MAX_DEADLINE_S = 7 * 86_400.0
"""The longest deadline a job may ask for."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JobCreateBase(StrictModel):
    """Fields common to every job submission; limits are attached by :func:`job_create_model`."""

    prompt: str
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    tier: str | None = None
    """Force a tier instead of routing (only for tenants allowed to); one of the deployment's tiers."""
    deadline_s: Annotated[float, Field(gt=0, le=MAX_DEADLINE_S)] | None = None
    """The job ends ``expired`` if it has not ended this many seconds after submission (never generated after)."""
    webhook_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    """Each terminal state of the job is posted there, signed: an http(s) URL on a host the tenant may call."""

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            webhook_host(value)
        return value

    @field_validator("prompt", "idempotency_key")
    @classmethod
    def _storable_text(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (no lone surrogates)") from None
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE}")
        return value


def job_create_model(settings: Settings) -> type[JobCreateBase]:
    """The job submission model with this deployment's limits."""
    size = Annotated[int, Field(ge=settings.min_size, le=settings.max_size)]
    model: type[JobCreateBase] = create_model(
        "JobCreate",
        __base__=JobCreateBase,
        prompt=(
            Annotated[
                str,
                StringConstraints(strip_whitespace=True, min_length=1, max_length=settings.max_prompt_chars),
            ],
            ...,
        ),
        seed=(Annotated[int, Field(ge=0, le=MAX_SEED)] | None, None),
        steps=(Annotated[int, Field(ge=1, le=settings.max_steps)] | None, None),
        width=(size | None, None),
        height=(size | None, None),
        tier=(Literal[settings.tier_names] | None, None),  # type: ignore[arg-type]
    )
    return model


MAX_BATCH_JOBS = 100
"""Most jobs one ``POST /v1/jobs/batch`` may submit."""


class JobBatchCreateBase(StrictModel):
    """Several job submissions in one request; the job model is attached by :func:`job_batch_model`."""

    jobs: list[JobCreateBase]


def job_batch_model(job_model: type[JobCreateBase]) -> type[JobBatchCreateBase]:
    """The batch submission model whose jobs are ``job_model`` (this deployment's limits)."""
    model: type[JobBatchCreateBase] = create_model(
        "JobBatchCreate",
        __base__=JobBatchCreateBase,
        jobs=(Annotated[list[job_model], Field(min_length=1, max_length=MAX_BATCH_JOBS)], ...),  # type: ignore[valid-type,arg-type]
    )
    return model


def known_tier(value: str | None, info: ValidationInfo) -> str | None:
    """A tier filter must name one of the deployment's tiers (given as the validation context's ``tiers``)."""
    tiers = (info.context or {}).get("tiers")
    if value is not None and tiers and value not in tiers:
        raise ValueError(f"must be one of {', '.join(tiers)}")
    return value


class JobListQuery(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    status: StatusName | None = None
    dead_lettered: bool | None = None
    tier: TierName | None = None
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)
    cursor: Cursor | None = None

    _tier = field_validator("tier")(known_tier)


class DecisionListQuery(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    tier: TierName | None = None
    _tier = field_validator("tier")(known_tier)
    router: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    router_version: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE)
    cursor: Cursor | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso_8601(cls, value: object) -> object:
        # pydantic would read "0.5" as a Unix timestamp; the documented format is an ISO 8601 date-time.
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
                utc = as_utc(parsed)
            except (ValueError, OverflowError):
                raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z") from None
            if not EARLIEST <= utc.year <= LATEST:
                raise ValueError(f"must be between the years {EARLIEST} and {LATEST}")
            return parsed
        return value


# --- responses ------------------------------------------------------------------------------------------


class JobAccepted(BaseModel):
    id: uuid.UUID
    url: str
    status: StatusName


class JobBatchItem(JobAccepted):
    created: bool
    """False: the job submitted earlier with this item's idempotency key."""


class JobBatchAccepted(BaseModel):
    items: list[JobBatchItem]
    """One per submitted job, in the order of the request."""


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class DecisionPage(BaseModel):
    items: list[DecisionOut]
    next_cursor: str | None


class JobCounts(BaseModel):
    total: int
    by_status: dict[str, int]
    dead_lettered: int


class RoutedCounts(BaseModel):
    total: int
    by_tier: dict[str, int]
    cloud_fraction: float


class Amounts(BaseModel):
    total: float
    by_tier: dict[str, float]


class Latency(BaseModel):
    count: int
    p50: float | None
    p90: float | None
    p99: float | None


class BudgetOut(BaseModel):
    cloud_fraction: float = Field(description="The share of routed jobs the budget sends to tiers above the cheapest.")
    usd_per_image: float = Field(description="The mean price per image the router aims at over its window.")
    prices_usd: dict[str, float] = Field(description="Each tier's price per image.")
    window: int
    spend_limit_usd: float | None = Field(
        default=None, description="Most the cloud images of one spend period may cost (null: no limit)."
    )
    spend_period_s: int | None = Field(default=None, description="Length of a spend period (UTC, from the epoch).")
    spent_this_period_usd: float | None = Field(
        default=None,
        description="Reserved and billed for cloud images in the current period, every tenant's (null without a "
        "limit, or when Redis did not answer).",
    )


class BreakerOut(BaseModel):
    state: Literal["closed", "open", "half-open"]
    failures: int = Field(description="Generations failed for good in a row on the tier.")
    open_until: float | None = Field(description="When an open breaker lets a probe through (seconds since the epoch).")
    opened: int = Field(description="Times it opened since it last closed.")


class StatsOut(BaseModel):
    jobs: JobCounts
    routed: RoutedCounts
    spend_usd: Amounts
    gpu_seconds: Amounts
    mean_quality: dict[str, dict[str, float]]
    latency_s: Latency
    tiers: list[str] = Field(description="The deployment's tiers, cheapest first.")
    budget: BudgetOut
    breakers: dict[str, BreakerOut] = Field(
        description="Each tier's circuit breaker (empty when Redis did not answer)."
    )
    router: str
    scope: str = Field(description="'all tenants' for an admin, else the tenant's name.")


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
