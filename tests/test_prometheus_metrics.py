"""``/metrics``: aggregates computed by the database (PostgreSQL and SQLite), and the exposition served by the API.

Aggregates are checked as differences before and after inserting rows with known timestamps, because the
session's PostgreSQL database also holds the jobs of other tests.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from api.app import create_app
from core.settings import Settings
from db.jobs import create_job
from db.lifecycle import transition
from db.migrate import upgrade
from db.models import CostEntry, Decision, Generation, Job, JobEvent, JobStatus
from db.monitoring import (
    LATENCY_BUCKETS_S,
    STAGES,
    Histogram,
    cost_totals,
    decisions_by_router,
    jobs_by_status_and_tier,
    recent_cloud_fraction,
    stage_histograms,
)
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant, get_tenant_by_name
from tests.conftest import create_tenant_key
from tests.servers import ApiServer
from tests.support import PrivateRedis, free_port
from worker.transport import create_celery

OPS = Path(__file__).resolve().parents[1] / "ops"
T0 = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a migrated SQLite file or inside the PostgreSQL test transaction."""
    if request.param == "postgresql":
        yield request.getfixturevalue("db_session")
        return
    url = f"sqlite:///{tmp_path / 'metrics.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as sqlite_session:
        yield sqlite_session
    engine.dispose()


def add_job(
    session: Session,
    *,
    tier: str | None,
    status: JobStatus,
    route_wait: float | None = None,
    routing: float | None = None,
    tier_wait: float | None = None,
    generating: float | None = None,
    total: float | None = None,
    version: str = "v1",
    usd: float = 0.0,
    gpu_s: float = 0.0,
    decided_at: datetime | None = None,
) -> Job:
    """A job whose stage durations are exactly the given seconds, with its decision and cost when routed."""
    job = create_job(session, tenant_id=tenant_of(session), prompt="metrics test", seed=1)
    job.created_at = T0
    at = T0
    if route_wait is not None:
        at += timedelta(seconds=route_wait)
        session.add(JobEvent(job_id=job.id, status=JobStatus.ROUTING, at=at))
    if routing is not None:
        at += timedelta(seconds=routing)
        job.routed_at = at
        job.tier = tier
        session.add(
            Decision(
                job_id=job.id,
                router_name="metrics-test",
                router_version=version,
                inputs={},
                score=0.0,
                budget=0.3,
                budget_state={},
                tier=tier,
                reason="test",
                latency_ms=1.0,
                created_at=decided_at or at,
            )
        )
    if tier_wait is not None:
        at += timedelta(seconds=tier_wait)
        job.started_at = at
    if generating is not None:
        at += timedelta(seconds=generating)
    if total is not None:
        at = T0 + timedelta(seconds=total)
    job.status = status
    if status.terminal:
        job.finished_at = at
    if usd or gpu_s:
        generation = Generation(
            id=uuid.uuid4(),
            job_id=job.id,
            tier=tier,
            role="primary",
            backend="null",
            model_id="m",
            device="cpu",
            seed=1,
            steps=1,
            width=64,
            height=64,
            image_path="x.png",
            image_sha256="0" * 64,
            wall_s=gpu_s,
            gpu_s=gpu_s,
        )
        session.add(generation)
        session.add(CostEntry(job_id=job.id, generation=generation, tier=tier, usd=Decimal(str(usd)), gpu_s=gpu_s))
    session.flush()
    return job


def tenant_of(session: Session) -> uuid.UUID:
    """The id of this module's tenant in the session's database, created on first use."""
    tenant = get_tenant_by_name(session, "metrics-test")
    if tenant is None:
        tenant = create_tenant(session, name="metrics-test")
        session.flush()
    return tenant.id


def histograms(session: Session) -> dict[tuple[str, str], Histogram]:
    return {(h.stage, h.tier): h for stage in STAGES for h in stage_histograms(session, stage)}


