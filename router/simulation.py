"""A deployment simulated on a rated log: routing policies, the learning loop among them, run online.

Each prompt of a two-tier replay log (:mod:`router.log`) arrives in turn: in the log's order (seed 0) or in a
shuffled order (seeds 1, 2, ...). Every policy routes as a router worker does: the prompt is scored by the
policy's current router and decided against a live :class:`~router.budget.BudgetController` holding the cloud
share to ρ over its window, the router's offline calibration setting the threshold until the window has scores.
A policy that learns asks for shadow samples through the controller (``shadow=True``), so a label's cloud image
is paid as the product's ``ROUTET2I_SHADOW_PAID_FROM`` says (:attr:`SimulationConfig.shadow_paid_from`): from ρ,
taking room in the window, or beside it, taking none. A shadow-sampled prompt reveals both tiers' ratings (a
label); any other prompt delivers only its tier's rating, and the user always receives the routed tier's image.

Policies (:data:`POLICIES`):

- ``frozen``: the shipped RouteT2I artifact, unchanged, no labels;
- ``random``: random scores; ``rule``: longest-prompt-first; ``pooled``: the pooled prior (:mod:`router.priors`);
- ``loop``: the learning loop (:mod:`router.learning`) of ``routet2i learn``: it starts from the shipped artifact;
  after ``min_prior_labels`` labels its champion becomes the best of its candidate priors (shipped, rule) on
  them; every ``retrain_every`` new labels (from :attr:`LoopConfig.min_labels` on) it trains a challenger on all
  but the most recent labels, judges it against the champion on those and promotes it if the verdict says so.
  Its shadow rate is :func:`router.learning.shadow_rate` of its labels and of the champion's error on the
  latest held-out labels. ``loop`` trains its challengers from scratch; ``loop-warm`` warm starts them from the
  chosen prior (``routet2i learn``'s default); ``loop-pooled`` has the pooled prior (:mod:`router.priors`) among
  its candidates and warm starts from it;
- ``cv-reference``: the challengers' router cross-validated on the log itself, each prompt scored by a model
  trained on the other folds: an upper reference no deployment has.

The summary of the runs (PGR over the stream, labels, what they cost) is :mod:`router.simulation_report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from router.base import Router, create_router
from router.baselines import RandomRouter
from router.budget import (
    DEFAULT_TOLERANCE,
    SHADOW_PAYMENTS,
    BudgetConfig,
    BudgetController,
    MemoryBudgetStore,
    ShadowPayment,
)
from router.learning import LoopConfig, choose_prior, judge, shadow_rate, split_recent, train_challenger
from router.log import LogRecord
from router.replay import record_costs
from router.splits import group_ids, split_folds

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder

DEFAULT_WINDOW = 500
"""The budget window when none is given (``ROUTET2I_BUDGET_WINDOW``'s default), shortened to the log's length."""

PRICES = {"edge": 0.009, "cloud": 0.065}
"""US dollars per image per tier where the log has no ``cost`` field (the tiers' default prices)."""


@dataclass(frozen=True)
class LoopVariant:
    """A learning-loop policy: the priors its first champion is chosen among, and what its challengers start from.

    Attributes:
        candidates: names of priors (keys of the ``priors`` given to :func:`simulate`).
        warm_from: None: challengers learn from the labels alone; ``"chosen"``: warm started from the prior
            chosen on the first labels; else the name of the prior they are warm started from.
    """

    candidates: tuple[str, ...]
    warm_from: str | None = None


LOOPS: dict[str, LoopVariant] = {
    "loop": LoopVariant(("shipped", "rule")),
    "loop-warm": LoopVariant(("shipped", "rule"), "chosen"),
    "loop-pooled": LoopVariant(("shipped", "rule", "pooled"), "pooled"),
}
"""The learning-loop policies."""

FIXED = {"frozen": "shipped", "rule": "rule", "pooled": "pooled"}
"""Policies that route with one prior, never changed, by the prior's name."""

POLICIES = ("frozen", "random", "rule", "pooled", "loop", "loop-warm", "loop-pooled", "cv-reference")
"""Every policy, in the order they are reported."""

SWAPS = ("keep", "rescore")
"""What the budget window's score history does when a policy's router changes: ``keep`` it (a route worker
switching to a new champion keeps the shared window's scores, which the old router gave), or ``rescore`` the
window's prompts with the new router."""


@dataclass(frozen=True)
class SimulationConfig:
    """Settings of a simulated deployment.

    Attributes:
        budget: ρ, the largest share of prompts whose image uses the cloud (delivered or shadow).
        seeds: orders of the log: seed 0 is the log's order, seeds 1.. shuffle it.
        window: the budget window (None: :data:`DEFAULT_WINDOW` or the log's length if shorter).
        tolerance: the window's minimum share below ρ (``ROUTET2I_BUDGET_TOLERANCE``).
        retrain_every: new labels between two challengers (``ROUTET2I_LEARN_RETRAIN_EVERY``).
        min_prior_labels: labels the first champion is chosen on among the candidate priors.
        shadow_rate: the shadow rate's maximum (``ROUTET2I_SHADOW_RATE``).
        shadow_min_rate: what it falls to once settled (``ROUTET2I_SHADOW_MIN_RATE``).
        settle_labels: labels at which a loop counts as settled (``ROUTET2I_SHADOW_SETTLE_LABELS``).
        loop: the loop's rules (the challengers' router, hold-out, promotion).
        router_settings: settings of the challengers' and the cross-validated reference's router.
        prices: US dollars per image per tier, where a record has no ``cost`` field.
        curve_points: consecutive stretches of the stream the PGR curve is measured on.
        cv_folds: folds of the cross-validated reference.
        swap: the window's scores when a router changes (:data:`SWAPS`).
        shadow_paid_from: where a label's cloud image is paid from (:data:`router.budget.SHADOW_PAYMENTS`:
            ``allowance``, beside ρ, or ``window``, from it; ``ROUTET2I_SHADOW_PAID_FROM`` and its default).
    """

    budget: float = 0.5
    seeds: int = 3
    window: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    retrain_every: int = 25
    min_prior_labels: int = 20
    shadow_rate: float = 0.2
    shadow_min_rate: float = 0.02
    settle_labels: int = 200
    loop: LoopConfig = field(default_factory=LoopConfig)
    router_settings: Mapping[str, Any] = field(default_factory=dict)
    prices: Mapping[str, float] = field(default_factory=lambda: dict(PRICES))
    curve_points: int = 8
    cv_folds: int = 5
    swap: str = "keep"
    shadow_paid_from: ShadowPayment = "allowance"

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be within [0, 1], got {self.budget}")
        for name in ("seeds", "retrain_every", "min_prior_labels", "settle_labels", "curve_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if not 0.0 <= self.shadow_min_rate <= self.shadow_rate <= 1.0:
            raise ValueError("shadow rates must satisfy 0 <= shadow_min_rate <= shadow_rate <= 1")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {self.cv_folds}")
        if self.swap not in SWAPS:
            raise ValueError(f"swap must be one of {', '.join(SWAPS)}, got {self.swap!r}")
        if self.shadow_paid_from not in SHADOW_PAYMENTS:
            raise ValueError(
                f"shadow_paid_from must be one of {', '.join(SHADOW_PAYMENTS)}, got {self.shadow_paid_from!r}"
            )

    def window_for(self, n: int) -> int:
        return self.window if self.window is not None else min(DEFAULT_WINDOW, n)


@dataclass
class Run:
    """One policy deployed on one order of the log.

    Attributes:
        order: the log's record indices in arrival order.
        cloud: per arriving prompt, whether the user received the cloud's image.
        shadow: whether it was shadow-sampled (both images made: a label).
        in_window: whether it took a cloud place in the budget window (a cloud image delivered, or a shadow
            paid from ρ).
        labels: labels collected once the prompt was decided.
        shadow_cost_usd: what the shadow images (the image not delivered) cost.
        events: the loop's steps: the prior chosen, each challenger's verdict.
        wall_s: seconds the run took.
    """

    policy: str
    seed: int
    order: np.ndarray
    cloud: np.ndarray
    shadow: np.ndarray
    labels: np.ndarray
    in_window: np.ndarray
    shadow_cost_usd: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def uses_cloud(self) -> np.ndarray:
        """Per prompt, whether the cloud made an image (delivered or shadow): what the budget holds."""
        result: np.ndarray = self.cloud | self.shadow
        return result

    @property
    def promotions(self) -> int:
        return sum(1 for e in self.events if e["event"] == "judged" and e["promote"])


@dataclass
class Simulation:
    """Every policy's runs on one log."""

    records: list[LogRecord]
    config: SimulationConfig
    runs: dict[str, list[Run]]
    info: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def window(self) -> int:
        return self.config.window_for(len(self.records))


class _Context:
    """What every run of one simulation shares: the log, the priors, and each router's scores of the log."""

    def __init__(
        self,
        records: Sequence[LogRecord],
        priors: Mapping[str, Router],
        config: SimulationConfig,
        encoder: SentenceEncoder | None,
    ) -> None:
        self.records = list(records)
        self.prompts = [r.prompt for r in self.records]
        self.priors = dict(priors)
        self.config = config
        self.encoder = encoder
        self.window = config.window_for(len(self.records))
        self.costs = record_costs(self.records, config.prices)
        self._scores: dict[int, tuple[Router, np.ndarray]] = {}

    def scores(self, router: Router) -> np.ndarray:
        """``router``'s score of every prompt of the log, in log order (computed once per router)."""
        if id(router) not in self._scores:
            scores = np.asarray(router.score(self.prompts), dtype=np.float64)
            self._scores[id(router)] = (router, scores)  # the router is kept so that its id is not reused
        return self._scores[id(router)][1]

    def new_router(self) -> Router:
        return create_router(self.config.loop.router, encoder=self.encoder, **self.config.router_settings)


class _Fixed:
    """A policy whose scores never change and which collects no labels."""

    def __init__(self, scores: np.ndarray, floor: float | None, threshold: float | None) -> None:
        self.scores, self.floor, self.threshold = scores, floor, threshold
        self.n_labels = 0
        self.events: list[dict[str, Any]] = []

    def wants_shadow(self, position: int) -> bool:
        return False

    def learn(self, record: LogRecord, position: int) -> bool:
        return False


class _Loop:
    """The learning loop as ``routet2i learn`` runs it, on the labels its shadow samples collect."""

    def __init__(self, ctx: _Context, variant: LoopVariant, seed: int) -> None:
        self.ctx, self.variant = ctx, variant
        self.labels: list[LogRecord] = []
        # The same draws for every loop policy of a seed: they differ only by what they learn (paired).
        self.uniform = np.random.default_rng([seed, 7]).random(len(ctx.records))
        self.prior: str | None = None
        self.trained_at = 0
        self.recent_error: float | None = None
        self.events: list[dict[str, Any]] = []
        self._install(ctx.priors["shipped"])

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    def _install(self, router: Router) -> None:
        self.router = router
        self.scores = self.ctx.scores(router)
        self.floor = router.edge_floor()
        self.threshold = router.calibrated_threshold(self.ctx.config.budget)

    def wants_shadow(self, position: int) -> bool:
        cfg = self.ctx.config
        rate = shadow_rate(
            len(self.labels),
            max_rate=cfg.shadow_rate,
            min_rate=cfg.shadow_min_rate,
            settle_labels=cfg.settle_labels,
            recent_error=self.recent_error,
        )
        return bool(self.uniform[position] < rate)

    def learn(self, record: LogRecord, position: int) -> bool:
        """Take one label; True when the champion changed."""
        cfg = self.ctx.config
        self.labels.append(record)
        n = len(self.labels)
        if self.prior is None:
            if n < cfg.min_prior_labels:
                return False
            candidates = {name: self.ctx.priors[name] for name in self.variant.candidates}
            best, values = choose_prior(candidates, self.labels, cfg.budget, cfg.loop)
            self.prior, self.trained_at = best, n
            self.events.append({"event": "prior", "position": position, "labels": n, "chosen": best, "values": values})
            changed = candidates[best] is not self.router
            self._install(candidates[best])
            return changed
        if n < cfg.loop.min_labels or n - self.trained_at < cfg.retrain_every:
            return False
        return self._challenge(position)

    def _challenge(self, position: int) -> bool:
        cfg, n = self.ctx.config, len(self.labels)
        train, holdout = split_recent(self.labels, cfg.loop)
        warm = self.variant.warm_from
        prior = None if warm is None else self.ctx.priors[self.prior if warm == "chosen" and self.prior else warm]
        started = time.perf_counter()
        challenger = train_challenger(
            train, cfg.loop, prior=prior, encoder=self.ctx.encoder, seed=n, **cfg.router_settings
        )
        verdict = judge(self.router, challenger, holdout, cfg.budget, cfg.loop, trained_on=len(train))
        self.trained_at = n
        pgr = verdict.comparisons["pgr"]
        self.recent_error = 1.0 - (pgr.challenger if verdict.promote else pgr.champion)
        self.events.append(
            {
                "event": "judged",
                "position": position,
                "labels": n,
                **verdict.to_dict(),
                "prior_weight": getattr(challenger, "weight", None),
                "train_s": round(time.perf_counter() - started, 3),
            }
        )
        if verdict.promote:
            self._install(challenger)
        return verdict.promote


def _cross_validated(ctx: _Context, seed: int) -> _Fixed:
    """Each prompt scored by the challengers' router trained on the other folds (split by prompt with ``seed``)."""
    folds = split_folds(ctx.prompts, ctx.config.cv_folds, seed)
    scores = np.empty(len(ctx.records))
    thresholds, floor = [], None
    for fold in range(ctx.config.cv_folds):
        inside = folds == fold
        model = ctx.new_router().fit([r for r, f in zip(ctx.records, folds, strict=True) if f != fold], seed=seed)
        scores[inside] = model.score([p for p, i in zip(ctx.prompts, inside, strict=True) if i])
        floor = model.edge_floor()
        if (threshold := model.calibrated_threshold(ctx.config.budget)) is not None:
            thresholds.append(threshold)
    return _Fixed(scores, floor, float(np.mean(thresholds)) if thresholds else None)


def _agent(ctx: _Context, policy: str, seed: int) -> _Fixed | _Loop:
    if policy in LOOPS:
        return _Loop(ctx, LOOPS[policy], seed)
    if policy == "cv-reference":
        return _cross_validated(ctx, seed)
    router: Router = RandomRouter(seed=seed) if policy == "random" else ctx.priors[FIXED[policy]]
    return _Fixed(ctx.scores(router), router.edge_floor(), router.calibrated_threshold(ctx.config.budget))


class _Window(MemoryBudgetStore):
    """The in-process budget window, whose score history can be replaced by a new router's scores."""

    def rescore(self, scores: Sequence[float]) -> None:
        """Replace the recent scores (newest first) by ``scores`` of the same prompts."""
        with self._lock:
            self._scores.clear()
            self._scores.extend(float(s) for s in list(scores)[: len(self._decisions)])


def run_policy(ctx: _Context, policy: str, seed: int, order: np.ndarray) -> Run:
    """Deploy ``policy`` on the log in ``order``."""
    started = time.perf_counter()
    cfg = ctx.config
    agent = _agent(ctx, policy, seed)
    store = _Window(ctx.window)
    budget = BudgetConfig(
        rho=cfg.budget, window=ctx.window, tolerance=cfg.tolerance, shadow_paid_from=cfg.shadow_paid_from
    )
    controller = BudgetController(budget, store)
    n = len(order)
    cloud, shadow, labels = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
    in_window = np.zeros(n, dtype=bool)
    cost = 0.0
    for position, index in enumerate(order):
        verdict = controller.decide(
            float(agent.scores[index]),
            floor=agent.floor,
            calibrated_threshold=agent.threshold,
            shadow=agent.wants_shadow(position),
        )
        cloud[position], shadow[position], in_window[position] = verdict.cloud, verdict.shadow, verdict.in_window
        if verdict.shadow:
            cost += float(ctx.costs[index, 0 if verdict.cloud else 1])  # the image the user does not receive
            changed = agent.learn(ctx.records[index], position)
            if changed and cfg.swap == "rescore":
                store.rescore(agent.scores[order[position::-1]][: ctx.window])
        labels[position] = agent.n_labels
    wall_s = time.perf_counter() - started
    return Run(policy, seed, order, cloud, shadow, labels, in_window, cost, agent.events, wall_s)


def orders(n: int, seeds: int) -> list[np.ndarray]:
    """Arrival orders: the log's own (seed 0), then a seeded shuffle per further seed."""
    return [np.arange(n) if seed == 0 else np.random.default_rng(seed).permutation(n) for seed in range(seeds)]


def needed_priors(policies: Sequence[str]) -> set[str]:
    """The priors (by name) the given policies route with or choose among."""
    names = {FIXED[p] for p in policies if p in FIXED}
    for policy in policies:
        if policy in LOOPS:
            variant = LOOPS[policy]
            names |= {"shipped", *variant.candidates}
            if variant.warm_from not in (None, "chosen"):
                names.add(str(variant.warm_from))
    return names


def simulate(
    records: Sequence[LogRecord],
    priors: Mapping[str, Router],
    config: SimulationConfig | None = None,
    *,
    policies: Sequence[str] = POLICIES,
    encoder: SentenceEncoder | None = None,
    info: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Simulation:
    """Deploy every policy on ``records`` in each seed's order (see the module's docstring).

    Args:
        records: a rated two-tier log, in its arrival order.
        priors: routers by name: ``shipped`` and ``rule`` (and ``pooled`` for ``loop-pooled``), as
            :func:`router.priors.candidate_priors` builds them.
        config: the deployment's settings (default: :class:`SimulationConfig`'s).
        policies: names of :data:`POLICIES`.
        encoder: given to every router trained here.
        info: recorded with the result (where the log came from).
        progress: called with one line per finished run.

    Returns:
        Every policy's runs, seed by seed.
    """
    config = config or SimulationConfig()
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies or len(set(policies)) != len(policies):
        raise ValueError(f"policies must be distinct names among {', '.join(POLICIES)}; got {list(policies)}")
    missing = sorted(needed_priors(policies) - set(priors))
    if missing:
        raise ValueError(
            f"no prior named {missing[0]!r} was given; the policies need {sorted(needed_priors(policies))}"
        )
    if len(records) < max(4, config.curve_points):
        raise ValueError(f"the log needs at least {max(4, config.curve_points)} prompts, got {len(records)}")
    if "cv-reference" in policies and int(group_ids([r.prompt for r in records]).max()) + 1 < config.cv_folds:
        raise ValueError(f"cv-reference needs at least {config.cv_folds} distinct prompts")
    started = time.perf_counter()
    ctx = _Context(records, priors, config, encoder)
    runs: dict[str, list[Run]] = {p: [] for p in policies}
    for seed, order in enumerate(orders(len(records), config.seeds)):
        for policy in policies:
            run = run_policy(ctx, policy, seed, order)
            runs[policy].append(run)
            if progress is not None:
                progress(
                    f"{policy} seed {seed}: {int(run.labels[-1])} labels, {run.promotions} promotions, "
                    f"{run.wall_s:.1f} s"
                )
    return Simulation(list(records), config, runs, dict(info or {}), time.perf_counter() - started)
