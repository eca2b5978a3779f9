"""A cloud spend limit per period, enforced by a real route worker and counted by a real cloud worker.

The cloud tier is a hosted image API stand-in (a real HTTP server) billed per image and per second, so the
spend ledger must hold the routers' reservations plus what the cloud worker billed beyond them.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.app import create_app
from db.models import CostEntry, Decision, Job, JobEvent
from db.session import make_engine, make_session_factory
from db.state_redis import connect
from routet2i.settings import Settings
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.servers import ApiServer, cli_env
from tests.support import PrivateRedis, WorkerPool, wait_until
from tests.test_http_backend import ImageApi
from worker.budget_store import SpendLedger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 0.065
PER_SECOND = 1.0
IMAGES = 4
LIMIT = IMAGES * PRICE + 0.001  # four reservations fit, a fifth does not
JOBS = 12
PERIOD_S = 31 * 86_400  # the longest period: a test that straddles a period's end is all but impossible


@pytest.fixture(scope="module")
def image_api() -> Iterator[ImageApi]:
    api = ImageApi()
    yield api
    api.close()


@pytest.fixture(scope="module")
def spend_stack(pg_settings: Settings, tmp_path_factory, model_cache, image_api: ImageApi) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    broker = PrivateRedis(tmp_path_factory.mktemp("spend-redis"))
    broker.start()
    api = image_api
    settings = make_settings(
        database_url=pg_settings.database_url,
        broker_url=broker.url,
        image_dir=pg_settings.image_dir,  # the session's image store: the dashboard test shows every job's image
        cache_dir=model_cache,
        edge={"backend": "null", "model": "null-edge", "width": 64, "height": 64},
        cloud={
            "backend": "http",
            "url": api.url,
            "model": "hosted-model",
            "width": 64,
            "height": 64,
            "price_per_image": PRICE,
            "price_per_gpu_second": PER_SECOND,
        },
        scorer={"enabled": False},
        router="prompt-complexity",
        cloud_budget=1.0,  # the share would send nearly every job to the cloud: only the money stops them
        cloud_spend_limit_usd=LIMIT,
        cloud_spend_period_s=PERIOD_S,
        budget_name=f"spend-{uuid.uuid4().hex[:6]}",
        rate_limit_per_minute=0,
    )
    pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("spend-logs"))
    try:
        pool.start_all()
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


@pytest.fixture
def ledger(spend_stack: Settings) -> Iterator[SpendLedger]:
    """The stack's spend ledger, starting the test with nothing spent this period (and left that way)."""
    spend = SpendLedger.for_settings(spend_stack, connect(spend_stack.state_redis_url))
    assert spend is not None
    spend.client.delete(spend.key())
    yield spend
    spend.client.delete(spend.key())


