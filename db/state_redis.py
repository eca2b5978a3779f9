"""Redis connections for shared state (budget windows, rate limits, broker probes).

Commands are retried a few times on a dropped connection, so a Redis restart costs one slow call rather
than an error in every process holding a pooled connection to the old server.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

RETRIES = 3


def connect(url: str, *, timeout: float | None = None) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
    )
