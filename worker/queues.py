"""What is waiting on each Celery queue and who consumes it: ``routet2i queues`` and the metrics share this.

Broker depth is read the way kombu's Redis transport stores a queue: one Redis list per queue and priority
step, named ``QUEUE`` for priority 0 and ``QUEUE<sep><priority>`` for the others (``sep`` is ``"\\x06\\x16"``
unless the transport options change it). Messages a worker has taken but not acknowledged live in the
transport's ``unacked`` hash, not in these lists, so depth counts only what no worker holds yet. This is the
same number KEDA's Redis list scaler reads (``LLEN QUEUE``) when no priorities are used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS, Channel
from sqlalchemy.orm import Session

from db.backlog import waiting_backlog
from worker.app import QUEUES

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


def queue_depths(app: Celery, client: redis.Redis, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """Messages waiting in the broker per queue, read in one round trip."""
    options = app.conf.broker_transport_options or {}
    names = list(queues)
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
    backlog = waiting_backlog(session)
    nodes = consumers(app, timeout=timeout) if timeout is not None else {}
    statuses = []
    for queue in QUEUES:
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
