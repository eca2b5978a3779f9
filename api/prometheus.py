"""``GET /metrics``: Prometheus text exposition, computed from the database and the broker at scrape time.

Why a custom collector instead of counters incremented in request handlers: the API runs as several
gunicorn processes and the work happens in Celery workers, so in-process counters would each see a slice
(prometheus_client's multiprocess mode merges files per process but cannot see the workers). Reading the
shared state (PostgreSQL tables, Redis lists) at scrape time gives every API process the same answer.
Worker-level figures (workers online, task run times) come from Flower's own ``/metrics``.

The figures are the whole deployment's (spend, queue depths, routing), so the endpoint wants credentials:
``Authorization: Bearer`` with ``ROUTET2I_METRICS_TOKEN`` (what Prometheus is given) or an admin's API key. It
is open only when the whole API is (``ROUTET2I_AUTH=disabled``).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import redis
import sqlalchemy.exc
from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from api.auth import authenticate, principal
from api.errors import ApiError
from api.openapi import PROMETHEUS_TEXT, documented
from api.state import ApiState, state
from db.backlog import Backlog, waiting_backlog
from db.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from db.load import BurstAllowance, tier_loads
from db.monitoring import (
    STAGES,
    CostTotal,
    Histogram,
    cost_totals,
    decisions_by_router,
    images_by_role,
    jobs_by_status_and_tier,
    recent_cloud_fraction,
    stage_histograms,
)
from worker.transport import queue_depths

log = logging.getLogger(__name__)
blueprint = Blueprint("metrics", __name__)
REGISTRY_KEY = "routet2i.metrics_registry"


def _inf(value: float) -> str:
    return repr(float(value))


class RouteT2ICollector:
    """Builds every RouteT2I metric family from the shared state on each collection."""

    def __init__(self, st: ApiState) -> None:
        self.st = st

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "routet2i_metrics_source_up", "1 when the source answered this scrape, 0 when it failed.", labels=["source"]
        )
        families: list[Metric] = []
        sources: list[tuple[str, Callable[[], list[Metric]]]] = [("database", self._database), ("broker", self._broker)]
        if self.st.spend_ledger is not None:
            sources.append(("spend", self._spend))
        if self.st.settings.latency_slo_s is not None:
            sources.append(("load", self._load))
        for source, build in sources:
            ok = self._safely(source, build, families)
            up.add_metric([source], 1.0 if ok else 0.0)
        yield from families
        yield up
        yield GaugeMetricFamily(
            "routet2i_metrics_scrape_seconds", "Time this scrape spent querying.", value=time.perf_counter() - started
        )

    @staticmethod
    def _safely(source: str, build: Callable[[], list[Metric]], out: list[Metric]) -> bool:
        try:
            out.extend(build())
        except (sqlalchemy.exc.SQLAlchemyError, redis.exceptions.RedisError, OSError) as exc:
            log.warning("metrics source unavailable", extra={"source": source, "error": str(exc)})
            return False
        return True

    def _database(self) -> list[Metric]:
        settings = self.st.settings
        with self.st.sessions() as session:
            jobs = jobs_by_status_and_tier(session, settings.tier_names)
            decisions = decisions_by_router(session)
            recent, recent_n = recent_cloud_fraction(session, window=settings.budget_window, cheapest=settings.cheapest)
            costs = cost_totals(session, settings.tier_names)
            roles = images_by_role(session)
            histograms = [h for stage in STAGES for h in stage_histograms(session, stage)]
            backlog = waiting_backlog(session, settings.queues)
        return [
            *_job_families(jobs, decisions),
            *_budget_families(decisions, recent, recent_n, settings.dearest_share, settings.cheapest),
            *_cost_families(costs, roles),
            _latency_family(histograms),
            *_backlog_families(backlog),
        ]

    def _broker(self) -> list[Metric]:
        depths = queue_depths(self.st.celery, self.st.redis)
        depth = GaugeMetricFamily(
            "routet2i_queue_depth", "Messages waiting in the broker on each queue.", labels=["queue"]
        )
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        breaker = CircuitBreaker.for_settings(self.st.settings, self.st.redis)
        return [depth, *_breaker_families(breaker, self.st.settings.tier_names)]

    def _spend(self) -> list[Metric]:
        assert self.st.spend_ledger is not None
        return [
            GaugeMetricFamily(
                "routet2i_cloud_spend_limit_usd",
                "Most US dollars the cloud images of one spend period may cost.",
                value=self.st.settings.cloud_spend_limit_usd,
            ),
            GaugeMetricFamily(
                "routet2i_cloud_spend_period_usd",
                "US dollars reserved and billed for cloud images in the current spend period.",
                value=self.st.spend_ledger.spent(),
            ),
        ]

    def _load(self) -> list[Metric]:
        """What load-aware routing sees of each tier, and the burst allowance of the current period."""
        settings = self.st.settings
        with self.st.sessions() as session:
            loads = tier_loads(session, self.st.redis, settings)
        families = {
            "slots": GaugeMetricFamily(
                "routet2i_tier_slots", "Live worker slots consuming each tier.", labels=["tier"]
            ),
            "service": GaugeMetricFamily(
                "routet2i_tier_service_seconds", "Moving median seconds per image of each tier.", labels=["tier"]
            ),
            "latency": GaugeMetricFamily(
                "routet2i_tier_predicted_latency_seconds",
                "Predicted seconds until a job joining each tier now is done (+Inf: no live worker).",
                labels=["tier"],
            ),
        }
        for load in loads:
            families["slots"].add_metric([load.tier], load.slots)
            latency = load.latency_s()
            if load.service_s is not None and latency is not None:
                families["service"].add_metric([load.tier], load.service_s)
                families["latency"].add_metric([load.tier], latency)
        allowance = BurstAllowance(self.st.redis, settings, self.st.spend_ledger)
        left = GaugeMetricFamily(
            "routet2i_burst_allowance_left_usd",
            "US dollars the burst allowance has left this spend period for jobs spilled to keep the latency SLO.",
            value=allowance.left(),
        )
        return [*families.values(), left]


def init_app(app: Flask, st: ApiState) -> None:
    """Give the app its own registry (never the global one) holding the collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouteT2ICollector(st))
    app.extensions[REGISTRY_KEY] = registry
    app.register_blueprint(blueprint)


