"""End to end on real services: API (in process) -> Redis -> route worker -> tier worker -> PostgreSQL."""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.models import CostEntry, Decision, Generation, JobEvent
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key
from tests.support import WorkerPool, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def client(pg_settings: Settings, stack: WorkerPool):
    app = create_app(pg_settings)
    with app.test_client() as test_client:
        yield authorize(test_client, create_tenant_key(pg_settings))


def count(settings: Settings, model: type, job_id: uuid.UUID) -> int:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.job_id == job_id)) or 0


def test_submitted_job_succeeds_with_decision_generation_and_one_cost(client, pg_settings: Settings) -> None:
    response = client.post("/v1/jobs", json={"prompt": "a red bicycle leaning on a brick wall", "seed": 7})
    assert response.status_code == 202
    accepted = response.get_json()
    assert response.headers["Location"] == accepted["url"] == f"/v1/jobs/{accepted['id']}"
    assert accepted["status"] == "queued"

    job = wait_for_job(client, accepted["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["tier"] in ("edge", "cloud")
    assert job["seed"] == 7

    decision = job["decision"]
    assert decision["tier"] == job["tier"]
    # The default router: RouteT2I with its shipped artifact, predictions and explanations in the audit trail.
    assert decision["router"] == "routet2i"
    assert decision["router_version"].startswith("routet2i:")
    assert decision["budget"] == pg_settings.cloud_budget
    assert decision["reason"]
    assert 0.0 < decision["inputs"]["prs"] < 1.0
    assert set(decision["predicted"]["edge"]["values"]) == {"quality", "alignment"}
    words = {e["token"] for entries in decision["explanation"]["tokens_by_metric"].values() for e in entries}
    assert words and words <= {"a", "red", "bicycle", "leaning", "on", "brick", "wall"}
    assert "recent_decisions" in decision["budget_state"]

    result = job["result"]
    tier_settings = pg_settings.tier(job["tier"])
    assert result["model_id"] == tier_settings.model
    assert (result["width"], result["height"], result["steps"]) == (64, 64, 2)
    assert result["cost_usd"] == pytest.approx(tier_settings.price_per_image)
    assert result["gpu_s"] > 0

    statuses = [e["status"] for e in job["events"]]
    assert statuses == ["queued", "routing", "queued", "generating", "succeeded"]
    timings = job["timings"]
    assert all(timings[k] is not None and timings[k] >= 0 for k in timings), timings
    assert timings["total_s"] >= timings["generating_s"]

    png = client.get(job["result"]["image_url"])
    assert png.status_code == 200 and png.mimetype == "image/png"
    with Image.open(io.BytesIO(png.data)) as image:
        image.load()
        assert image.size == (64, 64)

    job_id = uuid.UUID(accepted["id"])
    assert count(pg_settings, Decision, job_id) == 1
    assert count(pg_settings, Generation, job_id) == 1
    assert count(pg_settings, CostEntry, job_id) == 1
    assert count(pg_settings, JobEvent, job_id) == 5


def test_many_jobs_all_finish_and_stats_add_up(client, pg_settings: Settings) -> None:
    prompts = [f"{n} apples on a wooden table next to a blue vase and a cat" if n % 2 else "a tree" for n in range(12)]
    ids = [client.post("/v1/jobs", json={"prompt": p}).get_json()["id"] for p in prompts]
    jobs = [wait_for_job(client, job_id) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in jobs)

    stats = client.get("/v1/stats").get_json()
    routed = stats["routed"]
    assert routed["total"] == routed["by_tier"]["edge"] + routed["by_tier"]["cloud"]
    assert stats["jobs"]["by_status"]["succeeded"] >= len(ids)
    spent = sum(j["result"]["cost_usd"] for j in jobs)
    assert stats["spend_usd"]["total"] >= spent - 1e-9
    assert stats["latency_s"]["count"] >= len(ids)

    listed = client.get("/v1/jobs?status=succeeded&limit=5").get_json()
    assert len(listed["items"]) == 5 and listed["next_cursor"]
    following = client.get(f"/v1/jobs?status=succeeded&limit=5&cursor={listed['next_cursor']}").get_json()
    assert not {j["id"] for j in listed["items"]} & {j["id"] for j in following["items"]}

    cloud = client.get("/v1/decisions?tier=cloud&limit=500").get_json()["items"]
    assert all(d["tier"] == "cloud" for d in cloud)
    assert len(cloud) == routed["by_tier"]["cloud"]
