"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

import redis
import sqlalchemy.exc
from flask import Blueprint, jsonify

from api.openapi import documented
from api.schemas import HealthOut, ReadyOut
from api.state import state
from db.session import ping

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
@documented(summary="Liveness", tag="health", secured=False, responses={200: ("The process is up.", HealthOut)})
def healthz() -> Any:
    """The process is up (no dependency is checked)."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
@documented(
    summary="Readiness: the database and the broker answer",
    tag="health",
    secured=False,
    responses={200: ("Ready.", ReadyOut), 503: ("A dependency is down.", ReadyOut)},
)
def readyz() -> Any:
    """Ready to accept jobs: the database answers and the broker answers."""
    checks: dict[str, str] = {}
    try:
        ping(state().engine)
        checks["database"] = "ok"
    except sqlalchemy.exc.SQLAlchemyError as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        state().redis.ping()
        checks["broker"] = "ok"
    except redis.exceptions.RedisError as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ready" if ready else "unavailable", "checks": checks}), 200 if ready else 503
