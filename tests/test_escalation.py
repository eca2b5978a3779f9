"""Escalation: an edge image that scores among the worst is generated again on the cloud, within a window of
its own and the spend limit, with real route, edge and cloud workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.generations import primary_generation
from db.labels import iter_labelled_jobs
from db.lifecycle import transition
from db.models import CostEntry, Decision, Generation, Job, JobEvent, JobStatus, Tenant, utcnow
from db.redis_state import SpendLedger, connect
from db.session import make_engine, make_session_factory, transaction
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, decided_for_the_edge, record_image, wait_for_job
from worker.context import WorkerContext
from worker.generating import _escalations
from worker.recovery import fail_job, reconcile
from worker.transport import create_celery, job_ids_of

PRICE = 0.065
WINDOW = 10
RATE = 0.5
JOBS = 16


@pytest.fixture(scope="module")
def escalation_stack(pg_url: str, tmp_path_factory, model_cache) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    broker = PrivateRedis(tmp_path_factory.mktemp("escalation-redis"))
    broker.start()
    null = {"backend": "null", "width": 64, "height": 64}
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path_factory.mktemp("escalation-images"),
        cache_dir=model_cache,
        edge={**null, "model": "null-edge", "price_per_image": 0.001},
        cloud={**null, "model": "null-cloud", "price_per_image": PRICE},
        cloud_budget=0.0,  # the router sends everything to the edge: only escalations reach the cloud
        escalation_rate=RATE,
        escalation_metric="alignment",
        budget_window=WINDOW,
        budget_name=f"escalation-{uuid.uuid4().hex[:6]}",
        cloud_spend_limit_usd=100.0,
        cloud_spend_period_s=31 * 86_400,
        rate_limit_per_minute=0,
    )
    pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("escalation-logs"))
    try:
        pool.start_all()
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


def replaced_images(settings: Settings) -> float:
    """``routet2i_images_by_role_total{role="replaced"}`` as the API's ``/metrics`` exposes it."""
    admin = authorize(create_app(settings).test_client(), create_tenant_key(settings, is_admin=True))
    exposition = admin.get("/metrics").get_data(as_text=True)
    values = {
        (s.name, s.labels.get("role")): s.value for f in text_string_to_metric_families(exposition) for s in f.samples
    }
    return values[("routet2i_images_by_role_total", "replaced")]


