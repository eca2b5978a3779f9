"""Shadow sampling: a share of jobs also runs on the other tier, paid from the cloud budget (``window``) or
beside it within the spend limit (``allowance``), and the labelled pairs become a training log."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.jobs import create_job
from db.models import CostEntry, Decision, Generation, Job
from db.redis_state import RedisBudgetStore, SpendLedger
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant
from router.budget import BudgetConfig, BudgetController, BudgetState, MemoryBudgetStore, decide
from router.log import read_log
from router.policy import shadow_sampled
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, wait_for_job, wait_until
from worker.context import WorkerContext
from worker.routing import route_jobs
from worker.transport import create_celery

CLOUD_PRICE = 0.065


def test_shadow_needs_room_in_the_budget() -> None:
    config = BudgetConfig(rho=0.5, window=10, tolerance=1.0)  # no minimum share: eight edge decisions stand
    roomy = decide(0.0, BudgetState((0,) * 8, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert not roomy.cloud and roomy.shadow and roomy.uses_cloud and "shadow-sampled" in roomy.reason
    full = decide(0.0, BudgetState((1, 0) * 4, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert not full.shadow and not full.uses_cloud and "no budget left" in full.reason
    routed = decide(9.0, BudgetState((0,) * 8, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert routed.cloud and routed.shadow  # the cloud is delivered; the edge runs as the shadow


def test_a_shadow_paid_beside_rho_needs_no_room_in_the_window() -> None:
    config = BudgetConfig(rho=0.5, window=10, tolerance=1.0, shadow_paid_from="allowance")
    full = decide(0.0, BudgetState((1, 0) * 4, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert not full.cloud and full.shadow and full.shadow_beside
    assert full.uses_cloud and not full.in_window  # a cloud image is made, but takes no place in the window
    assert full.reason.endswith("shadow-sampled on the cloud too, paid beside the routing budget")
    assert full.state["shadow_paid_from"] == "allowance"
    # A job routed to the cloud takes its place as always; its shadow is the edge's.
    routed = decide(9.0, BudgetState((0,) * 8, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert routed.cloud and routed.shadow and not routed.shadow_beside and routed.in_window
    assert "shadow_paid_from" not in routed.state
    # Beside ρ means beside it even when ρ is zero (the spend limit alone pays).
    zero = decide(0.0, BudgetState((), ()), BudgetConfig(rho=0.0, window=10, shadow_paid_from="allowance"), shadow=True)
    assert not zero.cloud and zero.shadow and not zero.in_window
    unsampled = decide(0.0, BudgetState((1, 0) * 4, (1.0,) * 8), config, calibrated_threshold=5.0)
    assert not unsampled.shadow and not unsampled.uses_cloud


def test_shadows_beside_rho_leave_the_window_to_routed_jobs() -> None:
    scores = [float(s) for s in random.Random(4).choices(range(100), k=200)]

    def run(paid_from: str) -> tuple[list[bool], list[bool], MemoryBudgetStore]:
        store = MemoryBudgetStore(20)
        controller = BudgetController(BudgetConfig(rho=0.3, window=20, shadow_paid_from=paid_from), store)  # type: ignore[arg-type]
        verdicts = [controller.decide(s, calibrated_threshold=50.0, shadow=i % 2 == 0) for i, s in enumerate(scores)]
        return [v.cloud for v in verdicts], [v.shadow for v in verdicts], store

    cloud, shadow, store = run("allowance")
    # Every sampled job is shadowed, and the window counts only the cloud images delivered.
    assert all(shadow[i] for i in range(0, len(scores), 2)) and not any(shadow[1::2])
    assert sum(store.snapshot().decisions) == sum(cloud[-20:])
    for end in range(1, len(cloud) + 1):
        assert sum(cloud[max(0, end - 20) : end]) <= int(0.3 * min(end, 20) + 1e-9)
    window_cloud, window_shadow, _ = run("window")
    # Paid from ρ, the shadows took places routed jobs would have had, and fewer jobs were shadowed.
    assert sum(cloud) > sum(window_cloud) and sum(shadow) > sum(window_shadow)


def test_shadows_beside_rho_stay_within_the_spend_limit() -> None:
    config = BudgetConfig(
        rho=0.5, window=10, spend_limit_usd=2 * CLOUD_PRICE, cloud_cost_usd=CLOUD_PRICE, shadow_paid_from="allowance"
    )
    controller = BudgetController(config, MemoryBudgetStore(10))
    verdicts = [controller.decide(-1.0, floor=0.0, calibrated_threshold=0.0, shadow=True) for _ in range(3)]
    assert [v.shadow for v in verdicts] == [True, True, False]
    assert [v.reserved_usd for v in verdicts] == [CLOUD_PRICE, CLOUD_PRICE, 0.0]
    assert verdicts[2].reason.endswith("the spend limit leaves nothing to shadow-sample")
    state = controller.store.snapshot()
    assert state.spent_usd == pytest.approx(2 * CLOUD_PRICE) and sum(state.decisions) == 0


@pytest.mark.integration
def test_the_shared_window_leaves_out_shadows_paid_beside_rho(redis_client) -> None:
    spend = SpendLedger(redis_client, period_s=86_400, name="beside")
    config = BudgetConfig(
        rho=0.5, window=10, spend_limit_usd=1.0, cloud_cost_usd=CLOUD_PRICE, shadow_paid_from="allowance"
    )
    controller = BudgetController(config, RedisBudgetStore(redis_client, window=10, name="beside", spend=spend))
    shadowed = controller.decide(-1.0, floor=0.0, calibrated_threshold=0.0, shadow=True)
    routed = controller.decide(5.0, floor=0.0, calibrated_threshold=0.0)
    assert shadowed.shadow and not shadowed.cloud and routed.cloud
    assert shadowed.state["spend_period"] == spend.key()  # held by the job, to give back if the shadow fails
    assert controller.store.snapshot().decisions == (1, 0)
    assert spend.spent() == pytest.approx(2 * CLOUD_PRICE)


def test_the_setting_reaches_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().shadow_paid_from == "allowance"
    assert BudgetConfig.for_settings(Settings(), 0.3).shadow_paid_from == "allowance"
    monkeypatch.setenv("ROUTET2I_SHADOW_PAID_FROM", "window")
    settings = Settings.from_env()
    assert settings.shadow_paid_from == "window"
    assert BudgetConfig.for_settings(settings, 0.3).shadow_paid_from == "window"
    monkeypatch.setenv("ROUTET2I_SHADOW_PAID_FROM", "ledger")
    with pytest.raises(ValueError, match="shadow_paid_from"):
        Settings.from_env()
    with pytest.raises(ValueError, match="shadow_paid_from"):
        BudgetConfig(rho=0.5, shadow_paid_from="ledger")  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_route_worker_shadows_beside_rho_and_records_it(pg_url: str, tmp_path, model_cache) -> None:  # type: ignore[no-untyped-def]
    """The routing stage itself (no worker processes): every job shadow-sampled, the window holding only
    the cloud images delivered, each edge job holding its shadow's reservation, until the spend limit."""
    (tmp_path / "redis").mkdir()
    broker = PrivateRedis(tmp_path / "redis")
    broker.start()
    limit = 10 * CLOUD_PRICE + 0.001  # ten cloud images (delivered or shadow) fit, an eleventh does not
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path / "images",
        cache_dir=model_cache,
        cloud={"price_per_image": CLOUD_PRICE},
        router="prompt-complexity",
        shadow_rate=1.0,
        shadow_paid_from="allowance",
        cloud_budget=0.3,
        budget_window=10,
        cloud_spend_limit_usd=limit,
        budget_name=f"beside-{uuid.uuid4().hex[:6]}",
    )
    ctx = WorkerContext(settings, create_celery(settings))
    sessions = make_session_factory(make_engine(settings.database_url))
    try:
        with transaction(sessions) as session:
            tenant = create_tenant(session, name=f"beside-{uuid.uuid4().hex[:6]}")
            session.flush()
            words = ["kite", "red kite over a beach", "a lighthouse in a storm at night with gulls and waves"]
            ids = [
                str(create_job(session, tenant_id=tenant.id, prompt=f"{words[i % 3]} {i}", seed=i).id)
                for i in range(16)
            ]
        for job_id in ids:  # one at a time: the window's order is the jobs' order
            route_jobs(ctx, [job_id])
        with sessions() as session:
            keys = [uuid.UUID(i) for i in ids]
            decisions = {d.job_id: d for d in session.scalars(select(Decision).where(Decision.job_id.in_(keys)))}
            jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_(keys)))}
        ordered = [decisions[k] for k in keys]
        cloud = [d.tier == "cloud" for d in ordered]
        images = [d.tier == "cloud" or d.shadow for d in ordered]  # cloud images reserved, delivered or shadow
        assert any(cloud) and not all(cloud)
        paid = [i for i, used in enumerate(images) if used]
        assert len(paid) == 10 and not ordered[-1].shadow and ordered[-1].tier == "edge"
        # Shadowed whatever the window held (it is full during the first decisions), while money was left.
        assert all(d.shadow for d in ordered[: paid[-1] + 1])
        assert "budget full" in ordered[0].reason
        assert "the spend limit leaves nothing to shadow-sample" in ordered[-1].reason
        for d in ordered:
            if d.shadow and d.tier == "edge":
                assert d.budget_state["shadow_paid_from"] == "allowance"
                assert jobs[d.job_id].reserved_tier == "cloud"
                assert jobs[d.job_id].reserved_usd == pytest.approx(CLOUD_PRICE)
        for start in range(len(cloud) - settings.budget_window + 1):  # the window holds routed cloud images alone
            assert sum(cloud[start : start + settings.budget_window]) <= settings.budget_window * settings.cloud_budget
        window = ctx.budget(settings.budget_name, settings.dearest_share).store.snapshot()
        assert list(window.decisions) == [int(c) for c in reversed(cloud)][: settings.budget_window]
        assert window.spent_usd == pytest.approx(10 * CLOUD_PRICE)
    finally:
        broker.stop()


