"""Per-tenant rate limit of job submissions, shared by every API process through Redis.

The generic cell rate algorithm (GCRA): each tenant has a theoretical arrival time (TAT) in Redis; a request
is allowed when it would not push the TAT more than one burst ahead of now. One key per tenant, one atomic
script call per request, time from the Redis server so API hosts need no synchronised clocks.
"""

from __future__ import annotations

import logging
import math
import uuid

import redis

log = logging.getLogger(__name__)

_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > burst then
  return {0, ahead - burst}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(ahead))
return {1, 0}
"""


def burst(limit_per_minute: int) -> int:
    """The most submissions a tenant with this limit may make at once (a tenth of a minute's quota)."""
    return max(1, limit_per_minute // 10)


class RateLimiter:
    """``limit`` requests per minute per tenant, allowing bursts of up to a tenth of a minute's quota."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_GCRA)

    def check(self, tenant_id: uuid.UUID, limit_per_minute: int, cost: int = 1) -> float | None:
        """None when ``cost`` submissions are allowed now, else the seconds to wait. Fails open (allows) if
        Redis cannot answer. ``cost`` must not exceed :func:`burst` (it could never be allowed)."""
        if limit_per_minute <= 0:
            return None
        interval_ms = 60_000.0 / limit_per_minute
        burst_ms = interval_ms * burst(limit_per_minute)
        try:
            allowed, wait_ms = self._script(
                keys=[f"routet2i:ratelimit:{tenant_id}"], args=[interval_ms * cost, burst_ms]
            )
        except redis.exceptions.RedisError as exc:
            log.warning("rate limiter unavailable, allowing", extra={"error": str(exc)})
            return None
        return None if allowed else max(1.0, math.ceil(float(wait_ms) / 1000.0))
