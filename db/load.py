"""The live state of every tier, as load-aware routing reads it per batch (:mod:`router.load`), and the burst
allowance that pays for spilling jobs to a dearer tier.

- **Backlog**: jobs queued on a tier or generating there, counted in the database (the source of truth: it
  holds whatever the broker holds, and messages carry several jobs each).
- **Slots**: the pool processes of the live workers consuming the tier's queue, from their heartbeats
  (:class:`db.redis_state.WorkerRegistry`).
- **Service time**: the moving median of a tier's seconds per image over its last :data:`SAMPLES` generation
  batches (batch wall time over its images), per image size and over all sizes. Tier workers push one sample
  per batch (:func:`record_service_time`); a Redis list per key, trimmed, so reading is one round trip.

The burst allowance is a counter per spend period (:class:`BurstAllowance`): a spill takes its tier's price
from it and, with a spend limit, from the period's spend ledger in the same atomic script, so spills never
exceed either.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import cast

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.settings import Settings
from db.models import Job, JobStatus
from db.redis_state import SpendLedger, WorkerRegistry
from router.load import TierLoad

SAMPLES = 50
"""Generation batches the moving median of a tier's service time is taken over."""

SERVICE_KEY = "routet2i:service:{tier}:{size}"
ALL_SIZES = "all"

ACTIVE = (JobStatus.QUEUED, JobStatus.GENERATING)


def size_key(width: int, height: int) -> str:
    return f"{width}x{height}"


def record_service_time(client: redis.Redis, tier: str, sizes: Sequence[str], seconds_per_image: float) -> None:
    """Push one batch's seconds per image to the tier's moving windows: over all sizes, and for its size when the
    batch had one (``sizes``: the sizes of its images)."""
    keys = [SERVICE_KEY.format(tier=tier, size=ALL_SIZES)]
    if len(set(sizes)) == 1:
        keys.append(SERVICE_KEY.format(tier=tier, size=sizes[0]))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.lpush(key, repr(float(seconds_per_image)))
        pipe.ltrim(key, 0, SAMPLES - 1)
    pipe.execute()


def service_times(client: redis.Redis, tiers: Sequence[str], sizes: dict[str, str]) -> dict[str, float | None]:
    """Each tier's moving median seconds per image at its size ``sizes[tier]`` (over all sizes when that size
    has no samples yet); None when the tier has none at all."""
    pipe = client.pipeline(transaction=False)
    for tier in tiers:
        pipe.lrange(SERVICE_KEY.format(tier=tier, size=sizes[tier]), 0, -1)
        pipe.lrange(SERVICE_KEY.format(tier=tier, size=ALL_SIZES), 0, -1)
    answers = cast(list[list[bytes]], pipe.execute())
    found: dict[str, float | None] = {}
    for k, tier in enumerate(tiers):
        samples = answers[2 * k] or answers[2 * k + 1]
        found[tier] = statistics.median(float(v) for v in samples) if samples else None
    return found


def backlogs(session: Session, tiers: Sequence[str]) -> dict[str, int]:
    """Jobs queued on each tier or generating there."""
    counts = dict.fromkeys(tiers, 0)
    rows = session.execute(
        select(Job.tier, func.count()).where(Job.status.in_(ACTIVE), Job.tier.is_not(None)).group_by(Job.tier)
    )
    for tier, count in rows:
        if tier in counts:
            counts[tier] = int(count)
    return counts


def live_slots(registry: WorkerRegistry, tiers: Sequence[str], dead_after_s: float) -> dict[str, int]:
    """Pool processes of the live workers consuming each tier's queue."""
    slots = dict.fromkeys(tiers, 0)
    for beat in registry.live(dead_after_s):
        for queue in beat.queues:
            if queue in slots:
                slots[queue] += beat.slots
    return slots


def tier_loads(
    session: Session,
    client: redis.Redis,
    settings: Settings,
    *,
    width: int | None = None,
    height: int | None = None,
) -> list[TierLoad]:
    """Every tier's live state, cheapest first (one database query, two Redis round trips); service times for
    images of ``width`` × ``height`` (each tier's own size where not given)."""
    tiers = settings.tier_names
    sizes = {t: size_key(width or settings.tier(t).width, height or settings.tier(t).height) for t in tiers}
    counts = backlogs(session, tiers)
    slots = live_slots(WorkerRegistry(client), tiers, settings.worker_dead_after_s)
    service = service_times(client, tiers, sizes)
    return [TierLoad(t, counts[t], slots[t], service[t]) for t in tiers]


_TAKE = """
local allowance = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local spent = 0
if KEYS[2] ~= '' then spent = tonumber(redis.call('GET', KEYS[2]) or '0') end
local taken = 0
for i = 4, #ARGV do
  local price = tonumber(ARGV[i])
  if used + price > allowance + 1e-9 then break end
  if limit >= 0 and spent + price > limit + 1e-9 then break end
  used = used + price
  spent = spent + price
  taken = taken + 1
end
if taken > 0 then
  redis.call('SET', KEYS[1], tostring(used), 'EX', ttl)
  if KEYS[2] ~= '' then redis.call('SET', KEYS[2], tostring(spent), 'EX', ttl) end
end
return taken
"""


class BurstAllowance:
    """Money for spilling jobs to dearer tiers under load, per spend period (``ROUTET2I_BURST_BUDGET_USD_PER_
    PERIOD``), shared by every router process; within the spend limit when there is one. Its counter is a
    :class:`SpendLedger` of its own (same periods, its own name)."""

    def __init__(self, client: redis.Redis, settings: Settings, ledger: SpendLedger | None) -> None:
        self.usd = settings.burst_budget_usd_per_period
        self.used = SpendLedger(client, period_s=settings.cloud_spend_period_s, name=f"{settings.budget_name}-burst")
        self.ledger = ledger if settings.cloud_spend_limit_usd is not None else None
        self.limit = settings.cloud_spend_limit_usd

    def left(self) -> float:
        """What the period's allowance has left (and the spend limit allows)."""
        left = self.usd - self.used.spent()
        if self.ledger is not None and self.limit is not None:
            left = min(left, self.limit - self.ledger.spent())
        return max(0.0, left)

    def take(self, prices: Sequence[float]) -> tuple[int, str | None]:
        """Take ``prices`` in order while the allowance (and the spend limit) has room, atomically.

        Returns:
            How many were taken (a prefix of ``prices``), and the spend period key their reservations are held
            in (None without a spend limit).
        """
        if not prices:
            return 0, None
        spend_key = self.ledger.key() if self.ledger is not None else None
        limit = self.limit if spend_key is not None and self.limit is not None else -1.0
        taken = self.used.client.eval(
            _TAKE,
            2,
            self.used.key(),
            spend_key or "",
            repr(float(self.usd)),
            repr(float(limit)),
            str(2 * self.used.period_s),
            *(repr(float(p)) for p in prices),
        )
        return int(cast(int, taken)), spend_key
