"""State that every API and worker process shares through Redis: the budget windows, the spend ledger and
the rate limits, and the connections to it.

Commands are retried a few times on a dropped connection, so a Redis restart costs one slow call rather
than an error in every process holding a pooled connection to the old server.

**Budget windows and the spend ledger.** A router's batch of decisions reads the window (and the period's
spend), decides in order and appends to it (and adds what its cloud images reserved) as one optimistic
transaction (``WATCH`` / ``MULTI``): if another router wrote in between, the transaction is retried with the
fresh state, so two routers can never both take the last cloud slot or the last dollar. The decision rule
itself is pure and lives in :mod:`router.budget`.

**Worker heartbeats.** Every worker records, every ``heartbeat_interval_s``, that it lives and which messages it
holds (:class:`WorkerRegistry`): a message taken by a worker that stopped beating is published again by the
reconciler (:func:`worker.transport.republish_orphans`).

**Rate limits.** Per-tenant limits of job submissions with the generic cell rate algorithm (GCRA): each
tenant has a theoretical arrival time (TAT) in Redis; a request is allowed when it would not push the TAT more
than one burst ahead of now. One key per tenant, one atomic script call per request, time from the Redis
server so API hosts need no synchronised clocks.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core.settings import Settings
from router.budget import BudgetState
from router.spend import SpendState, TierVerdict, parse_entries
from router.types import BudgetVerdict

log = logging.getLogger(__name__)

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


# --- budget windows and the spend ledger ---------------------------------------------------------------

KEY_PREFIX = "routet2i:budget"
SPEND_PREFIX = "routet2i:spend"
MAX_ATTEMPTS = 100
"""Optimistic transaction retries before giving up (only under extreme contention)."""

_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBYFLOAT', KEYS[1], -tonumber(ARGV[1]))
end
return nil
"""
"""Decrement a period's counter only while it exists, so a late release cannot create a negative counter
without an expiry."""


class SpendLedger:
    """Money spent on cloud images per period (UTC periods of ``period_s`` seconds from the epoch, so a day
    starts at midnight UTC), one Redis counter per period, shared by every budget window of a deployment.

    Router decisions add the price they reserve inside their budget transaction; tier workers add what a
    generation was billed beyond its reservation (a price per GPU-second) when they record it, and give a
    reservation back when the cloud generator refused the job and no image was billed. A period's counter
    expires two periods after its last change.
    """

    def __init__(
        self, client: redis.Redis, *, period_s: int, name: str = "default", clock: Callable[[], float] = time.time
    ) -> None:
        if period_s < 1:
            raise ValueError(f"period_s must be positive, got {period_s}")
        self.client = client
        self.period_s = period_s
        self.name = name
        self.clock = clock

    @classmethod
    def for_settings(cls, settings: Settings, client: redis.Redis) -> SpendLedger | None:
        """The deployment's ledger in ``client`` (its router state's Redis), or None without a spend limit."""
        if settings.cloud_spend_limit_usd is None:
            return None
        return cls(client, period_s=settings.cloud_spend_period_s, name=settings.budget_name)

    def key(self) -> str:
        """The counter of the current period."""
        return f"{SPEND_PREFIX}:{self.name}:{self.period_s}:{math.floor(self.clock() / self.period_s)}"

    def spent(self, key: str | None = None, *, client: redis.Redis | redis.client.Pipeline | None = None) -> float:
        """Money counted in the period ``key`` (the current one when omitted)."""
        raw = (client or self.client).get(key or self.key())
        return float(cast(bytes, raw)) if raw is not None else 0.0

    def add(self, usd: float, *, pipe: redis.client.Pipeline | None = None, key: str | None = None) -> None:
        """Count ``usd`` in the period ``key`` (the current one), in ``pipe`` when given (a transaction)."""
        if usd == 0:
            return
        target = pipe if pipe is not None else self.client.pipeline()
        key = key or self.key()
        target.incrbyfloat(key, usd)
        target.expire(key, 2 * self.period_s)
        if pipe is None:
            target.execute()

    def release(self, usd: float, key: str) -> bool:
        """Give back ``usd`` reserved in the period ``key`` for a cloud image that was never billed.

        Returns False when that period's counter no longer exists (it expired: nothing left to give back).
        """
        if usd <= 0:
            return False
        return self.client.eval(_RELEASE, 1, key, repr(float(usd))) is not None


class BudgetContention(RuntimeError):
    """The shared budget window kept changing under this router; the route task will be retried."""


V = TypeVar("V", BudgetVerdict, TierVerdict)