def _authorize() -> None:
    """Let the metrics token or an admin key through (everyone when authentication is disabled)."""
    settings = state().settings
    if settings.auth == "disabled":
        return
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    token = settings.metrics_token
    if (
        token is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(credentials.strip().encode(), token.get_secret_value().encode())
    ):
        return
    authenticate()  # 401 for a missing or unknown key
    if not principal().is_admin:
        raise ApiError(
            403, "forbidden", "metrics cover the whole deployment: they need the metrics token or an admin key"
        )


@blueprint.get("/metrics")
@documented(
    summary="Prometheus metrics (the metrics token or an admin key)",
    tag="operations",
    responses={200: ("The Prometheus text exposition.", PROMETHEUS_TEXT)},
    extra_errors=(403,),
)
def metrics() -> Response:
    """Prometheus text format."""
    _authorize()
    return Response(generate_latest(current_app.extensions[REGISTRY_KEY]), content_type=CONTENT_TYPE_LATEST)


def _job_families(jobs: dict[tuple[str, str], int], decisions: dict[tuple[str, str, str], int]) -> list[Metric]:
    gauge = GaugeMetricFamily(
        "routet2i_jobs", "Jobs by status and tier (tier 'none': not routed).", labels=["status", "tier"]
    )
    for (status, tier), count in sorted(jobs.items()):
        gauge.add_metric([status, tier], count)
    counter = CounterMetricFamily(
        "routet2i_decisions", "Routing decisions by tier and router.", labels=["tier", "router", "router_version"]
    )
    for (tier, router, version), count in sorted(decisions.items()):
        counter.add_metric([tier, router, version], count)
    return [gauge, counter]


