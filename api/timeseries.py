"""``GET /v1/stats/timeseries``: routing, cloud share against the budget, spend and outcomes per time bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.auth import authenticate, principal
from api.jobs import parse_query
from api.openapi import documented
from api.state import state
from db.pagination import as_utc
from db.timeseries import BUCKET_SECONDS, timeseries

blueprint = Blueprint("timeseries", __name__)
blueprint.before_request(authenticate)

MAX_BUCKETS = 1440
"""At most a day of minutes (or two months of hours) per request."""

EARLIEST_UNTIL = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_UNTIL = datetime(9999, 1, 1, tzinfo=UTC)
"""``until`` lies in [EARLIEST_UNTIL, LATEST_UNTIL): the series' edges (``until`` rounded up to a bucket, less
``buckets`` of them) stay within the dates Python and both databases represent."""


class TimeseriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: Literal["minute", "hour", "day"] = "minute"
    buckets: int = Field(default=60, ge=1, le=MAX_BUCKETS)
    until: datetime | None = None
    """The series ends with the bucket containing this instant (default: now)."""

    @field_validator("until", mode="before")
    @classmethod
    def _bounded_iso_8601(cls, value: object) -> object:
        # pydantic would read "0.5" as a Unix timestamp; the documented format is an ISO 8601 date-time.
        if not isinstance(value, str):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z") from None
        try:
            utc = as_utc(parsed)
        except OverflowError:  # before the year 1 once moved to UTC
            utc = None
        if utc is None or not EARLIEST_UNTIL <= utc < LATEST_UNTIL:
            raise ValueError(f"must be from {EARLIEST_UNTIL:%Y-%m-%d} to before {LATEST_UNTIL:%Y-%m-%d} (UTC)")
        return utc


class BucketOut(BaseModel):
    start: datetime
    routed: dict[str, int] = Field(description="Decisions per tier.")
    cloud_fraction: float | None = Field(
        description="Share of the bucket's decisions sent to a tier above the cheapest."
    )
    spend_usd: dict[str, float]
    gpu_s: dict[str, float]
    submitted: int
    finished: dict[str, int] = Field(description="Jobs that ended, per outcome.")


class SeriesBudget(BaseModel):
    cloud_fraction: float
    window: int


class TimeseriesOut(BaseModel):
    bucket: Literal["minute", "hour", "day"]
    tiers: list[str] = Field(description="The deployment's tiers, cheapest first.")
    bucket_s: int
    start: datetime
    end: datetime
    budget: SeriesBudget
    spend_before_usd: float = Field(description="Spend before the first bucket.")
    scope: str = Field(description="'all tenants' for an admin, else the tenant's name.")
    items: list[BucketOut]


@blueprint.get("/v1/stats/timeseries")
@documented(
    summary="Routing, cloud share, spend and outcomes per time bucket",
    tag="stats",
    query=TimeseriesQuery,
    responses={200: ("The series, oldest bucket first (every tenant's for an admin).", TimeseriesOut)},
)
def index() -> Any:
    """Per bucket: decisions per tier, cloud fraction, spend and GPU-seconds per tier, submissions, outcomes."""
    query = parse_query(TimeseriesQuery)
    st = state()
    until = as_utc(query.until) if query.until else datetime.now(UTC)
    width = BUCKET_SECONDS[query.bucket]
    who = principal()
    with st.sessions() as session:
        series = timeseries(
            session,
            width_s=width,
            count=query.buckets,
            until=until,
            tenant_id=None if who.is_admin else who.tenant_id,
            tiers=st.settings.tier_names,
        )
    items = [
        {
            "start": b.start.isoformat(),
            "routed": b.routed,
            "cloud_fraction": b.cloud_fraction,
            "spend_usd": {tier: round(usd, 6) for tier, usd in b.spend_usd.items()},
            "gpu_s": {tier: round(s, 6) for tier, s in b.gpu_s.items()},
            "submitted": b.submitted,
            "finished": b.finished,
        }
        for b in series.buckets
    ]
    return jsonify(
        {
            "bucket": query.bucket,
            "tiers": list(st.settings.tier_names),
            "bucket_s": width,
            "start": series.buckets[0].start.isoformat(),
            "end": (series.buckets[-1].start + timedelta(seconds=width)).isoformat(),
            "budget": {"cloud_fraction": st.settings.dearest_share, "window": st.settings.budget_window},
            "spend_before_usd": round(series.spend_before_usd, 6),
            "scope": "all tenants" if who.is_admin else who.tenant_name,
            "items": items,
        }
    )