class _RedisWindow:
    """A budget window as one capped Redis list, newest first, decided in one optimistic transaction with the
    period's spend (``WATCH`` / ``MULTI``); subclasses say what an entry holds."""

    def __init__(self, client: redis.Redis, *, window: int, key: str, spend: SpendLedger | None = None) -> None:
        """``spend``: the deployment's spend ledger, when a spend limit is set (read and charged in the same
        transaction as the window)."""
        self.client = client
        self.window = window
        self.key = key
        self.spend = spend

    def _transact(
        self,
        decide: Callable[[redis.client.Pipeline, str | None], Sequence[V]],
        entries: Callable[[Sequence[V]], list[str]],
    ) -> list[V]:
        """Run ``decide`` on the state read through the watching pipeline, then push ``entries`` of its verdicts
        and charge their reservations, retrying from a fresh read when another router wrote in between."""
        for _ in range(MAX_ATTEMPTS):
            with self.client.pipeline() as pipe:
                try:
                    spend_key = self.spend.key() if self.spend is not None else None
                    pipe.watch(self.key, *([spend_key] if spend_key else []))
                    verdicts = list(decide(pipe, spend_key))
                    if spend_key is not None:  # where each reservation is counted, to give it back if unused
                        verdicts = [
                            replace(v, state={**v.state, "spend_period": spend_key}) if v.reserved_usd else v
                            for v in verdicts
                        ]
                    new = entries(verdicts)
                    if not new:
                        return verdicts
                    pipe.multi()
                    pipe.lpush(self.key, *new)  # LPUSH of several values leaves the last one at the head
                    pipe.ltrim(self.key, 0, self.window - 1)
                    if self.spend is not None:
                        self.spend.add(sum(v.reserved_usd for v in verdicts), pipe=pipe, key=spend_key)
                    pipe.execute()
                    return verdicts
                except redis.WatchError:
                    continue
        raise BudgetContention(f"budget window changed {MAX_ATTEMPTS} times in a row")

    def _spent(self, client: redis.Redis | redis.client.Pipeline, spend_key: str | None) -> float:
        return self.spend.spent(spend_key, client=client) if self.spend is not None else 0.0

    def _current_spend_key(self) -> str | None:
        return self.spend.key() if self.spend is not None else None

    def reset(self) -> None:
        self.client.delete(self.key)


class RedisBudgetStore(_RedisWindow):
    """The two-tier budget window: entries ``"<1|0>:<score>"`` (1: the dearer tier's image takes a place in the
    window: delivered, or a shadow paid from ρ).

    One list (rather than one for decisions and one for scores) keeps a decision at one read and one write
    round trip, plus the ``WATCH``.
    """

    def __init__(
        self, client: redis.Redis, *, window: int, name: str = "default", spend: SpendLedger | None = None
    ) -> None:
        super().__init__(client, window=window, key=f"{KEY_PREFIX}:{name}:window", spend=spend)

    def transact(
        self, fn: Callable[[BudgetState], Sequence[BudgetVerdict]], scores: Sequence[float]
    ) -> list[BudgetVerdict]:
        def entries(verdicts: Sequence[BudgetVerdict]) -> list[str]:
            return [f"{1 if v.in_window else 0}:{float(s)!r}" for v, s in zip(verdicts, scores, strict=True)]

        return self._transact(lambda pipe, spend_key: fn(self._read(pipe, spend_key)), entries)

    def _read(self, client: redis.Redis | redis.client.Pipeline, spend_key: str | None = None) -> BudgetState:
        raws = cast(list[bytes], client.lrange(self.key, 0, self.window - 1))
        entries = [raw.split(b":", 1) for raw in raws]
        return BudgetState(
            decisions=tuple(int(d) for d, _ in entries),
            scores=tuple(float(v) for _, v in entries),
            spent_usd=self._spent(client, spend_key),
        )

    def snapshot(self) -> BudgetState:
        return self._read(self.client, self._current_spend_key())


