"""Load-aware routing through real workers: the tier state read from them (backlog, slots from heartbeats,
service time from recorded generations), and a burst that spills to the cloud until the burst allowance is
spent, then degrades."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from api.app import create_app
from cli.bench.traces import make_trace
from core.settings import Settings
from db.load import BurstAllowance, tier_loads
from db.models import Decision, Generation
from db.session import make_engine, make_session_factory
from tests.conftest import PG_DB, authorize, create_tenant_key, fresh_database, make_settings
from tests.live_jobs import submit, wait_ended
from tests.support import PrivateRedis, WorkerPool

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDGE_S = 0.3
CLOUD_PRICE = 0.05
SLO_S = 6.0
SPILLS = 3


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of its own: a tier's backlog counts every job queued on it, other modules' leftovers included."""
    with fresh_database(f"{PG_DB}_slo") as url:
        yield url


@pytest.fixture(scope="module")
def stack(database: str, tmp_path_factory: pytest.TempPathFactory, model_cache: Any) -> Iterator[Settings]:
    """Two edge slots at 0.3 s per image, a fast cloud, every job routed to the edge by the budget (ρ = 0), an
    SLO of 6 s and an allowance of three cloud images."""
    broker = PrivateRedis(tmp_path_factory.mktemp("slo-redis"))
    broker.start()
    tier = {"backend": "null", "width": 64, "height": 64, "max_batch": 1}
    settings = make_settings(
        database_url=database,
        broker_url=broker.url,
        image_dir=tmp_path_factory.mktemp("slo-images"),
        cache_dir=model_cache,
        edge={**tier, "model": "null-edge", "service_time_s": EDGE_S, "steps": 20},
        cloud={**tier, "model": "null-cloud", "service_time_s": 0.05, "price_per_image": CLOUD_PRICE},
        scorer={"enabled": False},
        router="prompt-complexity",
        cloud_budget=0.0,
        budget_name=f"slo-{uuid.uuid4().hex[:6]}",
        heartbeat_interval_s=1.0,
        worker_dead_after_s=5.0,
        latency_slo_s=SLO_S,
        burst_budget_usd_per_period=SPILLS * CLOUD_PRICE,
        slo_degrade_steps=0.5,
    )
    pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("slo-logs"))
    try:
        pool.start("route")
        pool.start("edge", concurrency=2)
        pool.start("cloud")
        pool.wait_ready()
        warm_up(settings)
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


def warm_up(settings: Settings) -> None:
    """A few jobs forced on each tier, so both have measured service times (a tier never measured is not judged)."""
    forced = [{"prompt": f"a warm-up sketch {i}", "tier": tier} for tier in ("edge", "cloud") for i in range(6)]
    wait_ended(settings, submit(settings, forced, forced_tiers=("edge", "cloud")))


def test_the_tier_state_comes_from_the_workers(stack: Settings) -> None:
    settings = stack
    client = redis_lib.Redis.from_url(settings.broker_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    seen: list[Any] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with sessions() as session:
                seen.append(tier_loads(session, client, settings))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    ids = submit(settings, [f"a small calm lake number {i}" for i in range(8)])  # 1.2 s of work on 2 slots
    jobs = wait_ended(settings, ids)
    stop.set()
    watcher.join()
    assert {j.tier for j in jobs} == {"edge"}
    with sessions() as session:
        after = {load.tier: load for load in tier_loads(session, client, settings)}
    # Slots: the edge worker's two pool processes, from its heartbeat; the cloud's one.
    assert (after["edge"].slots, after["cloud"].slots) == (2, 1)
    # Service time: the moving median of the recorded batches, each one image of 0.3 s plus the worker's own
    # work on it (the sleep is a floor; a loaded machine adds to the rest).
    assert after["edge"].service_s is not None and EDGE_S <= after["edge"].service_s < 2.0
    assert after["edge"].backlog == 0
    # While the jobs were waiting the backlog was the database's count of them, and the prediction followed it.
    peak = max(seen, key=lambda loads: loads[0].backlog)[0]
    assert peak.backlog >= 3
    latency = peak.latency_s()
    assert latency is not None and latency >= (peak.backlog - 2 + 1) * EDGE_S / 2


def test_a_poisson_trace_below_capacity_is_routed_as_the_router_decided(stack: Settings) -> None:
    """Arrivals at 2 jobs/s on an edge that serves about 6/s: nothing is moved, so load-aware routing decides
    exactly as the load-blind router (every decision ``kept``: its tier is the router's own)."""
    settings = stack
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    arrivals = make_trace("poisson", rate=2.0, duration=8.0, burst_factor=1.0, seed=1)
    ids: list[uuid.UUID] = []
    started = time.monotonic()
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, started + at - time.monotonic()))
        response = client.post("/v1/jobs", json={"prompt": f"a quiet harbour at dawn, boat {i}"})
        assert response.status_code == 202
        ids.append(uuid.UUID(response.get_json()["id"]))
    jobs = wait_ended(settings, ids)
    assert len(jobs) >= 10 and {j.status for j in jobs} == {"succeeded"}
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        decisions = session.scalars(select(Decision).where(Decision.job_id.in_(ids))).all()
    assert {d.budget_state["load"]["action"] for d in decisions} == {"kept"}
    assert all("SLO" not in d.reason for d in decisions)


