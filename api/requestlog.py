"""One access-log record per request, with method, path, status, duration and the job id when there is one.

gunicorn's own access log is off (``routet2i api``), so these records are the access log; with
``ROUTET2I_LOG_JSON=true`` each is a JSON line a log collector can index by ``job_id``.
"""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request

log = logging.getLogger("routet2i.api.access")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probe and scrape paths, logged at DEBUG so that they do not drown the requests of users."""

_JOB_LOCATION = re.compile(r"/v1/jobs/([0-9a-f-]{36})$")


def _job_id(response: Response) -> str | None:
    job_id = (request.view_args or {}).get("job_id")
    if job_id is None and response.location:
        match = _JOB_LOCATION.search(response.location)
        job_id = match.group(1) if match else None
    return job_id


def init_app(app: Flask) -> None:
    @app.before_request
    def _start_clock() -> None:
        g.routet2i_request_started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        started = g.get("routet2i_request_started")
        duration_ms = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
        }
        job_id = _job_id(response)
        if job_id is not None:
            fields["job_id"] = job_id
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        log.log(level, "%s %s %s", request.method, request.path, response.status_code, extra=fields)
        return response
