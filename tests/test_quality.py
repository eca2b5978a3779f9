"""Every generated image is scored by its tier worker, stored with the generation, and shown by the API.

Through real Celery workers (one per queue) on the test PostgreSQL and Redis; the workers score with the
default ViT-B-32 and fixed-seed random weights, so this process can build the same scorer and check the
stored numbers against the stored image.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from statistics import fmean

import pytest

from api.app import create_app
from core.settings import Settings
from db.jobs import create_job
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant, issue_api_key
from router.quality_metrics import ALIGNMENT, METRIC_NAMES, ROUTET2I_V1
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import WorkerPool, wait_for_job
from worker import generating
from worker.context import WorkerContext
from worker.scoring import ClipScorer, decode_image
from worker.transport import create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = {
    "edge": ["a lighthouse on a cliff at dusk", "a bowl of ramen"],
    "cloud": ["an astronaut riding a horse through a field of sunflowers", "three red apples on a blue plate"],
}


@pytest.fixture()
def client(pg_settings: Settings, stack: WorkerPool):
    """A client of a fresh tenant allowed to choose the tier, so its statistics hold only this test's jobs."""
    key = create_tenant_key(pg_settings, forced_tiers=("edge", "cloud"))
    with create_app(pg_settings).test_client() as test_client:
        yield authorize(test_client, key)


def test_every_image_is_scored_stored_and_averaged_per_tier(client, pg_settings: Settings) -> None:
    submitted = {}
    for tier, prompts in PROMPTS.items():
        for seed, prompt in enumerate(prompts):
            response = client.post("/v1/jobs", json={"prompt": prompt, "seed": seed, "tier": tier})
            assert response.status_code == 202, response.get_json()
            submitted[response.get_json()["id"]] = (tier, prompt)
    jobs = {job_id: wait_for_job(client, job_id) for job_id in submitted}
    scorer = ClipScorer.from_settings(pg_settings.scorer)

    for job_id, job in jobs.items():
        tier, prompt = submitted[job_id]
        assert job["status"] == "succeeded", job["error"]
        assert job["tier"] == tier
        quality = job["result"]["quality"]
        assert quality["metric_set"] == ROUTET2I_V1.id
        assert tuple(quality["values"]) == METRIC_NAMES
        assert all(0.0 < quality["values"][m.name] < 1.0 for m in ROUTET2I_V1.metrics)
        assert 0.0 <= quality["values"][ALIGNMENT] <= ROUTET2I_V1.alignment_weight
        assert job["events"][-1]["detail"]["scoring_s"] > 0

        # The stored vector is the scorer's verdict on the stored image and the job's prompt.
        png = client.get(job["result"]["image_url"]).data
        expected = scorer.score([decode_image(png)], [prompt])[0]
        assert quality["values"] == pytest.approx(dict(expected.values), abs=1e-5)

    # GET /v1/stats averages the tenant's scored images per tier, metric by metric.
    mean_quality = client.get("/v1/stats").get_json()["mean_quality"]
    assert set(mean_quality) == set(PROMPTS)
    for tier in PROMPTS:
        vectors = [j["result"]["quality"]["values"] for j in jobs.values() if j["tier"] == tier]
        assert len(vectors) == len(PROMPTS[tier])
        assert mean_quality[tier] == pytest.approx({m: fmean(v[m] for v in vectors) for m in METRIC_NAMES}, abs=1e-9)


def _settings(pg_settings: Settings, tmp_path: Path, **scorer: object) -> Settings:
    return make_settings(
        database_url=pg_settings.database_url,
        broker_url=pg_settings.broker_url,
        image_dir=tmp_path / "images",
        cache_dir=pg_settings.cache_dir,
        edge={"backend": "null", "model": "flat-colour"},
        scorer=scorer,
    )


def _generate(settings: Settings, ctx: WorkerContext, prompt: str) -> dict:
    """Create a job, run the tier worker's step on it in this process, and read it back through the API."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        tenant = create_tenant(session, name=f"t-{uuid.uuid4().hex[:10]}")
        key = issue_api_key(session, tenant=tenant)
        session.flush()  # the tenant row before the job that refers to it
        job = create_job(session, tenant_id=tenant.id, prompt=prompt, seed=1, requested_tier="edge")
        job.tier = "edge"  # routed, as the route worker would have left it
        job_id = str(job.id)
    assert generating.generate_job(ctx, job_id, "edge") is True
    with create_app(settings).test_client() as api:
        return authorize(api, key).get(f"/v1/jobs/{job_id}").get_json()


def test_a_scoring_failure_delivers_the_image_without_quality(pg_settings: Settings, tmp_path: Path) -> None:
    """Product rule: the user gets the image they paid for; the missing score is explained in its history."""
    checkpoint = tmp_path / f"missing-{uuid.uuid4().hex[:6]}.pt"
    settings = _settings(pg_settings, tmp_path, pretrained=str(checkpoint))
    ctx = WorkerContext(settings, create_celery(settings))
    try:
        for prompt in ("a red square", "a blue circle"):
            job = _generate(settings, ctx, prompt)
            assert job["status"] == "succeeded", job
            assert job["error"] is None
            assert job["result"]["quality"] is None
            assert job["result"]["image_sha256"]
            detail = job["events"][-1]["detail"]
            assert "scorer failed to load" in detail["scoring_error"]
            assert checkpoint.name in detail["scoring_error"]
            assert "scoring_s" not in detail
    finally:
        ctx.close()


def test_scoring_switched_off_stores_no_quality_and_no_error(pg_settings: Settings, tmp_path: Path) -> None:
    settings = _settings(pg_settings, tmp_path, enabled=False)
    ctx = WorkerContext(settings, create_celery(settings))
    try:
        job = _generate(settings, ctx, "a green triangle")
    finally:
        ctx.close()
    assert job["status"] == "succeeded"
    assert job["result"]["quality"] is None
    assert set(job["events"][-1]["detail"]) == {"tier", "image_sha256"}
