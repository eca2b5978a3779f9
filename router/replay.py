"""Replay one router over a log at one cloud budget: its per-prompt decisions and what they would have cost.

Decisions are whole: with budget ``ρ`` and ``n`` prompts, the ``floor(ρ·n)`` highest-scoring prompts go to the
cloud (never more than the budget allows), except prompts at or below the router's edge floor; fixed-tier
routers ignore the budget. Equal scores are taken in log order. (Evaluation, :mod:`router.pgr`, counts ties
and the fractional marginal prompt at their expectation instead, so its numbers can differ from a replay's in
the last prompt.)

With ``online``, decisions are made instead as a router worker makes them: in log order, each against the
budget controller's window of the decisions before it (:mod:`router.budget`: the recent scores' quantile, the
window's cap and minimum share), starting from an empty window with the router's offline calibration. The
result then also reports the lowest and highest cloud share over the log's full windows and how many requests
the window's minimum share sent to the cloud.

Cost per prompt is the log's optional ``"cost": {"edge": usd, "cloud": usd}`` field where present, else the
tier's price per image from the settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.base import Router
from router.budget import BudgetConfig, BudgetController, BudgetRequest, MemoryBudgetStore
from router.log import LogFormatError, LogRecord, metric_names
from router.pgr import quality_arrays
from router.types import Tier


@dataclass(frozen=True)
class ReplayDecision:
    """One prompt's routing in a replay."""

    id: str
    score: float
    tier: Tier


@dataclass(frozen=True)
class ReplayResult:
    """A router's replay of a log at one budget.

    Attributes:
        router: router name.
        version: router version (artifact hash for trained routers).
        budget: the cloud budget ρ.
        decisions: per prompt, in log order.
        cloud_share: share of prompts sent to the cloud.
        quality: mean quality per metric of the routed tiers, and of all-edge and all-cloud routing.
        pgr: PGR per metric and ``aggregate`` (their mean); ``None`` where the cloud gains nothing on a metric.
        pareto_no_worse: share of prompts whose routed tier is not Pareto-dominated by the other tier.
        cost: total US dollars of the routing, of all-edge and of all-cloud.
        online: for an online replay, the budget window, the tolerance, the lowest and highest cloud share over
            full windows (None when the log is shorter than a window) and the number of requests sent to the
            cloud by the window's minimum share rather than by their score; None for an offline replay.
    """

    router: str
    version: str
    budget: float
    decisions: tuple[ReplayDecision, ...]
    cloud_share: float
    quality: Mapping[str, Mapping[str, float]]
    pgr: Mapping[str, float | None]
    pareto_no_worse: float
    cost: Mapping[str, float]
    online: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "router": self.router,
            "version": self.version,
            "budget": self.budget,
            "prompts": len(self.decisions),
            "cloud": sum(d.tier == "cloud" for d in self.decisions),
            "cloud_share": self.cloud_share,
            "quality": {k: dict(v) for k, v in self.quality.items()},
            "pgr": dict(self.pgr),
            "pareto_no_worse": self.pareto_no_worse,
            "cost_usd": dict(self.cost),
            "online": None if self.online is None else dict(self.online),
            "decisions": [{"id": d.id, "score": d.score, "tier": d.tier} for d in self.decisions],
        }


def record_costs(records: Sequence[LogRecord], prices: Mapping[str, float]) -> np.ndarray:
    """Per-record cost of each tier, shape ``(n, 2)`` (edge, cloud): the log's ``cost`` field, else ``prices``."""
    costs = np.empty((len(records), 2))
    for i, record in enumerate(records):
        given = record.extra.get("cost")
        if given is not None and not isinstance(given, Mapping):
            raise LogFormatError(f"record {record.id!r}: field 'cost' must be an object with 'edge' and 'cloud'")
        for j, tier in enumerate(("edge", "cloud")):
            value = prices[tier] if given is None or tier not in given else given[tier]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise LogFormatError(f"record {record.id!r}: field 'cost.{tier}' must be a non-negative number")
            costs[i, j] = float(value)
    return costs


