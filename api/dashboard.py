"""``GET /dashboard``: a single page that reads the JSON API (no build step, no third-party script).

The page and its static files hold no data, so they are served without credentials; every figure comes
from the ``/v1`` endpoints the page calls, with the API key the user enters when the API requires one.
A strict Content-Security-Policy (scripts and styles from this origin only, no inline code) backs up the
page's rule of inserting user text (prompts) only as text nodes.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

STATIC = Path(__file__).parent / "static" / "dashboard"

blueprint = Blueprint(
    "dashboard",
    __name__,
    static_folder=str(STATIC),
    static_url_path="/dashboard/static",
)

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)


@blueprint.get("/dashboard")
def page() -> Response:
    """The dashboard's HTML."""
    return send_from_directory(STATIC, "index.html", mimetype="text/html", max_age=0)


@blueprint.after_request
def _secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
