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
from core.settings import Settings
from db.lifecycle import hold_reservation, transition
from db.models import CostEntry, Decision, Generation, Job, JobEvent, JobStatus, utcnow
from db.redis_state import SpendLedger, connect
from db.session import make_engine, make_session_factory, transaction
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.servers import ApiServer, cli_env
from tests.support import PrivateRedis, WorkerPool, decided_for_the_edge, record_image, wait_for_job, wait_until
from tests.test_http_backend import ImageApi
from worker.context import WorkerContext
from worker.recovery import fail_job, replay_dead_letters, shadow_failed
from worker.transport import create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRICE = 0.065
PER_SECOND = 1.0
IMAGES = 4
LIMIT = IMAGES * PRICE + 0.001  # four reservations fit, a fifth does not
JOBS = 12
PERIOD_S = 31 * 86_400  # the longest period: a test that straddles a period's end is all but impossible


NULL_EDGE = {"backend": "null", "model": "null-edge", "width": 64, "height": 64}


def hosted_cloud(api: ImageApi) -> dict[str, object]:
    """The cloud tier on the hosted image API stand-in, billed per image."""
    return {
        "backend": "http",
        "url": api.url,
        "model": "hosted-model",
        "width": 64,
        "height": 64,
        "price_per_image": PRICE,
    }


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
        edge=NULL_EDGE,
        # Jobs the API fails stay failed (no fallback to the edge): this module follows their reservations.
        cloud={**hosted_cloud(api), "price_per_gpu_second": PER_SECOND, "fallback": "none"},
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

    admin = authorize(app.test_client(), create_tenant_key(spend_stack, is_admin=True))  # /metrics needs an admin
    exposition = admin.get("/metrics").get_data(as_text=True)
    values = {s.name: s.value for f in text_string_to_metric_families(exposition) for s in f.samples}
    assert values["routet2i_cloud_spend_limit_usd"] == pytest.approx(LIMIT)
    assert values["routet2i_cloud_spend_period_usd"] == pytest.approx(float(billed), abs=1e-5)

    # The operator's view: `routet2i stats` against the API under gunicorn.
    server = ApiServer(settings, log_path=tmp_path / "api.log")
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "cli", "stats", "--api", server.url],
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
        [sys.executable, "-m", "cli", "dlq", "replay", busy],
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


def test_a_refused_cloud_shadow_gives_its_reservation_back(
    pg_settings: Settings, tmp_path: Path, model_cache: Path, image_api: ImageApi
) -> None:
    """Shadow-sampled jobs routed to the edge reserve their cloud shadow's price. The hosted API refuses every
    prompt here, so no cloud image is billed: every reservation, delivered or shadow, goes back."""
    (tmp_path / "redis").mkdir()
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    settings = make_settings(
        database_url=pg_settings.database_url,
        broker_url=broker.url,
        image_dir=pg_settings.image_dir,  # the session's image store, as the spend stack's
        cache_dir=model_cache,
        edge=NULL_EDGE,
        cloud=hosted_cloud(image_api),
        scorer={"enabled": False},
        router="prompt-complexity",
        cloud_budget=0.5,
        budget_window=10,
        shadow_rate=1.0,
        cloud_spend_limit_usd=10.0,
        cloud_spend_period_s=PERIOD_S,
        budget_name=f"shadow-spend-{uuid.uuid4().hex[:6]}",
        rate_limit_per_minute=0,
    )
    spend = SpendLedger.for_settings(settings, connect(settings.state_redis_url))
    assert spend is not None
    pool = WorkerPool(settings, log_dir=tmp_path)
    try:
        pool.start_all()
        client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
        ids = []
        for i in range(8):  # one at a time, so the budget window sees them in order and leaves room to shadow
            response = client.post("/v1/jobs", json={"prompt": f"a refuse bin {'by a red door ' * (i % 3)}{i}"})
            ids.append(response.get_json()["id"])
            wait_for_job(client, ids[-1])
        keys = [uuid.UUID(i) for i in ids]
        sessions = make_session_factory(make_engine(settings.database_url))
        with sessions() as session:
            decisions = list(session.scalars(select(Decision).where(Decision.job_id.in_(keys))))
        shadowed = [d.job_id for d in decisions if d.tier == "edge" and d.shadow]
        routed = [d.job_id for d in decisions if d.tier == "cloud"]
        assert shadowed and routed  # both kinds of cloud image were reserved
        for decision in decisions:
            if decision.job_id in shadowed or decision.job_id in routed:
                assert decision.budget_state["reserved_usd"] == pytest.approx(PRICE)

        def settled() -> list[Job] | None:  # a shadow may still be failing when its job's edge image is done
            with sessions() as session:
                jobs = [session.get(Job, key) for key in shadowed + routed]
            return jobs if all(j is not None and j.reserved_usd == 0 for j in jobs) else None  # type: ignore[misc]

        jobs = wait_until(settled, timeout=120, interval=0.5, what="every reservation to be given back")
        assert all(j.reserved_period is None for j in jobs)
        assert [j.status for j in jobs] == ["succeeded"] * len(shadowed) + ["failed"] * len(routed)
        with sessions() as session:
            cloud_images = session.scalar(
                select(func.count())
                .select_from(Generation)
                .where(Generation.job_id.in_(keys), Generation.tier == "cloud")
            )
        assert cloud_images == 0
        assert spend.spent() == pytest.approx(0.0, abs=1e-9)  # without the shadows' release: len(shadowed) × PRICE
    finally:
        pool.stop_all()
        broker.stop()  # the ledger lived in this broker's Redis