def test_a_burst_spills_its_largest_gains_until_the_allowance_is_spent_then_degrades(stack: Settings) -> None:
    settings = stack
    sessions = make_session_factory(make_engine(settings.database_url))
    allowance = BurstAllowance(redis_lib.Redis.from_url(settings.broker_url), settings, None)
    # 60 jobs at once: on two edge slots of 0.3 s (or more, with the worker's own work) the SLO of 6 s holds at most
    # 40 of them.
    ids = submit(settings, [f"a burst of {i} red {'very ' * (i % 7)}detailed kites over a field" for i in range(60)])
    jobs = {j.id: j for j in wait_ended(settings, ids)}
    assert {j.status for j in jobs.values()} == {"succeeded"}
    with sessions() as session:
        decisions = session.scalars(select(Decision).where(Decision.job_id.in_(ids))).all()
        made = dict(session.execute(select(Generation.job_id, Generation.tier).where(Generation.job_id.in_(ids))).all())
    actions = {d.job_id: d.budget_state["load"]["action"] for d in decisions}
    spilled = [d for d in decisions if actions[d.job_id] == "spilled"]
    degraded = [d for d in decisions if actions[d.job_id] == "degraded"]
    kept = [d for d in decisions if actions[d.job_id] == "kept"]
    # The allowance paid exactly three spills, each to the cloud, with its reason and the tiers' state.
    assert len(spilled) == SPILLS
    for decision in spilled:
        assert decision.tier == "cloud" and made[decision.job_id] == "cloud"
        assert "spilled to cloud" in decision.reason
        assert decision.budget_state["load"]["tiers"]["edge"]["slots"] == 2
    # Within a batch, spills went to the largest predicted gains among the jobs the edge could not hold.
    batches: dict[float, list[Decision]] = {}
    for decision in decisions:  # a batch's decisions share the batch's routing time
        batches.setdefault(decision.latency_ms, []).append(decision)
    for batch in batches.values():
        moved = [d.score for d in batch if actions[d.job_id] == "spilled"]
        stayed_late = [d.score for d in batch if actions[d.job_id] in ("degraded", "late")]
        if moved and stayed_late:
            assert min(moved) >= max(stayed_late)
    assert allowance.left() == pytest.approx(0.0, abs=1e-9)
    # What operators see of it: /metrics has the tiers' state and the allowance left.
    admin = authorize(create_app(settings).test_client(), create_tenant_key(settings, is_admin=True))
    samples = {
        (s.name, s.labels.get("tier")): s.value
        for family in text_string_to_metric_families(admin.get("/metrics").get_data(as_text=True))
        for s in family.samples
    }
    assert samples[("routet2i_tier_slots", "edge")] == 2
    assert samples[("routet2i_tier_service_seconds", "edge")] >= EDGE_S
    assert samples[("routet2i_burst_allowance_left_usd", None)] == pytest.approx(0.0, abs=1e-9)
    # Then the steps knob: degraded jobs ran on the edge with half their steps.
    assert degraded, "with the allowance spent, late jobs are degraded"
    for decision in degraded:
        assert decision.tier == "edge" and jobs[decision.job_id].steps == 10
        assert "burst allowance spent" in decision.reason
    assert kept and all(d.tier == "edge" and jobs[d.job_id].steps is None for d in kept)