def bucket_delta(before: Histogram | None, after: Histogram) -> list[int]:
    old = dict(before.buckets) if before else {}
    return [count - old.get(bound, 0) for bound, count in after.buckets]


def expected_buckets(*durations: float) -> list[int]:
    return [sum(d <= bound for d in durations) for bound in LATENCY_BUCKETS_S]


def test_stage_histograms_bucket_each_stage_from_the_timestamps(session: Session) -> None:
    before = histograms(session)
    # edge job: 0.2 s before routing, 0.07 s routing, 1.7 s waiting for a worker, 3 s generating
    add_job(
        session, tier="edge", status=JobStatus.SUCCEEDED, route_wait=0.2, routing=0.07, tier_wait=1.7, generating=3.0
    )
    add_job(
        session, tier="cloud", status=JobStatus.SUCCEEDED, route_wait=0.02, routing=0.03, tier_wait=20, generating=61
    )
    add_job(session, tier=None, status=JobStatus.FAILED, total=7.0)  # failed before routing
    add_job(session, tier=None, status=JobStatus.QUEUED)  # still waiting: in no stage yet
    after = histograms(session)

    expected = {
        ("route_wait", "edge"): [0.2],
        ("routing", "edge"): [0.07],
        ("tier_wait", "edge"): [1.7],
        ("generating", "edge"): [3.0],
        ("total", "edge"): [4.97],
        ("route_wait", "cloud"): [0.02],
        ("routing", "cloud"): [0.03],
        ("tier_wait", "cloud"): [20.0],
        ("generating", "cloud"): [61.0],
        ("total", "cloud"): [81.05],
        ("total", "none"): [7.0],
    }
    for key, durations in expected.items():
        old = before.get(key)
        new = after[key]
        assert new.count - (old.count if old else 0) == len(durations), key
        assert new.sum_s - (old.sum_s if old else 0.0) == pytest.approx(sum(durations), abs=5e-3), key
        assert bucket_delta(old, new) == expected_buckets(*durations), key
    changed = {k for k, h in after.items() if h.count != (before[k].count if k in before else 0)}
    assert changed == set(expected)


def test_job_decision_cost_and_cloud_fraction_aggregates(session: Session) -> None:
    jobs_before, costs_before = jobs_by_status_and_tier(session), cost_totals(session)
    version = f"v-{uuid.uuid4().hex[:8]}"
    future = datetime(2100, 1, 1, tzinfo=UTC)  # newer than any other test's decisions: they form the window
    tiers = ["cloud", "edge", "cloud", "cloud"]
    for i, tier in enumerate(tiers):
        add_job(
            session,
            tier=tier,
            status=JobStatus.SUCCEEDED,
            route_wait=0.1,
            routing=0.1,
            tier_wait=0.1,
            generating=0.1,
            version=version,
            usd=0.065 if tier == "cloud" else 0.009,
            gpu_s=2.0 if tier == "cloud" else 0.5,
            decided_at=future + timedelta(seconds=i),
        )
    add_job(session, tier=None, status=JobStatus.QUEUED)

    jobs_after = jobs_by_status_and_tier(session)
    delta = {k: jobs_after[k] - jobs_before[k] for k in jobs_after if jobs_after[k] != jobs_before[k]}
    assert delta == {("succeeded", "cloud"): 3, ("succeeded", "edge"): 1, ("queued", "none"): 1}
    assert len(jobs_after) == len(JobStatus) * 3  # every status x (none, edge, cloud), zeros included

    decisions = decisions_by_router(session)
    assert decisions[("cloud", "metrics-test", version)] == 3
    assert decisions[("edge", "metrics-test", version)] == 1

    assert recent_cloud_fraction(session, window=4) == (0.75, 4)
    assert recent_cloud_fraction(session, window=2) == (1.0, 2)  # the two newest are both cloud

    costs_after = cost_totals(session)
    assert costs_after["cloud"].usd - costs_before["cloud"].usd == pytest.approx(3 * 0.065)
    assert costs_after["cloud"].gpu_s - costs_before["cloud"].gpu_s == pytest.approx(6.0)
    assert costs_after["edge"].images - costs_before["edge"].images == 1


