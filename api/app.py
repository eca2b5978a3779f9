"""The Flask application factory: the API's composition root."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from flask import Flask
from flask.json.provider import DefaultJSONProvider

from api.auth import LOCAL_TENANT, KeyCache
from api.errors import register_error_handlers
from api.schemas import job_batch_model, job_create_model
from api.state import EXTENSION, ApiState
from core.settings import Settings
from db.images import ImageStore
from db.redis_state import RateLimiter, SpendLedger
from db.redis_state import connect as connect_redis
from db.session import make_engine, make_session_factory
from worker.transport import create_celery

REDIS_PROBE_TIMEOUT_S = 1.0

log = logging.getLogger(__name__)


class JsonProvider(DefaultJSONProvider):
    """Flask's JSON, keys in insertion order, and a document nested deeper than the parser's recursion limit is
    invalid JSON (a ``ValueError``: a 400 naming the body) instead of a ``RecursionError`` (a 500)."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API for ``settings`` (read from the environment when omitted)."""
    settings = settings or Settings.from_env()
    app = Flask("routet2i", static_folder=None)  # no /static route: the dashboard serves its own files
    app.json = JsonProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # werkzeug answers 413 beyond it
    engine = make_engine(settings.database_url)
    client = connect_redis(settings.broker_url, timeout=REDIS_PROBE_TIMEOUT_S)
    app.extensions[EXTENSION] = ApiState(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        celery=create_celery(settings),
        images=ImageStore(settings.image_dir),
        redis=client,
        job_create_model=(job_model := job_create_model(settings)),
        job_batch_model=job_batch_model(job_model),
        key_cache=KeyCache(),
        rate_limiter=RateLimiter(client),
        spend_ledger=_spend_ledger(settings, client),
        image_waits=threading.BoundedSemaphore(settings.images_waiters),
    )
    if settings.auth == "disabled":
        log.warning(
            "AUTHENTICATION IS DISABLED: every request acts as the admin of tenant %r. "
            "Use this for local demos only (ROUTET2I_AUTH=required in production).",
            LOCAL_TENANT,
        )

    from api.control import blueprint as control
    from api.decisions import blueprint as decisions
    from api.health import blueprint as health
    from api.jobs import blueprint as jobs
    from api.models import blueprint as models
    from api.openai_compat import blueprint as openai_compat
    from api.openapi import blueprint as openapi
    from api.stats import blueprint as stats

    for blueprint in (health, jobs, control, decisions, stats, models, openapi, openai_compat):
        app.register_blueprint(blueprint)
    register_operations(app)
    register_error_handlers(app)
    return app


def _spend_ledger(settings: Settings, broker_client: redis.Redis) -> SpendLedger | None:
    """The spend ledger the routers charge (in the router state's Redis), when a spend limit is set."""
    if settings.cloud_spend_limit_usd is None:
        return None
    client = (
        broker_client
        if settings.state_redis_url == settings.broker_url
        else connect_redis(settings.state_redis_url, timeout=REDIS_PROBE_TIMEOUT_S)
    )
    return SpendLedger.for_settings(settings, client)


def register_operations(app: Flask) -> None:
    """Monitoring and the dashboard: ``/metrics``, access logs, time series, queues, plots, ``/dashboard``."""
    from api import prometheus, requestlog
    from api.dashboard import blueprint as dashboard
    from api.queues import blueprint as queues
    from api.reports import blueprint as reports
    from api.timeseries import blueprint as timeseries

    for blueprint in (timeseries, queues, reports, dashboard):
        app.register_blueprint(blueprint)
    prometheus.init_app(app, app.extensions[EXTENSION])
    requestlog.init_app(app)
