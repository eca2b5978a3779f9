"""The routing audit trail."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.auth import authenticate, principal
from api.errors import ApiError
from api.jobs import job_url, parse_query
from api.openapi import documented
from api.schemas import DecisionListQuery, DecisionPage
from api.state import state
from db.decisions import list_decisions
from db.documents import decision_out
from db.pagination import InvalidCursor

blueprint = Blueprint("decisions", __name__)
blueprint.before_request(authenticate)


@blueprint.get("/v1/decisions")
@documented(
    summary="The routing audit trail, newest first",
    tag="decisions",
    query=DecisionListQuery,
    responses={200: ("One page of decisions.", DecisionPage)},
)
def index() -> Any:
    """Decisions, newest first, filtered by tier, router, router version and time."""
    query = parse_query(DecisionListQuery)
    with state().sessions() as session:
        try:
            page = list_decisions(
                session,
                tenant_id=None if principal().is_admin else principal().tenant_id,
                tier=query.tier,
                router_name=query.router,
                router_version=query.router_version,
                since=query.since,
                until=query.until,
                limit=query.limit,
                cursor=query.cursor,
            )
        except InvalidCursor as exc:
            raise ApiError(400, "invalid_request", str(exc), field="cursor") from exc
        items = [decision_out(row, job_url=job_url(row.job_id)).model_dump(mode="json") for row in page.items]
    return jsonify({"items": items, "next_cursor": page.next_cursor})