# --- the exposition ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("metrics-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def sqlite_settings(tmp_path: Path, private_redis: PrivateRedis) -> Settings:
    url = f"sqlite:///{tmp_path / 'exposition.db'}"
    upgrade(url)
    redis_lib.Redis.from_url(private_redis.url).flushdb()
    return Settings(
        database_url=url,
        broker_url=private_redis.url,
        image_dir=tmp_path / "images",
        cloud_budget=0.25,
        metrics_token=TOKEN,
    )


TOKEN = "scrape-token-0123"
SCRAPER = {"Authorization": f"Bearer {TOKEN}"}
"""What Prometheus sends (the API's ROUTET2I_METRICS_TOKEN)."""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def insert(settings: Settings, **job: object) -> None:
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as s:
        add_job(s, **job)  # type: ignore[arg-type]
    engine.dispose()


def test_metrics_endpoint_exposes_every_family(sqlite_settings: Settings) -> None:
    insert(
        sqlite_settings,
        tier="cloud",
        status=JobStatus.SUCCEEDED,
        route_wait=0.2,
        routing=0.07,
        tier_wait=1.7,
        generating=3.0,
        usd=0.065,
        gpu_s=2.5,
    )
    insert(
        sqlite_settings,
        tier="edge",
        status=JobStatus.SUCCEEDED,
        route_wait=0.2,
        routing=0.07,
        tier_wait=1.7,
        generating=3.0,
        usd=0.009,
        gpu_s=0.4,
    )
    insert(sqlite_settings, tier=None, status=JobStatus.QUEUED)
    app = create_celery(sqlite_settings)
    for _ in range(2):
        app.send_task("edge.generate", args=[str(uuid.uuid4())], queue="edge")
    app.close()

    response = create_app(sqlite_settings).test_client().get("/metrics", headers=SCRAPER)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    parsed = samples(response.get_data(as_text=True))

    assert value(parsed, "routet2i_jobs", status="succeeded", tier="cloud") == 1
    assert value(parsed, "routet2i_jobs", status="queued", tier="none") == 1
    assert value(parsed, "routet2i_decisions_total", tier="cloud", router="metrics-test", router_version="v1") == 1
    assert value(parsed, "routet2i_cloud_fraction", window="all") == 0.5
    assert value(parsed, "routet2i_cloud_fraction", window="recent") == 0.5
    assert value(parsed, "routet2i_cloud_budget") == 0.25
    assert value(parsed, "routet2i_cost_usd_total", tier="cloud") == pytest.approx(0.065)
    assert value(parsed, "routet2i_gpu_seconds_total", tier="edge") == pytest.approx(0.4)
    assert value(parsed, "routet2i_images_total", tier="edge") == 1
    assert value(parsed, "routet2i_queue_depth", queue="edge") == 2
    assert value(parsed, "routet2i_queue_depth", queue="cloud") == 0
    assert value(parsed, "routet2i_queue_waiting_jobs", queue="route") == 1
    assert value(parsed, "routet2i_queue_oldest_age_seconds", queue="route") > 0
    assert value(parsed, "routet2i_job_stage_seconds_count", stage="generating", tier="edge") == 1
    assert value(parsed, "routet2i_job_stage_seconds_bucket", stage="generating", tier="edge", le="2.5") == 0
    assert value(parsed, "routet2i_job_stage_seconds_bucket", stage="generating", tier="edge", le="5.0") == 1
    assert value(parsed, "routet2i_job_stage_seconds_bucket", stage="total", tier="cloud", le="+Inf") == 1
    assert value(parsed, "routet2i_metrics_source_up", source="database") == 1
    assert value(parsed, "routet2i_metrics_source_up", source="broker") == 1


