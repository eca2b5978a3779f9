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
from sqlalchemy import select

from api.app import create_app
from db.jobs import create_job
from db.models import Generation
from db.session import make_engine, make_session_factory, transaction
from router.metrics import ALIGNMENT, METRIC_NAMES, ROUTET2I_V1
from routet2i.settings import Settings
from tests.conftest import make_settings
from tests.support import WorkerPool, wait_for_job
from worker import pipeline
from worker.app import ROUTE_TASK, create_celery, publish
from worker.context import WorkerContext
from worker.scoring import ClipScorer, decode_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = {
    "edge": ["a lighthouse on a cliff at dusk", "a bowl of ramen"],
    "cloud": ["an astronaut riding a horse through a field of sunflowers", "three red apples on a blue plate"],
}


@pytest.fixture()
def client(pg_settings: Settings, stack: WorkerPool):
    with create_app(pg_settings).test_client() as test_client:
        yield test_client


def submit(settings: Settings, prompt: str, *, tier: str, seed: int) -> str:
    """A job forced onto ``tier``, enqueued for routing exactly as the API enqueues one."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        job = create_job(session, prompt=prompt, seed=seed, requested_tier=tier)
        job_id = str(job.id)
    publish(create_celery(settings), ROUTE_TASK, job_id)
    return job_id


def test_every_image_is_scored_stored_and_averaged_per_tier(client, pg_settings: Settings) -> None:
    ids = {
        job_id: (tier, prompt)
        for tier, prompts in PROMPTS.items()
        for seed, prompt in enumerate(prompts)
        for job_id in [submit(pg_settings, prompt, tier=tier, seed=seed)]
    }
    jobs = {job_id: wait_for_job(client, job_id) for job_id in ids}
    scorer = ClipScorer.from_settings(pg_settings.scorer)

    for job_id, job in jobs.items():
        tier, prompt = ids[job_id]
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

    # GET /v1/stats averages every scored generation of a tier, metric by metric.
    stats = client.get("/v1/stats").get_json()
    sessions = make_session_factory(make_engine(pg_settings.database_url))
    with sessions() as session:
        rows = session.execute(select(Generation.tier, Generation.quality).where(Generation.quality.is_not(None))).all()
    for tier in ("edge", "cloud"):
        stored = [quality["values"] for row_tier, quality in rows if row_tier == tier]
        assert len(stored) >= len(PROMPTS[tier])
        mean = stats["mean_quality"][tier]
        assert set(mean) == set(METRIC_NAMES)
        for metric in METRIC_NAMES:
            assert mean[metric] == pytest.approx(fmean(v[metric] for v in stored if metric in v), abs=1e-9)


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
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        job_id = str(create_job(session, prompt=prompt, seed=1, requested_tier="edge").id)
    assert pipeline.generate_job(ctx, job_id, "edge") is True
    with create_app(settings).test_client() as api:
        return api.get(f"/v1/jobs/{job_id}").get_json()


def test_a_scoring_failure_delivers_the_image_without_quality(pg_settings: Settings, tmp_path: Path) -> None:
    """Product rule: the user gets the image they paid for; the missing score is explained in its history."""
    checkpoint = tmp_path / f"missing-{uuid.uuid4().hex[:6]}.pt"
    settings = _settings(pg_settings, tmp_path, pretrained=str(checkpoint))
    ctx = WorkerContext(settings, create_celery(settings))
    try:
        for prompt in ("a red square", "a blue circle"):
            job = _generate(settings, ctx, prompt)
            assert job["status"] == "succeeded" and job["error"] is None
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
