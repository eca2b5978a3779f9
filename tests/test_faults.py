"""Fault injection against real processes: killed workers, a Redis that forgets, a PostgreSQL that stops.

These tests run their own redis-server and PostgreSQL server (so they can restart them) and their own
Celery worker processes; every job must still reach a terminal state, with exactly one generation and one
cost entry per job.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_lib
from sqlalchemy import func, select, text

from api.app import create_app
from core.settings import Settings
from db.migrate import upgrade
from db.models import CostEntry, Generation, Job, JobEvent
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivatePostgres, PrivateRedis, WorkerPool, wait_for_job, wait_until
from worker.recovery import reconcile
from worker.transport import broker_job_ids, create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    upgrade(server.url)
    yield server
    server.remove()


@pytest.fixture()
def settings_for(private_redis, private_pg, tmp_path, model_cache):  # type: ignore[no-untyped-def]
    redis_lib.Redis.from_url(private_redis.url).flushall()

    def build(**overrides: object) -> Settings:
        return make_settings(
            database_url=private_pg.url,
            broker_url=private_redis.url,
            image_dir=tmp_path / "images",
            cache_dir=model_cache,
            budget_name=f"faults-{uuid.uuid4().hex[:6]}",
            **overrides,
        )

    return build


@pytest.fixture()
def pool(tmp_path) -> Iterator[list[WorkerPool]]:
    pools: list[WorkerPool] = []
    yield pools
    for p in pools:
        p.stop_all()


def counts(settings: Settings, job_id: str) -> dict[str, int]:
    key = uuid.UUID(job_id)
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        result = {
            name: session.scalar(select(func.count()).select_from(model).where(model.job_id == key)) or 0
            for name, model in (("generations", Generation), ("costs", CostEntry))
        }
        result["generating_events"] = (
            session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(JobEvent.job_id == key, JobEvent.status == "generating")
            )
            or 0
        )
    engine.dispose()
    return result


def status_of(settings: Settings, job_id: str) -> str:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        status = session.scalar(select(Job.status).where(Job.id == uuid.UUID(job_id)))
    engine.dispose()
    return str(status)


SLOW_EDGE = {"model": "offline:edge", "steps": 60, "width": 128, "height": 128}
"""About three seconds per image on one CPU thread: long enough to kill a worker in the middle."""


def submit_forced_edge(settings: Settings, prompt: str):  # type: ignore[no-untyped-def]
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, forced_tiers=("edge",)))
    response = client.post("/v1/jobs", json={"prompt": prompt, "tier": "edge"})
    assert response.status_code == 202
    return client, response.get_json()["id"]


def test_sigkill_of_the_generating_child_is_redelivered_once(settings_for, pool, tmp_path) -> None:
    settings = settings_for(edge=SLOW_EDGE)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    workers.start("route")
    edge = workers.start("edge")
    workers.wait_ready()

    client, job_id = submit_forced_edge(settings, "a lighthouse in a storm")
    wait_until(
        lambda: status_of(settings, job_id) == "generating", timeout=120, interval=0.02, what="generation to start"
    )
    child = workers.pids(edge)[1]
    os.kill(child, signal.SIGKILL)

    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert counts(settings, job_id) == {"generations": 1, "costs": 1, "generating_events": 2}
    assert (
        "WorkerLostError" in workers.log(edge) or "exited with" in workers.log(edge) or "signal 9" in workers.log(edge)
    )


def test_sigkill_of_the_whole_worker_is_recovered_by_the_reconciler(settings_for, pool, tmp_path) -> None:
    settings = settings_for(edge=SLOW_EDGE, lease_s=8.0, reconcile_after_s=1.0)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    workers.start("route")
    first = workers.start("edge")
    workers.wait_ready()

    client, job_id = submit_forced_edge(settings, "a castle on a hill")
    wait_until(
        lambda: status_of(settings, job_id) == "generating", timeout=120, interval=0.02, what="generation to start"
    )
    for pid in reversed(workers.pids(first)):
        os.kill(pid, signal.SIGKILL)
    workers.stop(first)

    second = workers.start("edge")
    workers.wait_ready([second])
    time.sleep(settings.lease_s + 0.5)  # the dead worker's lease runs out; its message stays unacknowledged
    report = reconcile(
        make_session_factory(make_engine(settings.database_url)),
        create_celery(settings),
        redis_lib.Redis.from_url(settings.broker_url),
        settings,
    )
    assert report.republished == [job_id]

    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    assert job["redeliveries"] == 1
    assert counts(settings, job_id) == {"generations": 1, "costs": 1, "generating_events": 2}


def test_sigterm_lets_the_worker_finish_its_job(settings_for, pool, tmp_path) -> None:
    settings = settings_for(edge=SLOW_EDGE)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    workers.start("route")
    edge = workers.start("edge")
    workers.wait_ready()

    client, job_id = submit_forced_edge(settings, "a fox in the snow")
    wait_until(
        lambda: status_of(settings, job_id) == "generating", timeout=120, interval=0.02, what="generation to start"
    )
    assert workers.stop(edge, signal.SIGTERM, timeout=120) == 0
    assert status_of(settings, job_id) == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["attempts"] == 1
    assert counts(settings, job_id) == {"generations": 1, "costs": 1, "generating_events": 1}


NULL_TIERS = {
    "edge": {"backend": "null", "model": "null-edge", "width": 64, "height": 64},
    "cloud": {"backend": "null", "model": "null-cloud", "width": 64, "height": 64, "price_per_image": 0.065},
}


def test_redis_restart_loses_queued_messages_but_no_job(settings_for, private_redis, pool, tmp_path) -> None:
    settings = settings_for(**NULL_TIERS, reconcile_after_s=1.0)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    route = workers.start("route")
    workers.wait_ready()
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))

    routed = [client.post("/v1/jobs", json={"prompt": f"routed {i}"}).get_json()["id"] for i in range(10)]
    wait_until(lambda: all(client.get(f"/v1/jobs/{j}").get_json()["tier"] for j in routed), timeout=60, what="routing")
    workers.stop(route)
    waiting = [client.post("/v1/jobs", json={"prompt": f"waiting {i}"}).get_json()["id"] for i in range(5)]
    broker = redis_lib.Redis.from_url(settings.broker_url)
    assert broker_job_ids(broker) == set(routed) | set(waiting)  # every job has a message (some carry several)
    assert broker.llen("route") == 5

    private_redis.restart()
    broker = redis_lib.Redis.from_url(settings.broker_url)
    assert broker.llen("route") == broker.llen("edge") + broker.llen("cloud") == 0

    for queue in ("route", "edge", "cloud"):
        workers.start(queue)
    workers.wait_ready()
    time.sleep(settings.reconcile_after_s + 0.2)
    report = reconcile(
        make_session_factory(make_engine(settings.database_url)), create_celery(settings), broker, settings
    )
    assert sorted(report.republished) == sorted(routed + waiting)

    after = client.post("/v1/jobs", json={"prompt": "after the restart"})
    assert after.status_code == 202  # the API's pooled broker connections recover too

    jobs = [wait_for_job(client, j, timeout=120) for j in [*routed, *waiting, after.get_json()["id"]]]
    assert [j["status"] for j in jobs] == ["succeeded"] * 16
    assert all(counts(settings, j["id"])["generations"] == 1 for j in jobs)


def test_postgres_outage_answers_503_and_loses_nothing(settings_for, private_pg, pool, tmp_path) -> None:
    settings = settings_for(**NULL_TIERS)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    for queue in ("route", "edge", "cloud"):
        workers.start(queue)
    workers.wait_ready()
    app = create_app(settings)
    client = authorize(app.test_client(), create_tenant_key(settings))

    accepted = [client.post("/v1/jobs", json={"prompt": f"outage {i}"}).get_json()["id"] for i in range(20)]
    private_pg.stop()
    try:
        during = client.post("/v1/jobs", json={"prompt": "while down"})
        assert during.status_code == 503
        assert during.get_json()["error"]["code"] == "database_unavailable"
        assert during.headers["Retry-After"] == "5"
        assert client.get(f"/v1/jobs/{accepted[0]}").status_code == 503
        assert client.get("/readyz").status_code == 503
        time.sleep(4)
    finally:
        private_pg.start()

    jobs = [wait_for_job(client, j, timeout=180) for j in accepted]
    assert [j["status"] for j in jobs] == ["succeeded"] * 20
    assert all(counts(settings, j)["generations"] == counts(settings, j)["costs"] == 1 for j in accepted)
    assert client.get("/readyz").status_code == 200


# --- whole workers that die: recovered by the workers' own keepers, under the default recovery settings --------

RECOVERY_DEADLINE_S = 300.0
"""Every job of a dead worker must end within this of a fresh worker starting (heartbeats, leases and the
reconciler at their defaults: docs/reliability.md says where the minutes go)."""


def generated_lines(workers: WorkerPool, nodes: list[str]) -> dict[str, int]:
    """How many times each job's image was generated and recorded, read from the workers' logs."""
    found: dict[str, int] = {}
    for node in nodes:
        for job_id in re.findall(r"worker\.generating: generated\s+job_id=(\S+)", workers.log(node)):
            found[job_id] = found.get(job_id, 0) + 1
    return found


def kill(workers: WorkerPool, node: str) -> None:
    """SIGKILL the worker's main process and its pool at once: nothing is returned to the broker."""
    for pid in reversed(workers.pids(node)):
        os.kill(pid, signal.SIGKILL)
    workers.stop(node)


