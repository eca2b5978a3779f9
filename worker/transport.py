"""The Celery transport: the app, its queues and task names, publishing, and what the broker holds.

Both sides build the app from settings: the API only to publish (``send_task`` by name, no GPU code
imported), workers to consume. Delivery is at-least-once (late acknowledgement, reject when a child process
dies), so every task is idempotent against the database, which is the source of truth for job state. This is
the one module of the worker the API imports.

Broker depth is read the way kombu's Redis transport stores a queue: one Redis list per queue and priority
step, named ``QUEUE`` for priority 0 and ``QUEUE<sep><priority>`` for the others (``sep`` is ``"\\x06\\x16"``
unless the transport options change it). Messages a worker has taken but not acknowledged live in the
transport's ``unacked`` hash, not in these lists, so depth counts only what no worker holds yet. This is the
same number KEDA's Redis list scaler reads (``LLEN QUEUE``) when no priorities are used.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import kombu.exceptions
import redis
import redis.exceptions
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.redis import PRIORITY_STEPS, Channel
from sqlalchemy.orm import Session

from core.settings import QUEUES, Settings
from db.backlog import waiting_backlog

log = logging.getLogger(__name__)

ROUTE_TASK = "router.route"


def generate_task(tier: str) -> str:
    """The name of the task that generates a tier's images (consumed from the queue named after the tier)."""
    return f"{tier}.generate"


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
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in settings.queues],
        task_default_queue="route",
        task_default_exchange="route",
        task_default_routing_key="route",
        task_routes={ROUTE_TASK: {"queue": "route"}, **{generate_task(t): {"queue": t} for t in settings.tier_names}},
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


# --- what the broker holds ----------------------------------------------------------------------------

UNACKED_KEY = "unacked"
"""Where kombu's Redis transport keeps delivered, unacknowledged messages (a hash: tag -> message)."""

UNACKED_INDEX_KEY = "unacked_index"
"""When each of those messages was delivered (a sorted set: tag -> the consumer's clock, seconds)."""

_REPUBLISH = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[2])
  return 1
end
return 0
"""
"""Move an unacknowledged message back to the head of its queue, as a new message: only if it is still
unacknowledged (its worker may have acknowledged it meanwhile), all at once."""

INSPECT_TIMEOUT_S = 1.0
"""How long ``routet2i queues`` waits for workers to answer the remote-control broadcast."""


@dataclass(frozen=True)
class QueueStatus:
    """One queue as an operator sees it."""

    name: str
    depth: int
    """Messages waiting in the broker (all priority steps), not yet taken by any worker."""
    waiting_jobs: int
    """Jobs the database says wait on this queue (differs from ``depth`` if the broker lost messages)."""
    oldest_job_id: str | None
    oldest_age_s: float | None
    """Seconds the oldest waiting job has been on this queue, from the database."""
    workers: tuple[str, ...]
    """Node names of the workers consuming this queue that answered the broadcast."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "depth": self.depth,
            "waiting_jobs": self.waiting_jobs,
            "oldest_job_id": self.oldest_job_id,
            "oldest_age_s": self.oldest_age_s,
            "workers": list(self.workers),
        }


def redis_keys(queue: str, transport_options: Mapping[str, Any]) -> list[str]:
    """The Redis list names kombu uses for ``queue``, one per priority step."""
    sep = transport_options.get("sep", Channel.sep)
    prefix = transport_options.get("global_keyprefix", "")
    steps = sorted(set(transport_options.get("priority_steps", PRIORITY_STEPS)))
    return [f"{prefix}{queue}" if step == 0 else f"{prefix}{queue}{sep}{step}" for step in steps]


def broker_client(app: Celery) -> redis.Redis:
    """A Redis client on the app's broker; refuses brokers that are not Redis."""
    url = str(app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"queue depth needs a Redis broker; ROUTET2I_BROKER_URL is {url.split('://')[0]}://...")
    return redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)


def queue_depths(app: Celery, client: redis.Redis, queues: Iterable[str] | None = None) -> dict[str, int]:
    """Messages waiting in the broker per queue (None: the deployment's queues), read in one round trip."""
    options = app.conf.broker_transport_options or {}
    names = list(app.conf.routet2i_settings.queues if queues is None else queues)
    keys = {queue: redis_keys(queue, options) for queue in names}
    with client.pipeline(transaction=False) as pipe:
        for queue in names:
            for key in keys[queue]:
                pipe.llen(key)
        sizes = iter(pipe.execute())
    return {queue: sum(next(sizes) for _ in keys[queue]) for queue in names}


