"""The cloud budget window in Redis, shared by every router worker process.

A router's batch of decisions reads the window, decides in order and appends to it as one optimistic
transaction (``WATCH`` / ``MULTI``): if another router wrote in between, the transaction is retried with the
fresh window, so two routers can never both take the last cloud slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import redis

from router.budget import BudgetState
from router.types import BudgetVerdict

KEY_PREFIX = "routet2i:budget"
MAX_ATTEMPTS = 100
"""Optimistic transaction retries before giving up (only under extreme contention)."""


class BudgetContention(RuntimeError):
    """The shared budget window kept changing under this router; the route task will be retried."""


class RedisBudgetStore:
    """The budget window as one capped Redis list, newest first, of ``"<1|0>:<score>"`` entries.

    One list (rather than one for decisions and one for scores) keeps a decision at one read and one write
    round trip, plus the ``WATCH``.
    """

    def __init__(self, client: redis.Redis, *, window: int, name: str = "default") -> None:
        self.client = client
        self.window = window
        self.key = f"{KEY_PREFIX}:{name}:window"

    def transact(
        self, fn: Callable[[BudgetState], Sequence[BudgetVerdict]], scores: Sequence[float]
    ) -> list[BudgetVerdict]:
        for _ in range(MAX_ATTEMPTS):
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.key)
                    verdicts = list(fn(self._read(pipe)))
                    entries = [
                        f"{1 if v.uses_cloud else 0}:{float(s)!r}" for v, s in zip(verdicts, scores, strict=True)
                    ]
                    if not entries:
                        return verdicts
                    pipe.multi()
                    pipe.lpush(self.key, *entries)  # LPUSH of several values leaves the last one at the head
                    pipe.ltrim(self.key, 0, self.window - 1)
                    pipe.execute()
                    return verdicts
                except redis.WatchError:
                    continue
        raise BudgetContention(f"budget window changed {MAX_ATTEMPTS} times in a row")

    def _read(self, client: redis.Redis | redis.client.Pipeline) -> BudgetState:
        raws = cast(list[bytes], client.lrange(self.key, 0, self.window - 1))
        entries = [raw.split(b":", 1) for raw in raws]
        return BudgetState(decisions=tuple(int(d) for d, _ in entries), scores=tuple(float(v) for _, v in entries))

    def snapshot(self) -> BudgetState:
        return self._read(self.client)

    def reset(self) -> None:
        self.client.delete(self.key)