def test_a_dead_tier_worker_s_running_and_prefetched_jobs_end_within_minutes(settings_for, pool, tmp_path) -> None:
    edge = {**NULL_TIERS["edge"], "service_time_s": 2.0}  # a batch of four takes eight seconds
    settings = settings_for(edge=edge, reconcile_in_workers=True)
    assert settings.edge.max_batch == 4 and (settings.lease_s, settings.worker_dead_after_s) == (120.0, 60.0)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    workers.start("route")
    first = workers.start("edge")
    workers.wait_ready()
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, forced_tiers=("edge",)))
    batch = {"jobs": [{"prompt": f"a dead edge worker's job {i}", "tier": "edge"} for i in range(12)]}
    ids = [item["id"] for item in client.post("/v1/jobs/batch", json=batch).get_json()["items"]]
    broker = redis_lib.Redis.from_url(settings.broker_url)

    def generating() -> list[str]:
        return [j for j in ids if status_of(settings, j) == "generating"]

    # The worker runs one message of four jobs and holds the next one prefetched; the third waits in the queue.
    running = wait_until(lambda: len(g := generating()) == 4 and broker.hlen("unacked") == 2 and g, timeout=60)
    kill(workers, first)
    second = workers.start("edge")
    workers.wait_ready([second])
    started = time.monotonic()

    jobs = [wait_for_job(client, j, timeout=RECOVERY_DEADLINE_S) for j in ids]
    elapsed = time.monotonic() - started
    assert [j["status"] for j in jobs] == ["succeeded"] * 12
    assert elapsed < RECOVERY_DEADLINE_S
    assert generated_lines(workers, [first, second]) == dict.fromkeys(ids, 1)  # never generated twice
    for job_id in ids:
        assert counts(settings, job_id) == {
            "generations": 1,
            "costs": 1,
            "generating_events": 2 if job_id in running else 1,
        }
    assert any("jobs of dead workers published again" in workers.log(node) for node in workers.processes)


