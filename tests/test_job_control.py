"""Job control against real workers: cancel, deadlines and signed webhooks retried until the receiver answers."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask, Response, request
from PIL import Image
from sqlalchemy import func, select
from werkzeug.serving import make_server

from api.app import create_app
from core.settings import Settings
from db.models import CostEntry, Decision, Generation, Job, JobEvent, utcnow
from db.redis_state import SpendLedger, connect
from db.session import make_engine, make_session_factory, transaction
from db.tenants import get_tenant_by_name, set_webhooks
from tests.conftest import authorize, create_tenant_key
from tests.servers import Process, cli_env
from tests.support import PrivateRedis, WorkerPool, free_port, wait_for_job, wait_until
from worker.recovery import reconcile
from worker.transport import create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 0.065
SLOW = 3.0
"""Seconds the null generators spend per image: long enough to cancel a job while it generates."""


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[PrivateRedis]:
    # A broker of its own: the session's workers must not take these tests' jobs.
    server = PrivateRedis(tmp_path_factory.mktemp("control-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def settings(pg_settings: Settings, broker: PrivateRedis) -> Settings:
    redis_lib.Redis.from_url(broker.url).flushdb()
    null = {"backend": "null", "width": 64, "height": 64, "service_time_s": SLOW}
    return pg_settings.model_copy(
        update={
            "broker_url": broker.url,
            "edge": pg_settings.edge.model_copy(update={**null, "model": "null-edge"}),
            "cloud": pg_settings.cloud.model_copy(update={**null, "model": "null-cloud", "price_per_image": PRICE}),
            "router": "prompt-complexity",
            "scorer": pg_settings.scorer.model_copy(update={"enabled": False}),  # workers ready at once
            "budget_name": f"control-{uuid.uuid4().hex[:6]}",
            "cloud_spend_limit_usd": 10.0,
            "webhook_retry_s": 0.5,
            "webhook_timeout_s": 1.0,
        }
    )


@pytest.fixture()
def workers(settings: Settings, tmp_path) -> Iterator[WorkerPool]:
    pool = WorkerPool(settings, log_dir=tmp_path)
    yield pool
    pool.stop_all()


def rows(settings: Settings, model: Any, job_id: str) -> int:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        count = session.scalar(select(func.count()).select_from(model).where(model.job_id == uuid.UUID(job_id)))
    engine.dispose()
    return int(count or 0)


def job_row(settings: Settings, job_id: str) -> Job:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        job = session.get_one(Job, uuid.UUID(job_id))
    engine.dispose()
    return job


def generating_events(settings: Settings, job_id: str) -> int:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        query = (
            select(func.count())
            .select_from(JobEvent)
            .where(JobEvent.job_id == uuid.UUID(job_id), JobEvent.status == "generating")
        )
        count = session.scalar(query)
    engine.dispose()
    return int(count or 0)


# --- cancel ---------------------------------------------------------------------------------------------


def test_a_cancelled_queued_job_never_generates(settings: Settings, workers: WorkerPool) -> None:
    workers.start("edge")
    workers.start("cloud")
    workers.wait_ready()
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    cancelled = client.post("/v1/jobs", json={"prompt": "a job its client changes its mind about"}).get_json()["id"]
    kept = client.post("/v1/jobs", json={"prompt": "a job that runs"}).get_json()["id"]

    answer = client.post(f"/v1/jobs/{cancelled}/cancel")
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "cancelled"
    assert answer.get_json()["events"][-1]["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200  # cancelling twice is harmless

    workers.start("route")  # the router now takes both messages
    workers.wait_ready()
    assert wait_for_job(client, kept, timeout=120)["status"] == "succeeded"
    assert client.get(f"/v1/jobs/{cancelled}").get_json()["status"] == "cancelled"
    assert rows(settings, Decision, cancelled) == rows(settings, Generation, cancelled) == 0

    ended = client.post(f"/v1/jobs/{kept}/cancel")
    assert ended.status_code == 409 and ended.get_json()["error"]["code"] == "already_ended"
    other = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    assert other.post(f"/v1/jobs/{kept}/cancel").status_code == 404  # another tenant's job is nobody's


def test_a_job_cancelled_while_generating_records_no_image_and_gives_back_its_reservation(
    settings: Settings, workers: WorkerPool
) -> None:
    for queue in ("route", "edge", "cloud"):
        workers.start(queue)
    workers.wait_ready()
    # ρ = 1: the router sends the job to the cloud, reserving its price from the spend limit.
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, cloud_budget=1.0))
    ledger = SpendLedger.for_settings(settings, connect(settings.state_redis_url))
    assert ledger is not None
    spent_before = ledger.spent()
    prompt = "a very detailed cathedral interior with stained glass windows, pillars, pews and a choir at dusk"
    job_id = client.post("/v1/jobs", json={"prompt": prompt}).get_json()["id"]
    wait_until(lambda: job_row(settings, job_id).status == "generating", timeout=60, interval=0.05, what="generation")
    assert job_row(settings, job_id).tier == "cloud" and job_row(settings, job_id).reserved_usd == PRICE
    assert ledger.spent() == pytest.approx(spent_before + PRICE)

    assert client.post(f"/v1/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"
    # The worker finishes its image, finds the job cancelled and discards it: a local tier bills nothing.
    wait_until(lambda: job_row(settings, job_id).reserved_usd == 0, timeout=60, what="the reservation to go back")
    assert ledger.spent() == pytest.approx(spent_before)
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "cancelled" and job["result"] is None
    assert rows(settings, Generation, job_id) == rows(settings, CostEntry, job_id) == 0
    assert generating_events(settings, job_id) == 1
    assert any("image discarded" in workers.log(node) for node in workers.processes)


class SlowImageApi:
    """A paid image API that takes its time: an image it produced was paid for, cancelled or not."""

    def __init__(self) -> None:
        self.calls = 0
        app = Flask("slow-image-api")

        @app.post("/generate")
        def generate() -> Response:
            self.calls += 1
            time.sleep(SLOW)
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
            return Response(buffer.getvalue(), mimetype="image/png")

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/generate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_an_image_a_paid_api_made_for_a_cancelled_job_is_billed_as_wasted(settings: Settings, tmp_path) -> None:
    api = SlowImageApi()
    try:
        cloud = settings.cloud.model_copy(update={"backend": "http", "url": api.url, "max_retries": 0})
        paid = settings.model_copy(update={"cloud": cloud})
        workers = WorkerPool(paid, log_dir=tmp_path)
        try:
            workers.start("cloud")
            workers.wait_ready()
            client = authorize(create_app(paid).test_client(), create_tenant_key(paid, forced_tiers=("cloud",)))
            job_id = client.post("/v1/jobs", json={"prompt": "a paid image", "tier": "cloud"}).get_json()["id"]
            # No router runs: a forced job is decided by the test's own route pass.
            from worker.context import WorkerContext
            from worker.routing import route_job

            route_job(WorkerContext(paid, create_celery(paid)), job_id)
            wait_until(lambda: api.calls == 1, timeout=60, interval=0.05, what="the paid API to be called")
            assert client.post(f"/v1/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"
            wait_until(lambda: rows(paid, CostEntry, job_id) == 1, timeout=60, what="the wasted image to be billed")
        finally:
            workers.stop_all()
    finally:
        api.server.shutdown()
    engine = make_engine(paid.database_url)
    with make_session_factory(engine)() as session:
        generation = session.scalars(select(Generation).where(Generation.job_id == uuid.UUID(job_id))).one()
        cost = session.scalars(select(CostEntry).where(CostEntry.job_id == uuid.UUID(job_id))).one()
    engine.dispose()
    assert generation.role == "wasted" and float(cost.usd) == pytest.approx(PRICE)
    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert job["status"] == "cancelled" and job["result"] is None  # the user receives nothing


# --- deadlines ------------------------------------------------------------------------------------------


def test_a_job_past_its_deadline_ends_expired_and_never_generates(settings: Settings, workers: WorkerPool) -> None:
    workers.start("edge")
    workers.wait_ready()
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, forced_tiers=("edge",)))
    # No router yet: the job waits on the route queue past its deadline, and its status says so at once.
    unrouted = client.post("/v1/jobs", json={"prompt": "a job nobody routes", "deadline_s": 0.5}).get_json()["id"]
    time.sleep(0.7)
    assert client.get(f"/v1/jobs/{unrouted}").get_json()["status"] == "expired"
    workers.start("route")
    workers.wait_ready()
    # The edge worker is busy with a job for SLOW seconds; the next one waits behind it past its deadline.
    busy = client.post("/v1/jobs", json={"prompt": "a job that takes its time", "tier": "edge"}).get_json()["id"]
    wait_until(lambda: job_row(settings, busy).status == "generating", timeout=60, interval=0.05, what="generation")
    late = client.post("/v1/jobs", json={"prompt": "a hurried job", "tier": "edge", "deadline_s": 1.0}).get_json()["id"]

    assert wait_for_job(client, busy, timeout=120)["status"] == "succeeded"
    job = wait_for_job(client, late, timeout=60)
    assert job["status"] == "expired" and job["error"].startswith("expired: its deadline passed")
    broker = redis_lib.Redis.from_url(settings.broker_url)
    wait_until(lambda: broker.hlen("unacked") == broker.llen("edge") == 0, timeout=30, what="its message to be taken")
    assert generating_events(settings, late) == 0 and rows(settings, Generation, late) == 0
    assert rows(settings, Decision, unrouted) == 0


def test_a_generating_job_past_its_deadline_expires_and_its_image_is_discarded(settings: Settings, tmp_path) -> None:
    slow = settings.model_copy(update={"edge": settings.edge.model_copy(update={"service_time_s": 8.0})})
    workers = WorkerPool(slow, log_dir=tmp_path)
    try:
        for queue in ("route", "edge"):
            workers.start(queue)
        workers.wait_ready()
        client = authorize(create_app(slow).test_client(), create_tenant_key(slow, forced_tiers=("edge",)))
        job = {"prompt": "a slow job", "tier": "edge", "deadline_s": 4.0}
        job_id = client.post("/v1/jobs", json=job).get_json()["id"]
        wait_until(lambda: job_row(slow, job_id).status == "generating", timeout=4, interval=0.05, what="generation")
        wait_until(lambda: job_row(slow, job_id).deadline_at < utcnow(), timeout=5, what="the deadline")  # type: ignore[operator]
        # The reconciler (run here by hand) ends the unattended job at its deadline; the worker then discards it.
        report = reconcile(
            make_session_factory(make_engine(slow.database_url)),
            create_celery(slow),
            redis_lib.Redis.from_url(slow.broker_url),
            slow,
        )
        assert job_id in report.expired
        assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "expired"
        wait_until(lambda: job_row(slow, job_id).lease_owner is None, timeout=60, what="the worker to discard it")
        assert rows(slow, Generation, job_id) == 0
        assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "expired"
        assert any("image discarded" in workers.log(node) for node in workers.processes)
    finally:
        workers.stop_all()


# --- webhooks -------------------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver that checks each signature as a receiver would, on a port chosen up front (so it can
    be down first and come up later)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        app = Flask("receiver")

        @app.post("/hooks")
        def hook() -> Response:
            body = request.get_data()
            fields = dict(part.split("=", 1) for part in request.headers["RouteT2I-Signature"].split(","))
            expected = hmac.new(self.secret.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, fields["v1"]) or abs(time.time() - int(fields["t"])) > 300:
                return Response("bad signature", status=400)
            self.received.append({**json.loads(body), "signature": request.headers["RouteT2I-Signature"]})
            return Response(status=204)

        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def tenant_with_webhooks(settings: Settings, hosts: tuple[str, ...]) -> tuple[str, str]:
    """A new tenant whose webhooks may call ``hosts``: its API key and its webhook secret."""
    name = f"hooks-{uuid.uuid4().hex[:8]}"
    key = create_tenant_key(settings, name)
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        tenant = get_tenant_by_name(session, name)
        assert tenant is not None
        secret = set_webhooks(tenant, hosts=hosts)
    engine.dispose()
    assert secret is not None
    return key, secret


def test_webhooks_are_signed_retried_until_the_receiver_answers_and_listed(settings: Settings, tmp_path) -> None:
    fast = settings.model_copy(
        update={
            "edge": settings.edge.model_copy(update={"service_time_s": 0.0}),
            "cloud": settings.cloud.model_copy(update={"service_time_s": 0.0}),
        }
    )
    down, up = Receiver(""), Receiver("")
    key, secret = tenant_with_webhooks(fast, (f"127.0.0.1:{down.port}", f"127.0.0.1:{up.port}"))
    down.secret = up.secret = secret
    up.start()
    dispatcher = Process(
        [sys.executable, "-m", "cli", "webhooks", "--concurrency", "4"],
        env=cli_env(fast),
        log_path=tmp_path / "hooks.log",
    )
    pool = WorkerPool(fast, log_dir=tmp_path / "workers")
    (tmp_path / "workers").mkdir()
    try:
        for queue in ("route", "edge", "cloud"):
            pool.start(queue)
        pool.wait_ready()
        client = authorize(create_app(fast).test_client(), key)
        refused = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": "http://example.com/hooks"})
        assert refused.status_code == 403 and refused.get_json()["error"]["field"] == "webhook_url"
        bad = client.post("/v1/jobs", json={"prompt": "x", "webhook_url": "ftp://127.0.0.1/hooks"})
        assert bad.status_code == 422 and bad.get_json()["error"]["field"] == "webhook_url"

        late = client.post("/v1/jobs", json={"prompt": "a job for a receiver that is down", "webhook_url": down.url})
        prompt = "a job for a receiver that is up"
        on_time = client.post("/v1/jobs", json={"prompt": prompt, "webhook_url": up.url})
        late_id, on_time_id = late.get_json()["id"], on_time.get_json()["id"]
        assert wait_for_job(client, late_id)["status"] == wait_for_job(client, on_time_id)["status"] == "succeeded"

        # The receiver that is down holds up nobody: the other delivery arrives at once, signed.
        started = time.monotonic()
        wait_until(lambda: up.received, timeout=30, what="the live receiver's delivery")
        assert time.monotonic() - started < 10
        (delivered,) = up.received
        assert delivered["event"] == "job.succeeded" and delivered["job"]["id"] == on_time_id
        assert delivered["job"]["status"] == "succeeded" and delivered["job"]["result"]["image_url"]
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", delivered["signature"])

        wait_until(
            lambda: len(client.get(f"/v1/jobs/{late_id}/deliveries").get_json()["items"][0]["attempt_log"]) >= 2,
            timeout=30,
            what="attempts at the receiver that is down",
        )
        down.start()  # the receiver comes back: the next attempt delivers, nothing is lost
        wait_until(lambda: down.received, timeout=30, what="the delivery after the receiver came back")
        assert down.received[0]["job"]["id"] == late_id
        (record,) = client.get(f"/v1/jobs/{late_id}/deliveries").get_json()["items"]
        assert record["state"] == "delivered" and record["event"] == "succeeded" and record["url"] == down.url
        log = record["attempt_log"]
        assert log[-1]["status_code"] == 204 and all(a["status_code"] is None and a["error"] for a in log[:-1])
        assert [a["attempt"] for a in log] == list(range(1, len(log) + 1))
    finally:
        pool.stop_all()
        dispatcher.stop()
        up.stop()
        down.stop()


def test_a_cancelled_job_posts_its_cancellation(settings: Settings, tmp_path) -> None:
    receiver = Receiver("")
    key, receiver.secret = tenant_with_webhooks(settings, (f"127.0.0.1:{receiver.port}",))
    receiver.start()
    dispatcher = Process(
        [sys.executable, "-m", "cli", "webhooks"], env=cli_env(settings), log_path=tmp_path / "hooks.log"
    )
    try:
        client = authorize(create_app(settings).test_client(), key)
        job_id = client.post("/v1/jobs", json={"prompt": "never mind", "webhook_url": receiver.url}).get_json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/cancel").get_json()["status"] == "cancelled"
        wait_until(lambda: receiver.received, timeout=30, what="the cancellation's delivery")
        assert receiver.received[0]["event"] == "job.cancelled" and receiver.received[0]["job"]["id"] == job_id
    finally:
        dispatcher.stop()
        receiver.stop()
