"""The cloud budget in Redis, shared by every router worker process: the window of recent decisions and the
money spent on cloud images in the current period.

A router's batch of decisions reads the window (and the period's spend), decides in order and appends to it
(and adds what its cloud images reserved) as one optimistic transaction (``WATCH`` / ``MULTI``): if another
router wrote in between, the transaction is retried with the fresh state, so two routers can never both take
the last cloud slot or the last dollar.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import redis

from core.settings import Settings
from router.budget import BudgetState
from router.types import BudgetVerdict

if TYPE_CHECKING:
    from db.models import Job

log = logging.getLogger(__name__)

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


class RedisBudgetStore:
    """The budget window as one capped Redis list, newest first, of ``"<1|0>:<score>"`` entries.

    One list (rather than one for decisions and one for scores) keeps a decision at one read and one write
    round trip, plus the ``WATCH``.
    """

    def __init__(
        self, client: redis.Redis, *, window: int, name: str = "default", spend: SpendLedger | None = None
    ) -> None:
        """``spend``: the deployment's spend ledger, when a spend limit is set (read and charged in the same
        transaction as the window)."""
        self.client = client
        self.window = window
        self.key = f"{KEY_PREFIX}:{name}:window"
        self.spend = spend

    def transact(
        self, fn: Callable[[BudgetState], Sequence[BudgetVerdict]], scores: Sequence[float]
    ) -> list[BudgetVerdict]:
        for _ in range(MAX_ATTEMPTS):
            with self.client.pipeline() as pipe:
                try:
                    spend_key = self.spend.key() if self.spend is not None else None
                    pipe.watch(self.key, *([spend_key] if spend_key else []))
                    verdicts = list(fn(self._read(pipe, spend_key)))
                    if spend_key is not None:  # where each reservation is counted, to give it back if unused
                        verdicts = [
                            replace(v, state={**v.state, "spend_period": spend_key}) if v.reserved_usd else v
                            for v in verdicts
                        ]
                    entries = [
                        f"{1 if v.uses_cloud else 0}:{float(s)!r}" for v, s in zip(verdicts, scores, strict=True)
                    ]
                    if not entries:
                        return verdicts
                    pipe.multi()
                    pipe.lpush(self.key, *entries)  # LPUSH of several values leaves the last one at the head
                    pipe.ltrim(self.key, 0, self.window - 1)
                    if self.spend is not None:
                        self.spend.add(sum(v.reserved_usd for v in verdicts), pipe=pipe, key=spend_key)
                    pipe.execute()
                    return verdicts
                except redis.WatchError:
                    continue
        raise BudgetContention(f"budget window changed {MAX_ATTEMPTS} times in a row")

    def _read(self, client: redis.Redis | redis.client.Pipeline, spend_key: str | None = None) -> BudgetState:
        raws = cast(list[bytes], client.lrange(self.key, 0, self.window - 1))
        entries = [raw.split(b":", 1) for raw in raws]
        return BudgetState(
            decisions=tuple(int(d) for d, _ in entries),
            scores=tuple(float(v) for _, v in entries),
            spent_usd=self.spend.spent(spend_key, client=client) if self.spend is not None else 0.0,
        )

    def snapshot(self) -> BudgetState:
        return self._read(self.client, self.spend.key() if self.spend is not None else None)

    def reset(self) -> None:
        self.client.delete(self.key)


def hold_reservation(job: Job, period: str, usd: float) -> None:
    """Record that ``job``'s cloud image (delivered, or its shadow when the job is on the edge) holds ``usd``
    in the spend ledger's counter ``period``."""
    job.reserved_usd = float(usd)
    job.reserved_period = period


def take_reservation(job: Job) -> tuple[str, float] | None:
    """Clear the cloud reservation ``job`` holds; returns its ledger period and amount, or None if it holds
    none. The caller gives it back (:func:`give_back`) once the change is committed."""
    if job.reserved_usd <= 0 or job.reserved_period is None:
        return None
    released = (job.reserved_period, float(job.reserved_usd))
    job.reserved_usd = 0.0
    job.reserved_period = None
    return released


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
