"""Replay metrics of one routing of one test set: quality at every cloud fraction, PGR, CPT, APGR, Pareto share.

Pure numpy. Notation: ``n`` prompts, metrics ``i``, per-prompt gain ``g_ij = q_i(cloud_j) − q_i(edge_j)``.

1. **Routing at cloud fraction f.** The router's scores rank the prompts; the ``f·n`` highest go to the
   cloud. Where ``f·n`` is not a whole number, the marginal prompt goes to the cloud with the leftover
   probability, and prompts with *equal* scores are taken in random order. Both are replaced by their
   expectation, so the result is deterministic and a router is never rewarded or punished for the order of
   the log: inside a block of tied scores the cumulative gain grows linearly. A router with a constant score
   therefore scores exactly like random routing in expectation. Routers with an edge floor never send a
   prompt scoring at or below it (their cloud share stops growing); fixed-tier routers (all-edge, all-cloud)
   ignore the budget.
2. **Quality** of the routing on metric i: ``Q_i(f) = (Σ_j q_i(edge_j) + G_i(f·n)) / n`` with ``G_i(k)`` the
   expected total gain of the ``k`` prompts sent to the cloud.
3. **PGR** (performance gap recovered): ``PGR_i(f) = (Q_i(f) − Q_i^edge) / (Q_i^cloud − Q_i^edge)
   = G_i(f·n) / Σ_j g_ij``; 0 for all-edge, 1 for all-cloud, above 1 where the router avoids prompts on which
   the cloud is worse.
4. **Aggregate over metrics**: the mean of the per-metric PGR curves. Because each PGR is linear in the
   routed set, this equals the PGR of the composite metric ``Σ_i q_i / (m·Δ_i)`` with ``Δ_i`` the mean gain of
   metric i on the test set: every metric counts in units of the gap the cloud recovers on it, which is also
   the per-metric scale of RouteT2I's Pareto relative superiority. The per-prompt oracle ranks by it.
5. **APGR**: area under the PGR curve over cloud fractions 0..1 (exact: the curve is piecewise linear
   between whole numbers of prompts, so the trapezoid rule on ``k/n`` integrates it without error).
6. **CPT(x)**: the smallest cloud share actually used at which PGR reaches ``x``, interpolated linearly
   between whole numbers of prompts; NaN when the router never reaches it (all-edge, or a floor that stops
   it first).
7. **Pareto no-worse share**: the share of prompts whose routed tier's quality vector is not dominated by the
   other tier's (per metric: the routed tier is at least as good on that metric).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.log import LogRecord
from router.types import Tier

FRACTIONS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
"""Cloud fractions at which PGR is reported."""

CURVE_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(21))
"""Cloud fractions at which whole curves (quality, PGR) are kept for plots and JSON."""


def quality_arrays(records: Sequence[LogRecord], metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Edge and cloud qualities as two ``(n, m)`` float arrays, metrics in the given order."""
    edge = np.array([[r.edge[m] for m in metrics] for r in records], dtype=np.float64).reshape(len(records), -1)
    cloud = np.array([[r.cloud[m] for m in metrics] for r in records], dtype=np.float64).reshape(len(records), -1)
    return edge, cloud


def aggregate_weights(edge: np.ndarray, cloud: np.ndarray) -> np.ndarray:
    """Per-metric weights ``1 / (m·Σ_j g_ij)`` under which a prompt's composite gain sums to the aggregate PGR.

    A metric whose total gain is zero gets weight 0: its PGR is undefined and the aggregate leaves it out.
    """
    total = (cloud - edge).sum(axis=0)
    defined = max(int(np.count_nonzero(total)), 1)
    weights: np.ndarray = np.where(total != 0, 1.0 / (np.where(total != 0, total, 1.0) * defined), 0.0)
    return weights


def gain_scales(edge: np.ndarray, cloud: np.ndarray) -> np.ndarray:
    """Per-metric scale of the cloud's gain on training data, to put metrics on one footing.

    The mean gain (the gap the aggregate PGR is measured in) where it is clearly non-zero; otherwise the
    standard deviation of the gains (a metric where the cloud is no better on average still has prompts it
    wins and loses by a typical amount); 1 when the gains are constant.
    """
    gains = cloud - edge
    mean = gains.mean(axis=0)
    std = gains.std(axis=0)
    scale = np.where(mean > 0.1 * std, mean, std)
    return np.where(scale > 0, scale, 1.0)