@pytest.mark.integration
@pytest.mark.slow
def test_the_worst_edge_images_are_escalated_within_their_window(escalation_stack: Settings) -> None:
    settings = escalation_stack
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, forced_tiers=("edge",)))
    replaced_before = replaced_images(settings)
    ids = []
    for i in range(JOBS):  # one at a time, so the escalation window's order is the submission order
        prompt = f"a {'blue ' * (i % 5)}lighthouse on a cliff, storm number {i}"
        ids.append(client.post("/v1/jobs", json={"prompt": prompt}).get_json()["id"])
        wait_for_job(client, ids[-1])
    forced = client.post("/v1/jobs", json={"prompt": "a lighthouse, forced to the edge", "tier": "edge"}).get_json()
    forced_job = wait_for_job(client, forced["id"])
    jobs = [client.get(f"/v1/jobs/{i}").get_json() for i in ids]
    assert all(j["status"] == "succeeded" for j in [*jobs, forced_job]), [j["error"] for j in jobs]

    keys = [uuid.UUID(i) for i in ids]
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id.in_(keys)).order_by(JobEvent.id)))
        generations = list(session.scalars(select(Generation).where(Generation.job_id.in_(keys))))
        costs = dict(
            session.execute(  # type: ignore[arg-type]
                select(CostEntry.job_id, func.count()).where(CostEntry.job_id.in_(keys)).group_by(CostEntry.job_id)
            ).all()
        )
        labelled = {row.job_id for row in iter_labelled_jobs(session)}
        reserved = dict(session.execute(select(Job.id, Job.reserved_usd).where(Job.id.in_(keys))).all())  # type: ignore[arg-type]
    # Each edge image's escalation verdict, in the order the edge images were recorded.
    verdicts = {e.job_id: e.detail["escalation"] for e in events if "escalation" in (e.detail or {})}
    assert set(verdicts) == set(keys)  # every routed edge image was considered...
    assert all("escalation" not in (e["detail"] or {}) for e in forced_job["events"])  # ...a forced one never

    assert {v["window"] for v in verdicts.values()} == {f"{settings.budget_name}-escalation"}  # the shared one
    escalated = [k for k in keys if verdicts[k]["escalated"]]
    assert 0 < len(escalated) < JOBS
    flags = [int(verdicts[k]["escalated"]) for k in keys]
    for start in range(JOBS - WINDOW + 1):
        assert sum(flags[start : start + WINDOW]) <= RATE * WINDOW
    for k in keys:
        verdict = verdicts[k]
        if verdict["escalated"]:
            assert verdict["value"] < verdict["threshold"] and "below the escalation threshold" in verdict["reason"]
        elif verdict["threshold"] is not None and "not below" in verdict["reason"]:
            assert verdict["value"] >= verdict["threshold"]

    by_job: dict[uuid.UUID, dict[str, str]] = {}
    for g in generations:
        by_job.setdefault(g.job_id, {})[g.tier] = g.role
    for k, job in zip(keys, jobs, strict=True):
        if k in escalated:
            # The user receives the cloud image; the edge image stays recorded and billed as the one it replaced.
            assert by_job[k] == {"edge": "replaced", "cloud": "primary"} and costs[k] == 2
            assert job["tier"] == "cloud" and job["result"]["tier"] == "cloud" and job["decision"]["tier"] == "edge"
            stages = [(e["detail"] or {}).get("stage") for e in job["events"] if e["status"] == "queued"]
            assert stages == [None, "routed", "escalated"]  # submitted, routed, escalated
            assert reserved[k] == pytest.approx(PRICE)
        else:
            assert by_job[k] == {"edge": "primary"} and costs[k] == 1 and job["result"]["tier"] == "edge"
    # Both tiers are scored for an escalated job, but a sample chosen by its outcome is no training label.
    assert not labelled & set(escalated)

    ledger = SpendLedger.for_settings(settings, connect(settings.state_redis_url))
    assert ledger is not None and ledger.spent() == pytest.approx(len(escalated) * PRICE)
    assert replaced_images(settings) == replaced_before + len(escalated)  # the database is the session's


@pytest.mark.integration
@pytest.mark.slow
def test_tenants_with_their_own_cloud_budget_have_their_own_escalation_window(escalation_stack: Settings) -> None:
    """A tenant held to no cloud images (its own budget 0) is never escalated; a tenant with its own budget is
    escalated in its own window, as it is routed in its own window."""
    settings = escalation_stack
    sessions = make_session_factory(make_engine(settings.database_url))
    seen: dict[str, list[dict]] = {}
    for name, budget in (("none", 0.0), ("own", 0.01)):  # 0.01 of a window of 10 routes nothing to the cloud
        client = authorize(create_app(settings).test_client(), create_tenant_key(settings, cloud_budget=budget))
        jobs = []
        for i in range(4):
            job = client.post("/v1/jobs", json={"prompt": f"a {'green ' * i}lighthouse for tenant {name}"}).get_json()
            jobs.append(wait_for_job(client, job["id"]))
        assert all(j["status"] == "succeeded" and j["decision"]["tier"] == "edge" for j in jobs)
        with sessions() as session:
            tenant = session.scalar(select(Job.tenant_id).where(Job.id == uuid.UUID(jobs[0]["id"])))
        seen[name] = [
            e["detail"]["escalation"] for j in jobs for e in j["events"] if "escalation" in (e["detail"] or {})
        ]
        if name == "own":
            window = f"tenant-{tenant}-escalation"
    assert seen["none"] == []
    assert len(seen["own"]) == 4 and {v["window"] for v in seen["own"]} == {window}
    assert seen["own"][0]["threshold"] is None  # its window starts empty: no edge image to compare with


