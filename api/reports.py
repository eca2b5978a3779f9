"""Evaluation plots: PNG files in ``ROUTET2I_REPORTS_DIR`` (e.g. written by ``routet2i eval --plot``).

The plots show the whole deployment's evaluation, so, like the queues, they are shown to admin keys only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, jsonify, send_from_directory, url_for
from pydantic import BaseModel

from api.auth import authenticate, principal
from api.errors import ApiError
from api.openapi import PNG, documented
from api.state import state

blueprint = Blueprint("reports", __name__)


@blueprint.before_request
def _admins_only() -> None:
    authenticate()
    if not principal().is_admin:
        raise ApiError(403, "forbidden", "evaluation plots cover the whole deployment: they need an admin key")


REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")
"""Plot file names the API serves: plain names (no folders) ending in ``.png``."""


class ReportOut(BaseModel):
    name: str
    url: str
    size_bytes: int
    modified_at: datetime


class ReportsOut(BaseModel):
    items: list[ReportOut]


@blueprint.get("/v1/reports")
@documented(
    summary="The evaluation plots, newest first (admin keys only)",
    tag="operations",
    responses={200: ("The plots in the reports directory.", ReportsOut)},
    extra_errors=(403,),
)
def index() -> Any:
    """The evaluation plots, newest first."""
    root = state().settings.reports_dir
    files = [p for p in root.glob("*.png") if p.is_file() and REPORT_NAME.match(p.name)] if root.is_dir() else []
    files.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    items = [
        {
            "name": p.name,
            "url": url_for("reports.get", name=p.name),
            "size_bytes": p.stat().st_size,
            "modified_at": datetime.fromtimestamp(p.stat().st_mtime, UTC).isoformat(),
        }
        for p in files
    ]
    return jsonify({"items": items})


@blueprint.get("/v1/reports/<name>")
@documented(
    summary="One evaluation plot (admin keys only)",
    tag="operations",
    responses={200: ("The plot.", PNG)},
    extra_errors=(403,),
)
def get(name: str) -> Any:
    """One plot as ``image/png``."""
    root = state().settings.reports_dir
    if not REPORT_NAME.fullmatch(name) or not (root / name).is_file():
        raise ApiError(404, "not_found", f"no evaluation plot named {name!r}", field="name")
    return send_from_directory(root.resolve(), name, mimetype="image/png", max_age=0)
