"""The job pipeline as plain functions: route jobs, generate and score their images, fail a job.

Each step takes a batch of job ids (a worker's batch of messages; one id when the system is idle), reads the
jobs from the database (the source of truth), does its step for all of them and commits the outcomes with the
jobs' next states. All are idempotent: a redelivered message for a step that was
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
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import redis.exceptions
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.settings import TierSettings
from db.decisions import get_decision, record_decision
from db.generations import NewGeneration, get_generation, record_generations
from db.images import StoredImage
from db.jobs import get_job, transition
from db.models import Decision, Generation, Job, JobStatus, Tenant, utcnow
from db.pagination import as_utc
from db.session import transaction
from router.budget import BudgetConfig, BudgetController, BudgetRequest
from router.policy import RouteRequest, shadow_sampled
from router.types import BudgetVerdict
from worker.app import GENERATE_TASKS, chunks, publish_many
from worker.budget_store import give_back, hold_reservation, take_reservation
from worker.context import ScorerUnavailable, WorkerContext
from worker.generation import GenerationRequest, GenerationResult, cost_usd

log = logging.getLogger(__name__)


def _is_done(job: Job | None) -> bool:
    return job is None or JobStatus(job.status).terminal


def route_job(ctx: WorkerContext, job_id: str) -> str | None:
    """Route one job (:func:`route_jobs` with one id).

    Returns:
        The chosen tier, or None when the job no longer needs routing.
    """
    return route_jobs(ctx, [job_id])[job_id]


def route_jobs(ctx: WorkerContext, job_ids: Sequence[str]) -> dict[str, str | None]:
    """Decide the tier of queued jobs, record the decisions, and enqueue their generations.

    One transaction for the whole batch: the job rows are locked (in id order, so two batches never wait on
    each other in a cycle), the router scores every prompt in one call, each budget window is updated in one
    Redis transaction, and each decision is written with its job's ``routing`` and ``queued`` history
    entries. A redelivered message finds its job already routed and only repeats the hand-off to the tier
    queue.

    Returns:
        Per job id, the chosen tier, or None when the job no longer needs routing.
    """
    tiers: dict[str, str | None] = dict.fromkeys(job_ids)
    keys = sorted({uuid.UUID(job_id) for job_id in job_ids})
    handoffs: list[tuple[str, str, bool]] = []  # (job id, tier, shadow)
    try:
        with transaction(ctx.sessions) as session:
            rows = session.execute(
                select(Job, Tenant.cloud_budget)
                .join(Tenant, Tenant.id == Job.tenant_id)
                .where(Job.id.in_(keys))
                .order_by(Job.id)
                .with_for_update(of=Job)
            ).all()
            pending: list[tuple[Job, RouteRequest]] = []
            for job, tenant_budget in rows:
                if _is_done(job):
                    continue
                if job.tier is not None:
                    # Redelivery after the decision was committed: only the hand-off may be missing.
                    existing = get_decision(session, job_id=job.id)
                    handoffs.append((str(job.id), job.tier, bool(existing and existing.shadow)))
                    continue
                # A tenant with its own cloud budget is held to it over its own window; others share one.
                budget = ctx.budget(f"tenant-{job.tenant_id}", tenant_budget) if tenant_budget is not None else None
                request = RouteRequest(
                    job.prompt,
                    requested_tier=job.requested_tier,  # type: ignore[arg-type]
                    budget=budget,
                    shadow=job.requested_tier is None and shadow_sampled(str(job.id), ctx.settings.shadow_rate),
                )
                pending.append((job, request))
            if pending:
                started = utcnow()
                decisions = ctx.policy().decide_many([request for _, request in pending])
                for (job, _), decision in zip(pending, decisions, strict=True):
                    transition(session, job, JobStatus.ROUTING, at=started)
                    record_decision(session, job=job, decision=decision)
                    state = decision.budget_state
                    if state.get("spend_period") and state.get("reserved_usd"):  # a cloud image, delivered or shadow
                        hold_reservation(job, str(state["spend_period"]), float(state["reserved_usd"]))
                    job.enqueued_at = utcnow()
                    transition(session, job, JobStatus.QUEUED, detail={"stage": "routed", "tier": decision.tier})
                    handoffs.append((str(job.id), decision.tier, decision.shadow))
                    log.info(
                        "routed",
                        extra={
                            "job_id": str(job.id),
                            "tier": decision.tier,
                            "score": decision.score,
                            "shadow": decision.shadow,
                            "batch": len(pending),
                        },
                    )
    except IntegrityError:
        if len(keys) > 1:
            # Without row locks (SQLite) a concurrent delivery decided one of these first: route each alone.
            for job_id in job_ids:
                tiers.update(route_jobs(ctx, [job_id]))
            return tiers
        # A concurrent delivery of this message decided first: follow it.
        with ctx.sessions() as session:
            winner = get_decision(session, job_id=keys[0])
        if winner is None:
            raise
        handoffs = [(str(keys[0]), winner.tier, winner.shadow)]

    # The batch's hand-offs in one round trip to the broker: per tier, messages of at most as many jobs as one
    # of its workers takes at once; shadow generations one per message.
    messages: list[tuple[str, Sequence[str], dict[str, Any]]] = []
    for tier, task in GENERATE_TASKS.items():
        ids = [job_id for job_id, chosen, _ in handoffs if chosen == tier]
        messages += [(task, chunk, {}) for chunk in chunks(ids, ctx.settings.tier(tier).max_batch)]
    messages += [(GENERATE_TASKS[OTHER_TIER[tier]], [job_id], {"role": "shadow"}) for job_id, tier, s in handoffs if s]
    publish_many(ctx.app, messages)
    given = {str(uuid.UUID(job_id)): job_id for job_id in job_ids}
    for job_id, tier, _ in handoffs:
        tiers[given[job_id]] = tier
    return tiers


OTHER_TIER = {"edge": "cloud", "cloud": "edge"}


def score_images(
    ctx: WorkerContext, pngs: Sequence[bytes], prompts: Sequence[str]
) -> list[tuple[dict[str, Any] | None, dict[str, Any]]]:
    """Score generated images with the process's CLIP scorer (in batches of its ``batch_size``).

    A scoring failure never costs the user the image they paid for: the image is delivered with no quality
    vector (``quality`` null) and the reason goes into the job's history. A job only fails when it has no
    image to deliver.

    Returns:
        Per image: the quality vector as stored (``QualityVector.to_dict()``), or None when scoring is off or
        failed; and details for the job's history (``scoring_s``, the batch's time per image, or
        ``scoring_error``).
    """
    if not ctx.settings.scorer.enabled or not pngs:
        return [(None, {}) for _ in pngs]
    started = time.perf_counter()
    try:
        from worker.scoring import decode_image

        images = [decode_image(png, source="generated image") for png in pngs]
        vectors = ctx.scorer().score(images, list(prompts))
    except ScorerUnavailable as exc:  # its traceback was logged once, when loading failed
        log.warning("no scorer; the image is delivered without quality", extra={"error": str(exc)})
        return [(None, {"scoring_error": str(exc)}) for _ in pngs]
    except Exception as exc:
        log.exception("scoring failed; the image is delivered without quality", extra={"error": str(exc)})
        return [(None, {"scoring_error": f"{type(exc).__name__}: {exc}"}) for _ in pngs]
    per_image = round((time.perf_counter() - started) / len(pngs), 4)
    return [(vector.to_dict(), {"scoring_s": per_image}) for vector in vectors]


def _claim(session: Session, job: Job, *, tier: str, delivery: str, ctx: WorkerContext, batch: int) -> bool:
    """Take the generation lease for ``delivery``; False when another live delivery holds it. ``batch``: how
    many jobs the worker took together (recorded in the job's history)."""
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
    transition(session, job, JobStatus.GENERATING, detail={"tier": tier, "attempt": job.attempts, "batch": batch})
    return True


def generate_job(ctx: WorkerContext, job_id: str, tier: str, *, delivery: str | None = None) -> bool:
    """Generate one job's image (:func:`generate_jobs` with one job).

    Returns:
        True when this call produced the image, False when there was nothing (left) to do.

    Raises:
        GenerationError: (or any other exception) the generator failed for this job.
    """
    outcome = generate_jobs(ctx, [(job_id, delivery or f"local-{uuid.uuid4()}")], tier)[job_id]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def generate_jobs(ctx: WorkerContext, jobs: Sequence[tuple[str, str]], tier: str) -> dict[str, bool | Exception]:
    """Generate the images of routed jobs on ``tier``, score, store and bill them, and mark them succeeded.

    Two transactions for the whole batch: one takes every job's generation lease, one records every image
    with its cost and the job's ``succeeded``. Between them the generator runs on all the claimed jobs at once
    (a diffusers pipeline generates jobs of one size and step count in one call) and the scorer scores every
    image in batches.

    Args:
        ctx: the worker process's resources.
        jobs: ``(job id, delivery)`` pairs; the delivery is the Celery task id of the message being handled
            (a redelivery keeps its id).
        tier: the tier whose worker runs this.

    Returns:
        Per job id: True when this call produced the image, False when there was nothing (left) to do, or the
        exception the generator raised for that job (the caller decides between retrying and failing it).
        Database and broker errors are raised for the whole batch.
    """
    tier_settings = ctx.settings.tier(tier)
    outcomes: dict[str, bool | Exception] = {job_id: False for job_id, _ in jobs}
    given = {uuid.UUID(job_id): job_id for job_id, _ in jobs}
    delivery_of = {uuid.UUID(job_id): delivery for job_id, delivery in jobs}
    claimed: list[tuple[uuid.UUID, GenerationRequest]] = []
    # Jobs whose tier the router chose (and whose cloud image it reserved from the spend limit, if one is set).
    routed: set[uuid.UUID] = set()
    with transaction(ctx.sessions) as session:
        for job in _locked_jobs(session, sorted(given)):
            if _is_done(job):
                continue
            job_id = str(job.id)
            if job.tier != tier:
                # A stale message: the job was (re)routed elsewhere, or its routing was not recorded. The message
                # of its current step, or the reconciler, takes it from here.
                log.warning(
                    "message for another tier ignored", extra={"job_id": job_id, "tier": tier, "job_tier": job.tier}
                )
                continue
            # No generation can exist yet: the image, its cost and ``succeeded`` are committed together.
            if job.attempts >= ctx.settings.max_attempts:
                reason = f"generation started {job.attempts} times without finishing"
                if not _deliver_replaced(session, job, reason, {"tier": tier}):
                    _dead_letter(session, job, reason, stage="generation")
                continue
            if not _claim(session, job, tier=tier, delivery=delivery_of[job.id], ctx=ctx, batch=len(given)):
                log.info("duplicate message left alone: a live delivery holds the lease", extra={"job_id": job_id})
                continue
            claimed.append((job.id, _generation_request(job, tier_settings)))
            if job.requested_tier is None:
                routed.add(job.id)
    if not claimed:
        return outcomes

    results = ctx.generator(tier).generate_batch([request for _, request in claimed])
    produced: list[tuple[uuid.UUID, GenerationRequest, GenerationResult]] = []
    for (key, request), result in zip(claimed, results, strict=True):
        if isinstance(result, Exception):
            outcomes[given[key]] = result
        else:
            produced.append((key, request, result))
    stored = [ctx.images.put(result.png) for _, _, result in produced]
    scored = score_images(
        ctx, [result.png for _, _, result in produced], [request.prompt for _, request, _ in produced]
    )
    escalations = _escalations(ctx, tier, [key for key, _, _ in produced], scored, routed)

    def record(session: Session, items: Sequence[int]) -> list[int]:
        """Record the produced images ``items`` (indices into ``produced``); returns those recorded."""
        jobs_by_id = {job.id: job for job in _locked_jobs(session, sorted(produced[i][0] for i in items))}
        recorded = [
            i
            for i in items
            if not _is_done(job := jobs_by_id.get(produced[i][0])) and job is not None and job.tier == tier
        ]
        images = []
        for i in recorded:
            key, request, result = produced[i]
            job = jobs_by_id[key]
            job.lease_owner = None
            job.lease_until = None
            detail: dict[str, Any] = {"tier": tier, "image_sha256": stored[i].sha256, **scored[i][1]}
            escalation = escalations.get(i)
            if escalation is not None:
                detail["escalation"] = escalation
            role = "replaced" if escalation is not None and escalation["escalated"] else "primary"
            images.append(
                _new_generation(key, tier, tier_settings, role, request, result, stored[i], quality=scored[i][0])
            )
            if role == "primary":
                transition(session, job, JobStatus.SUCCEEDED, detail=detail)
                continue
            # Escalated: the cloud generates the job again, from a fresh count of attempts, and the user
            # receives that image; this one stays recorded (and billed) as the image it replaced.
            assert escalation is not None
            job.tier = OTHER_TIER[tier]
            job.attempts = 0
            job.enqueued_at = utcnow()
            if escalation.get("spend_period"):
                hold_reservation(job, str(escalation["spend_period"]), float(escalation["reserved_usd"]))
            transition(session, job, JobStatus.QUEUED, detail={**detail, "stage": "escalated"})
        record_generations(session, images)
        return recorded

    try:
        with transaction(ctx.sessions) as session:
            recorded = record(session, range(len(produced)))
    except IntegrityError:
        if len(produced) == 1:
            log.warning("duplicate generation discarded", extra={"job_id": given[produced[0][0]], "tier": tier})
            recorded = []
        else:
            # One of them was recorded by a concurrent delivery: record the others one by one.
            recorded = []
            for i in range(len(produced)):
                try:
                    with transaction(ctx.sessions) as session:
                        recorded += record(session, [i])
                except IntegrityError:
                    log.warning("duplicate generation discarded", extra={"job_id": given[produced[i][0]], "tier": tier})
    if tier == "cloud":
        _count_spend_beyond_reservation(ctx, [produced[i][2].gpu_s for i in recorded if produced[i][0] in routed])
    for i in recorded:
        key, _, result = produced[i]
        outcomes[given[key]] = True
        log.info(
            "generated",
            extra={"job_id": given[key], "tier": tier, "wall_s": round(result.wall_s, 3), "batch": len(claimed)},
        )
    escalated = [given[produced[i][0]] for i in recorded if escalations.get(i, {}).get("escalated")]
    if escalated:
        other = OTHER_TIER[tier]
        try:
            publish_many(
                ctx.app,
                [(GENERATE_TASKS[other], chunk, {}) for chunk in chunks(escalated, ctx.settings.tier(other).max_batch)],
            )
        except Exception as exc:  # the jobs are queued on the cloud in the database: the reconciler publishes them
            log.warning("escalated jobs not published", extra={"jobs": escalated, "error": str(exc)})
        log.info("escalated to the cloud", extra={"jobs": escalated, "tier": tier})
    return outcomes


def _escalations(
    ctx: WorkerContext,
    tier: str,
    keys: Sequence[uuid.UUID],
    scored: Sequence[tuple[dict[str, Any] | None, dict[str, Any]]],
    routed: set[uuid.UUID],
) -> dict[int, dict[str, Any]]:
    """Which of the edge images just scored go to the cloud again (``escalation_rate``).

    Candidates are the images of routed jobs (not a forced tier, not shadow-sampled, which get a cloud image
    anyway, not of a tenant whose own cloud budget is zero) that carry ``escalation_metric``. They are decided
    in order in one transaction per escalation window (the deployment's shared one, or a tenant's own:
    :meth:`WorkerContext.escalation`), whose score is the metric's negative: the worst-scoring share goes to
    the cloud, with ``escalation_below`` as the edge floor and the spend limit as for routing. An escalation
    that cannot be decided (Redis unreachable) delivers the edge images as they are.

    Returns:
        Per candidate (an index into ``keys``): what was decided, by which window and why, for the job's history.
    """
    if tier != "edge" or ctx.settings.escalation_rate <= 0:
        return {}
    metric = ctx.settings.escalation_metric
    candidates: list[tuple[int, float]] = []
    for i, key in enumerate(keys):
        quality = scored[i][0]
        value = quality["values"].get(metric) if quality else None
        if key in routed and isinstance(value, int | float):
            candidates.append((i, float(value)))
    if not candidates:
        return {}
    with ctx.sessions() as session:  # each candidate's tenant budget, and whether it was shadow-sampled
        rows = session.execute(
            select(Job.id, Job.tenant_id, Tenant.cloud_budget, Decision.shadow)
            .join(Tenant, Tenant.id == Job.tenant_id)
            .outerjoin(Decision, Decision.job_id == Job.id)
            .where(Job.id.in_([keys[i] for i, _ in candidates]))
        )
        tenants = {job_id: (tenant_id, budget) for job_id, tenant_id, budget, shadow in rows if not shadow}
    windows: dict[str, tuple[BudgetController, list[tuple[int, float]]]] = {}
    for i, value in candidates:
        controller = ctx.escalation(*tenants[keys[i]]) if keys[i] in tenants else None
        if controller is not None:
            windows.setdefault(controller.name, (controller, []))[1].append((i, value))
    below = ctx.settings.escalation_below
    floor = None if below is None else -below  # a score -value at or below it: value at or above `below`
    decided: dict[int, dict[str, Any]] = {}
    for name, (controller, group) in windows.items():
        try:
            verdicts = controller.decide_many([BudgetRequest(-value, floor=floor) for _, value in group])
        except Exception as exc:
            log.warning("escalation not decided; the edge images are delivered", extra={"error": str(exc)})
            for i, value in group:
                decided[i] = {
                    "metric": metric,
                    "value": value,
                    "window": name,
                    "escalated": False,
                    "reason": f"not decided: {exc}",
                }
            continue
        for (i, value), verdict in zip(group, verdicts, strict=True):
            threshold = None if verdict.threshold is None else 0.0 - verdict.threshold  # (never -0.0)
            info: dict[str, Any] = {
                "metric": metric,
                "value": round(value, 6),
                "threshold": None if threshold is None else round(threshold, 6),
                "window": name,
                "escalated": verdict.cloud,
                "reason": _escalation_reason(verdict, controller.config, metric, value, threshold, below),
            }
            if verdict.cloud and verdict.reserved_usd:
                info["reserved_usd"] = verdict.reserved_usd
                info["spend_period"] = verdict.state.get("spend_period")
            decided[i] = info
    return decided


def _escalation_reason(
    verdict: BudgetVerdict,
    config: BudgetConfig,
    metric: str,
    value: float,
    threshold: float | None,
    below: float | None,
) -> str:
    """The escalation window's verdict in the metric's own terms (the window ranks the metric's negative)."""
    state = verdict.state
    if verdict.cloud:
        assert threshold is not None
        return f"{metric} {value:.4g} below the escalation threshold {threshold:.4g}"
    if below is not None and value >= below:
        return f"{metric} {value:.4g} is not below {below:.4g}"
    if state["recent_cloud"] + 1 > state["cap"]:
        return (
            f"escalation budget full: {state['recent_cloud']} of the last {state['recent_decisions']} edge images "
            f"escalated, at most {state['cap']} allowed"
        )
    if threshold is None:
        return "no edge image scored yet to compare with"
    if value < threshold and "spent_usd" in state and not config.affordable(state["spent_usd"]):
        return f"{metric} {value:.4g} below the escalation threshold {threshold:.4g}, but the spend limit is reached"
    return f"{metric} {value:.4g} not below the escalation threshold {threshold:.4g}"


def _count_spend_beyond_reservation(ctx: WorkerContext, gpu_seconds: Sequence[float]) -> None:
    """Add to the period's cloud spend what routed cloud images were billed beyond the price per image their
    decision reserved (the price per GPU-second), so the spend limit sees what is billed.

    It runs after the images were recorded: if Redis is unreachable now, the job stays done and the period's
    count stays short by this amount (logged), rather than the image being generated and billed again.
    """
    ledger = ctx.spend_ledger()
    price = ctx.settings.cloud.price_per_gpu_second
    if ledger is None or price == 0 or not gpu_seconds:
        return
    usd = price * sum(gpu_seconds)
    try:
        ledger.add(usd)
    except redis.exceptions.RedisError as exc:
        log.warning("cloud spend not counted: Redis unreachable", extra={"usd": round(usd, 6), "error": str(exc)})


def _generation_request(job: Job, tier_settings: TierSettings) -> GenerationRequest:
    """What to generate for ``job`` on a tier: the job's own steps and size, else the tier's defaults."""
    return GenerationRequest(
        prompt=job.prompt,
        seed=job.seed,
        steps=job.steps or tier_settings.steps,
        width=job.width or tier_settings.width,
        height=job.height or tier_settings.height,
    )


def _new_generation(
    key: uuid.UUID,
    tier: str,
    tier_settings: TierSettings,
    role: str,
    request: GenerationRequest,
    result: GenerationResult,
    stored: StoredImage,
    *,
    quality: dict[str, Any] | None,
) -> NewGeneration:
    """The record of one stored image of job ``key``, billed at the tier's prices."""
    return NewGeneration(
        job_id=key,
        tier=tier,
        role=role,
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


def _locked_jobs(session: Session, keys: Sequence[uuid.UUID]) -> list[Job]:
    """The jobs ``keys`` with their rows locked, in id order (so two batches never wait on each other in a cycle)."""
    if not keys:
        return []
    return list(session.scalars(select(Job).where(Job.id.in_(keys)).order_by(Job.id).with_for_update()))


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
        request = _generation_request(job, tier_settings)
    result = ctx.generator(tier).generate(request)
    stored = ctx.images.put(result.png)
    ((quality, _),) = score_images(ctx, [result.png], [request.prompt])
    try:
        with transaction(ctx.sessions) as session:
            if get_job(session, key, for_update=True) is None:
                return False
            record_generations(
                session, [_new_generation(key, tier, tier_settings, "shadow", request, result, stored, quality=quality)]
            )
    except IntegrityError:
        return False
    if tier == "cloud":
        _count_spend_beyond_reservation(ctx, [result.gpu_s])
    log.info("shadow generated", extra={"job_id": job_id, "tier": tier})
    return True


def shadow_failed(ctx: WorkerContext, job_id: str, tier: str, error: str) -> bool:
    """A shadow generation's generator raised on every attempt: no image was produced or billed, so the
    reservation the job holds for a cloud shadow goes back to the spend ledger (once: the job's reservation is
    cleared in the same transaction). The job itself is left as it is.

    Returns:
        True when a reservation was given back.
    """
    if tier != "cloud":
        return False
    key = uuid.UUID(job_id)
    with transaction(ctx.sessions) as session:
        job = get_job(session, key, for_update=True)
        # A job on the edge holding a reservation holds its cloud shadow's; a shadow image recorded (by an
        # earlier delivery of the same message) was billed.
        if job is None or job.tier != "edge" or get_generation(session, job_id=key, tier="cloud") is not None:
            return False
        released = take_reservation(job)
    if released is None:
        return False
    log.warning("shadow generation failed for good", extra={"job_id": job_id, "tier": tier, "error": error})
    give_back(ctx.spend_ledger(), *released, job_id=job_id)
    return True


def _deliver_replaced(session: Session, job: Job, error: str, detail: dict[str, Any]) -> bool:
    """If ``job`` was escalated and its cloud generation failed for good, deliver the edge image the
    escalation was to replace (the job succeeds on the edge, the failure in its history). Returns whether it
    did; False for any other job, which fails."""
    if job.tier != "cloud" or job.requested_tier is not None:
        return False
    replaced = session.scalars(
        select(Generation).where(Generation.job_id == job.id, Generation.role == "replaced")
    ).first()
    if replaced is None:
        return False
    replaced.role = "primary"
    job.tier = replaced.tier
    job.lease_owner = None
    job.lease_until = None
    transition(session, job, JobStatus.SUCCEEDED, detail={**detail, "stage": "escalation failed", "error": error})
    log.warning("escalation failed; the edge image is delivered", extra={"job_id": str(job.id), "error": error})
    return True


def _dead_letter(session: Session, job: Job, reason: str, *, stage: str, detail: dict[str, Any] | None = None) -> None:
    job.dead_lettered_at = utcnow()
    job.lease_owner = None
    job.lease_until = None
    transition(
        session,
        job,
        JobStatus.FAILED,
        detail={"stage": stage, **(detail or {}), "dead_lettered": True},
        error=f"dead-lettered: {reason}",
    )
    log.error("job dead-lettered", extra={"job_id": str(job.id), "stage": stage, "reason": reason})


def fail_job(
    ctx: WorkerContext,
    job_id: str,
    error: str,
    *,
    stage: str,
    dead_letter: bool = False,
    release_reservation: bool = False,
) -> bool:
    """Mark a job failed with a reason the user can read (an escalated job whose cloud generation fails
    delivers its edge image instead). Returns False if it had already ended.

    Args:
        ctx: the worker process's resources.
        job_id: the job.
        error: what went wrong, for the user.
        stage: ``routing`` or ``generation``.
        dead_letter: the failure may pass (exhausted retries of a transient fault): keep the job replayable
            with ``routet2i dlq replay``.
        release_reservation: the tier's generator raised on every attempt, so no image was produced or
            billed: the reservation of a job failing on the cloud goes back to the spend ledger. (Other
            failures keep it: an image may have been billed before the failure. A job failing on the edge
            keeps its shadow's reservation: the shadow is generated whatever becomes of the job.)
    """
    released: tuple[str, float] | None = None
    with transaction(ctx.sessions) as session:
        job = get_job(session, uuid.UUID(job_id), for_update=True)
        if _is_done(job):
            return False
        assert job is not None
        detail: dict[str, Any] = {"stage": stage}
        if release_reservation and job.tier == "cloud":
            released = take_reservation(job)
            if released is not None:
                detail["released_usd"] = released[1]
        delivered = stage == "generation" and _deliver_replaced(session, job, error, detail)
        if not delivered and dead_letter:
            _dead_letter(session, job, error, stage=stage, detail=detail)
        elif not delivered:
            job.lease_owner = None
            job.lease_until = None
            transition(session, job, JobStatus.FAILED, detail=detail, error=error)
            log.warning("job failed", extra={"job_id": job_id, "stage": stage, "error": error})
    if released is not None:
        give_back(ctx.spend_ledger(), *released, job_id=job_id)
    return True
