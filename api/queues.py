"""``GET /v1/queues``: depth and backlog of each queue (the dashboard's and scripts' view of ``routet2i queues``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field

from api.auth import authenticate, principal
from api.errors import ApiError
from api.jobs import parse_query
from api.openapi import documented
from api.state import state
from worker.transport import queue_status

blueprint = Blueprint("queues", __name__)
blueprint.before_request(authenticate)

WORKERS_TIMEOUT_S = 0.5
"""How long ``?workers=true`` waits for workers to answer the broadcast."""


class QueuesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: bool = False
    """Also ask the workers which queues they consume (adds up to half a second)."""


class QueueOut(BaseModel):
    name: str
    depth: int = Field(description="Messages waiting in the broker, not yet taken by any worker.")
    waiting_jobs: int = Field(description="Jobs the database says wait on this queue.")
    oldest_job_id: str | None
    oldest_age_s: float | None = Field(description="Seconds the oldest waiting job has been on this queue.")
    workers: list[str] = Field(description="Workers consuming this queue that answered (with ?workers=true).")


class QueuesOut(BaseModel):
    items: list[QueueOut]
    workers_included: bool


@blueprint.get("/v1/queues")
@documented(
    summary="Depth and backlog of each queue (admin keys only)",
    tag="operations",
    query=QueuesQuery,
    responses={200: ("Every queue: route, then one per tier.", QueuesOut)},
    extra_errors=(403,),
)
def index() -> Any:
    """Every queue's depth and backlog (the whole deployment's: admin keys only)."""
    if not principal().is_admin:
        raise ApiError(403, "forbidden", "queue depths cover every tenant: they need an admin key")
    query = parse_query(QueuesQuery)
    st = state()
    try:
        with st.sessions() as session:
            statuses = queue_status(
                st.celery,
                st.redis,
                session,
                now=datetime.now(UTC),
                timeout=WORKERS_TIMEOUT_S if query.workers else None,
            )
    except redis.exceptions.RedisError as exc:
        raise ApiError(
            503,
            "broker_unavailable",
            "the broker does not answer; queue depths unknown",
            headers={"Retry-After": "5"},
        ) from exc
    return jsonify({"items": [s.to_dict() for s in statuses], "workers_included": query.workers})
