"""Shadow sampling: a share of jobs also runs on the other tier, paid from the cloud budget, and the
labelled pairs become a training log."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.models import CostEntry, Decision, Generation
from db.session import make_engine, make_session_factory
from router.budget import BudgetConfig, BudgetState, decide
from router.log import read_log
from router.policy import shadow_sampled
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, wait_for_job, wait_until


def test_shadow_needs_room_in_the_budget() -> None:
    config = BudgetConfig(rho=0.5, window=10, tolerance=1.0)  # no minimum share: eight edge decisions stand
    roomy = decide(0.0, BudgetState((0,) * 8, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert not roomy.cloud and roomy.shadow and roomy.uses_cloud and "shadow-sampled" in roomy.reason
    full = decide(0.0, BudgetState((1, 0) * 4, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert not full.shadow and not full.uses_cloud and "no budget left" in full.reason
    routed = decide(9.0, BudgetState((0,) * 8, (1.0,) * 8), config, calibrated_threshold=5.0, shadow=True)
    assert routed.cloud and routed.shadow  # the cloud is delivered; the edge runs as the shadow


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
