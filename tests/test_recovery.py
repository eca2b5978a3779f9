"""The reconciler, leases, attempt limits and the dead-letter queue, on real PostgreSQL and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis

from core.settings import Settings
from db.jobs import create_job, get_job
from db.lifecycle import transition
from db.models import JobStatus, utcnow
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant
from tests.support import PrivateRedis
from worker.context import WorkerContext
from worker.generating import generate_job
from worker.recovery import reconcile
from worker.transport import broker_job_ids, create_celery, job_ids_of

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[PrivateRedis]:
    # A broker of its own: the session's worker processes must not consume what these tests publish.
    server = PrivateRedis(tmp_path_factory.mktemp("recovery-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def env(pg_settings: Settings, broker: PrivateRedis):  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(broker.url)
    client.flushdb()
    settings = pg_settings.model_copy(
        update={"broker_url": broker.url, "reconcile_after_s": 60.0, "max_redeliveries": 2}
    )
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        tenant = create_tenant(session, name=f"r-{uuid.uuid4().hex[:8]}")
    return settings, sessions, create_celery(settings), client, tenant.id


def new_job(sessions, tenant_id, *, age_s: float = 600.0, status: JobStatus = JobStatus.QUEUED) -> str:  # type: ignore[no-untyped-def]
    with transaction(sessions) as session:
        job = create_job(session, tenant_id=tenant_id, prompt="a lost job", seed=1)
        job.enqueued_at = utcnow() - timedelta(seconds=age_s)
        if status != JobStatus.QUEUED:
            transition(session, job, status)
        return str(job.id)


def reload(sessions, job_id: str):  # type: ignore[no-untyped-def]
    with sessions() as session:
        return get_job(session, uuid.UUID(job_id))


def test_lost_job_is_republished_and_a_queued_one_left_alone(env) -> None:
    settings, sessions, app, client, tenant_id = env
    lost = new_job(sessions, tenant_id)
    fresh = new_job(sessions, tenant_id, age_s=1.0)
    report = reconcile(sessions, app, client, settings)
    assert lost in report.republished and fresh not in report.republished
    assert lost in broker_job_ids(client)
    job = reload(sessions, lost)
    assert job.redeliveries == 1 and job.status == "queued"

    # Now it is in the route queue: however stale, the next pass must not publish it again.
    later = utcnow() + timedelta(seconds=10 * settings.reconcile_after_s)
    again = reconcile(sessions, app, client, settings, now=later)
    assert lost not in again.republished and again.still_queued >= 1
    assert [job_id for raw in client.lrange("route", 0, -1) for job_id in job_ids_of(raw)].count(lost) == 1


def test_backoff_doubles_and_exhausted_jobs_are_dead_lettered(env) -> None:
    settings, sessions, app, client, tenant_id = env
    job_id = new_job(sessions, tenant_id, age_s=0.0)
    enqueued = utcnow()
    for redelivery in range(settings.max_redeliveries):
        client.flushdb()  # the broker loses the message every time
        wait = settings.reconcile_after_s * 2**redelivery
        too_soon = enqueued + timedelta(seconds=wait * 0.5)
        assert job_id not in reconcile(sessions, app, client, settings, now=too_soon).republished
        enqueued = enqueued + timedelta(seconds=wait * 1.01)
        assert job_id in reconcile(sessions, app, client, settings, now=enqueued).republished
    client.flushdb()
    now = enqueued + timedelta(seconds=settings.reconcile_after_s * 2**settings.max_redeliveries * 1.01)
    report = reconcile(sessions, app, client, settings, now=now)
    assert job_id in report.dead_lettered
    job = reload(sessions, job_id)
    assert job.status == "failed" and job.dead_lettered_at is not None and "dead-lettered" in job.error


def test_expired_generation_lease_is_republished_to_its_step(env) -> None:
    settings, sessions, app, client, tenant_id = env
    job_id = new_job(sessions, tenant_id, status=JobStatus.GENERATING)
    with transaction(sessions) as session:
        job = get_job(session, uuid.UUID(job_id))
        job.lease_owner, job.lease_until = "dead-worker", utcnow() - timedelta(seconds=1)
    assert job_id in reconcile(sessions, app, client, settings).republished
    assert client.llen("route") == 1  # no decision yet, so it goes back to routing


def test_a_live_lease_keeps_a_duplicate_message_from_generating(env) -> None:
    settings, sessions, app, _, tenant_id = env
    job_id = new_job(sessions, tenant_id, status=JobStatus.GENERATING)
    with transaction(sessions) as session:
        job = get_job(session, uuid.UUID(job_id))
        job.tier, job.attempts = "edge", 1
        job.lease_owner, job.lease_until = "delivery-a", utcnow() + timedelta(minutes=5)
    ctx = WorkerContext(settings, app)
    assert generate_job(ctx, job_id, "edge", delivery="delivery-b") is False
    job = reload(sessions, job_id)
    assert (job.attempts, job.lease_owner, job.status) == (1, "delivery-a", "generating")


def test_too_many_attempts_dead_letter_the_job(env) -> None:
    settings, sessions, app, _, tenant_id = env
    job_id = new_job(sessions, tenant_id)
    with transaction(sessions) as session:
        job = get_job(session, uuid.UUID(job_id))
        job.tier, job.attempts = "edge", settings.max_attempts
    assert generate_job(WorkerContext(settings, app), job_id, "edge", delivery="x") is False
    job = reload(sessions, job_id)
    assert job.status == "failed" and job.dead_lettered_at is not None
    assert f"started {settings.max_attempts} times" in job.error


def test_dlq_cli_lists_and_replays(env) -> None:
    settings, sessions, _, client, tenant_id = env
    job_id = new_job(sessions, tenant_id)
    with transaction(sessions) as session:
        job = get_job(session, uuid.UUID(job_id))
        job.dead_lettered_at = utcnow()
        transition(session, job, JobStatus.FAILED, error="dead-lettered: test")
    healthy = new_job(sessions, tenant_id, age_s=1)
    cli_env = {**os.environ, **settings.to_env()}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "dlq", *args], env=cli_env, capture_output=True, text=True)

    # Every dead letter of the session's database (other tests' too, some stamped in the future): all of them.
    listed = json.loads(cli("list", "--json", "--limit", "10000").stdout)
    assert job_id in {row["id"] for row in listed}

    refused = cli("replay", healthy)
    assert refused.returncode == 2 and "not dead-lettered" in refused.stderr
    assert cli("replay", "nonsense").returncode == 2

    replayed = cli("replay", job_id, "--tier", "cloud")
    assert replayed.returncode == 0 and f"{job_id} -> cloud.generate" in replayed.stdout
    job = reload(sessions, job_id)
    assert (job.status, job.tier, job.dead_lettered_at, job.error, job.attempts) == ("queued", "cloud", None, None, 0)
    assert job_id in broker_job_ids(client) and client.llen("cloud") == 1
    assert job_id not in {row["id"] for row in json.loads(cli("list", "--json", "--limit", "10000").stdout)}


def test_a_message_for_another_tier_is_ignored(env) -> None:
    settings, sessions, app, _, tenant_id = env
    job_id = new_job(sessions, tenant_id)
    with transaction(sessions) as session:
        get_job(session, uuid.UUID(job_id)).tier = "cloud"  # e.g. replayed to the cloud after an edge message
    assert generate_job(WorkerContext(settings, app), job_id, "edge", delivery="stale") is False
    job = reload(sessions, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("queued", 0, None)


def test_every_job_of_a_message_carrying_many_is_seen_in_the_broker(env) -> None:
    from worker.transport import ROUTE_TASK, publish_many

    _, _, app, client, _ = env
    ids = [str(uuid.uuid4()) for _ in range(40)]  # their repr is far longer than Celery's argsrepr keeps
    publish_many(app, [(ROUTE_TASK, ids, {})])
    assert client.llen("route") == 1
    assert job_ids_of(client.lrange("route", 0, -1)[0]) == ids
    assert set(ids) <= broker_job_ids(client)
    assert job_ids_of(b"not a message") == []
