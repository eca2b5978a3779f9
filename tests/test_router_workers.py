"""Two router worker processes share one cloud budget through Redis, routing with the shipped RouteT2I artifact."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from api.app import create_app
from core.settings import Settings
from db.models import Decision, Job
from db.session import make_engine, make_session_factory
from router.data import sample_prompts
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, wait_until

JOBS = 1000
RHO = 0.3
WINDOW = 500
TOLERANCE = 0.03


@pytest.fixture()
def two_routers(pg_url: str, tmp_path, model_cache) -> Iterator[tuple[Settings, WorkerPool, list[str]]]:  # type: ignore[no-untyped-def]
    (tmp_path / "redis").mkdir()
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    null = {"backend": "null", "width": 64, "height": 64}
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path / "images",
        cache_dir=model_cache,
        edge={**null, "model": "null-edge"},
        cloud={**null, "model": "null-cloud"},
        scorer={"enabled": False},
        router="routet2i",
        cloud_budget=RHO,
        budget_window=WINDOW,
        budget_name=f"two-routers-{uuid.uuid4().hex[:6]}",
        rate_limit_per_minute=0,
    )
    pool = WorkerPool(settings, log_dir=tmp_path)
    routers = [pool.start("route", name=f"route-{i}-{uuid.uuid4().hex[:4]}@test") for i in range(2)]
    for queue in ("edge", "cloud"):
        pool.start(queue)
    pool.wait_ready()
    try:
        yield settings, pool, routers
    finally:
        pool.stop_all()
        broker.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_two_router_processes_hold_one_budget_over_1000_decisions(two_routers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, _pool, routers = two_routers
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    ids = []
    for prompt in sample_prompts(JOBS, seed=7):
        response = client.post("/v1/jobs", json={"prompt": prompt})
        assert response.status_code == 202, response.get_json()
        ids.append(uuid.UUID(response.get_json()["id"]))

    sessions = make_session_factory(make_engine(settings.database_url))

    def decided() -> list[Decision] | None:
        with sessions() as session:
            rows = list(session.scalars(select(Decision).where(Decision.job_id.in_(ids))))
        return rows if len(rows) == JOBS else None

    decisions = wait_until(decided, timeout=600, interval=1.0, what=f"{JOBS} routing decisions")
    cap = int(RHO * WINDOW)
    full_windows = 0
    for d in decisions:
        assert d.router_name == "routet2i" and d.router_version.startswith("routet2i:")
        state = d.budget_state
        in_window = state["recent_cloud"] + (1 if d.tier == "cloud" else 0)
        # The window ending at this decision, as the shared Redis list held it when the decision was made.
        assert in_window <= cap, state
        if state["recent_decisions"] == WINDOW - 1:
            full_windows += 1
            assert RHO - TOLERANCE <= in_window / WINDOW <= RHO, state
    assert full_windows >= JOBS - WINDOW
    cloud_share = sum(d.tier == "cloud" for d in decisions) / JOBS
    assert RHO - TOLERANCE <= cloud_share <= RHO

    # Both router processes took part.
    for node in routers:
        log = (tmp_path / f"{node}.log").read_text()
        assert log.count("worker.routing: routed") >= 50, node

    def finished() -> bool:
        with sessions() as session:
            statuses = session.scalars(select(Job.status).where(Job.id.in_(ids))).all()
        return all(s == "succeeded" for s in statuses)

    wait_until(finished, timeout=300, interval=1.0, what="every job to succeed")