class RedisSpendStore(_RedisWindow):
    """The money budget's window (:mod:`router.spend`): entries are :func:`router.spend.window_entry` strings."""

    def __init__(
        self, client: redis.Redis, *, window: int, name: str = "default", spend: SpendLedger | None = None
    ) -> None:
        super().__init__(client, window=window, key=f"{KEY_PREFIX}:{name}:tiers", spend=spend)

    def transact(
        self, fn: Callable[[SpendState], Sequence[TierVerdict]], entries: Callable[[Sequence[TierVerdict]], list[str]]
    ) -> list[TierVerdict]:
        return self._transact(lambda pipe, spend_key: fn(self._read(pipe, spend_key)), entries)

    def _read(self, client: redis.Redis | redis.client.Pipeline, spend_key: str | None = None) -> SpendState:
        raws = [raw.decode() for raw in cast(list[bytes], client.lrange(self.key, 0, self.window - 1))]
        prices, utilities = parse_entries(raws)
        return SpendState(prices=prices, utilities=utilities, spent_usd=self._spent(client, spend_key))

    def snapshot(self) -> SpendState:
        return self._read(self.client, self._current_spend_key())


def give_back(ledger: SpendLedger | None, period: str, usd: float, *, job_id: str) -> None:
    """Give a cloud reservation back to the period that holds it.

    It runs after the job's change was committed: if Redis is unreachable now, the period keeps counting the
    reservation (logged), which errs towards spending less, never more.
    """
    if ledger is None:  # the deployment no longer keeps a spend limit
        return
    try:
        if ledger.release(usd, period):
            log.info("cloud reservation given back", extra={"job_id": job_id, "usd": usd, "period": period})
    except redis.RedisError as exc:
        log.warning(
            "cloud reservation not given back: Redis unreachable",
            extra={"job_id": job_id, "usd": usd, "error": str(exc)},
        )


# --- worker heartbeats ----------------------------------------------------------------------------------

WORKERS_KEY = "routet2i:workers"
"""A hash: worker node name -> its last heartbeat (JSON)."""


@dataclass(frozen=True)
class Heartbeat:
    """What a worker last said of itself."""

    node: str
    at: float
    """When, in the Redis server's clock (seconds since the epoch): hosts need no synchronised clocks."""
    pid: int
    queues: tuple[str, ...]
    held: tuple[str, ...]
    """Delivery tags of the messages it held: prefetched, waiting for an ETA, or running."""
    slots: int = 1
    """Its pool processes (threads, with a thread pool): how many of its messages it can run at once."""

    def age(self, now: float) -> float:
        return now - self.at


class WorkerRegistry:
    """The deployment's workers and the messages each holds, as of their last heartbeats."""

    def __init__(self, client: redis.Redis, *, key: str = WORKERS_KEY) -> None:
        self.client = client
        self.key = key

    def now(self) -> float:
        """The Redis server's clock, in seconds since the epoch."""
        seconds, micros = cast(tuple[int, int], self.client.time())
        return seconds + micros / 1e6

    def beat(self, node: str, *, pid: int, queues: Sequence[str], held: Iterable[str], slots: int = 1) -> None:
        record = {"at": self.now(), "pid": pid, "queues": list(queues), "held": sorted(held), "slots": slots}
        self.client.hset(self.key, node, json.dumps(record))

    def heartbeats(self) -> list[Heartbeat]:
        found = []
        for node, raw in cast(dict[bytes, bytes], self.client.hgetall(self.key)).items():
            try:
                record = json.loads(raw)
                found.append(
                    Heartbeat(
                        node=node.decode(),
                        at=float(record["at"]),
                        pid=int(record["pid"]),
                        queues=tuple(record["queues"]),
                        held=tuple(record["held"]),
                        slots=int(record.get("slots", 1)),
                    )
                )
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable heartbeat ignored", extra={"node": node.decode(errors="replace")})
        return found

    def live(self, dead_after_s: float) -> list[Heartbeat]:
        """Workers whose last heartbeat is at most ``dead_after_s`` old."""
        now = self.now()
        return [beat for beat in self.heartbeats() if beat.age(now) <= dead_after_s]

    def forget(self, nodes: Iterable[str]) -> None:
        names = list(nodes)
        if names:
            self.client.hdel(self.key, *names)


# --- the learning loop's shadow rate ----------------------------------------------------------------------

SHADOW_RATE_KEY = "routet2i:learn:{slot}:shadow-rate"
"""The share of jobs ``routet2i learn`` currently wants shadow-sampled for the deployment router ``slot``."""


def set_shadow_rate(client: redis.Redis, slot: str, rate: float) -> None:
    client.set(SHADOW_RATE_KEY.format(slot=slot), repr(float(rate)))


def get_shadow_rate(client: redis.Redis, slot: str) -> float | None:
    """The learning loop's current rate for ``slot``; None until it has set one."""
    raw = client.get(SHADOW_RATE_KEY.format(slot=slot))
    return float(cast(bytes, raw)) if raw is not None else None


# --- rate limits ---------------------------------------------------------------------------------------

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
