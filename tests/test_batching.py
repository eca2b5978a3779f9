"""Dynamic batching through real worker processes: messages waiting for a pool process run together, an idle
worker runs each message alone, a killed pool process gives its whole batch back, and every job still ends
once, with one decision, one generation and one cost entry."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.models import CostEntry, Decision, Generation, Job, JobEvent
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, wait_for_job, wait_until
from worker.tasks import prefetch_multiplier

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NULL = {"backend": "null", "width": 64, "height": 64}


@pytest.fixture()
def broker(tmp_path) -> Iterator[PrivateRedis]:  # type: ignore[no-untyped-def]
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def settings_for(pg_settings: Settings, broker: PrivateRedis, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "edge": {**NULL, "model": "null-edge"},
        "cloud": {**NULL, "model": "null-cloud"},
        "scorer": {"enabled": False},
        "router": "prompt-complexity",
        "budget_name": f"batching-{uuid.uuid4().hex[:6]}",
        "rate_limit_per_minute": 0,
        **overrides,
    }
    # The session's database and image store: the dashboard test shows every job's image.
    return make_settings(
        database_url=pg_settings.database_url,
        broker_url=broker.url,
        image_dir=pg_settings.image_dir,
        cache_dir=pg_settings.cache_dir,
        **values,
    )


def jobs_of(settings: Settings, ids: list[str]) -> dict[str, Any]:
    """Per job: status, attempts, and how many decisions, generations, cost entries and batches it has."""
    keys = [uuid.UUID(i) for i in ids]
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:

        def per_job(model: Any) -> dict[uuid.UUID, int]:
            rows = session.execute(
                select(model.job_id, func.count()).where(model.job_id.in_(keys)).group_by(model.job_id)
            ).all()
            return {job_id: n for job_id, n in rows}

        decisions, generations, costs = per_job(Decision), per_job(Generation), per_job(CostEntry)
        batches = {
            job_id: inputs.get("batch")
            for job_id, inputs in session.execute(
                select(Decision.job_id, Decision.inputs).where(Decision.job_id.in_(keys))
            )
        }
        generating = {
            job_id: detail
            for job_id, detail in session.execute(
                select(JobEvent.job_id, JobEvent.detail)
                .where(JobEvent.job_id.in_(keys), JobEvent.status == "generating")
                .order_by(JobEvent.id)
            )
        }
        rows = session.execute(select(Job.id, Job.status, Job.attempts).where(Job.id.in_(keys))).all()
        result = {
            str(job_id): {
                "status": status,
                "attempts": attempts,
                "decisions": decisions.get(job_id, 0),
                "generations": generations.get(job_id, 0),
                "costs": costs.get(job_id, 0),
                "route_batch": batches.get(job_id),
                "generate_batch": (generating.get(job_id) or {}).get("batch"),
            }
            for job_id, status, attempts in rows
        }
    engine.dispose()
    return result


def all_terminal(settings: Settings, ids: list[str]) -> bool:
    return all(j["status"] in ("succeeded", "failed") for j in jobs_of(settings, ids).values())


def test_route_workers_prefetch_a_batch_and_tier_workers_the_next_message(tmp_path) -> None:
    settings = make_settings(
        database_url="sqlite://", broker_url="redis://", image_dir=tmp_path, cache_dir=tmp_path, route_batch=16
    )
    assert prefetch_multiplier(settings, "route") == 32
    assert prefetch_multiplier(settings, "edge") == prefetch_multiplier(settings, "cloud") == 2


def test_waiting_messages_run_in_batches_and_each_job_ends_once(pg_settings, broker, tmp_path) -> None:
    settings = settings_for(pg_settings, broker, route_batch=8, edge={**NULL, "model": "null-edge", "max_batch": 5})
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    workers = WorkerPool(settings, log_dir=tmp_path)
    try:
        # Every message is waiting before any worker consumes: the route queue is taken in batches of 8.
        ids = [client.post("/v1/jobs", json={"prompt": f"a lantern number {i}"}).get_json()["id"] for i in range(30)]
        for queue in ("route", "edge", "cloud"):
            workers.start(queue)
        workers.wait_ready()
        wait_until(lambda: all_terminal(settings, ids), timeout=120, interval=0.2, what="every job to finish")
    finally:
        workers.stop_all()

    jobs = jobs_of(settings, ids)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    assert all(j["decisions"] == j["generations"] == j["costs"] == 1 for j in jobs.values())
    route_batches = [j["route_batch"] for j in jobs.values()]
    assert max(route_batches) == 8 and min(route_batches) >= 1
    assert sum(1 for b in route_batches if b > 1) >= 20  # nearly all of them went in batches
    edge_batches = [j["generate_batch"] for j in jobs.values() if j["generate_batch"] is not None]
    assert edge_batches and max(edge_batches) <= 5


def test_a_batch_submission_travels_as_few_messages_as_the_batch_sizes_allow(pg_settings, broker, tmp_path) -> None:
    import redis as redis_lib

    edge = {**NULL, "model": "null-edge", "max_batch": 4}
    settings = settings_for(pg_settings, broker, route_batch=8, edge=edge, cloud={**edge, "model": "c"})
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    queues = redis_lib.Redis.from_url(settings.broker_url)
    workers = WorkerPool(settings, log_dir=tmp_path)
    try:
        response = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": f"a tower number {i}"} for i in range(30)]})
        ids = [item["id"] for item in response.get_json()["items"]]
        assert queues.llen("route") == 4  # 8 + 8 + 8 + 6 jobs
        workers.start("route")
        workers.wait_ready()
        wait_until(lambda: all(j["decisions"] for j in jobs_of(settings, ids).values()), timeout=60, what="routing")
        # Each route batch handed its jobs to the tiers in messages of at most 4.
        assert queues.llen("edge") + queues.llen("cloud") <= 4 * 3 + 2 * 4
        for queue in ("edge", "cloud"):
            workers.start(queue)
        workers.wait_ready()
        wait_until(lambda: all_terminal(settings, ids), timeout=120, interval=0.2, what="every job to finish")
    finally:
        workers.stop_all()
    jobs = jobs_of(settings, ids)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    assert all(j["decisions"] == j["generations"] == j["costs"] == 1 for j in jobs.values())
    assert sorted({j["route_batch"] for j in jobs.values()}) == [6, 8]
    assert max(j["generate_batch"] for j in jobs.values()) <= 4


def test_an_idle_worker_runs_each_message_alone(pg_settings, broker, tmp_path) -> None:
    settings = settings_for(pg_settings, broker)
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    workers = WorkerPool(settings, log_dir=tmp_path)
    try:
        for queue in ("route", "edge", "cloud"):
            workers.start(queue)
        workers.wait_ready()
        ids = []
        for i in range(5):
            ids.append(client.post("/v1/jobs", json={"prompt": f"a kite number {i}"}).get_json()["id"])
            assert wait_for_job(client, ids[-1], timeout=60)["status"] == "succeeded"
    finally:
        workers.stop_all()
    jobs = jobs_of(settings, ids)
    assert [j["route_batch"] for j in jobs.values()] == [1] * 5
    assert [j["generate_batch"] for j in jobs.values()] == [1] * 5


SLOW_EDGE = {"model": "offline:edge", "steps": 60, "width": 128, "height": 128, "max_batch": 3}
"""About three seconds per image on one CPU thread, three images per batch."""


def test_a_killed_pool_process_gives_back_its_whole_batch(pg_settings, broker, tmp_path) -> None:
    settings = settings_for(pg_settings, broker, edge=SLOW_EDGE)
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, forced_tiers=("edge",)))
    workers = WorkerPool(settings, log_dir=tmp_path)
    try:
        ids = [
            client.post("/v1/jobs", json={"prompt": f"a windmill number {i}", "tier": "edge"}).get_json()["id"]
            for i in range(4)
        ]
        # The route worker takes the first alone and the other three together (they arrive while it works), so
        # the edge queue gets a message of one job and a message of three.
        workers.start("route")
        workers.wait_ready()
        wait_until(
            lambda: all(j["decisions"] == 1 for j in jobs_of(settings, ids).values()), timeout=60, what="routing"
        )
        edge = workers.start("edge")
        workers.wait_ready([edge])

        def batch_of_three() -> set[str]:
            jobs = jobs_of(settings, ids)
            running = {i for i, j in jobs.items() if j["status"] == "generating" and j["generate_batch"] == 3}
            return running if len(running) == 3 else set()

        batch = wait_until(batch_of_three, timeout=120, interval=0.02, what="a batch of three to start generating")
        os.kill(workers.pids(edge)[1], signal.SIGKILL)
        wait_until(lambda: all_terminal(settings, ids), timeout=300, interval=0.2, what="every job to finish")
        log = workers.log(edge)
    finally:
        workers.stop_all()

    jobs = jobs_of(settings, ids)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    # The killed batch's jobs were each redelivered once and are billed once; the other ran once.
    assert {i: j["attempts"] for i, j in jobs.items()} == {i: 2 if i in batch else 1 for i in ids}
    assert all(j["generations"] == j["costs"] == 1 for j in jobs.values())
    assert "requeued" in log