def test_a_dead_router_s_running_and_prefetched_jobs_end_within_minutes(settings_for, pool, tmp_path) -> None:
    settings = settings_for(**NULL_TIERS, router="prompt-complexity", reconcile_in_workers=True)
    workers = WorkerPool(settings, log_dir=tmp_path)
    pool.append(workers)
    for queue in ("edge", "cloud"):
        workers.start(queue)
    workers.wait_ready()
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, rate_limit_per_minute=0))
    # 100 jobs in one request: four route messages (the router takes 32 jobs at once).
    batch = {"jobs": [{"prompt": f"a dead router's job {i}"} for i in range(100)]}
    ids = [item["id"] for item in client.post("/v1/jobs/batch", json=batch).get_json()["items"]]
    broker = redis_lib.Redis.from_url(settings.broker_url)
    assert broker.llen("route") == 4

    engine = make_engine(settings.database_url)
    with engine.connect() as locker:
        # Hold the jobs' rows: the router's first batch blocks inside its transaction while it has taken
        # every message (its prefetch is 64), then it dies there.
        locker.execute(select(Job.id).where(Job.id.in_([uuid.UUID(j) for j in ids])).with_for_update())
        first = workers.start("route")
        workers.wait_ready([first])
        wait_until(lambda: broker.llen("route") == 0 and broker.hlen("unacked") == 4, timeout=60, what="prefetch")
        wait_until(lambda: _waiting_on_a_lock(engine), timeout=60, what="the router's batch to block")
        kill(workers, first)
        locker.rollback()
    engine.dispose()
    second = workers.start("route")
    workers.wait_ready([second])
    started = time.monotonic()

    jobs = [wait_for_job(client, j, timeout=RECOVERY_DEADLINE_S) for j in ids]
    assert time.monotonic() - started < RECOVERY_DEADLINE_S
    assert [j["status"] for j in jobs] == ["succeeded"] * 100
    assert all(counts(settings, j)["generations"] == 1 for j in ids)
    assert any("jobs of dead workers published again" in workers.log(node) for node in workers.processes)


def _waiting_on_a_lock(engine) -> bool:  # type: ignore[no-untyped-def]
    """Whether a session of the database waits for a row lock (the router's batch). Asked on a connection of
    its own: a transaction sees one snapshot of the statistics views."""
    with engine.connect() as connection:
        waiting = connection.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))
        return bool(waiting.scalar())