def decide(router: Router, scores: np.ndarray, budget: float) -> np.ndarray:
    """Boolean cloud decision per prompt at ``budget`` (see the module docstring for the rule)."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be within [0, 1], got {budget}")
    n = len(scores)
    if router.fixed_tier is not None:
        return np.full(n, router.fixed_tier == "cloud")
    k = math.floor(budget * n + 1e-9)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    cloud = np.zeros(n, dtype=bool)
    cloud[order[:k]] = True
    floor = router.edge_floor()
    if floor is not None:
        cloud &= np.asarray(scores) > floor
    return cloud


def decide_online(router: Router, scores: np.ndarray, config: BudgetConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Cloud decisions in log order through the budget controller, and what the online replay reports of them."""
    n = len(scores)
    if router.fixed_tier is not None:
        cloud = np.full(n, router.fixed_tier == "cloud")
        by_minimum = 0
    else:
        controller = BudgetController(config, MemoryBudgetStore(config.window))
        calibrated, floor = router.calibrated_threshold(config.rho), router.edge_floor()
        verdicts = controller.decide_many(
            [BudgetRequest(float(s), floor=floor, calibrated_threshold=calibrated) for s in scores]
        )
        cloud = np.array([v.cloud for v in verdicts], dtype=bool)
        by_minimum = sum(
            v.cloud and (v.threshold is None or s <= v.threshold) for v, s in zip(verdicts, scores, strict=True)
        )
    shares = np.convolve(cloud.astype(np.float64), np.ones(config.window), "valid") / config.window
    full = n >= config.window
    return cloud, {
        "window": config.window,
        "tolerance": config.tolerance,
        "lowest_window_share": float(shares.min()) if full else None,
        "highest_window_share": float(shares.max()) if full else None,
        "cloud_by_minimum_share": int(by_minimum),
    }


def routed_pgr(
    edge: np.ndarray, cloud: np.ndarray, to_cloud: np.ndarray, metrics: Sequence[str]
) -> dict[str, float | None]:
    """PGR of a routing (``to_cloud``: per prompt, whether it got the cloud's image) per metric and their mean
    (``aggregate``): the gain over the edge it recovered, over all-cloud's; None where the cloud gains nothing."""
    routed = np.where(to_cloud[:, None], cloud, edge)
    pgr: dict[str, float | None] = {}
    for i, metric in enumerate(metrics):
        gap = float((cloud[:, i] - edge[:, i]).sum())
        pgr[metric] = float((routed[:, i] - edge[:, i]).sum() / gap) if gap != 0 else None
    defined = [v for v in pgr.values() if v is not None]
    pgr["aggregate"] = float(np.mean(defined)) if defined else None
    return pgr


def replay(
    records: Sequence[LogRecord],
    router: Router,
    budget: float,
    *,
    prices: Mapping[str, float],
    online: BudgetConfig | None = None,
) -> ReplayResult:
    """Route every record of ``records`` with ``router`` at cloud budget ``budget``.

    Args:
        records: the log.
        router: a ready router (fitted or loaded when it learns).
        budget: the cloud budget ρ in [0, 1].
        prices: US dollars per image per tier, for records without a ``cost`` field.
        online: decide in log order with the budget controller of this configuration (its ``rho`` must be
            ``budget``) instead of sending the best ``floor(ρ·n)`` scores.

    Returns:
        The decisions with the routing's quality, PGR, Pareto share and cost.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be within [0, 1], got {budget}")
    if online is not None and online.rho != budget:
        raise ValueError(f"the online budget controller holds {online.rho}, not the budget {budget}")
    scores = np.asarray(router.score_records(records), dtype=np.float64)
    summary: dict[str, Any] | None = None
    if online is None:
        cloud = decide(router, scores, budget)
    else:
        cloud, summary = decide_online(router, scores, online)
    metrics = metric_names(records)
    edge, cloud_q = quality_arrays(records, metrics)
    routed = np.where(cloud[:, None], cloud_q, edge)
    quality = {
        "routed": dict(zip(metrics, routed.mean(axis=0).tolist(), strict=True)),
        "edge_only": dict(zip(metrics, edge.mean(axis=0).tolist(), strict=True)),
        "cloud_only": dict(zip(metrics, cloud_q.mean(axis=0).tolist(), strict=True)),
    }
    pgr = routed_pgr(edge, cloud_q, cloud, metrics)
    other = np.where(cloud[:, None], edge, cloud_q)
    dominated = np.all(other >= routed, axis=1) & np.any(other > routed, axis=1)
    costs = record_costs(records, prices)
    return ReplayResult(
        router=router.name,
        version=router.version,
        budget=budget,
        decisions=tuple(
            ReplayDecision(r.id, float(s), "cloud" if c else "edge")
            for r, s, c in zip(records, scores, cloud, strict=True)
        ),
        cloud_share=float(cloud.mean()),
        quality=quality,
        pgr=pgr,
        pareto_no_worse=float((~dominated).mean()),
        cost={
            "routed": float(np.where(cloud, costs[:, 1], costs[:, 0]).sum()),
            "edge_only": float(costs[:, 0].sum()),
            "cloud_only": float(costs[:, 1].sum()),
        },
        online=summary,
    )
