"""The cloud budget window in Redis, shared by every router worker process.

A decision reads the window, decides and appends to it as one optimistic transaction (``WATCH`` /
``MULTI``): if another router wrote in between, the transaction is retried with the fresh window, so two
routers can never both take the last cloud slot.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from router.budget import BudgetState
from router.types import BudgetVerdict

KEY_PREFIX = "routet2i:budget"
MAX_ATTEMPTS = 100
"""Optimistic transaction retries before giving up (only under extreme contention)."""


class BudgetContention(RuntimeError):
    """The shared budget window kept changing under this router; the route task will be retried."""


class RedisBudgetStore:
    """Budget window as two capped Redis lists, newest first."""

    def __init__(self, client: redis.Redis, *, window: int, name: str = "default") -> None:
        self.client = client
        self.window = window
        self.decisions_key = f"{KEY_PREFIX}:{name}:decisions"
        self.scores_key = f"{KEY_PREFIX}:{name}:scores"

    def transact(self, fn: Callable[[BudgetState], BudgetVerdict], score: float) -> BudgetVerdict:
        for _ in range(MAX_ATTEMPTS):
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.decisions_key, self.scores_key)
                    state = self._read(pipe)
                    verdict = fn(state)
                    pipe.multi()
                    pipe.lpush(self.decisions_key, 1 if verdict.uses_cloud else 0)
                    pipe.ltrim(self.decisions_key, 0, self.window - 1)
                    pipe.lpush(self.scores_key, repr(float(score)))
                    pipe.ltrim(self.scores_key, 0, self.window - 1)
                    pipe.execute()
                    return verdict
                except redis.WatchError:
                    continue
        raise BudgetContention(f"budget window changed {MAX_ATTEMPTS} times in a row")

    def _read(self, client: redis.Redis | redis.client.Pipeline) -> BudgetState:
        decisions = client.lrange(self.decisions_key, 0, self.window - 1)
        scores = client.lrange(self.scores_key, 0, self.window - 1)
        return BudgetState(decisions=tuple(int(d) for d in decisions), scores=tuple(float(s) for s in scores))

    def snapshot(self) -> BudgetState:
        return self._read(self.client)

    def reset(self) -> None:
        self.client.delete(self.decisions_key, self.scores_key)
