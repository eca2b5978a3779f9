"""The job pipeline as plain functions: route a job, generate and score its image, fail it.

Each function takes a job id, reads the job from the database (the source of truth), does its step and
commits the outcome with the job's next state. All are idempotent: a redelivered message for a step that was
already done only re-publishes the next step, and unique keys make a duplicate generation or cost entry
fail at commit instead of being recorded twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy.exc import IntegrityError

from db.decisions import get_decision, record_decision
from db.generations import get_generation, record_generation
from db.jobs import get_job, transition
from db.models import Job, JobStatus
from db.session import transaction
from worker.app import GENERATE_TASKS, publish
from worker.context import ScorerUnavailable, WorkerContext
from worker.generation import GenerationRequest, cost_usd

log = logging.getLogger(__name__)


def _is_done(job: Job | None) -> bool:
    return job is None or JobStatus(job.status).terminal


def route_job(ctx: WorkerContext, job_id: str) -> str | None:
    """Decide the tier of a queued job, record the decision, and enqueue the generation.

    Returns:
        The chosen tier, or None when the job no longer needs routing.
    """
    key = uuid.UUID(job_id)
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        if _is_done(job):
            return None
        assert job is not None
        existing = get_decision(session, job_id=key)
        if existing is None:
            transition(session, job, JobStatus.ROUTING)
        prompt, requested = job.prompt, job.requested_tier

    if existing is not None:
        # Redelivery after the decision was committed: only the hand-off may be missing.
        tier = existing.tier
    else:
        decision = ctx.policy().decide(prompt, requested_tier=requested)  # type: ignore[arg-type]
        tier = decision.tier
        try:
            with transaction(ctx.sessions) as session:
                job = get_job(session, key, for_update=True)
                if _is_done(job):
                    return None
                assert job is not None
                record_decision(session, job=job, decision=decision)
                transition(session, job, JobStatus.QUEUED, detail={"stage": "routed", "tier": tier})
        except IntegrityError:
            # Another delivery of this message recorded its decision first; follow that one.
            with ctx.sessions() as session:
                winner = get_decision(session, job_id=key)
            if winner is None:
                raise
            tier = winner.tier
        log.info("routed", extra={"job_id": job_id, "tier": tier, "score": decision.score})

    publish(ctx.app, GENERATE_TASKS[tier], job_id)
    return tier


def score_image(ctx: WorkerContext, png: bytes, prompt: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Score a generated image with the process's CLIP scorer.

    A scoring failure never costs the user the image they paid for: the image is delivered with no quality
    vector (``quality`` null) and the reason goes into the job's history. A job only fails when it has no
    image to deliver.

    Returns:
        The quality vector as stored (``QualityVector.to_dict()``), or None when scoring is off or failed;
        and details for the job's history (``scoring_s``, or ``scoring_error``).
    """
    if not ctx.settings.scorer.enabled:
        return None, {}
    started = time.perf_counter()
    try:
        from worker.scoring import decode_image

        vector = ctx.scorer().score([decode_image(png, source="generated image")], [prompt])[0]
    except ScorerUnavailable as exc:  # its traceback was logged once, when loading failed
        log.warning("no scorer; the image is delivered without quality", extra={"error": str(exc)})
        return None, {"scoring_error": str(exc)}
    except Exception as exc:
        log.exception("scoring failed; the image is delivered without quality", extra={"error": str(exc)})
        return None, {"scoring_error": f"{type(exc).__name__}: {exc}"}
    return vector.to_dict(), {"scoring_s": round(time.perf_counter() - started, 4)}


def generate_job(ctx: WorkerContext, job_id: str, tier: str) -> bool:
    """Generate the image of a routed job on ``tier``, score, store and bill it, and mark the job succeeded.

    Returns:
        True when this call produced the image, False when there was nothing (left) to do.
    """
    key = uuid.UUID(job_id)
    tier_settings = ctx.settings.tier(tier)
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        if _is_done(job):
            return False
        assert job is not None
        if get_generation(session, job_id=key, tier=tier) is not None:
            transition(session, job, JobStatus.SUCCEEDED, detail={"tier": tier, "recovered": True})
            return False
        job.attempts += 1
        transition(session, job, JobStatus.GENERATING, detail={"tier": tier, "attempt": job.attempts})
        request = GenerationRequest(
            prompt=job.prompt,
            seed=job.seed,
            steps=job.steps or tier_settings.steps,
            width=job.width or tier_settings.width,
            height=job.height or tier_settings.height,
        )

    generator = ctx.generator(tier)
    result = generator.generate(request)
    stored = ctx.images.put(result.png)
    cost = cost_usd(tier_settings, result.gpu_s)
    quality, scoring = score_image(ctx, result.png, request.prompt)

    try:
        with transaction(ctx.sessions) as session:
            job = get_job(session, key, for_update=True)
            if _is_done(job):
                return False
            assert job is not None
            record_generation(
                session,
                job=job,
                tier=tier,
                role="primary",
                backend=result.backend,
                model_id=result.model_id,
                device=result.device,
                seed=request.seed,
                steps=request.steps,
                width=request.width,
                height=request.height,
                image_path=stored.path,
                image_sha256=stored.sha256,
                wall_s=result.wall_s,
                gpu_s=result.gpu_s,
                cost_usd=cost,
                quality=quality,
            )
            detail = {"tier": tier, "image_sha256": stored.sha256, **scoring}
            transition(session, job, JobStatus.SUCCEEDED, detail=detail)
    except IntegrityError:
        log.warning("duplicate generation discarded", extra={"job_id": job_id, "tier": tier})
        return False
    log.info("generated", extra={"job_id": job_id, "tier": tier, "wall_s": round(result.wall_s, 3)})
    return True


def fail_job(ctx: WorkerContext, job_id: str, error: str, *, stage: str) -> bool:
    """Mark a job failed with a reason the user can read. Returns False if it had already ended."""
    with transaction(ctx.sessions) as session:
        job = get_job(session, uuid.UUID(job_id), for_update=True)
        if _is_done(job):
            return False
        assert job is not None
        transition(session, job, JobStatus.FAILED, detail={"stage": stage}, error=error)
    log.warning("job failed", extra={"job_id": job_id, "stage": stage, "error": error})
    return True
