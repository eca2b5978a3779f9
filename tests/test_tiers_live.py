"""Three tiers through the real stack: a K-tier router trained on the carried ratings of three models routes
real prompts among an edge, a mid and a cloud tier (each its own queue and worker process) under a money budget.

The router is the ridge regressor of every tier's quality, which trains in seconds; the K-tier RouteT2I routes
through the same code (its artifact loads by the same name-and-directory settings) and is judged offline."""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from api.app import create_app
from core.settings import Settings
from db.models import Decision, Generation, Job
from db.session import make_engine, make_session_factory
from router.tierdata import genai_bench_tiers
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import PrivateRedis, WorkerPool, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = ["SDXL_Turbo", "SDXL_Base", "DALLE_3"]
NULL = {"backend": "null", "width": 64, "height": 64}
WINDOW = 100


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A K-tier router artifact trained on the carried GenAI-Bench ratings of three models, as a user makes one:
    ``routet2i data import --tiers`` then ``routet2i train`` on the K-tier log."""
    work = tmp_path_factory.mktemp("tier-router")
    log, directory = work / "three-tiers.jsonl", work / "artifact"
    for argv in (
        ["data", "import", "genai-bench", "--tiers", ",".join(MODELS), "-o", str(log)],
        ["train", "--log", str(log), "--router", "ridge", "--out", str(directory)],
    ):
        done = subprocess.run([sys.executable, "-m", "cli", *argv], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert "3 tiers (SDXL_Turbo, SDXL_Base, DALLE_3)" in done.stdout
    return directory


@pytest.fixture(scope="module")
def three_tiers(
    pg_url: str, artifact: Path, tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[Settings]:
    """The stack on a Redis of its own: no other module's workers take its jobs."""
    prices = genai_bench_tiers(MODELS)[0].cost
    broker = PrivateRedis(tmp_path_factory.mktemp("tier-redis"))
    broker.start()
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path_factory.mktemp("tier-images"),
        cache_dir=model_cache,
        tiers="edge,mid,cloud",
        edge={**NULL, "model": "null-edge", "price_per_image": prices["SDXL_Turbo"]},
        extra_tiers={"mid": {**NULL, "model": "null-mid", "price_per_image": prices["SDXL_Base"]}},
        cloud={**NULL, "model": "null-cloud", "price_per_image": prices["DALLE_3"]},
        budget_usd_per_image=prices["SDXL_Turbo"] + 0.35 * (prices["DALLE_3"] - prices["SDXL_Turbo"]),
        budget_window=WINDOW,
        budget_name="three-tiers",
        rate_limit_per_minute=0,
        scorer={"enabled": False},
        router="ridge",
        router_model=artifact,
    )
    pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("tier-logs"))
    try:
        pool.start_all(("route", "edge", "mid", "cloud"))
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


def test_jobs_reach_every_tier_within_the_money_budget(three_tiers: Settings) -> None:
    """300 real prompts: every tier's queue and worker gets jobs, every window of 100 decisions after the first
    spends within ±10% of the budget per image, and every decision records all three tiers' predictions."""
    settings = three_tiers
    prompts = [r.prompt for r in genai_bench_tiers(MODELS)]
    random.Random(0).shuffle(prompts)
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings))
    ids: list[uuid.UUID] = []
    for start in range(0, 300, 100):
        response = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": p} for p in prompts[start : start + 100]]})
        assert response.status_code == 202, response.get_json()
        ids += [uuid.UUID(item["id"]) for item in response.get_json()["items"]]
    sessions = make_session_factory(make_engine(settings.database_url))

    def all_done() -> bool:
        with sessions() as session:
            return session.scalar(select(Job).where(Job.id.in_(ids), Job.status != "succeeded").limit(1)) is None

    wait_until(all_done, timeout=300, interval=1.0, what="300 jobs to succeed on three tiers")
    with sessions() as session:
        decisions = session.scalars(
            select(Decision).where(Decision.job_id.in_(ids)).order_by(Decision.created_at, Decision.id)
        ).all()
        made = {t for (t,) in session.execute(select(Generation.tier).where(Generation.job_id.in_(ids)).distinct())}
    assert len(decisions) == 300
    assert made == {"edge", "mid", "cloud"}
    spent = np.array([settings.prices[d.tier] for d in decisions])
    means = [spent[i : i + WINDOW].mean() for i in range(WINDOW, len(spent) - WINDOW + 1, WINDOW)]
    budget = settings.budget_usd
    assert all(abs(m - budget) <= 0.1 * budget for m in means), (budget, means)
    for decision in decisions:
        assert set(decision.predicted or {}) == {"edge", "mid", "cloud"}
        assert set((decision.explanation or {})["utilities"]) == {"edge", "mid", "cloud"}
        assert decision.threshold is not None and decision.threshold >= 0  # λ
        assert decision.budget_state["budget_usd_per_image"] == pytest.approx(budget)
        assert decision.reason.startswith(f"{decision.tier!r}: predicted utility")
