"""The job pipeline as plain functions: route a job, generate and score its image, fail it.

Each function takes a job id, reads the job from the database (the source of truth), does its step and
commits the outcome with the job's next state. All are idempotent: a redelivered message for a step that was
already done only re-publishes the next step, and unique keys make a duplicate generation or cost entry
fail at commit instead of being recorded twice.

Generation is guarded by a lease: the delivery that starts generating a job records its Celery task id and
a deadline. A redelivery of that same message (its worker died) takes over at once; a different message for
the same job (a duplicate publication) leaves a live lease alone. After the deadline, the reconciler treats
the job as orphaned.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.decisions import get_decision, record_decision
from db.generations import get_generation, record_generation
from db.jobs import get_job, transition
from db.models import Job, JobStatus, Tenant, utcnow
from db.pagination import as_utc
from db.session import transaction
from router.policy import shadow_sampled
from worker.app import GENERATE_TASKS, publish
from worker.context import ScorerUnavailable, WorkerContext
from worker.generation import GenerationRequest, cost_usd

log = logging.getLogger(__name__)


def _is_done(job: Job | None) -> bool:
    return job is None or JobStatus(job.status).terminal


def route_job(ctx: WorkerContext, job_id: str) -> str | None:
    """Decide the tier of a queued job, record the decision, and enqueue the generation.

    One transaction: the job row is locked, the router decides (its shared budget window is updated in
    Redis), and the decision is written with the job's ``routing`` and ``queued`` history entries. A
    redelivered message finds the job already routed and only repeats the hand-off to the tier queue.

    Returns:
        The chosen tier, or None when the job no longer needs routing.
    """
    key = uuid.UUID(job_id)
    try:
        with transaction(ctx.sessions) as session:
            row = session.execute(
                select(Job, Tenant.cloud_budget)
                .join(Tenant, Tenant.id == Job.tenant_id)
                .where(Job.id == key)
                .with_for_update(of=Job)
            ).first()
            if row is None or _is_done(row[0]):
                return None
            job, tenant_budget = row
            if job.tier is not None:
                # Redelivery after the decision was committed: only the hand-off may be missing.
                existing = get_decision(session, job_id=key)
                tier, shadow = job.tier, bool(existing and existing.shadow)
            else:
                started = utcnow()
                # A tenant with its own cloud budget is held to it over its own window; others share one.
                budget = ctx.budget(f"tenant-{job.tenant_id}", tenant_budget) if tenant_budget is not None else None
                decision = ctx.policy().decide(
                    job.prompt,
                    requested_tier=job.requested_tier,  # type: ignore[arg-type]
                    budget=budget,
                    shadow=job.requested_tier is None and shadow_sampled(job_id, ctx.settings.shadow_rate),
                )
                tier, shadow = decision.tier, decision.shadow
                transition(session, job, JobStatus.ROUTING, at=started)
                record_decision(session, job=job, decision=decision)
                job.enqueued_at = utcnow()
                transition(session, job, JobStatus.QUEUED, detail={"stage": "routed", "tier": tier})
                log.info("routed", extra={"job_id": job_id, "tier": tier, "score": decision.score, "shadow": shadow})
    except IntegrityError:
        # Without row locks (SQLite) a concurrent delivery of this message may have decided first: follow it.
        with ctx.sessions() as session:
            winner = get_decision(session, job_id=key)
        if winner is None:
            raise
        tier, shadow = winner.tier, winner.shadow

    publish(ctx.app, GENERATE_TASKS[tier], job_id)
    if shadow:
        publish(ctx.app, GENERATE_TASKS[OTHER_TIER[tier]], job_id, role="shadow")
    return tier


OTHER_TIER = {"edge": "cloud", "cloud": "edge"}


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


def _claim(session: Session, job: Job, *, tier: str, delivery: str, ctx: WorkerContext) -> bool:
    """Take the generation lease for ``delivery``; False when another live delivery holds it."""
    now = utcnow()
    if (
        job.status == JobStatus.GENERATING
        and job.lease_owner not in (None, delivery)
        and job.lease_until is not None
        and as_utc(job.lease_until) > now
    ):
        return False
    job.attempts += 1
    job.lease_owner = delivery
    job.lease_until = now + timedelta(seconds=ctx.settings.lease_s)
    transition(session, job, JobStatus.GENERATING, detail={"tier": tier, "attempt": job.attempts})
    return True


def generate_job(ctx: WorkerContext, job_id: str, tier: str, *, delivery: str | None = None) -> bool:
    """Generate the image of a routed job on ``tier``, score, store and bill it, and mark the job succeeded.

    Args:
        ctx: the worker process's resources.
        job_id: the job.
        tier: the tier whose worker runs this.
        delivery: the Celery task id of the message being handled (a redelivery keeps its id).

    Returns:
        True when this call produced the image, False when there was nothing (left) to do.
    """
    key = uuid.UUID(job_id)
    delivery = delivery or f"local-{uuid.uuid4()}"
    tier_settings = ctx.settings.tier(tier)
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        if _is_done(job):
            return False
        assert job is not None
        if job.tier != tier:
            # A stale message: the job was (re)routed elsewhere, or its routing was not recorded. The message of
            # its current step, or the reconciler, takes it from here.
            log.warning(
                "message for another tier ignored", extra={"job_id": job_id, "tier": tier, "job_tier": job.tier}
            )
            return False
        # No generation can exist yet: the image, its cost and ``succeeded`` are committed together.
        if job.attempts >= ctx.settings.max_attempts:
            _dead_letter(session, job, f"generation started {job.attempts} times without finishing", stage="generation")
            return False
        if not _claim(session, job, tier=tier, delivery=delivery, ctx=ctx):
            log.info("duplicate message left alone: a live delivery holds the lease", extra={"job_id": job_id})
            return False
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
            job.lease_owner = None
            job.lease_until = None
            detail = {"tier": tier, "image_sha256": stored.sha256, **scoring}
            transition(session, job, JobStatus.SUCCEEDED, detail=detail)
    except IntegrityError:
        log.warning("duplicate generation discarded", extra={"job_id": job_id, "tier": tier})
        return False
    log.info("generated", extra={"job_id": job_id, "tier": tier, "wall_s": round(result.wall_s, 3)})
    return True


def generate_shadow(ctx: WorkerContext, job_id: str, tier: str) -> bool:
    """Generate, score and bill the shadow image of a shadow-sampled job on ``tier``.

    The shadow never changes the job's state or what the user receives; it only adds a labelled pair
    (both tiers' quality on one prompt) for ``routet2i data export``. A duplicate message is harmless: the
    unique key on ``(job_id, tier)`` keeps one shadow generation and one cost entry.

    Returns:
        True when this call recorded the shadow image.
    """
    key = uuid.UUID(job_id)
    tier_settings = ctx.settings.tier(tier)
    with ctx.sessions() as session:
        job = get_job(session, key)
        if job is None or get_generation(session, job_id=key, tier=tier) is not None:
            return False
        request = GenerationRequest(
            prompt=job.prompt,
            seed=job.seed,
            steps=job.steps or tier_settings.steps,
            width=job.width or tier_settings.width,
            height=job.height or tier_settings.height,
        )
    result = ctx.generator(tier).generate(request)
    stored = ctx.images.put(result.png)
    quality, _ = score_image(ctx, result.png, request.prompt)
    try:
        with transaction(ctx.sessions) as session:
            job = get_job(session, key, for_update=True)
            if job is None:
                return False
            record_generation(
                session,
                job=job,
                tier=tier,
                role="shadow",
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
                cost_usd=cost_usd(tier_settings, result.gpu_s),
                quality=quality,
            )
    except IntegrityError:
        return False
    log.info("shadow generated", extra={"job_id": job_id, "tier": tier})
    return True


def _dead_letter(session: Session, job: Job, reason: str, *, stage: str) -> None:
    job.dead_lettered_at = utcnow()
    job.lease_owner = None
    job.lease_until = None
    transition(
        session, job, JobStatus.FAILED, detail={"stage": stage, "dead_lettered": True}, error=f"dead-lettered: {reason}"
    )
    log.error("job dead-lettered", extra={"job_id": str(job.id), "stage": stage, "reason": reason})


def fail_job(ctx: WorkerContext, job_id: str, error: str, *, stage: str, dead_letter: bool = False) -> bool:
    """Mark a job failed with a reason the user can read. Returns False if it had already ended.

    Args:
        ctx: the worker process's resources.
        job_id: the job.
        error: what went wrong, for the user.
        stage: ``routing`` or ``generation``.
        dead_letter: the failure may pass (exhausted retries of a transient fault): keep the job replayable
            with ``routet2i dlq replay``.
    """
    with transaction(ctx.sessions) as session:
        job = get_job(session, uuid.UUID(job_id), for_update=True)
        if _is_done(job):
            return False
        assert job is not None
        if dead_letter:
            _dead_letter(session, job, error, stage=stage)
        else:
            job.lease_owner = None
            job.lease_until = None
            transition(session, job, JobStatus.FAILED, detail={"stage": stage}, error=error)
            log.warning("job failed", extra={"job_id": job_id, "stage": stage, "error": error})
    return True
