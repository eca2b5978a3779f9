"""Celery tasks: thin adapters from a message (a job id) to a :mod:`worker.pipeline` function.

Failures are sorted in two kinds. Infrastructure that blinks (database, Redis, broker, a remote image API's
429/5xx) is retried with capped exponential backoff; anything else ends the job as ``failed`` with the reason,
so every job reaches a terminal state the user can see.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc
from celery import Celery, Task
from celery.signals import worker_process_init

from worker import pipeline
from worker.app import GENERATE_TASKS, ROUTE_TASK
from worker.budget_store import BudgetContention
from worker.context import get_context
from worker.generation import GenerationError

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


def _run(task: Task, stage: str, job_id: str, step: Any, *, generation_retries: int = 0) -> Any:
    """Run one pipeline step with the retry and failure policy above."""
    ctx = get_context(task.app)
    try:
        return step(ctx)
    except TRANSIENT as exc:
        if task.request.retries < INFRA_MAX_RETRIES:
            log.warning("transient failure, retrying", extra={"job_id": job_id, "stage": stage, "error": str(exc)})
            raise task.retry(exc=exc, countdown=backoff(task.request.retries), max_retries=INFRA_MAX_RETRIES) from exc
        pipeline.fail_job(
            ctx, job_id, f"{stage} failed: infrastructure unavailable: {exc}", stage=stage, dead_letter=True
        )
    except GenerationError as exc:
        if exc.retryable and task.request.retries < generation_retries:
            log.warning("generation failed, retrying", extra={"job_id": job_id, "error": str(exc)})
            wait = max(backoff(task.request.retries), min(exc.retry_after or 0.0, RETRY_AFTER_CAP_S))
            raise task.retry(exc=exc, countdown=wait, max_retries=generation_retries) from exc
        pipeline.fail_job(ctx, job_id, f"{stage} failed: {exc}", stage=stage, dead_letter=exc.retryable)
    except Exception as exc:
        log.exception("step failed", extra={"job_id": job_id, "stage": stage})
        pipeline.fail_job(ctx, job_id, f"{stage} failed: {type(exc).__name__}: {exc}", stage=stage)
    return None


def _run_shadow(task: Task, job_id: str, tier: str, *, generation_retries: int) -> bool | None:
    """A shadow generation: retried like any other on transient faults, but its failure never touches the
    job (the user's image does not depend on it); it is logged and the label is simply not collected."""
    ctx = get_context(task.app)
    try:
        return pipeline.generate_shadow(ctx, job_id, tier)
    except TRANSIENT as exc:
        if task.request.retries < INFRA_MAX_RETRIES:
            raise task.retry(exc=exc, countdown=backoff(task.request.retries), max_retries=INFRA_MAX_RETRIES) from exc
    except GenerationError as exc:
        if exc.retryable and task.request.retries < generation_retries:
            raise task.retry(exc=exc, countdown=backoff(task.request.retries), max_retries=generation_retries) from exc
        log.warning("shadow generation failed", extra={"job_id": job_id, "tier": tier, "error": str(exc)})
    except Exception:
        log.exception("shadow generation failed", extra={"job_id": job_id, "tier": tier})
    return None


def register_tasks(app: Celery) -> None:
    """Register the route task and one generate task per tier on ``app``, and warm up pool children."""

    @worker_process_init.connect(weak=False)
    def _warm_up(**_: Any) -> None:
        queues = app.conf.get("routet2i_warm_queues") or []
        try:
            get_context(app).warm_up(queues)
        except Exception:  # the first task will fail its job with the reason
            log.exception("warm-up failed", extra={"queues": queues})

    @app.task(name=ROUTE_TASK, bind=True)
    def route(self: Task, job_id: str) -> str | None:
        return cast(str | None, _run(self, "routing", job_id, lambda ctx: pipeline.route_job(ctx, job_id)))

    def make_generate(tier: str) -> None:
        settings = app.conf.routet2i_settings.tier(tier)

        @app.task(name=GENERATE_TASKS[tier], bind=True)
        def generate(self: Task, job_id: str, role: str = "primary") -> bool | None:
            if role == "shadow":
                return _run_shadow(self, job_id, tier, generation_retries=settings.max_retries)
            return _run(
                self,
                "generation",
                job_id,
                lambda ctx: pipeline.generate_job(ctx, job_id, tier, delivery=self.request.id),
                generation_retries=settings.max_retries,
            )

    for tier in GENERATE_TASKS:
        make_generate(tier)
