"""The generation stage: generate routed jobs' images on a tier, score, store and bill them, and deliver them
(or escalate the worst edge images to the cloud); and the shadow images of shadow-sampled jobs.

Two transactions for a whole batch: one takes every job's generation lease (:func:`db.lifecycle.claim_lease`),
one records every image with its cost and the job's next state. Between them the generator runs on all the
claimed jobs at once (a diffusers pipeline generates jobs of one size and step count in one call) and the
scorer scores every image in batches.

Generation is guarded by the lease: the delivery that starts generating a job records its Celery task id and
a deadline. A redelivery of that same message (its worker died) takes over at once; a different message for
the same job (a duplicate publication) leaves a live lease alone. After the deadline, the reconciler treats
the job as orphaned. Unique keys on ``(job, tier)`` make a duplicate generation or cost entry fail at commit
instead of being recorded twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.tier_settings import TierSettings
from db.generations import NewGeneration, get_generation, record_generations
from db.images import StoredImage
from db.jobs import get_job, lock_jobs, tenant_budgets_unless_shadowed
from db.lifecycle import (
    claim_lease,
    dead_letter,
    deliver_replaced,
    discard,
    escalate,
    expire_if_overdue,
    is_done,
    is_stopped,
    renew_leases,
    succeed,
)
from db.load import record_service_time, size_key
from db.models import Job
from db.redis_state import give_back
from db.session import transaction
from router.budget import BudgetController
from router.cost import beyond_reservation_usd, image_cost_usd, wasted_when_discarded
from router.escalation import decide_escalations
from worker.context import ScorerUnavailable, WorkerContext
from worker.fallback import breaker_open, record_success, try_fallback
from worker.generators import GenerationRequest, GenerationResult
from worker.routing import other_tier
from worker.transport import chunks, generate_task, publish_many

log = logging.getLogger(__name__)

Scored = tuple[dict[str, Any] | None, dict[str, Any]]
"""An image's quality vector as stored (None: not scored) and details for the job's history."""


@dataclass(frozen=True)
class Produced:
    """One image the generator produced for a claimed job, stored and scored."""

    key: uuid.UUID
    request: GenerationRequest
    result: GenerationResult
    stored: StoredImage
    scored: Scored


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
    outcomes: dict[str, bool | Exception] = {job_id: False for job_id, _ in jobs}
    if breaker_open(ctx, tier):  # the tier is down: its waiting jobs go to their fallback tiers untried
        reason = f"the {tier} tier's circuit breaker is open"
        jobs = [(job_id, d) for job_id, d in jobs if try_fallback(ctx, job_id, tier, reason, waiting=True) is None]
    given = {uuid.UUID(job_id): job_id for job_id, _ in jobs}
    deliveries = {uuid.UUID(job_id): delivery for job_id, delivery in jobs}
    started = time.perf_counter()  # the slot's time on the batch: claim, generate, store, score, record
    claimed, routed = _claim(ctx, deliveries, tier)
    if not claimed:
        return outcomes
    leases = [(key, deliveries[key]) for key, _ in claimed]
    with _renewing(ctx, leases):
        results = ctx.generator(tier).generate_batch([request for _, request in claimed])
        made = [(key, request, result) for (key, request), result in zip(claimed, results, strict=True)]
        for key, _, result in made:
            if isinstance(result, Exception):
                outcomes[given[key]] = result
        images = [(key, request, result) for key, request, result in made if not isinstance(result, Exception)]
        stored = [ctx.images.put(result.png) for _, _, result in images]
        prompts = [request.prompt for _, request, _ in images]
        scored = score_images(ctx, [result.png for _, _, result in images], prompts)
    produced = [
        Produced(key, request, result, image, score)
        for (key, request, result), image, score in zip(images, stored, scored, strict=True)
    ]
    escalations = _escalations(ctx, tier, [item.key for item in produced], [item.scored for item in produced], routed)
    outcome = _record_all(ctx, tier, produced, escalations, deliveries)
    _record_service_time(ctx, tier, [request for _, request in claimed], time.perf_counter() - started)
    recorded = outcome.delivered
    if produced:
        record_success(ctx, tier)
    if tier != ctx.settings.cheapest:
        billed = [produced[i] for i in recorded + outcome.wasted if produced[i].key in routed]
        _count_spend_beyond_reservation(ctx, tier, [item.result.gpu_s for item in billed])
    for i in recorded:
        outcomes[given[produced[i].key]] = True
        log.info(
            "generated",
            extra={
                "job_id": given[produced[i].key],
                "tier": tier,
                "wall_s": round(produced[i].result.wall_s, 3),
                "batch": len(claimed),
            },
        )
    escalated = [given[produced[i].key] for i in recorded if escalations.get(i, {}).get("escalated")]
    if escalated:
        _publish_escalated(ctx, tier, escalated)
    return outcomes


@contextmanager
def _renewing(ctx: WorkerContext, leases: Sequence[tuple[uuid.UUID, str]]) -> Iterator[None]:
    """Renew the generation leases ``leases`` every quarter of ``lease_s`` while the block runs (a thread), so
    that a long generation keeps its jobs while this worker lives: the reconciler takes a job back only when its
    lease lapses, which happens within ``lease_s`` of its worker's death."""
    stop = threading.Event()
    every = ctx.settings.lease_s / 4

    def renew() -> None:
        while not stop.wait(every):
            try:
                with transaction(ctx.sessions) as session:
                    renew_leases(session, leases, lease_s=ctx.settings.lease_s)
            except Exception as exc:  # the next renewal tries again; the lease has three more quarters to run
                log.warning("generation leases not renewed", extra={"error": str(exc), "jobs": len(leases)})

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()


