"""Per-process resources of a worker: database, image store, routing policy, generators, image scorer.

Built lazily inside each pool child (never in the parent before it forks, so no CUDA context or database
connection is shared across processes) and rebuilt if the process id changes.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from celery import Celery

from core.settings import Settings
from db.images import ImageStore
from db.session import make_engine, make_session_factory

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = 400
"""Carried PartiPrompts whose utilities set a K-tier router's λ until the budget window holds its own prompts."""

if TYPE_CHECKING:
    import uuid

    import numpy as np
    import redis

    from db.breaker import CircuitBreaker
    from db.redis_state import SpendLedger
    from router.base import Router
    from router.budget import BudgetController
    from router.embeddings import SentenceEncoder
    from router.multitier import TierRouter
    from router.policy import RoutingPolicy
    from router.spend import SpendController
    from router.tier_policy import TierRoutingPolicy
    from worker.generators import Generator
    from worker.scoring import ClipScorer


class ScorerUnavailable(RuntimeError):
    """The image scorer failed to load in this process; the first failure's reason is kept."""


class WorkerContext:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.app = app
        self.engine = make_engine(settings.database_url, synchronous_commit=settings.worker_synchronous_commit)
        self.sessions = make_session_factory(self.engine)
        self.images = ImageStore(settings.image_dir)
        self._generators: dict[str, Generator] = {}
        self._policy: RoutingPolicy | None = None
        self._scorer: ClipScorer | None = None
        self._scorer_error: str | None = None
        self._budgets: dict[tuple[str, float], BudgetController] = {}
        self._tier_policy: TierRoutingPolicy | None = None
        self._spend_budgets: dict[tuple[str, float], SpendController] = {}
        self._breaker: CircuitBreaker | None = None
        self._redis: redis.Redis | None = None
        self._spend_ledger: SpendLedger | None = None
        self._encoder: SentenceEncoder | None = None
        self._refreshed = 0.0
        self._learned_shadow_rate: float | None = None
        self._from_registry = False

    def generator(self, tier: str) -> Generator:
        if tier not in self._generators:
            from worker.generators import create_generator

            self._generators[tier] = create_generator(self.settings.tier(tier), cache_dir=self.settings.cache_dir)
        return self._generators[tier]

    def scorer(self) -> ClipScorer:
        """The CLIP scorer of ``ROUTET2I_SCORER__*``, built on first use.

        A failed build is remembered and not retried in this process: it comes from the configuration (an
        unknown model, a missing checkpoint, a bad metric-set file), which a restart with fixed settings
        cures, and retrying would spend the load time again on every job.

        Raises:
            ScorerUnavailable: the scorer could not be built, now or earlier in this process.
        """
        if self._scorer is None:
            if self._scorer_error is not None:
                raise ScorerUnavailable(self._scorer_error)
            from worker.scoring import ClipScorer

            try:
                scorer = ClipScorer.from_settings(self.settings.scorer)
            except Exception as exc:
                log.exception("scorer failed to load", extra={"model": self.settings.scorer.model})
                self._scorer_error = f"scorer failed to load: {type(exc).__name__}: {exc}"
                raise ScorerUnavailable(self._scorer_error) from exc
            # Text embeddings of the metric set are computed now rather than during the first job.
            scorer.metric_embeddings(scorer.metric_set)
            self._scorer = scorer
        return self._scorer

    def policy(self) -> RoutingPolicy:
        """The routing policy: the model registry's champion for this deployment's router
        (:attr:`Settings.model_slot`) when there is one, else the configured artifact (or the shipped one). Every
        ``router_refresh_s`` it asks the registry again and, when another champion was promoted (or rolled back),
        or none is left, loads the router that now applies and switches between two batches: no restart, no
        decision dropped."""
        if self._policy is None:
            from router.embeddings import SentenceEncoder
            from router.policy import RoutingPolicy

            self._encoder = SentenceEncoder.from_settings(self.settings)
            router = self._current_router(None)
            assert router is not None
            self._policy = RoutingPolicy(
                router,
                self.budget(self.settings.budget_name, self.settings.dearest_share),
                tiers=(self.settings.cheapest, self.settings.dearest),
            )
            self._refreshed = time.monotonic()
        elif time.monotonic() - self._refreshed >= self.settings.router_refresh_s:
            self._refreshed = time.monotonic()
            newer: Router | None = None
            try:
                newer = self._current_router(self._policy.router)
            except Exception:  # the registry or the artifact is unreachable: keep routing with what there is
                log.exception("could not look for a new champion; routing on with the current router")
            if newer is not None:
                log.info(
                    "switched router",
                    extra={"from": self._policy.router.version, "to": newer.version, "slot": self.settings.model_slot},
                )
                self._policy.router = newer
        return self._policy

    def tier_policy(self) -> TierRoutingPolicy:
        """The routing policy of a deployment with more than two tiers: the configured K-tier router
        (``ROUTET2I_ROUTER``, ``ROUTET2I_ROUTER_MODEL``) under the money budget, built on first use."""
        if self._tier_policy is None:
            from router.embeddings import SentenceEncoder
            from router.multitier import load_tier_router
            from router.tier_policy import TierRoutingPolicy

            self._encoder = SentenceEncoder.from_settings(self.settings)
            assert self.settings.router_model is not None  # the settings refuse more than two tiers without one
            router = load_tier_router(self.settings.router, self.settings.router_model, encoder=self._encoder)
            budget = self.spend_budget(self.settings.budget_name, self.settings.budget_usd, router=router)
            self._tier_policy = TierRoutingPolicy(router, budget)
        return self._tier_policy

    def spend_budget(self, name: str, budget_usd: float, *, router: TierRouter | None = None) -> SpendController:
        """The shared money budget ``name`` (the deployment's, or a tenant's own) held to ``budget_usd`` per image,
        and to the deployment's spend limit when one is set. ``router``: the K-tier router whose utilities on the
        carried PartiPrompts calibrate λ until the window has its own."""
        key = (name, budget_usd)
        if key not in self._spend_budgets:
            from db.redis_state import RedisSpendStore
            from router.cost import reserved_usd
            from router.spend import SpendConfig, SpendController

            settings = self.settings
            config = SpendConfig(
                tiers=settings.tier_names,
                prices=tuple(settings.prices.values()),
                budget_usd=budget_usd,
                window=settings.budget_window,
                spend_limit_usd=settings.cloud_spend_limit_usd,
                reserve_usd=(0.0, *(reserved_usd(settings.tier(t)) for t in settings.tier_names[1:])),
            )
            store = RedisSpendStore(self._state_redis(), window=config.window, name=name, spend=self.spend_ledger())
            calibration = self._tier_calibration(router or self.tier_policy().router)
            self._spend_budgets[key] = SpendController(config, store, name=name, calibration=calibration)
        return self._spend_budgets[key]

    def _tier_calibration(self, router: TierRouter) -> np.ndarray:
        """The utilities λ is set on until the window has its own: the router's training prompts', else those of
        the carried PartiPrompts."""
        if router.calibration.size:
            return router.calibration
        from router.data import partiprompts

        return router.utilities(partiprompts()[:CALIBRATION_PROMPTS])

    def breaker(self) -> CircuitBreaker:
        """The deployment's per-tier circuit breakers (in the router state's Redis)."""
        if self._breaker is None:
            from db.breaker import CircuitBreaker

            self._breaker = CircuitBreaker.for_settings(self.settings, self._state_redis())
        return self._breaker

    def _current_router(self, running: Router | None) -> Router | None:
        """The router that should route now, loaded, or None when it is ``running`` already: the registry's
        champion (its artifact unpacked once under ``cache_dir/models``), else the configured router. Also reads
        the learning loop's current shadow rate."""
        import redis.exceptions as redis_errors

        from db.redis_state import get_shadow_rate
        from db.registry import champion, champion_version, unpack
        from router.base import load_router

        try:
            self._learned_shadow_rate = get_shadow_rate(self._state_redis(), self.settings.model_slot)
        except redis_errors.RedisError as exc:  # the last rate read stands
            log.warning("shadow rate not read", extra={"error": str(exc)})
        with self.sessions() as session:
            found = champion_version(session, self.settings.model_slot)
            if found is not None and running is not None and found[1] == running.version:
                return None
            row = champion(session, self.settings.model_slot) if found is not None else None
            if row is not None:
                directory = self.settings.cache_dir / "models" / row.sha256
                if not (directory / "manifest.json").is_file():
                    unpack(row.artifact, directory)
                kind = row.kind
        if row is not None:
            self._from_registry = True
            return load_router(kind, directory, encoder=self._encoder)
        if running is not None and not self._from_registry:
            return None  # no champion, and the configured router runs already
        self._from_registry = False
        return load_router(self.settings.router, self.settings.router_model, encoder=self._encoder)

    def shadow_rate(self) -> float:
        """The share of routed jobs to shadow-sample: the learning loop's current rate (``routet2i learn``
        lowers it as the router settles), never above ``ROUTET2I_SHADOW_RATE``."""
        configured = self.settings.shadow_rate
        learned = self._learned_shadow_rate
        return configured if learned is None else min(configured, learned)

    def budget(self, name: str, rho: float, *, tolerance: float | None = None) -> BudgetController:
        """The shared budget window ``name`` (the deployment's, or a tenant's own) held to ``rho``, and to the
        deployment's spend limit when one is set; ``tolerance``: the window's minimum share (None: the
        deployment's ``budget_tolerance``; 1: none)."""
        key = (name, rho)
        if key not in self._budgets:
            from db.redis_state import RedisBudgetStore
            from router.budget import BudgetConfig, BudgetController

            config = BudgetConfig.for_settings(self.settings, rho, tolerance=tolerance)
            store = RedisBudgetStore(self._state_redis(), window=config.window, name=name, spend=self.spend_ledger())
            self._budgets[key] = BudgetController(config, store, name=name)
        return self._budgets[key]

    def escalation(
        self, tenant_id: uuid.UUID | None = None, tenant_budget: float | None = None
    ) -> BudgetController | None:
        """The window of edge images that may be escalated to the cloud (None: escalation is off).

        A tenant with its own cloud budget (``tenant_budget``) has its own window at the same rate, as it has
        its own routing window, and none when that budget is zero: such a tenant gets no cloud image it did
        not ask for. Other tenants share the deployment's window.
        """
        rate = self.settings.escalation_rate
        if rate <= 0 or (tenant_budget is not None and tenant_budget <= 0):
            return None
        if tenant_budget is None:
            return self.budget(f"{self.settings.budget_name}-escalation", rate, tolerance=1.0)
        return self.budget(f"tenant-{tenant_id}-escalation", rate, tolerance=1.0)

    def spend_ledger(self) -> SpendLedger | None:
        """The deployment's cloud spend per period, when a spend limit is set (built once per process)."""
        if self.settings.cloud_spend_limit_usd is not None and self._spend_ledger is None:
            from db.redis_state import SpendLedger

            self._spend_ledger = SpendLedger.for_settings(self.settings, self._state_redis())
        return self._spend_ledger

    def state_redis(self) -> redis.Redis:
        """The router state's Redis (budget windows, breakers, tier load), connected once per process."""
        return self._state_redis()

    def _state_redis(self) -> redis.Redis:
        if self._redis is None:
            from db.redis_state import connect

            self._redis = connect(self.settings.state_redis_url)
        return self._redis

    def warm_up(self, queues: list[str]) -> None:
        """Load what the consumed queues need before the first message arrives."""
        threads = self.settings.torch_threads
        if threads is None and queues == ["route"]:
            # A decision encodes one short prompt: a second thread gains little, and a prefork pool of
            # router processes with a thread per core each would fight over the cores.
            threads = 1
        if threads is not None:
            import torch
            from threadpoolctl import threadpool_limits

            torch.set_num_threads(threads)
            threadpool_limits(limits=threads)  # numpy's BLAS too (the router's mixture of experts runs on it)
        for queue in queues:
            if queue == "route" and len(self.settings.tier_names) > 2:
                self.tier_policy().router.utilities(["a warm-up prompt"])
            elif queue == "route":
                # One prediction now: a learned router's encoder is exported and loaded before the first job.
                self.policy().router.predict(["a warm-up prompt"])
            else:
                self.generator(queue)
                if self.settings.scorer.enabled:
                    self.scorer()

    def close(self) -> None:
        self.engine.dispose()


def get_context(app: Celery) -> WorkerContext:
    """The context of the current process, created on first use."""
    context: WorkerContext | None = getattr(app, "_routet2i_context", None)
    if context is None or context.pid != os.getpid():
        context = WorkerContext(app.conf.routet2i_settings, app)
        app._routet2i_context = context
    return context
