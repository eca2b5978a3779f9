"""Celery tasks: thin adapters from messages (the ids of one or more jobs each) to a stage's function
(:mod:`worker.routing`, :mod:`worker.generating`, :mod:`worker.recovery`).

Each task runs on a batch of messages (:mod:`worker.batching`): every message waiting when a pool process
becomes free, up to the queue's batch size in jobs, one message when the system is idle. Failures are settled
per job, and sorted in two kinds. Infrastructure that blinks (database, Redis, broker, a remote image API's
429/5xx) is retried with capped exponential backoff; anything else ends the job as ``failed`` with the reason,
so every job reaches a terminal state the user can see.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

from core.settings import Settings
from db.redis_state import BudgetContention
from worker import batching
from worker.batching import BatchTask, Delivery
from worker.context import get_context
from worker.fallback import record_failure, try_fallback
from worker.generating import generate_jobs, generate_shadow
from worker.generators import GenerationError
from worker.recovery import fail_job, shadow_failed
from worker.routing import route_jobs
from worker.transport import ROUTE_TASK, generate_task

log = logging.getLogger(__name__)

INFRA_MAX_RETRIES = 30
"""Retries of a step while the database, Redis or the broker are unreachable (about 10 minutes in all)."""

BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 300.0
"""A remote API's Retry-After is honoured up to this many seconds."""

TRANSIENT = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    BudgetContention,
)


def backoff(retries: int) -> float:
    return float(min(BACKOFF_CAP_S, 0.5 * 2**retries))


def _settle(
    task: BatchTask,
    delivery: Delivery,
    job_id: str,
    stage: str,
    exc: Exception,
    *,
    generation_retries: int = 0,
    tier: str | None = None,
) -> None:
    """Apply the failure policy to ``job_id`` of ``delivery``, whose step raised ``exc``: retry the job later (in
    a message of its own), send it to its fallback tier (a generation on ``tier`` that failed for good), or
    fail it."""
    ctx = get_context(task.app)
    try:
        if isinstance(exc, TRANSIENT):
            if delivery.retries < INFRA_MAX_RETRIES:
                log.warning("transient failure, retrying", extra={"job_id": job_id, "stage": stage, "error": str(exc)})
                task.retry_delivery(delivery, countdown=backoff(delivery.retries), args=[job_id])
                return
            fail_job(ctx, job_id, f"{stage} failed: infrastructure unavailable: {exc}", stage=stage, dead_letter=True)
        elif isinstance(exc, GenerationError):
            if exc.retryable and delivery.retries < generation_retries:
                log.warning("generation failed, retrying", extra={"job_id": job_id, "error": str(exc)})
                wait = max(backoff(delivery.retries), min(exc.retry_after or 0.0, RETRY_AFTER_CAP_S))
                task.retry_delivery(delivery, countdown=wait, args=[job_id])
                return
            # The tier is down or overloaded (not this prompt refused, which another tier must not get round).
            if tier is not None and exc.retryable:
                record_failure(ctx, tier)
                if try_fallback(ctx, job_id, tier, f"{stage} failed on {tier}: {exc}") is not None:
                    return
            fail_job(
                ctx,
                job_id,
                f"{stage} failed: {exc}",
                stage=stage,
                dead_letter=exc.retryable,
                release_reservation=stage == "generation",
            )
        else:
            log.error("step failed", exc_info=exc, extra={"job_id": job_id, "stage": stage})
            fail_job(ctx, job_id, f"{stage} failed: {type(exc).__name__}: {exc}", stage=stage)
    except Exception:
        # Neither a retry nor the failure could be recorded (the broker or database is gone too): the job
        # stays unfinished in the database, where the reconciler finds it.
        log.exception("could not settle a failed step", extra={"job_id": job_id, "stage": stage})


def _jobs(deliveries: Sequence[Delivery]) -> list[tuple[str, Delivery]]:
    """Every job id the deliveries carry, with its delivery; a job carried twice (a duplicate publication)
    is kept once, with its first delivery."""
    seen: set[str] = set()
    jobs = []
    for delivery in deliveries:
        for job_id in delivery.args:
            if job_id not in seen:
                seen.add(job_id)
                jobs.append((job_id, delivery))
    return jobs


def route_batch(task: BatchTask, deliveries: Sequence[Delivery]) -> None:
    """Route a batch of jobs; when the batch fails for a reason other than the infrastructure, route each job
    alone, so that one job the router cannot handle fails alone."""
    ctx = get_context(task.app)
    jobs = _jobs(deliveries)
    failed: list[tuple[str, Delivery, Exception]]
    try:
        route_jobs(ctx, [job_id for job_id, _ in jobs])
        return
    except TRANSIENT as transient:
        failed = [(job_id, delivery, transient) for job_id, delivery in jobs]
    except Exception as exc:
        if len(jobs) == 1:
            failed = [(jobs[0][0], jobs[0][1], exc)]
        else:
            log.warning("batch failed; routing its jobs one by one", extra={"error": str(exc), "batch": len(jobs)})
            failed = []
            for job_id, delivery in jobs:
                try:
                    route_jobs(ctx, [job_id])
                except Exception as one:
                    failed.append((job_id, delivery, one))
    for job_id, delivery, error in failed:
        _settle(task, delivery, job_id, "routing", error)


