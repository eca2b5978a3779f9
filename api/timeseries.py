"""``GET /v1/stats/timeseries``: routing, cloud share against the budget, spend and outcomes per time bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.auth import authenticate, principal
from api.jobs import parse_query
from api.state import state
from db.pagination import as_utc
from db.timeseries import BUCKET_SECONDS, timeseries

blueprint = Blueprint("timeseries", __name__)
blueprint.before_request(authenticate)

MAX_BUCKETS = 1440
"""At most a day of minutes (or two months of hours) per request."""


class TimeseriesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: Literal["minute", "hour", "day"] = "minute"
    buckets: int = Field(default=60, ge=1, le=MAX_BUCKETS)
    until: datetime | None = None
    """The series ends with the bucket containing this instant (default: now)."""


@blueprint.get("/v1/stats/timeseries")
def index() -> Any:
    """Per bucket: decisions per tier, cloud fraction, spend and GPU-seconds per tier, submissions, outcomes."""
    query = parse_query(TimeseriesQuery)
    st = state()
    until = as_utc(query.until) if query.until else datetime.now(UTC)
    width = BUCKET_SECONDS[query.bucket]
    who = principal()
    with st.sessions() as session:
        series = timeseries(
            session, width_s=width, count=query.buckets, until=until, tenant_id=None if who.is_admin else who.tenant_id
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
            "bucket_s": width,
            "start": series.buckets[0].start.isoformat(),
            "end": (series.buckets[-1].start + timedelta(seconds=width)).isoformat(),
            "budget": {"cloud_fraction": st.settings.cloud_budget, "window": st.settings.budget_window},
            "spend_before_usd": round(series.spend_before_usd, 6),
            "scope": "all tenants" if who.is_admin else who.tenant_name,
            "items": items,
        }
    )
