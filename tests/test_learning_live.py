"""The learning loop against real route and tier workers: shadow samples collected, ``routet2i learn`` trains and
promotes a challenger, the route workers switch to it without a restart, and ``routet2i models rollback`` switches
them back."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from api.app import create_app
from core.settings import Settings
from db.labels import iter_labelled_jobs
from db.registry import champion
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key
from tests.servers import cli_env
from tests.support import PrivateRedis, WorkerPool, wait_for_job, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = 60


@pytest.fixture()
def live(pg_settings: Settings, tmp_path) -> Iterator[tuple[Settings, WorkerPool]]:
    broker = PrivateRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    broker.start()
    null = {"backend": "null", "width": 64, "height": 64}
    settings = pg_settings.model_copy(
        update={
            "broker_url": broker.url,
            "budget_name": f"live-{uuid.uuid4().hex[:6]}",  # a registry slot of the test's own
            "edge": pg_settings.edge.model_copy(update={**null, "model": "null-edge"}),
            "cloud": pg_settings.cloud.model_copy(update={**null, "model": "null-cloud"}),
            "cloud_budget": 1.0,
            "shadow_rate": 1.0,  # every job is run on both tiers: labels
            "router_refresh_s": 1.0,
            "learn_retrain_every": 10,
            # Promote whatever the learner trains: the loop's plumbing is under test here; its judgement is in
            # tests/test_learn.py and tests/test_learning.py.
            "learn_min_gain": -100.0,
            "learn_noise_z": 1000.0,
            "learn_warm_start": False,
        }
    )
    pool = WorkerPool(settings, log_dir=tmp_path / "logs")
    (tmp_path / "logs").mkdir()
    try:
        for queue in ("route", "edge", "cloud"):
            pool.start(queue)
        pool.wait_ready()
        yield settings, pool
    finally:
        pool.stop_all()
        broker.stop()


def routet2i(settings: Settings, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args], env=cli_env(settings), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def decided_by(client, settings: Settings, prompt: str) -> str:  # type: ignore[no-untyped-def]
    """Submit one job; the router version its decision records."""
    job_id = client.post("/v1/jobs", json={"prompt": prompt}).get_json()["id"]
    job = wait_for_job(client, job_id, timeout=120)
    assert job["status"] == "succeeded", job["error"]
    return str(job["decision"]["router_version"])


def test_learn_promotes_a_challenger_the_route_workers_switch_to_and_rollback_switches_back(live) -> None:  # type: ignore[no-untyped-def]
    settings, pool = live
    route_pid = next(p.pid for name, p in pool.processes.items() if name.startswith("route"))
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, rate_limit_per_minute=0))
    batch = {
        "jobs": [
            {"prompt": f"a {word} in the rain, picture {i}"} for i, word in enumerate(["fox", "tram"] * (JOBS // 2))
        ]
    }
    ids = [item["id"] for item in client.post("/v1/jobs/batch", json=batch).get_json()["items"]]
    shipped = {wait_for_job(client, j, timeout=180)["decision"]["router_version"] for j in ids}
    assert len(shipped) == 1

    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)

    def labelled() -> int:
        ours = {uuid.UUID(j) for j in ids}
        with sessions() as session:
            return sum(1 for label in iter_labelled_jobs(session) if label.job_id in ours)

    wait_until(lambda: labelled() == JOBS, timeout=180, what="every job's shadow image")

    first = json.loads(routet2i(settings, "learn", "--once", "--json"))
    assert first["action"] == "prior" and first["promoted"]
    second = json.loads(routet2i(settings, "learn", "--once", "--json"))
    assert second["action"] == "judged" and second["promoted"], second["reason"]
    with sessions() as session:
        trained = champion(session, settings.model_slot)
        assert trained is not None and trained.kind == "routet2i" and str(trained.id) == second["model_id"]
        trained_version = trained.version
    assert trained_version not in shipped

    # The route worker loads the new champion between two batches: the next decision records it.
    assert decided_by(client, settings, "a fox after the promotion") == trained_version
    listed = json.loads(routet2i(settings, "models", "list", "--slot", settings.model_slot, "--json"))
    assert [m["state"] for m in listed] == ["champion", "retired"]

    routet2i(settings, "models", "rollback")
    with sessions() as session:
        back = champion(session, settings.model_slot)
        assert back is not None and str(back.id) == first["model_id"]
        prior_version = back.version
    assert decided_by(client, settings, "a tram after the rollback") == prior_version
    engine.dispose()

    assert next(p.pid for name, p in pool.processes.items() if name.startswith("route")) == route_pid
    route_log = next(pool.log(name) for name in pool.processes if name.startswith("route"))
    assert "switched router" in route_log and "Warm shutdown" not in route_log  # switched, never restarted
