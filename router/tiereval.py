"""Replay evaluation among any number of tiers: every router's quality-cost curve, by cross-validation.

Protocol (:func:`evaluate_tiers`), the conventions of :mod:`router.evaluation`:

1. For each seed, the log is split into folds by prompt (:func:`router.splits.split_folds`); each router gets a
   fresh instance per fold, fitted on the other folds with seed ``1000·seed + fold``, and routes the held-out
   fold. Every router routes the same test folds.
2. **Reported quality** is one aggregate per image: the mean over metrics of each metric divided by its
   standard deviation over every rating of the log (all tiers, all prompts); with one metric, the metric itself
   up to scale. It is the quality the curves show, the oracle maximises and the best single tier is chosen on
   (the tier with the highest mean over the whole log; ties to the cheaper).
3. **Curve.** For each budget ``B`` per image on :data:`BUDGETS` points evenly spaced from the cheapest tier's
   price to the dearest's, a router's utilities on the test fold give the price multiplier
   (:func:`router.tiers.multiplier_for_budget`) and the choices (:func:`router.tiers.choose`); where those cost
   less than ``B`` because the next smaller multiplier's choices cost more, the marginal prompts take the dearer
   choice with the leftover probability, counted at its expectation (as the two-tier evaluation does with the
   marginal prompt), so the router spends ``B`` exactly unless it wants less. Quality is normalised per run:
   0 for every prompt on the cheapest tier, 1 for every prompt on the best single tier.
4. **aqc**: the mean of the normalised curve over the budgets (trapezoid rule). **cost_to_best**: the lowest mean
   cost per image at which the router's mean curve over the runs reaches 1, as a share of the best tier's
   price (linear between budget points; None if it never does); ``cost_to_best_reached``: the share of runs
   whose own curve reaches it.
5. **Paired differences**: for the focus router, the mean over runs of its aqc minus another's on the same fold,
   with its standard error (sample standard deviation over the folds × seeds runs / √runs), as
   :meth:`router.results.Report.compare` does.

Routers: each single tier (``tier:<name>``; on budgets below its price the run falls back to the cheapest tier);
``random-mixture`` (at each budget, a random share of prompts on the dearer of the two adjacent tiers of the
training folds' upper quality-cost hull, which is the best any prompt-blind mixture of tiers does);
``routet2i-two-tier`` (the two-tier RouteT2I trained between the cheapest and the training folds' best tier,
routing between those two only); the K-tier routers of :mod:`router.multitier` (``ridge`` and ``knn`` choosing
the best predicted quality minus λ·price, :func:`~router.multitier.quality_utilities`; ``routet2i`` by PRS
utilities; ``-prs``/``-quality`` variants swap the utility); and the per-prompt ``oracle`` (the true qualities).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from router.results import FIT_SEED_STRIDE
from router.splits import split_folds
from router.tierlog import TierLog, TierRecord, two_tier_records
from router.tierresults import TierReport, TierRun, area, cost_to_best_share
from router.tiers import check_prices, choose, multiplier_for_budget

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder

BUDGETS = 101
"""Budget points of every curve, from the cheapest tier's price to the dearest's."""

DEFAULT_ROUTERS: tuple[str, ...] = (
    "random-mixture",
    "routet2i-two-tier",
    "ridge",
    "knn",
    "ridge-prs",
    "knn-prs",
    "routet2i",
    "oracle",
)
"""The routers of ``routet2i eval`` on a K-tier log, besides one per single tier."""

Point = tuple[float, float, np.ndarray]
"""One routing of a test fold: mean cost per image, mean reported quality, and the share of prompts on each tier."""

Policy = Callable[[float], Point]
"""A routing of one test fold at each budget per image."""


def report_quality(qualities: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """The reported aggregate ``(n, K)`` of qualities ``(n, K, M)``: the mean over metrics of each metric over its
    ``spread`` (the log's standard deviation of the metric)."""
    result: np.ndarray = (qualities / spread).mean(axis=2)
    return result


def metric_spread(qualities: np.ndarray) -> np.ndarray:
    """Each metric's standard deviation over every rating ``(n, K, M)`` of a log (1 where constant)."""
    std = qualities.reshape(-1, qualities.shape[2]).std(axis=0)
    return np.where(std > 1e-12, std, 1.0)


def utility_policy(utilities: np.ndarray, prices: np.ndarray, truth: np.ndarray) -> Policy:
    """The policy of routing by ``utilities`` (n, K) under :mod:`router.tiers`' rule, measured on the true reported
    qualities ``truth`` (n, K)."""
    rows = np.arange(len(truth))
    price_list = [float(p) for p in prices]  # router.tiers takes a sequence

    def at(choice: np.ndarray) -> Point:
        shares = np.bincount(choice, minlength=len(prices)) / len(choice)
        return float(prices[choice].mean()), float(truth[rows, choice].mean()), shares

    def policy(budget: float) -> Point:
        multiplier = multiplier_for_budget(utilities, price_list, budget)
        cost, quality, shares = at(choose(utilities, price_list, multiplier))
        if multiplier <= 0 or cost >= budget:
            return cost, quality, shares
        # The choices just below the multiplier cost more than the budget: mix them in at the leftover share.
        dearer = at(choose(utilities, price_list, multiplier - max(multiplier * 1e-9, 1e-12)))
        if dearer[0] <= cost:
            return cost, quality, shares
        t = min((budget - cost) / (dearer[0] - cost), 1.0)
        return cost + t * (dearer[0] - cost), quality + t * (dearer[1] - quality), shares + t * (dearer[2] - shares)

    return policy


def single_tier_policy(tier: int, prices: np.ndarray, truth: np.ndarray) -> Policy:
    """Every prompt on ``tier`` where the budget affords it, else on the cheapest tier."""
    means = truth.mean(axis=0)

    def policy(budget: float) -> Point:
        chosen = tier if prices[tier] <= budget + 1e-15 else 0
        return float(prices[chosen]), float(means[chosen]), np.eye(len(prices))[chosen]

    return policy


def upper_hull(prices: np.ndarray, quality: np.ndarray) -> list[int]:
    """Indices of the tiers on the upper concave hull of (price, mean quality) from the cheapest tier, by price:
    the tiers a prompt-blind random mixture ever uses."""
    hull = [0]
    for k in np.argsort(prices, kind="stable")[1:]:
        if quality[k] <= quality[hull[-1]]:
            continue  # no better than a cheaper tier already on the hull
        if prices[k] == prices[hull[-1]]:
            hull.pop()
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or below the chord from a to k: drop it.
            if (quality[b] - quality[a]) * (prices[k] - prices[a]) <= (quality[k] - quality[a]) * (
                prices[b] - prices[a]
            ):
                hull.pop()
            else:
                break
        hull.append(int(k))
    return hull


def mixture_policy(hull: Sequence[int], prices: np.ndarray, truth: np.ndarray) -> Policy:
    """At each budget, a random share of prompts on the dearer of the two adjacent ``hull`` tiers around it (at
    its expectation), measured on ``truth``."""
    means = truth.mean(axis=0)
    points = np.array([prices[k] for k in hull])

    def policy(budget: float) -> Point:
        if budget >= points[-1]:
            return float(prices[hull[-1]]), float(means[hull[-1]]), np.eye(len(prices))[hull[-1]]
        j = int(np.searchsorted(points, budget, side="right")) - 1
        a, b = hull[j], hull[j + 1]
        t = (budget - prices[a]) / (prices[b] - prices[a])
        shares = np.zeros(len(prices))
        shares[a], shares[b] = 1 - t, t
        return budget, float((1 - t) * means[a] + t * means[b]), shares

    return policy


def measure_run(
    router: str, seed: int, fold: int, policy: Policy, budgets: np.ndarray, truth: np.ndarray, best: tuple[int, float]
) -> TierRun:
    """Run ``policy`` at every budget and normalise its quality on the test fold's ``truth``; ``best``: the best
    single tier's index and price."""
    found = [policy(float(b)) for b in budgets]
    points = np.array([(cost, quality) for cost, quality, _ in found])
    means = truth.mean(axis=0)
    span = means[best[0]] - means[0]
    normalised = (points[:, 1] - means[0]) / span if span != 0 else np.full(len(budgets), np.nan)
    return TierRun(
        router=router,
        seed=seed,
        fold=fold,
        n_test=len(truth),
        cost=points[:, 0],
        quality=normalised,
        shares=np.array([shares for _, _, shares in found]),
        aqc=area(budgets, normalised),
        cost_to_best=cost_to_best_share(points[:, 0], normalised, best[1]),
    )


# --- the evaluation ---------------------------------------------------------------------------------------

UTILITY_OF: dict[str, tuple[str, str]] = {
    "ridge": ("ridge", "quality"),
    "ridge-prs": ("ridge", "prs"),
    "knn": ("knn", "quality"),
    "knn-prs": ("knn", "prs"),
    "routet2i": ("routet2i", "prs"),
    "routet2i-quality": ("routet2i", "quality"),
}
"""Each K-tier row: the router of :mod:`router.multitier` it fits and the utility it routes by."""

REFERENCE = ("random-mixture", "routet2i-two-tier", "oracle")
"""Rows that are not K-tier routers of :mod:`router.multitier`."""


@dataclass
class _Context:
    """What every run of one evaluation shares."""

    log: TierLog
    prices: np.ndarray
    truth: np.ndarray
    """Reported quality (n, K) of every record."""
    budgets: np.ndarray
    best: tuple[int, float]
    settings: Mapping[str, Mapping[str, Any]]
    encoder: SentenceEncoder | None
    fit_s: dict[str, float] = field(default_factory=dict)


def available_rows() -> tuple[str, ...]:
    """Every router row ``evaluate_tiers`` knows, besides the single tiers."""
    return (*REFERENCE, *UTILITY_OF)


def evaluate_tiers(
    log: TierLog,
    routers: Sequence[str] = DEFAULT_ROUTERS,
    *,
    folds: int = 5,
    seeds: int | Sequence[int] = 3,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    encoder: SentenceEncoder | None = None,
    progress: bool = False,
    info: Mapping[str, Any] | None = None,
    blas_threads: int | None = 1,
) -> TierReport:
    """Cross-validate every single tier and ``routers`` on a K-tier log with prices (module docstring).

    Args:
        log: the log (:func:`router.tierlog.read_tier_log`); its lines must carry costs.
        routers: rows of :func:`available_rows` (one row per single tier is always added).
        folds, seeds: folds per seed, and the number of split seeds (``3``: seeds 0, 1, 2) or the seeds.
        settings: constructor settings by K-tier router name (``routet2i``, ``ridge``, ``knn``) and for
            ``routet2i-two-tier`` (RouteT2I settings).
        encoder: the sentence encoder every learned router shares (None: one on the packaged MiniLM).
        blas_threads: BLAS threads while fitting and predicting (None: leave them alone).

    Raises:
        ValueError: a log without costs, an unknown row, or bad folds or seeds.
    """
    from threadpoolctl import threadpool_limits

    if log.prices is None:
        raise ValueError("the log carries no cost: K-tier evaluation needs each tier's price per image")
    unknown = [name for name in routers if name not in available_rows()]
    if unknown:
        raise ValueError(f"unknown routers {unknown}; available: {', '.join(available_rows())}")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    prices = check_prices([float(p) for p in log.prices])
    truth = report_quality(log.qualities(), metric_spread(log.qualities()))
    best = int(np.argmax(truth.mean(axis=0)))
    needs_encoder = any(name in UTILITY_OF or name == "routet2i-two-tier" for name in routers)
    if encoder is None and needs_encoder:
        from router.embeddings import SentenceEncoder

        encoder = SentenceEncoder()
    budgets = np.linspace(prices[0], prices[-1], BUDGETS)
    context = _Context(log, prices, truth, budgets, (best, float(prices[best])), dict(settings or {}), encoder)
    started, cpu_started = time.perf_counter(), time.process_time()
    splits = {seed: split_folds(log.prompts, folds, seed) for seed in seed_list}  # validates folds
    if needs_encoder and encoder is not None:
        with threadpool_limits(limits=blas_threads):
            encoder.encode(log.prompts)
            encoder.encode_tokens(log.prompts)
    names = [f"tier:{t}" for t in log.tiers] + list(routers)
    runs: dict[str, list[TierRun]] = {name: [] for name in names}
    for seed in seed_list:
        for fold in range(folds):
            if progress:
                print(f"seed {seed} fold {fold}", file=sys.stderr)
            test = np.flatnonzero(splits[seed] != fold), np.flatnonzero(splits[seed] == fold)
            with threadpool_limits(limits=blas_threads):
                policies = _policies(context, routers, *test, FIT_SEED_STRIDE * seed + fold)
            for name in names:
                runs[name].append(
                    measure_run(name, seed, fold, policies[name], context.budgets, truth[test[1]], context.best)
                )
    return TierReport(
        log=log,
        best=log.tiers[best],
        budgets=context.budgets,
        folds=folds,
        seeds=seed_list,
        runs=runs,
        fit_s=context.fit_s,
        wall_s=time.perf_counter() - started,
        cpu_s=time.process_time() - cpu_started,
        info=dict(info or {}),
    )


def _policies(
    context: _Context, routers: Sequence[str], train: np.ndarray, test: np.ndarray, seed: int
) -> dict[str, Policy]:
    """Every row's policy on one test fold, the learned ones fitted on ``train`` with ``seed``."""
    prices, truth = context.prices, context.truth[test]
    train_means = context.truth[train].mean(axis=0)
    policies: dict[str, Policy] = {
        f"tier:{t}": single_tier_policy(k, prices, truth) for k, t in enumerate(context.log.tiers)
    }
    if "random-mixture" in routers:
        policies["random-mixture"] = mixture_policy(upper_hull(prices, train_means), prices, truth)
    if "oracle" in routers:
        policies["oracle"] = utility_policy(truth - truth[:, :1], prices, truth)
    train_records = [context.log.records[int(i)] for i in train]
    test_prompts = [context.log.records[int(i)].prompt for i in test]
    if "routet2i-two-tier" in routers:
        utilities = _two_tier_utilities(context, train_records, test_prompts, int(np.argmax(train_means)), seed)
        policies["routet2i-two-tier"] = utility_policy(utilities, prices, truth)
    for base in sorted({UTILITY_OF[name][0] for name in routers if name in UTILITY_OF}):
        forms = _k_tier_utilities(context, base, train_records, test_prompts, seed)
        for name in routers:
            if UTILITY_OF.get(name, ("", ""))[0] == base:
                policies[name] = utility_policy(forms[UTILITY_OF[name][1]], prices, truth)
    return policies


def _k_tier_utilities(
    context: _Context, base: str, train: Sequence[TierRecord], prompts: Sequence[str], seed: int
) -> dict[str, np.ndarray]:
    """The K-tier router ``base`` fitted on ``train``: its PRS and predicted-quality utilities of ``prompts``."""
    from router.multitier import create_tier_router, prs_utilities, quality_utilities

    started = time.perf_counter()
    router = create_tier_router(base, encoder=context.encoder, **context.settings.get(base, {}))
    router.fit(train, seed=seed)
    if router.tiers != context.log.tiers:
        raise ValueError(f"{base} ordered the tiers {router.tiers}, the log {context.log.tiers}")
    qualities = router.qualities(prompts)
    weights = router.weights()
    forms = {
        "prs": prs_utilities(qualities, router.scales, weights, router.temperature),
        "quality": quality_utilities(qualities, router.scales, weights),
    }
    context.fit_s[base] = context.fit_s.get(base, 0.0) + time.perf_counter() - started
    return forms


def _two_tier_utilities(
    context: _Context, train: Sequence[TierRecord], prompts: Sequence[str], best: int, seed: int
) -> np.ndarray:
    """The two-tier RouteT2I between the cheapest tier and tier ``best``, as K-tier utilities: its score on
    ``best``, 0 on the cheapest, never any other tier (−∞)."""
    from router.routet2i import RouteT2IRouter

    utilities = np.full((len(prompts), len(context.prices)), -np.inf)
    utilities[:, 0] = 0.0
    if best == 0:
        return utilities
    started = time.perf_counter()
    tiers = context.log.tiers
    router = RouteT2IRouter(encoder=context.encoder, **context.settings.get("routet2i-two-tier", {}))
    router.fit(two_tier_records(train, tiers[0], tiers[best]), seed=seed)
    utilities[:, best] = router.score(prompts)
    context.fit_s["routet2i-two-tier"] = context.fit_s.get("routet2i-two-tier", 0.0) + time.perf_counter() - started
    return utilities
