"""What a K-tier evaluation (:func:`router.tiereval.evaluate_tiers`) produces: each run's curve, the report over
runs with its paired comparisons and its JSON document (docs/tiers.md describes its schema;
:mod:`router.tierreport` renders it as a table and a plot)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.pgr import crossing
from router.splits import group_ids
from router.tierlog import TierLog

FOCUS = "routet2i"
"""The router the others are compared with, paired over runs."""


@dataclass(frozen=True)
class TierRun:
    """One router on one test fold: its curve over :data:`~router.tiereval.BUDGETS` budgets, normalised, and what is read off it."""

    router: str
    seed: int
    fold: int
    n_test: int
    cost: np.ndarray
    """Mean cost per image at each budget (at most the budget)."""
    quality: np.ndarray
    """Normalised reported quality at each budget: 0 all-cheapest, 1 the best single tier."""
    shares: np.ndarray
    """Share of the prompts on each tier at each budget, (budgets, K)."""
    aqc: float
    cost_to_best: float
    """Share of the best tier's price at which the curve reaches 1 (NaN: never)."""


def area(budgets: np.ndarray, values: np.ndarray) -> float:
    """The mean of a curve over the budget range (trapezoid rule)."""
    if budgets[-1] == budgets[0]:
        return float(values.mean())
    return float(np.trapezoid(values, budgets) / (budgets[-1] - budgets[0]))


def cost_to_best_share(cost: np.ndarray, quality: np.ndarray, best_price: float) -> float:
    """The cost at which ``quality`` first reaches 1, over ``best_price`` (NaN: never, or an undefined scale)."""
    if best_price <= 0 or not np.all(np.isfinite(quality)):
        return float("nan")
    return crossing(cost, quality, 1.0) / best_price


# --- the report -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierComparison:
    """The focus router against another, paired over the runs (they share their test folds)."""

    other: str
    difference: float
    """Mean over runs of the focus router's aqc minus the other's on the same fold."""
    se: float
    """Sample standard deviation of those differences over √runs (NaN with one run)."""
    ahead: int
    runs: int


@dataclass(frozen=True)
class TierReport:
    """The outcome of :func:`evaluate_tiers`: every row's runs, and the values read from them."""

    log: TierLog
    best: str
    budgets: np.ndarray
    folds: int
    seeds: tuple[int, ...]
    runs: Mapping[str, Sequence[TierRun]]
    fit_s: Mapping[str, float]
    wall_s: float
    cpu_s: float
    info: Mapping[str, Any]

    def mean_curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean cost and mean normalised quality at each budget over ``name``'s runs."""
        runs = self.runs[name]
        return np.mean([r.cost for r in runs], axis=0), np.mean([r.quality for r in runs], axis=0)

    def mean_shares(self, name: str) -> np.ndarray:
        """Mean share of the prompts on each tier at each budget over ``name``'s runs, (budgets, K)."""
        result: np.ndarray = np.mean([r.shares for r in self.runs[name]], axis=0)
        return result

    def cost_to_best(self, name: str) -> float:
        """Where the mean curve reaches the best single tier's quality, as a share of its price (NaN: never)."""
        cost, quality = self.mean_curve(name)
        return cost_to_best_share(cost, quality, float(self.prices[self.log.tiers.index(self.best)]))

    @property
    def prices(self) -> np.ndarray:
        assert self.log.prices is not None
        return self.log.prices

    def compare(self, focus: str = FOCUS) -> list[TierComparison]:
        """``focus`` against every other row on aqc, paired over runs ([] when the report lacks it)."""
        if focus not in self.runs:
            return []
        mine = np.array([r.aqc for r in self.runs[focus]])
        result = []
        for other, runs in self.runs.items():
            if other == focus:
                continue
            diff = mine - np.array([r.aqc for r in runs])
            se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
            result.append(TierComparison(other, float(diff.mean()), se, int(np.sum(diff >= -1e-12)), len(diff)))
        return result

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (docs/tiers.md describes it); NaN is ``None``."""
        return {
            "routers": {name: self._summary(name) for name in self.runs},
            "comparison": {FOCUS: [_comparison(c) for c in self.compare()]},
            "log": {
                "records": len(self.log.records),
                "prompts": int(group_ids(self.log.prompts).max()) + 1,
                "tiers": list(self.log.tiers),
                "prices": [float(p) for p in self.prices],
                "metrics": list(self.log.metrics),
                "best_tier": self.best,
                "quality": "mean over metrics of each metric over its standard deviation in the log",
            },
            "protocol": {"folds": self.folds, "seeds": list(self.seeds), "budgets": len(self.budgets)},
            "timing": {
                "wall_s": round(self.wall_s, 2),
                "cpu_s": round(self.cpu_s, 2),
                "fit_s": {k: round(v, 2) for k, v in self.fit_s.items()},
            },
            "info": dict(self.info),
        }

    def _summary(self, name: str) -> dict[str, Any]:
        runs = self.runs[name]
        aqc = np.array([r.aqc for r in runs])
        reached = np.array([math.isfinite(r.cost_to_best) for r in runs])
        cost, quality = self.mean_curve(name)
        shares = self.mean_shares(name)
        middle = len(self.budgets) // 2
        return {
            "aqc": _num(aqc.mean()),
            "aqc_std": _num(aqc.std(ddof=1)) if len(aqc) > 1 else 0.0,
            "cost_to_best": _num(self.cost_to_best(name)),
            "cost_to_best_reached": float(reached.mean()),
            "mid_budget": round(float(self.budgets[middle]), 6),
            "shares_at_mid_budget": {
                t: round(float(v), 4) for t, v in zip(self.log.tiers, shares[middle], strict=True)
            },
            "curve": {
                "budget": [round(float(b), 6) for b in self.budgets],
                "cost": [round(float(c), 6) for c in cost],
                "quality": [_num(q) for q in quality],
                "shares": {t: [round(float(v), 4) for v in shares[:, k]] for k, t in enumerate(self.log.tiers)},
            },
            "runs": [
                {
                    "seed": r.seed,
                    "fold": r.fold,
                    "n_test": r.n_test,
                    "aqc": _num(r.aqc),
                    "cost_to_best": _num(r.cost_to_best),
                }
                for r in runs
            ],
        }


def _num(value: float) -> float | None:
    return None if not math.isfinite(float(value)) else round(float(value), 6)


def _comparison(c: TierComparison) -> dict[str, Any]:
    return {
        "router": c.other,
        "difference": _num(c.difference),
        "se": _num(c.se),
        "runs_ahead": c.ahead,
        "runs": c.runs,
    }