def consumers(app: Celery, *, timeout: float = INSPECT_TIMEOUT_S) -> dict[str, list[str]]:
    """Queue name -> node names of the workers consuming it (those that answered within ``timeout``)."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    found: dict[str, list[str]] = {}
    for node, queues in sorted(replies.items()):
        for queue in queues or []:
            found.setdefault(queue["name"], []).append(node)
    return found


def queue_status(
    app: Celery,
    client: redis.Redis,
    session: Session,
    *,
    now: datetime | None = None,
    timeout: float | None = INSPECT_TIMEOUT_S,
) -> list[QueueStatus]:
    """Depth, database backlog, age of the oldest waiting job and consumers of every queue.

    Args:
        timeout: seconds to wait for workers' answers; None skips asking them (``workers`` stays empty).
    """
    now = now or datetime.now(UTC)
    depths = queue_depths(app, client)
    queues = app.conf.routet2i_settings.queues
    backlog = waiting_backlog(session, queues)
    nodes = consumers(app, timeout=timeout) if timeout is not None else {}
    statuses = []
    for queue in queues:
        waiting = backlog[queue]
        age = (now - waiting.oldest_since).total_seconds() if waiting.oldest_since is not None else None
        statuses.append(
            QueueStatus(
                name=queue,
                depth=depths[queue],
                waiting_jobs=waiting.waiting,
                oldest_job_id=str(waiting.oldest_job_id) if waiting.oldest_job_id else None,
                oldest_age_s=round(max(0.0, age), 3) if age is not None else None,
                workers=tuple(nodes.get(queue, ())),
            )
        )
    return statuses


def job_ids_of(raw: bytes | str) -> list[str]:
    """The job ids carried by a Celery message as kombu's Redis transport stores it (its arguments, read from
    the body: the ``argsrepr`` header is cut short for a message carrying many ids)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [str(a) for a in args] if isinstance(args, list) else []
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return []


def broker_job_ids(client: redis.Redis, queues: Iterable[str] = QUEUES) -> set[str]:
    """Ids of every job with a message waiting in one of ``queues`` or delivered but not yet acknowledged."""
    ids: set[str] = set()
    for queue in queues:
        for raw in client.lrange(queue, 0, -1):
            ids.update(job_ids_of(raw))
    for raw in client.hvals(UNACKED_KEY):
        ids.update(job_ids_of(raw))
    return ids


def held_delivery_tags() -> set[str]:
    """Delivery tags of the messages this worker process holds: prefetched, waiting for an ETA, or running
    (Celery's record of its requests; call it in a worker's main process)."""
    from celery.worker import state as worker_state

    for _ in range(5):  # the consumer changes the mapping while we read it
        try:
            requests = list(worker_state.requests.values())
            break
        except RuntimeError:
            continue
    else:
        requests = []
    return {str(tag) for request in requests if (tag := getattr(request.message, "delivery_tag", None))}


def republish_orphans(client: redis.Redis, *, held: set[str], delivered_before: float) -> list[str]:
    """Publish again the messages that workers took and will never acknowledge: unacknowledged messages
    delivered before ``delivered_before`` (seconds since the epoch) that no live worker holds (``held``: the tags
    every live worker listed in its last heartbeat). Each goes back to the head of its queue as a new message (a
    new task id and delivery tag), so that the step it carries runs as a fresh delivery: a lease the dead worker
    took is then honoured until it lapses, and a worker wrongly presumed dead keeps its running generation.

    Kombu's Redis transport would redeliver these only after its visibility timeout (hours).

    Returns:
        The ids of the jobs the messages carry.
    """
    move = client.register_script(_REPUBLISH)
    jobs: list[str] = []
    for raw_tag in cast(list[bytes], client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", delivered_before)):
        tag = raw_tag.decode()
        if tag in held:
            continue
        raw = cast(bytes | None, client.hget(UNACKED_KEY, tag))
        if raw is None:
            continue
        try:
            message, _exchange, routing_key = json.loads(raw)
            fresh = _as_new_message(message)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable unacknowledged message left alone", extra={"delivery_tag": tag})
            continue
        if move(keys=[UNACKED_KEY, UNACKED_INDEX_KEY, routing_key], args=[tag, json.dumps(fresh)]):
            jobs += job_ids_of(raw)
    return jobs


def _as_new_message(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored message with a new task id and delivery tag (same task, arguments and retries)."""
    task_id = str(uuid.uuid4())
    headers = {**message["headers"], "id": task_id}
    properties = {**message["properties"], "correlation_id": task_id, "delivery_tag": str(uuid.uuid4())}
    return {**message, "headers": headers, "properties": properties}