def generate_batch(task: BatchTask, tier: str, deliveries: Sequence[Delivery], *, generation_retries: int) -> None:
    """Generate a batch of jobs' images on ``tier``; shadow generations run one by one beside them."""
    ctx = get_context(task.app)
    shadows = [d for d in deliveries if d.kwargs.get("role") == "shadow"]
    primary = _jobs([d for d in deliveries if d.kwargs.get("role", "primary") != "shadow"])
    for delivery in shadows:
        for job_id in delivery.args:
            _run_shadow(task, delivery, job_id, tier, generation_retries=generation_retries)
    if not primary:
        return
    try:
        outcomes = generate_jobs(ctx, [(job_id, delivery.id) for job_id, delivery in primary], tier)
    except Exception as exc:
        for job_id, delivery in primary:
            _settle(task, delivery, job_id, "generation", exc, generation_retries=generation_retries, tier=tier)
        return
    for job_id, delivery in primary:
        outcome = outcomes[job_id]
        if isinstance(outcome, Exception):
            _settle(task, delivery, job_id, "generation", outcome, generation_retries=generation_retries, tier=tier)


def _run_shadow(task: BatchTask, delivery: Delivery, job_id: str, tier: str, *, generation_retries: int) -> None:
    """A shadow generation: retried like any other on transient faults, but its failure never touches the
    job (the user's image does not depend on it); it is logged and the label is simply not collected. When
    the generator raised on every attempt, a cloud shadow's reservation goes back to the spend ledger."""
    ctx = get_context(task.app)
    try:
        generate_shadow(ctx, job_id, tier)
    except TRANSIENT as exc:
        if delivery.retries < INFRA_MAX_RETRIES:
            task.retry_delivery(delivery, countdown=backoff(delivery.retries), args=[job_id])
        else:
            log.warning("shadow generation abandoned", extra={"job_id": job_id, "tier": tier, "error": str(exc)})
    except GenerationError as exc:
        if exc.retryable and delivery.retries < generation_retries:
            task.retry_delivery(delivery, countdown=backoff(delivery.retries), args=[job_id])
        elif not shadow_failed(ctx, job_id, tier, str(exc)):
            log.warning("shadow generation failed", extra={"job_id": job_id, "tier": tier, "error": str(exc)})
    except Exception:
        log.exception("shadow generation failed", extra={"job_id": job_id, "tier": tier})


def register_tasks(app: Celery) -> None:
    """Register the route task and one generate task per tier on ``app`` (batching tasks: each call gets the
    messages waiting, up to the queue's batch size), and warm up pool children."""
    settings = app.conf.routet2i_settings

    keepers = []

    @worker_ready.connect(weak=False)
    def _keep(sender: Any = None, **_: Any) -> None:
        """The worker's heartbeats and its turns at the reconciler (:mod:`worker.keeper`)."""
        from worker.keeper import start_keeper

        try:
            keepers.append(start_keeper(app, sender))
        except Exception:  # Redis unreachable: the worker runs, unseen by the reconciler until it restarts
            log.exception("keeper not started")

    @worker_shutdown.connect(weak=False)
    def _stop_keeping(**_: Any) -> None:
        for keeper in keepers:
            keeper.stop()

    @worker_process_init.connect(weak=False)
    def _warm_up(**_: Any) -> None:
        queues = app.conf.get("routet2i_warm_queues") or []
        try:
            get_context(app).warm_up(queues)
        except Exception:  # the first task will fail its job with the reason
            log.exception("warm-up failed", extra={"queues": queues})

    @app.task(name=ROUTE_TASK, bind=True, base=BatchTask, max_batch=settings.route_batch)
    def route(self: BatchTask, deliveries: list[Delivery]) -> None:
        route_batch(self, deliveries)

    batching.register(route)

    def make_generate(tier: str) -> None:
        tier_settings = settings.tier(tier)

        @app.task(name=generate_task(tier), bind=True, base=BatchTask, max_batch=tier_settings.max_batch)
        def generate(self: BatchTask, deliveries: list[Delivery]) -> None:
            generate_batch(self, tier, deliveries, generation_retries=tier_settings.max_retries)

        batching.register(generate)

    for tier in settings.tier_names:
        make_generate(tier)


def prefetch_multiplier(settings: Settings, queue: str) -> int:
    """Messages a worker process of ``queue`` may hold (run and waiting).

    Route workers: room for a full batch of one-job messages (single submissions) waiting while a batch runs.
    Tier workers: the message being run and the next one. Their messages already carry up to ``max_batch``
    jobs each (the route step packs them), and a longer backlog stays in the queue, where idle workers and
    autoscalers see it, rather than in one busy worker.
    """
    return 2 * settings.route_batch if queue == "route" else 2