def test_a_shadow_reservation_is_the_shadows_alone(pg_settings: Settings, tmp_path: Path) -> None:
    """A job on the edge holds its cloud shadow's reservation: the job's own failure on the edge and its
    replay to the edge keep it; the shadow's failure gives it back once, and not after a shadow image was
    recorded; a replay to the cloud reserves the job's own image beside it."""
    (tmp_path / "redis").mkdir()
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    settings = pg_settings.model_copy(
        update={
            "broker_url": broker.url,
            "cloud_spend_limit_usd": 10.0,
            "budget_name": f"shadow-held-{uuid.uuid4().hex[:6]}",
        }
    )
    ctx = WorkerContext(settings, create_celery(settings))
    spend = ctx.spend_ledger()
    assert spend is not None
    sessions = make_session_factory(make_engine(settings.database_url))

    def shadowed_job(prompt: str) -> str:
        spend.add(PRICE)  # what routing reserved for the shadow
        with transaction(sessions) as session:
            job = decided_for_the_edge(session, prompt, seed=1)
            hold_reservation(job, spend.key(), PRICE, tier="cloud")
            transition(session, job, JobStatus.QUEUED, detail={"stage": "routed", "tier": "edge"})
            return str(job.id)

    def held(job_id: str) -> float:
        with sessions() as session:
            job = session.get(Job, uuid.UUID(job_id))
            assert job is not None
            return job.reserved_usd

    try:
        failing = shadowed_job("a refuse bin the edge cannot draw")
        assert fail_job(ctx, failing, "the edge refused", stage="generation", release_reservation=True)
        assert held(failing) == pytest.approx(PRICE) and spend.spent() == pytest.approx(PRICE)
        assert shadow_failed(ctx, failing, "cloud", "refused") and held(failing) == 0.0
        assert spend.spent() == pytest.approx(0.0, abs=1e-9)
        assert not shadow_failed(ctx, failing, "cloud", "refused")  # a redelivered failure gives nothing more
        assert spend.spent() == pytest.approx(0.0, abs=1e-9)

        billed = shadowed_job("a refuse bin whose shadow was drawn")
        with transaction(sessions) as session:
            job = session.get(Job, uuid.UUID(billed))
            record_image(session, job, tier="cloud", role="shadow", cost_usd=PRICE)
        assert not shadow_failed(ctx, billed, "cloud", "refused") and held(billed) == pytest.approx(PRICE)

        replayed = []
        for tier in ("edge", "cloud"):
            job_id = shadowed_job(f"a refuse bin replayed to the {tier}")
            with transaction(sessions) as session:
                job = session.get(Job, uuid.UUID(job_id))
                job.tier = "edge"
                job.dead_lettered_at = utcnow()
                transition(session, job, JobStatus.FAILED, detail={"stage": "generation"}, error="lost")
            before = spend.spent()
            replay_dead_letters(
                sessions, ctx.app, [uuid.UUID(job_id)], tier=tier, ledger=spend, reserve_usd={"cloud": PRICE}
            )
            replayed.append(spend.spent() - before)
        assert replayed == [pytest.approx(0.0, abs=1e-9), pytest.approx(PRICE)]
    finally:
        spend.client.delete(spend.key())
        broker.stop()
