"""Counts, cloud share against the budget, spend and latency."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.auth import authenticate, principal
from api.openapi import documented
from api.schemas import StatsOut
from api.state import state
from db.stats import job_stats

blueprint = Blueprint("stats", __name__)
blueprint.before_request(authenticate)


@blueprint.get("/v1/stats")
@documented(
    summary="Jobs per status and tier, cloud fraction against the budget, spend, latency",
    tag="stats",
    responses={200: ("The caller's figures (every tenant's for an admin).", StatsOut)},
)
def index() -> Any:
    st = state()
    with st.sessions() as session:
        stats = job_stats(session, tenant_id=None if principal().is_admin else principal().tenant_id)
    stats["budget"] = {"cloud_fraction": st.settings.cloud_budget, "window": st.settings.budget_window}
    stats["router"] = st.settings.router
    stats["scope"] = "all tenants" if principal().is_admin else principal().tenant_name
    return jsonify(StatsOut.model_validate(stats).model_dump(mode="json"))