def _claim(
    ctx: WorkerContext, deliveries: dict[uuid.UUID, str], tier: str
) -> tuple[list[tuple[uuid.UUID, GenerationRequest]], set[uuid.UUID]]:
    """Take the generation lease of every job that is still to generate on ``tier``, in one transaction.

    Returns:
        The claimed jobs with what to generate for them, and those of them whose tier the router chose (and
        whose cloud image it reserved from the spend limit, if one is set).
    """
    tier_settings = ctx.settings.tier(tier)
    claimed: list[tuple[uuid.UUID, GenerationRequest]] = []
    routed: set[uuid.UUID] = set()
    released: list[tuple[str, tuple[str, float]]] = []
    with transaction(ctx.sessions) as session:
        for job in lock_jobs(session, sorted(deliveries)):
            if is_done(job):
                continue
            job_id = str(job.id)
            if (held := expire_if_overdue(session, job)) or is_done(job):  # never generated after its deadline
                released += [(job_id, held)] if held else []
                continue
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
                if not deliver_replaced(session, job, reason, {"tier": tier}):
                    dead_letter(session, job, reason, stage="generation")
                continue
            delivery, lease_s = deliveries[job.id], ctx.settings.lease_s
            if not claim_lease(session, job, tier=tier, delivery=delivery, lease_s=lease_s, batch=len(deliveries)):
                log.info("duplicate message left alone: a live delivery holds the lease", extra={"job_id": job_id})
                continue
            claimed.append((job.id, generation_request(job, tier_settings)))
            if job.requested_tier is None:
                routed.add(job.id)
    for job_id, held in released:
        give_back(ctx.spend_ledger(), *held, job_id=job_id)
    return claimed, routed


@dataclass
class Recorded:
    """What a batch's record step did: images delivered (or escalated), images of jobs stopped meanwhile that were
    billed anyway (a remote API was called), and reservations to give back once committed."""

    delivered: list[int] = field(default_factory=list)
    wasted: list[int] = field(default_factory=list)
    released: list[tuple[str, tuple[str, float]]] = field(default_factory=list)

    def add(self, other: Recorded) -> None:
        self.delivered += other.delivered
        self.wasted += other.wasted
        self.released += other.released


