"""The physical reference of the pipeline benchmark: a bare Celery task round trip on the same broker.

A client publishes ``bench.echo``; a solo-pool worker runs it, and the task pushes its token to a Redis list
the client is blocked on. Nothing else: no database, no routing, no images. Run the worker with
``python -m cli.bench.echo BROKER_URL``.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery

QUEUE = "bench-echo"
TASK = "bench.echo"


def make_app(broker: str) -> Celery:
    app = Celery("bench-echo", broker=broker, set_as_current=False)
    app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)

    @app.task(name=TASK)
    def echo(reply_key: str, token: str) -> None:
        client: Any = app.backend_redis
        client.lpush(reply_key, token)

    import redis

    app.backend_redis = redis.Redis.from_url(broker)
    return app


if __name__ == "__main__":
    make_app(sys.argv[1]).worker_main(
        [
            "worker",
            f"--queues={QUEUE}",
            "--pool=solo",
            "--without-mingle",
            "--without-gossip",
            "--loglevel=WARNING",
            "--hostname=bench-echo@%h",
        ]
    )
