"""Per-tier circuit breakers, shared by every worker of a deployment through Redis.

A tier whose generations keep failing (its backend down, answering 429 or 5xx, or timing out) is held out of
routing for a cool-down, then probed; see :class:`CircuitBreaker`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis

from core.settings import Settings

log = logging.getLogger(__name__)

BREAKER_PREFIX = "routet2i:breaker"

_BREAKER_FAILURE = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[1]) then
  local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if open_until <= now then
    redis.call('HSET', KEYS[1], 'open_until', now + tonumber(ARGV[2]))
    redis.call('HINCRBY', KEYS[1], 'opened', 1)
    redis.call('DEL', KEYS[2])
    return 1
  end
end
return 0
"""
"""Count a failure; open the breaker (or open it again after a failed probe) once there are enough in a row."""

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class BreakerState:
    """One tier's breaker: ``closed`` (routing sends it jobs), ``open`` (it does not, until ``open_until``), or
    ``half-open`` (its cool-down is over: routing may send it a probe)."""

    tier: str
    state: str
    failures: int
    open_until: float | None
    opened: int
    """Times it opened since it last closed."""


class CircuitBreaker:
    """Per-tier circuit breakers shared by every worker of a deployment.

    Tier workers count each generation that failed for good on a retryable fault (the backend down, answering
    429 or 5xx, or timing out) with :meth:`failure` and each image produced with :meth:`success`. After
    ``failures`` in a row the tier's breaker opens for ``cooldown_s``: routing stops sending it jobs and jobs
    that fail there go to their fallback tiers. When the cool-down is over it is half-open: one router batch at a
    time (:meth:`admit`) may send it jobs, as a probe; a success closes it, a failure opens it for another
    cool-down. Times are the Redis server's, so hosts need no synchronised clocks.
    """

    def __init__(self, client: redis.Redis, *, failures: int, cooldown_s: float, name: str = "default") -> None:
        self.client = client
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.name = name
        self._failure = client.register_script(_BREAKER_FAILURE)

    @classmethod
    def for_settings(cls, settings: Settings, client: redis.Redis) -> CircuitBreaker:
        return cls(
            client,
            failures=settings.breaker_failures,
            cooldown_s=settings.breaker_cooldown_s,
            name=settings.budget_name,
        )

    def _key(self, tier: str) -> str:
        return f"{BREAKER_PREFIX}:{self.name}:{tier}"

    def failure(self, tier: str) -> bool:
        """Count a failure of ``tier``; returns whether this one opened its breaker."""
        opened = self._failure(
            keys=[self._key(tier), self._key(tier) + ":probe"], args=[self.failures, self.cooldown_s]
        )
        if opened:
            log.warning("circuit breaker opened", extra={"tier": tier, "cooldown_s": self.cooldown_s})
        return bool(opened)

    def success(self, tier: str) -> None:
        """An image was produced on ``tier``: its breaker closes (and its count of failures starts again)."""
        if self.client.delete(self._key(tier)):
            log.info("circuit breaker closed", extra={"tier": tier})

    def states(self, tiers: Sequence[str]) -> dict[str, BreakerState]:
        """Every tier's breaker, read in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            for tier in tiers:
                pipe.hgetall(self._key(tier))
            replies = pipe.execute()
        seconds, micros = replies[0]
        now = seconds + micros / 1e6
        states = {}
        for tier, raw in zip(tiers, replies[1:], strict=True):
            fields = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], raw).items()}
            failures = int(fields.get("failures", 0))
            until = float(fields["open_until"]) if "open_until" in fields else None
            state = CLOSED if until is None else OPEN if until > now else HALF_OPEN
            states[tier] = BreakerState(tier, state, failures, until, int(fields.get("opened", 0)))
        return states

    def admit(self, tier: str) -> bool:
        """Whether the caller may send a probe to a half-open ``tier`` now (one caller per cool-down)."""
        return bool(self.client.set(self._key(tier) + ":probe", "1", nx=True, px=int(self.cooldown_s * 1000)))

    def reset(self, tiers: Sequence[str]) -> None:
        for tier in tiers:
            self.client.delete(self._key(tier), self._key(tier) + ":probe")