def _breaker_families(breaker: CircuitBreaker, tiers: Sequence[str]) -> list[Metric]:
    state = GaugeMetricFamily(
        "routet2i_breaker_state",
        "Each tier's circuit breaker: 1 for its current state (closed, open or half-open), 0 for the others.",
        labels=["tier", "state"],
    )
    failures = GaugeMetricFamily(
        "routet2i_breaker_failures", "Generations failed for good in a row on each tier.", labels=["tier"]
    )
    for tier, current in breaker.states(tiers).items():
        for name in (CLOSED, OPEN, HALF_OPEN):
            state.add_metric([tier, name], 1.0 if current.state == name else 0.0)
        failures.add_metric([tier], current.failures)
    return [state, failures]


def _budget_families(
    decisions: dict[tuple[str, str, str], int], recent: float | None, recent_n: int, rho: float, cheapest: str
) -> list[Metric]:
    routed = sum(decisions.values())
    cloud = sum(n for (tier, _, _), n in decisions.items() if tier != cheapest)
    fraction = GaugeMetricFamily(
        "routet2i_cloud_fraction",
        "Share of decisions sent to a tier above the cheapest: over all decisions, and over the budget window's "
        "last decisions.",
        labels=["window"],
    )
    fraction.add_metric(["all"], cloud / routed if routed else 0.0)
    fraction.add_metric(["recent"], recent if recent is not None else 0.0)
    return [
        fraction,
        GaugeMetricFamily("routet2i_cloud_budget", "The cloud fraction the router may spend (rho).", value=rho),
        GaugeMetricFamily(
            "routet2i_budget_window_decisions",
            "Decisions in the recent window (at most the budget window).",
            value=recent_n,
        ),
    ]


def _cost_families(costs: dict[str, CostTotal], roles: dict[str, int]) -> list[Metric]:
    usd = CounterMetricFamily("routet2i_cost_usd", "US dollars billed, by tier.", labels=["tier"])
    gpu = CounterMetricFamily("routet2i_gpu_seconds", "Device seconds spent generating, by tier.", labels=["tier"])
    images = CounterMetricFamily("routet2i_images", "Images generated and billed, by tier.", labels=["tier"])
    for tier, total in costs.items():
        usd.add_metric([tier], total.usd)
        gpu.add_metric([tier], total.gpu_s)
        images.add_metric([tier], total.images)
    by_role = CounterMetricFamily(
        "routet2i_images_by_role",
        "Images stored by role: primary (delivered), shadow (labels), replaced (an edge image escalated).",
        labels=["role"],
    )
    for role, count in sorted(roles.items()):
        by_role.add_metric([role], count)
    return [usd, gpu, images, by_role]


def _latency_family(histograms: list[Histogram]) -> Metric:
    latency = HistogramMetricFamily(
        "routet2i_job_stage_seconds",
        "Time jobs spent in each pipeline stage, from their timestamps, by tier.",
        labels=["stage", "tier"],
    )
    for h in histograms:
        buckets = [(_inf(bound), count) for bound, count in h.buckets] + [("+Inf", h.count)]
        latency.add_metric([h.stage, h.tier], buckets, h.sum_s)
    return latency


def _backlog_families(backlog: dict[str, Backlog]) -> list[Metric]:
    now = datetime.now(UTC)
    waiting = GaugeMetricFamily(
        "routet2i_queue_waiting_jobs", "Jobs the database says wait on each queue.", labels=["queue"]
    )
    age = GaugeMetricFamily(
        "routet2i_queue_oldest_age_seconds",
        "Age of the oldest job waiting on each queue (0 when none).",
        labels=["queue"],
    )
    for queue, entry in backlog.items():
        waiting.add_metric([queue], entry.waiting)
        oldest = (now - entry.oldest_since).total_seconds() if entry.oldest_since is not None else 0.0
        age.add_metric([queue], max(0.0, oldest))
    return [waiting, age]