def test_sampling_is_stable_and_close_to_the_rate() -> None:
    ids = [str(uuid.UUID(int=i)) for i in range(4000)]
    assert [shadow_sampled(i, 0.1) for i in ids] == [shadow_sampled(i, 0.1) for i in ids]
    assert abs(sum(shadow_sampled(i, 0.1) for i in ids) / len(ids) - 0.1) < 0.02
    assert not any(shadow_sampled(i, 0.0) for i in ids)


@pytest.fixture()
def shadow_stack(pg_url: str, tmp_path, model_cache) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    broker = PrivateRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    broker.start()
    null = {"backend": "null", "width": 64, "height": 64}
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path / "images",
        cache_dir=model_cache,
        edge={**null, "model": "null-edge"},
        cloud={**null, "model": "null-cloud", "price_per_image": 0.065},
        shadow_rate=1.0,
        shadow_paid_from="window",  # labels paid from ρ: shadows only where the window has room
        cloud_budget=0.5,
        budget_window=10,
        budget_name=f"shadow-{uuid.uuid4().hex[:6]}",
    )
    pool = WorkerPool(settings, log_dir=tmp_path)
    pool.start_all()
    try:
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_shadow_jobs_get_both_tiers_within_the_budget_and_export_as_labels(shadow_stack: Settings, tmp_path) -> None:
    settings = shadow_stack
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    ids = []
    for i in range(16):
        ids.append(
            client.post("/v1/jobs", json={"prompt": f"a {'red ' * (i % 4)}kite over a beach number {i}"}).get_json()[
                "id"
            ]
        )
        wait_for_job(client, ids[-1])  # one at a time, so the budget window's order is the submission order
    jobs = [client.get(f"/v1/jobs/{i}").get_json() for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs)

    keys = [uuid.UUID(i) for i in ids]
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        decisions = {d.job_id: d for d in session.scalars(select(Decision).where(Decision.job_id.in_(keys)))}
    ordered = [decisions[k] for k in keys]
    shadowed = [d for d in ordered if d.shadow]
    assert shadowed and len(shadowed) < len(ordered)  # shadows happen, but only where the budget has room
    uses_cloud = [int(d.tier == "cloud" or d.shadow) for d in ordered]
    for start in range(len(uses_cloud) - settings.budget_window + 1):
        assert sum(uses_cloud[start : start + settings.budget_window]) <= settings.budget_window * settings.cloud_budget

    def per_job(model: type) -> dict[uuid.UUID, int]:
        with sessions() as session:
            rows = session.execute(
                select(model.job_id, func.count()).where(model.job_id.in_(keys)).group_by(model.job_id)
            ).all()
        return dict(rows)  # type: ignore[arg-type]

    expected = {k: 2 if decisions[k].shadow else 1 for k in keys}
    # A shadow generation may still be running when its job's delivered image was done.
    wait_until(lambda: per_job(Generation) == expected, timeout=120, what="shadow generations")
    assert per_job(CostEntry) == expected  # each image billed once, on its own tier
    for job in jobs:
        assert job["result"]["tier"] == job["tier"]  # the user receives the routed tier's image

    out = tmp_path / "labels.jsonl"
    exported = subprocess.run(
        [sys.executable, "-m", "cli", "data", "export", "-o", str(out)],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    records = {r.id: r for r in read_log(out)}
    assert {str(d.job_id) for d in shadowed} <= set(records)
    record = records[str(shadowed[0].job_id)]
    assert set(record.edge.metrics) == set(record.cloud.metrics) >= {"definition", "alignment"}
    assert record.extra["cost"] == {"edge": settings.edge.price_per_image, "cloud": settings.cloud.price_per_image}