def test_metrics_need_the_token_or_an_admin_key(sqlite_settings: Settings) -> None:
    client = create_app(sqlite_settings).test_client()
    tenant = create_tenant_key(sqlite_settings)
    admin = create_tenant_key(sqlite_settings, is_admin=True)
    answers = {
        "no credentials": client.get("/metrics"),
        "a wrong token": client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0124"}),
        "a tenant's key": client.get("/metrics", headers={"Authorization": f"Bearer {tenant}"}),
        "the token": client.get("/metrics", headers=SCRAPER),
        "an admin's key": client.get("/metrics", headers={"Authorization": f"Bearer {admin}"}),
    }
    assert {k: r.status_code for k, r in answers.items()} == {
        "no credentials": 401,
        "a wrong token": 401,
        "a tenant's key": 403,
        "the token": 200,
        "an admin's key": 200,
    }
    assert answers["no credentials"].get_json()["error"]["field"] == "Authorization"
    without_token = create_app(sqlite_settings.model_copy(update={"metrics_token": None})).test_client()
    assert without_token.get("/metrics", headers=SCRAPER).status_code == 401
    assert without_token.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    open_api = create_app(sqlite_settings.model_copy(update={"metrics_token": None, "auth": "disabled"}))
    assert open_api.test_client().get("/metrics").status_code == 200  # the whole API is open: so is this


def test_an_unreachable_broker_is_reported_not_fatal(sqlite_settings: Settings) -> None:
    down = sqlite_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    response = create_app(down).test_client().get("/metrics", headers=SCRAPER)
    assert response.status_code == 200
    parsed = samples(response.get_data(as_text=True))
    assert value(parsed, "routet2i_metrics_source_up", source="broker") == 0
    assert value(parsed, "routet2i_metrics_source_up", source="database") == 1
    assert not any(name == "routet2i_queue_depth" for name, _ in parsed)


@pytest.mark.integration
@pytest.mark.slow
def test_every_gunicorn_worker_answers_with_the_shared_state(sqlite_settings: Settings, tmp_path: Path) -> None:
    server = ApiServer(sqlite_settings, log_path=tmp_path / "api.log", workers=3)
    try:

        def scrape() -> dict:
            parsed = samples(httpx.get(f"{server.url}/metrics", headers=SCRAPER, timeout=10).text)
            return {k: v for k, v in parsed.items() if k[0] != "routet2i_metrics_scrape_seconds"}

        first = [scrape() for _ in range(9)]
        assert all(s == first[0] for s in first)
        insert(
            sqlite_settings,
            tier="edge",
            status=JobStatus.SUCCEEDED,
            route_wait=0.1,
            routing=0.1,
            tier_wait=0.1,
            generating=0.1,
            usd=0.009,
            gpu_s=0.3,
        )
        for parsed in (scrape() for _ in range(9)):
            assert value(parsed, "routet2i_jobs", status="succeeded", tier="edge") == 1
            assert value(parsed, "routet2i_cost_usd_total", tier="edge") == pytest.approx(0.009)
    finally:
        server.stop()


def test_alert_rules_use_metrics_the_api_exports(sqlite_settings: Settings) -> None:
    exported = {
        name
        for name, _ in samples(
            create_app(sqlite_settings).test_client().get("/metrics", headers=SCRAPER).get_data(as_text=True)
        )
    }
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    used = {
        m for group in rules["groups"] for rule in group["rules"] for m in re.findall(r"routet2i_[a-z_]+", rule["expr"])
    }
    assert used and used <= exported, used - exported


def test_metrics_survive_a_job_without_a_routing_event(session: Session) -> None:
    # A job failed while being enqueued has no events but its first: it must not break any stage query.
    job = create_job(session, tenant_id=tenant_of(session), prompt="never routed", seed=1)
    session.flush()
    transition(session, job, JobStatus.FAILED, error="broker unavailable")
    session.flush()
    assert all(isinstance(h.count, int) for stage in STAGES for h in stage_histograms(session, stage))
