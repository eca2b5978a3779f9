"""Per-process resources of a worker: database, image store, routing policy, generators.

Built lazily inside each pool child (never in the parent before it forks, so no CUDA context or database
connection is shared across processes) and rebuilt if the process id changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from celery import Celery

from db.images import ImageStore
from db.session import make_engine, make_session_factory
from routet2i.settings import Settings

if TYPE_CHECKING:
    import redis

    from router.budget import BudgetController
    from router.policy import RoutingPolicy
    from worker.generation import Generator


class WorkerContext:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.app = app
        self.engine = make_engine(settings.database_url)
        self.sessions = make_session_factory(self.engine)
        self.images = ImageStore(settings.image_dir)
        self._generators: dict[str, Generator] = {}
        self._policy: RoutingPolicy | None = None
        self._budgets: dict[tuple[str, float], BudgetController] = {}
        self._redis: redis.Redis | None = None

    def generator(self, tier: str) -> Generator:
        if tier not in self._generators:
            from worker.generation import create_generator

            self._generators[tier] = create_generator(self.settings.tier(tier), cache_dir=self.settings.cache_dir)
        return self._generators[tier]

    def policy(self) -> RoutingPolicy:
        if self._policy is None:
            from router.base import load_router
            from router.policy import RoutingPolicy

            router = load_router(self.settings.router, self.settings.router_model)
            self._policy = RoutingPolicy(router, self.budget(self.settings.budget_name, self.settings.cloud_budget))
        return self._policy

    def budget(self, name: str, rho: float) -> BudgetController:
        """The shared budget window ``name`` (the deployment's, or a tenant's own) held to ``rho``."""
        key = (name, rho)
        if key not in self._budgets:
            from db.state_redis import connect
            from router.budget import BudgetConfig, BudgetController
            from worker.budget_store import RedisBudgetStore

            if self._redis is None:
                self._redis = connect(self.settings.state_redis_url)
            window = self.settings.budget_window
            store = RedisBudgetStore(self._redis, window=window, name=name)
            self._budgets[key] = BudgetController(BudgetConfig(rho=rho, window=window), store, name=name)
        return self._budgets[key]

    def warm_up(self, queues: list[str]) -> None:
        """Load what the consumed queues need before the first message arrives."""
        if self.settings.torch_threads is not None and any(q != "route" for q in queues):
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        for queue in queues:
            if queue == "route":
                self.policy()
            else:
                self.generator(queue)

    def close(self) -> None:
        self.engine.dispose()


def get_context(app: Celery) -> WorkerContext:
    """The context of the current process, created on first use."""
    context: WorkerContext | None = getattr(app, "_routet2i_context", None)
    if context is None or context.pid != os.getpid():
        context = WorkerContext(app.conf.routet2i_settings, app)
        app._routet2i_context = context  # type: ignore[attr-defined]
    return context