def _record_all(
    ctx: WorkerContext,
    tier: str,
    produced: Sequence[Produced],
    escalations: dict[int, dict[str, Any]],
    deliveries: dict[uuid.UUID, str],
) -> Recorded:
    """Record the produced images in one transaction; if one of them was recorded by a concurrent delivery,
    record the others one by one. Reservations that stopped jobs no longer need are given back."""
    outcome = Recorded()
    try:
        with transaction(ctx.sessions) as session:
            outcome = _record(session, ctx, tier, produced, escalations, deliveries, range(len(produced)))
    except IntegrityError:
        if len(produced) == 1:
            log.warning("duplicate generation discarded", extra={"job_id": str(produced[0].key), "tier": tier})
        else:
            for i in range(len(produced)):
                try:
                    with transaction(ctx.sessions) as session:
                        outcome.add(_record(session, ctx, tier, produced, escalations, deliveries, [i]))
                except IntegrityError:
                    log.warning("duplicate generation discarded", extra={"job_id": str(produced[i].key), "tier": tier})
    for job_id, held in outcome.released:
        give_back(ctx.spend_ledger(), *held, job_id=job_id)
    return outcome


def _record(
    session: Session,
    ctx: WorkerContext,
    tier: str,
    produced: Sequence[Produced],
    escalations: dict[int, dict[str, Any]],
    deliveries: dict[uuid.UUID, str],
    items: Sequence[int],
) -> Recorded:
    """Record the produced images ``items`` with their costs and their jobs' next states (delivered, or queued
    on the cloud when escalated). A job that ended or moved meanwhile is skipped; one cancelled or expired while
    this delivery generated it gets no image, and its image is recorded (as ``wasted``, billed) only when
    money was spent on it."""
    tier_settings = ctx.settings.tier(tier)
    jobs_by_id = {job.id: job for job in lock_jobs(session, sorted(produced[i].key for i in items))}
    outcome = Recorded()
    images = []
    for i in items:
        item = produced[i]
        job = jobs_by_id.get(item.key)
        if job is None or job.tier != tier:
            continue
        if is_stopped(job) and job.lease_owner == deliveries.get(item.key):
            billed = wasted_when_discarded(tier_settings)
            if (held := discard(job, billed=billed)) is not None:
                outcome.released.append((str(job.id), held))
            if billed:
                images.append(new_generation(item.key, tier, "wasted", item, tier_settings))
                outcome.wasted.append(i)
            log.info("generated for a stopped job; image discarded", extra={"job_id": str(job.id), "billed": billed})
            continue
        if is_done(job):
            continue
        detail: dict[str, Any] = {"tier": tier, "image_sha256": item.stored.sha256, **item.scored[1]}
        escalation = escalations.get(i)
        if escalation is not None:
            detail["escalation"] = escalation
        role = "replaced" if escalation is not None and escalation["escalated"] else "primary"
        images.append(new_generation(item.key, tier, role, item, tier_settings))
        outcome.delivered.append(i)
        if role == "primary":
            succeed(session, job, detail=detail)
        else:
            # Escalated: the cloud generates the job again and the user receives that image; this one stays
            # recorded (and billed) as the image it replaced.
            assert escalation is not None
            escalate(session, job, tier=other_tier(ctx.settings, tier), detail=detail, reservation=escalation)
    record_generations(session, images)
    return outcome


def _publish_escalated(ctx: WorkerContext, tier: str, escalated: list[str]) -> None:
    other = other_tier(ctx.settings, tier)
    try:
        publish_many(
            ctx.app,
            [(generate_task(other), chunk, {}) for chunk in chunks(escalated, ctx.settings.tier(other).max_batch)],
        )
    except Exception as exc:  # the jobs are queued on the cloud in the database: the reconciler publishes them
        log.warning("escalated jobs not published", extra={"jobs": escalated, "error": str(exc)})
    log.info("escalated to the cloud", extra={"jobs": escalated, "tier": tier})


def score_images(ctx: WorkerContext, pngs: Sequence[bytes], prompts: Sequence[str]) -> list[Scored]:
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