def test_cloud_images_stop_at_the_spend_limit_and_the_ledger_matches_the_bill(
    spend_stack: Settings, ledger: SpendLedger, tmp_path: Path
) -> None:
    settings = spend_stack
    app = create_app(settings)
    client = authorize(app.test_client(), create_tenant_key(settings))
    prompts = [f"a crowded night market with {n} lanterns, a juggler, a cat and a bicycle" for n in range(JOBS)]
    response = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": p} for p in prompts]})
    assert response.status_code == 202, response.get_json()
    ids = [uuid.UUID(item["id"]) for item in response.get_json()["items"]]

    sessions = make_session_factory(make_engine(settings.database_url))

    def finished() -> list[Job] | None:
        with sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        return jobs if all(j.finished_at is not None for j in jobs) else None

    jobs = wait_until(finished, timeout=180, interval=0.5, what=f"{JOBS} jobs to finish")
    assert all(j.status == "succeeded" for j in jobs), [(j.status, j.error) for j in jobs]

    with sessions() as session:
        decisions = list(session.scalars(select(Decision).where(Decision.job_id.in_(ids))))
        billed = session.scalar(
            select(func.sum(CostEntry.usd)).where(CostEntry.job_id.in_(ids), CostEntry.tier == "cloud")
        )
    cloud = [d for d in decisions if d.tier == "cloud"]
    held_back = [d for d in decisions if "spend limit is reached" in d.reason]
    assert len(cloud) == IMAGES
    assert len(held_back) == JOBS - IMAGES  # each of them would have gone to the cloud on the share alone
    assert all(d.tier == "edge" and d.budget_state["spend_limit_usd"] == pytest.approx(LIMIT) for d in held_back)
    # What the decisions reserved, plus what the cloud worker billed beyond it (a dollar per second of the
    # hosted API's time: at least a millisecond per call), is the cloud bill. The one batch of decisions was
    # taken before any image was billed, so the seconds could not hold back a fifth reservation.
    assert isinstance(billed, Decimal) and float(billed) > IMAGES * (PRICE + 0.001)
    budget = client.get("/v1/stats").get_json()["budget"]
    assert budget["spend_limit_usd"] == pytest.approx(LIMIT)
    assert budget["spend_period_s"] == PERIOD_S
    assert budget["spent_this_period_usd"] == pytest.approx(float(billed), abs=1e-5)

    exposition = app.test_client().get("/metrics").get_data(as_text=True)
    values = {s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples}
    assert values["routet2i_cloud_spend_limit_usd"] == pytest.approx(LIMIT)
    assert values["routet2i_cloud_spend_period_usd"] == pytest.approx(float(billed), abs=1e-5)

    # The operator's view: `routet2i stats` against the API under gunicorn.
    server = ApiServer(settings, log_path=tmp_path / "api.log")
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "routet2i.cli", "stats", "--api", server.url],
            env=cli_env(settings, ROUTET2I_API_KEY=create_tenant_key(settings, is_admin=True)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert shown.returncode == 0, shown.stderr
    spent = budget["spent_this_period_usd"]  # the same ledger the command reads (all jobs are done)
    assert f"cloud spend this period: ${spent:.4f} of a ${LIMIT:.4f} limit per {PERIOD_S} s" in shown.stdout


def test_a_refused_cloud_image_gives_its_reservation_back_and_a_replay_takes_it_again(
    spend_stack: Settings, ledger: SpendLedger, image_api: ImageApi
) -> None:
    """The hosted API refuses two prompts (HTTP 400) and is overloaded for a third until its retries run out:
    no image is billed, so the three reservations go back to the ledger. Replaying the dead-lettered job once
    the API is back reserves its image again, and the ledger ends equal to the bill."""
    settings = spend_stack
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    image_api.busy = True
    prompts = ["a refuse sign on a red door", "a refuse truck in the snow", "a busy harbour at dawn with cranes"]
    response = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": p} for p in prompts]})
    assert response.status_code == 202, response.get_json()
    ids = [uuid.UUID(item["id"]) for item in response.get_json()["items"]]
    sessions = make_session_factory(make_engine(settings.database_url))

    def ended(status: str) -> list[Job] | None:
        with sessions() as session:
            jobs = [session.get(Job, job_id) for job_id in ids]
        return jobs if all(j is not None and j.status == status for j in jobs) else None  # type: ignore[misc]

    jobs = wait_until(lambda: ended("failed"), timeout=120, interval=0.5, what="the refused jobs to fail")
    with sessions() as session:
        decisions = {d.job_id: d for d in session.scalars(select(Decision).where(Decision.job_id.in_(ids)))}
        failures = {
            e.job_id: e.detail
            for e in session.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids), JobEvent.status == "failed"))
        }
    for job in jobs:
        state = decisions[job.id].budget_state
        assert decisions[job.id].tier == "cloud" and state["reserved_usd"] == pytest.approx(PRICE)
        assert state["spend_period"] == ledger.key()
        assert (job.reserved_usd, job.reserved_period) == (0.0, None)
        assert failures[job.id]["released_usd"] == pytest.approx(PRICE)
    assert [j.dead_lettered_at is not None for j in jobs] == [False, False, True]  # only the overload may pass
    assert "refused the request (400)" in jobs[0].error
    assert ledger.spent() == pytest.approx(0.0, abs=1e-9)  # 3 reserved, 3 given back, nothing billed

    image_api.busy = False
    busy = str(ids[2])
    replayed = subprocess.run(
        [sys.executable, "-m", "routet2i.cli", "dlq", "replay", busy],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stderr
    assert ledger.spent() >= PRICE  # counted before the job is published (its seconds may follow already)

    def succeeded() -> Job | None:
        with sessions() as session:
            job = session.get(Job, ids[2])
        return job if job is not None and job.status == "succeeded" else None

    job = wait_until(succeeded, timeout=60, interval=0.5, what="the replayed job to succeed")
    assert (job.reserved_usd, job.reserved_period) == (pytest.approx(PRICE), ledger.key())
    with sessions() as session:
        billed = session.scalar(select(func.sum(CostEntry.usd)).where(CostEntry.job_id.in_(ids)))
    assert isinstance(billed, Decimal) and float(billed) > PRICE  # the image and its seconds
    assert ledger.spent() == pytest.approx(float(billed), abs=1e-5)  # the replay's reservation and its seconds


def test_a_reservation_is_given_back_only_while_its_period_is_counted(spend_stack: Settings) -> None:
    spend = SpendLedger(connect(spend_stack.state_redis_url), period_s=60, name=f"release-{uuid.uuid4().hex[:6]}")
    spend.add(0.3)
    assert spend.release(0.1, spend.key()) and spend.spent() == pytest.approx(0.2)
    gone = spend.key() + "-expired"
    assert spend.release(0.1, gone) is False and spend.client.exists(gone) == 0  # no counter without expiry
    spend.client.delete(spend.key())
