"""Counts, cloud share against the budget, spend and latency."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Blueprint, jsonify

from api.auth import authenticate, principal
from api.openapi import documented
from api.schemas import StatsOut
from api.state import state
from db.breaker import CircuitBreaker
from db.redis_state import SpendLedger
from db.stats import job_stats

log = logging.getLogger(__name__)
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
        tenant_id = None if principal().is_admin else principal().tenant_id
        stats = job_stats(session, tenant_id=tenant_id, tiers=st.settings.tier_names)
    stats["tiers"] = list(st.settings.tier_names)
    stats["budget"] = {
        "cloud_fraction": st.settings.dearest_share,
        "usd_per_image": st.settings.budget_usd,
        "window": st.settings.budget_window,
        "prices_usd": st.settings.prices,
    }
    stats["breakers"] = _breakers(st)
    if st.spend_ledger is not None:
        stats["budget"] |= {
            "spend_limit_usd": st.settings.cloud_spend_limit_usd,
            "spend_period_s": st.settings.cloud_spend_period_s,
            "spent_this_period_usd": _spent(st.spend_ledger),
        }
    stats["router"] = st.settings.router
    stats["scope"] = "all tenants" if principal().is_admin else principal().tenant_name
    return jsonify(StatsOut.model_validate(stats).model_dump(mode="json"))


def _breakers(st: Any) -> dict[str, dict[str, Any]]:
    """Every tier's circuit breaker (empty when Redis did not answer)."""
    try:
        states = CircuitBreaker.for_settings(st.settings, st.redis).states(st.settings.tier_names)
    except redis.exceptions.RedisError as exc:
        log.warning("circuit breakers unavailable", extra={"error": str(exc)})
        return {}
    return {
        tier: {"state": b.state, "failures": b.failures, "open_until": b.open_until, "opened": b.opened}
        for tier, b in states.items()
    }


def _spent(ledger: SpendLedger) -> float | None:
    try:
        return round(ledger.spent(), 6)
    except redis.exceptions.RedisError as exc:
        log.warning("spend ledger unavailable", extra={"error": str(exc)})
        return None
