"""The Celery application: one app, three queues, explicit task names.

Both sides build it from settings: the API only to publish (``send_task`` by name, no GPU code imported),
workers to consume. Delivery is at-least-once (late acknowledgement, reject when a child process dies), so
every task is idempotent against the database, which is the source of truth for job state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Celery
from kombu import Exchange, Queue

from core.settings import Settings

QUEUES = ("route", "edge", "cloud")

ROUTE_TASK = "router.route"
GENERATE_TASKS = {"edge": "edge.generate", "cloud": "cloud.generate"}

VISIBILITY_TIMEOUT_S = 4 * 3600
"""Redis redelivers an unacknowledged message after this long; it must exceed the longest generation."""

PROC_ALIVE_TIMEOUT_S = 600.0
"""A new pool child loads its models before reporting for work; Celery's 4 s default would kill it meanwhile."""

PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
"""How long a publisher insists when the broker is briefly unreachable (about one second in all)."""

BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError)
"""What a publication raises when the broker cannot take it."""


def create_celery(settings: Settings, *, with_tasks: bool = False) -> Celery:
    """Build the Celery app for ``settings``.

    Args:
        settings: the process's settings; kept on the app as ``app.conf.routet2i_settings``.
        with_tasks: register the task bodies (workers); publishers leave it off.
    """
    app = Celery("routet2i", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="route",
        task_default_exchange="route",
        task_default_routing_key="route",
        task_routes={ROUTE_TASK: {"queue": "route"}, **{t: {"queue": q} for q, t in GENERATE_TASKS.items()}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT_S,
        worker_hijack_root_logger=False,
        # Task events cost a broker publish per task state; Flower switches them on while it watches
        # (it broadcasts enable_events), so they are off otherwise.
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_pool_limit=10,
        enable_utc=True,
        routet2i_settings=settings,
    )
    if with_tasks:
        from worker.tasks import register_tasks

        register_tasks(app)
    return app


def publish(app: Celery, task_name: str, job_id: str, **kwargs: Any) -> None:
    """Enqueue ``task_name`` for ``job_id`` on its queue, retrying briefly if the broker blinks."""
    publish_many(app, [(task_name, [job_id], kwargs)])


def publish_many(app: Celery, messages: Sequence[tuple[str, Sequence[str], dict[str, Any]]]) -> None:
    """Enqueue several ``(task name, job ids, kwargs)`` messages in one round trip to the broker (kombu's
    publish batch: one Redis pipeline), retrying the whole group briefly if the broker blinks.

    A message carries the ids of one or more jobs, which a worker takes together (see
    :mod:`worker.batching`). A retried group may deliver a message twice, which every step tolerates (they
    are idempotent).

    Raises:
        One of :data:`BROKER_ERRORS` when the broker stayed unreachable; then none of the messages can be
        counted on.
    """
    if not messages:
        return
    policy = PUBLISH_RETRY_POLICY
    retries = int(policy["max_retries"])
    for attempt in range(retries + 1):
        try:
            with app.producer_or_acquire() as producer, producer.batch():
                for task_name, job_ids, kwargs in messages:
                    queue = app.conf.task_routes[task_name]["queue"]
                    app.send_task(task_name, args=list(job_ids), kwargs=kwargs, queue=queue, producer=producer)
            return
        except BROKER_ERRORS:
            if attempt == retries:
                raise
            time.sleep(min(policy["interval_max"], policy["interval_start"] + attempt * policy["interval_step"]))


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """``items`` in consecutive groups of at most ``size`` (the job ids of one message each)."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, size))]