def composite_gain(edge: np.ndarray, cloud: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per-prompt gain of the cloud, each metric divided by its scale, averaged over metrics: shape ``(n,)``."""
    gains: np.ndarray = ((cloud - edge) / scales).mean(axis=1)
    return gains


def cumulative_gain(
    scores: np.ndarray,
    gains: np.ndarray,
    *,
    floor: float | None = None,
    fixed_tier: Tier | None = None,
) -> np.ndarray:
    """Expected total gain ``G(k)`` when the ``k`` highest-scoring prompts go to the cloud, ``k = 0..n``.

    Args:
        scores: the router's scores, shape ``(n,)``, all finite.
        gains: per-prompt gains, shape ``(n,)`` or ``(n, m)``.
        floor: scores at or below it never go to the cloud.
        fixed_tier: ``"edge"`` or ``"cloud"`` for routers that ignore the budget.

    Returns:
        Shape ``(n + 1,)`` or ``(n + 1, m)`` like ``gains``; ties between equal scores count at their
        expectation over a random order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    values = np.asarray(gains, dtype=np.float64)
    n = scores.shape[0]
    if scores.ndim != 1 or values.shape[0] != n:
        raise ValueError(f"scores must have shape (n,) matching gains; got {scores.shape} and {values.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite numbers")
    table = values.reshape(n, -1)
    if fixed_tier == "edge":
        result = np.zeros((n + 1, table.shape[1]))
    elif fixed_tier == "cloud":
        result = np.tile(table.sum(axis=0), (n + 1, 1))
    else:
        # Stable sort: the order inside a tie block does not matter because blocks are averaged below.
        order = np.argsort(-scores, kind="stable")
        ranked = scores[order]
        cum = np.vstack([np.zeros((1, table.shape[1])), np.cumsum(table[order], axis=0)])
        starts = np.concatenate([[0], np.flatnonzero(np.diff(ranked) != 0) + 1]) if n else np.array([0])
        ends = np.concatenate([starts[1:], [n]])
        k = np.arange(n + 1)
        block = np.searchsorted(starts, k, side="right") - 1
        a, b = starts[block], ends[block]
        width = np.maximum(b - a, 1)
        t = ((k - a) / width)[:, None]
        result = cum[a] + t * (cum[b] - cum[a])
        if floor is not None:
            eligible = int(np.count_nonzero(scores > floor))
            result[eligible + 1 :] = result[eligible]
    return result.reshape((n + 1,) if values.ndim == 1 else (n + 1, table.shape[1]))


def _dominated(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise: is vector ``a`` Pareto-dominated by ``b`` (``b ≥ a`` everywhere and ``b > a`` somewhere)?"""
    result: np.ndarray = np.all(b >= a, axis=1) & np.any(b > a, axis=1)
    return result


def crossing(shares: np.ndarray, pgr: np.ndarray, target: float) -> float:
    """The smallest share at which a piecewise-linear PGR curve reaches ``target`` (NaN if it never does)."""
    reached = np.flatnonzero(pgr >= target - 1e-12)
    if reached.size == 0:
        return float("nan")
    i = int(reached[0])
    if i == 0:
        return float(shares[0])
    rise = pgr[i] - pgr[i - 1]
    t = (target - pgr[i - 1]) / rise if rise > 0 else 1.0
    return float(shares[i - 1] + t * (shares[i] - shares[i - 1]))


@dataclass(frozen=True)
class RoutingCurves:
    """Every metric of one router's routing of one test set, as functions of the number ``k`` sent to the cloud.

    Attributes:
        metrics: metric names, in column order.
        n: number of prompts.
        edge_mean: mean edge quality per metric (all-edge routing).
        cloud_mean: mean cloud quality per metric (all-cloud routing).
        gain: ``G(k)``, shape ``(n + 1, m)``.
        gain_total: total gain of all-cloud routing per metric, ``Σ_j g_ij``.
        share: cloud share actually used at ``k``, shape ``(n + 1,)``.
        no_worse: Pareto no-worse share at ``k``, shape ``(n + 1,)``.
        metric_no_worse: per-metric no-worse share at ``k``, shape ``(n + 1, m)``.
    """

    metrics: tuple[str, ...]
    n: int
    edge_mean: np.ndarray
    cloud_mean: np.ndarray
    gain: np.ndarray
    gain_total: np.ndarray
    share: np.ndarray
    no_worse: np.ndarray
    metric_no_worse: np.ndarray

    @property
    def metric_pgr(self) -> np.ndarray:
        """Per-metric PGR at each ``k``, shape ``(n + 1, m)``; NaN for a metric with zero total gain."""
        total = self.gain_total
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total != 0, self.gain / np.where(total != 0, total, 1.0), np.nan)

    @property
    def pgr(self) -> np.ndarray:
        """Aggregate PGR at each ``k``: the mean of the per-metric PGRs (metrics with zero total gain left out)."""
        per_metric = self.metric_pgr
        defined = ~np.isnan(per_metric[0])
        if not defined.any():
            return np.full(self.n + 1, np.nan)
        result: np.ndarray = per_metric[:, defined].mean(axis=1)
        return result

    @property
    def quality(self) -> np.ndarray:
        """Mean quality of the routing per metric at each ``k``, shape ``(n + 1, m)``."""
        result: np.ndarray = self.edge_mean + self.gain / self.n
        return result

    def at(self, curve: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
        """A curve over ``k`` read at cloud fractions (budgets), by linear interpolation at ``f·n``."""
        grid = np.arange(self.n + 1, dtype=np.float64)
        x = np.asarray(fractions, dtype=np.float64) * self.n
        if curve.ndim == 1:
            return np.interp(x, grid, curve)
        return np.stack([np.interp(x, grid, curve[:, j]) for j in range(curve.shape[1])], axis=1)

    def area(self, curve: np.ndarray) -> np.ndarray | float:
        """Area under a curve over budgets 0..1 (exact for these piecewise-linear curves)."""
        result = (curve.sum(axis=0) - (curve[0] + curve[-1]) / 2.0) / self.n
        return float(result) if np.ndim(result) == 0 else np.asarray(result)

    def apgr(self) -> float:
        return float(self.area(self.pgr))

    def metric_apgr(self) -> np.ndarray:
        return np.asarray(self.area(self.metric_pgr))

    def cpt(self, target: float, metric: int | None = None) -> float:
        """CPT(target) on the aggregate PGR, or on one metric's PGR when ``metric`` is a column index."""
        pgr = self.pgr if metric is None else self.metric_pgr[:, metric]
        return crossing(self.share, pgr, target)


def routing_curves(
    scores: np.ndarray,
    edge: np.ndarray,
    cloud: np.ndarray,
    *,
    metrics: Sequence[str],
    floor: float | None = None,
    fixed_tier: Tier | None = None,
) -> RoutingCurves:
    """Evaluate one routing of one test set.

    Args:
        scores: the router's scores, shape ``(n,)``.
        edge: edge qualities, shape ``(n, m)``.
        cloud: cloud qualities, shape ``(n, m)``.
        metrics: the ``m`` metric names.
        floor: the router's edge floor (see :meth:`router.base.Router.edge_floor`).
        fixed_tier: the router's fixed tier, if it ignores the budget.

    Returns:
        The curves, from which every reported number is read.
    """
    edge = np.asarray(edge, dtype=np.float64)
    cloud = np.asarray(cloud, dtype=np.float64)
    n = edge.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate a routing of zero prompts")
    if edge.shape != cloud.shape or edge.ndim != 2 or edge.shape[1] != len(metrics):
        raise ValueError(f"edge and cloud must both have shape (n, {len(metrics)})")
    kwargs = {"floor": floor, "fixed_tier": fixed_tier}
    gain = cumulative_gain(scores, cloud - edge, **kwargs)  # type: ignore[arg-type]

    # Pareto no-worse: sending prompt j to the cloud changes its indicator from ok_edge to ok_cloud.
    ok_cloud = ~_dominated(cloud, edge)
    ok_edge = ~_dominated(edge, cloud)
    no_worse = (ok_edge.sum() + cumulative_gain(scores, ok_cloud.astype(float) - ok_edge, **kwargs)) / n  # type: ignore[arg-type]
    m_ok_cloud = (cloud >= edge).astype(float)
    m_ok_edge = (edge >= cloud).astype(float)
    metric_no_worse = (m_ok_edge.sum(axis=0) + cumulative_gain(scores, m_ok_cloud - m_ok_edge, **kwargs)) / n  # type: ignore[arg-type]

    k = np.arange(n + 1)
    if fixed_tier == "edge":
        share = np.zeros(n + 1)
    elif fixed_tier == "cloud":
        share = np.ones(n + 1)
    else:
        eligible = n if floor is None else int(np.count_nonzero(np.asarray(scores) > floor))
        share = np.minimum(k, eligible) / n
    return RoutingCurves(
        metrics=tuple(metrics),
        n=n,
        edge_mean=edge.mean(axis=0),
        cloud_mean=cloud.mean(axis=0),
        gain=gain,
        gain_total=(cloud - edge).sum(axis=0),
        share=share,
        no_worse=no_worse,
        metric_no_worse=metric_no_worse,
    )