@pytest.mark.integration
def test_shadow_sampled_jobs_and_tenants_held_to_no_cloud_are_not_candidates(pg_settings: Settings) -> None:
    """Of four badly scored edge images, only the routed, unshadowed ones of tenants that may use the cloud are
    put to an escalation window: the shared one, or the tenant's own."""
    settings = pg_settings.model_copy(
        update={"escalation_rate": 0.5, "budget_window": 10, "budget_name": f"esc-cand-{uuid.uuid4().hex[:6]}"}
    )
    ctx = WorkerContext(settings, create_celery(settings))
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        jobs = {name: decided_for_the_edge(session, f"a lighthouse, {name}", seed=1) for name in TENANT_BUDGETS}
        for name, budget in TENANT_BUDGETS.items():
            session.get(Tenant, jobs[name].tenant_id).cloud_budget = budget
        session.scalars(select(Decision).where(Decision.job_id == jobs["shadow"].id)).one().shadow = True
        keys = [job.id for job in jobs.values()]
        own_window = f"tenant-{jobs['own budget'].tenant_id}-escalation"
    scored = [({"values": {"alignment": 0.1}}, {}) for _ in keys]
    decided = _escalations(ctx, "edge", keys, scored, set(keys))
    windows = {list(TENANT_BUDGETS)[i]: info["window"] for i, info in decided.items()}
    assert windows == {"shared": f"{settings.budget_name}-escalation", "own budget": own_window}
    assert _escalations(ctx, "cloud", keys, scored, set(keys)) == {}  # only edge images are escalated


TENANT_BUDGETS = {"shared": None, "shadow": None, "no cloud": 0.0, "own budget": 0.2}
"""The tenants' own cloud budgets (None: the deployment's) of the candidate test's jobs."""


@pytest.mark.integration
def test_a_lost_escalation_is_republished_to_the_cloud(pg_settings: Settings, tmp_path) -> None:
    """The reconciler follows the job's tier, which an escalation changed after the decision."""
    broker = PrivateRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    broker.start()
    try:
        settings = pg_settings.model_copy(update={"broker_url": broker.url})
        sessions = make_session_factory(make_engine(settings.database_url))
        with transaction(sessions) as session:
            job = decided_for_the_edge(session, "a lighthouse whose edge image failed", seed=3)
            job.tier = "cloud"  # what an escalation leaves: decided for the edge, queued on the cloud
            job.enqueued_at = utcnow() - timedelta(hours=1)
            transition(session, job, JobStatus.QUEUED, detail={"stage": "escalated"})
            job_id = str(job.id)
        client = redis.Redis.from_url(broker.url)
        report = reconcile(sessions, create_celery(settings), client, settings)
        assert job_id in report.republished
        assert [job_ids_of(raw) for raw in client.lrange("cloud", 0, -1)] == [[job_id]]
        assert client.llen("edge") == 0
    finally:
        broker.stop()


@pytest.mark.integration
def test_an_escalation_that_fails_on_the_cloud_delivers_the_edge_image(pg_settings: Settings) -> None:
    """The hosted API refuses the escalated job for good: the user gets the edge image instead of a failure,
    and the escalation's reservation goes back."""
    settings = pg_settings.model_copy(
        update={"cloud_spend_limit_usd": 10.0, "budget_name": f"esc-fail-{uuid.uuid4().hex[:6]}"}
    )
    ctx = WorkerContext(settings, create_celery(settings))
    ledger = ctx.spend_ledger()
    assert ledger is not None
    ledger.add(PRICE)  # what the escalation reserved
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        job = decided_for_the_edge(session, "a lighthouse the cloud refuses", seed=5)
        record_image(session, job, tier="edge", role="replaced", cost_usd=0.001)
        job.tier, job.reserved_usd, job.reserved_period, job.reserved_tier = "cloud", PRICE, ledger.key(), "cloud"
        transition(session, job, JobStatus.QUEUED, detail={"stage": "escalated"})
        job_id = str(job.id)

    error = "generation failed: image API refused the request (400): content policy violation"
    assert fail_job(ctx, job_id, error, stage="generation", release_reservation=True)
    with sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        delivered = primary_generation(session, job_id=uuid.UUID(job_id))
        last = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc())).first()
    assert (job.status, job.tier, job.error, job.reserved_usd) == ("succeeded", "edge", None, 0.0)
    assert delivered is not None and delivered.tier == "edge"
    assert last.detail["stage"] == "escalation failed" and last.detail["error"] == error
    assert last.detail["released_usd"] == pytest.approx(PRICE)
    assert ledger.spent() == pytest.approx(0.0, abs=1e-9)
    assert fail_job(ctx, job_id, error, stage="generation", release_reservation=True) is False  # it has ended
    ledger.client.delete(ledger.key())