def _escalations(
    ctx: WorkerContext,
    tier: str,
    keys: Sequence[uuid.UUID],
    scored: Sequence[Scored],
    routed: set[uuid.UUID],
) -> dict[int, dict[str, Any]]:
    """Which of the edge images just scored go to the cloud again (``escalation_rate``).

    Candidates are the images of routed jobs (not a forced tier, not shadow-sampled, which get a cloud image
    anyway, not of a tenant whose own cloud budget is zero) that carry ``escalation_metric``. Each is decided by
    its escalation window (the deployment's shared one, or its tenant's own: :meth:`WorkerContext.escalation`)
    in :func:`router.escalation.decide_escalations`.

    Returns:
        Per candidate (an index into ``keys``): what was decided, by which window and why.
    """
    if tier != ctx.settings.cheapest or ctx.settings.escalation_rate <= 0:
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
        tenants = tenant_budgets_unless_shadowed(session, [keys[i] for i, _ in candidates])
    windows: dict[str, tuple[BudgetController, list[tuple[int, float]]]] = {}
    for i, value in candidates:
        key = keys[i]
        controller = ctx.escalation(*tenants[key]) if key in tenants else None
        if controller is not None:
            windows.setdefault(controller.name, (controller, []))[1].append((i, value))
    return decide_escalations(windows, metric=metric, below=ctx.settings.escalation_below)


def _record_service_time(ctx: WorkerContext, tier: str, requests: Sequence[GenerationRequest], wall_s: float) -> None:
    """The batch's seconds per image (its slot's whole time on it: claim to record), for the tier's moving median
    (load-aware routing predicts waits with it)."""
    try:
        sizes = [size_key(request.width, request.height) for request in requests]
        record_service_time(ctx.state_redis(), tier, sizes, wall_s / len(requests))
    except redis.exceptions.RedisError as exc:
        log.warning("service time not recorded: Redis unreachable", extra={"tier": tier, "error": str(exc)})


def _count_spend_beyond_reservation(ctx: WorkerContext, tier: str, gpu_seconds: Sequence[float]) -> None:
    """Add to the period's spend what routed images of ``tier`` (one above the cheapest) were billed beyond the
    price per image their decision reserved (the price per GPU-second), so the spend limit sees what is billed.

    It runs after the images were recorded: if Redis is unreachable now, the job stays done and the period's
    count stays short by this amount (logged), rather than the image being generated and billed again.
    """
    ledger = ctx.spend_ledger()
    usd = beyond_reservation_usd(ctx.settings.tier(tier), gpu_seconds)
    if ledger is None or usd == 0:
        return
    try:
        ledger.add(usd)
    except redis.exceptions.RedisError as exc:
        log.warning("cloud spend not counted: Redis unreachable", extra={"usd": round(usd, 6), "error": str(exc)})


def generation_request(job: Job, tier_settings: TierSettings) -> GenerationRequest:
    """What to generate for ``job`` on a tier: the job's own steps and size, else the tier's defaults."""
    return GenerationRequest(
        prompt=job.prompt,
        seed=job.seed,
        steps=job.steps or tier_settings.steps,
        width=job.width or tier_settings.width,
        height=job.height or tier_settings.height,
    )


def new_generation(key: uuid.UUID, tier: str, role: str, item: Produced, tier_settings: TierSettings) -> NewGeneration:
    """The record of one stored image of job ``key``, billed at the tier's prices."""
    request, result = item.request, item.result
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
        image_path=item.stored.path,
        image_sha256=item.stored.sha256,
        wall_s=result.wall_s,
        gpu_s=result.gpu_s,
        cost_usd=image_cost_usd(tier_settings, result.gpu_s),
        quality=item.scored[0],
    )


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
        request = generation_request(job, tier_settings)
    result = ctx.generator(tier).generate(request)
    stored = ctx.images.put(result.png)
    (scored,) = score_images(ctx, [result.png], [request.prompt])
    try:
        with transaction(ctx.sessions) as session:
            if get_job(session, key, for_update=True) is None:
                return False
            item = Produced(key, request, result, stored, scored)
            record_generations(session, [new_generation(key, tier, "shadow", item, tier_settings)])
    except IntegrityError:
        return False
    if tier != ctx.settings.cheapest:
        _count_spend_beyond_reservation(ctx, tier, [result.gpu_s])
    log.info("shadow generated", extra={"job_id": job_id, "tier": tier})
    return True
