"""``GET /v1/queues``: depth and backlog of each queue (the dashboard's and scripts' view of ``routet2i queues``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict

from api.auth import authenticate, principal
from api.errors import ApiError
from api.jobs import parse_query
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


@blueprint.get("/v1/queues")
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
