"""The job pipeline as plain functions: route a job, generate its image, fail it.

Each function takes a job id, reads the job from the database (the source of truth), does its step and
commits the outcome with the job's next state. All are idempotent: a redelivered message for a step that was
already done only re-publishes the next step, and unique keys make a duplicate generation or cost entry
fail at commit instead of being recorded twice.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy.exc import IntegrityError

from db.decisions import get_decision, record_decision
from db.generations import get_generation, record_generation
from db.jobs import get_job, transition
from db.models import Job, JobStatus
from db.session import transaction
from worker.app import GENERATE_TASKS, publish
from worker.context import WorkerContext
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


def generate_job(ctx: WorkerContext, job_id: str, tier: str) -> bool:
    """Generate the image of a routed job on ``tier``, store it, bill it and mark the job succeeded.

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
                quality=None,
            )
            transition(session, job, JobStatus.SUCCEEDED, detail={"tier": tier, "image_sha256": stored.sha256})
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
