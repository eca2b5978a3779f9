"""Escalation: which edge images scored so badly that the job is generated again on the cloud.

The rule is the cloud budget's, turned around (``ROUTET2I_ESCALATION_RATE``): each escalation window is a
budget controller (:mod:`router.budget`) whose score is the metric's negative, so the worst-scoring share of
edge images goes to the cloud, at most the rate of every window of edge images, with
``ROUTET2I_ESCALATION_BELOW`` as the edge floor and the spend limit as for routing. The edge worker finds the
candidates and their windows (the deployment's, or a tenant's own); this module decides them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from router.budget import BudgetConfig, BudgetController, BudgetRequest
from router.types import BudgetVerdict

log = logging.getLogger(__name__)


def decide_escalations(
    windows: Mapping[str, tuple[BudgetController, Sequence[tuple[int, float]]]],
    *,
    metric: str,
    below: float | None,
) -> dict[int, dict[str, Any]]:
    """Decide the candidates of every window, in order, in one budget transaction per window.

    Args:
        windows: per window name, its controller and its candidates: (index, the image's value of ``metric``).
        metric: the quality metric images are escalated on (lower is worse).
        below: only images scoring below it are escalated (None: the rate alone).

    Returns:
        Per candidate index: what was decided, by which window and why, for the job's history (with
        ``reserved_usd`` and ``spend_period`` when the cloud image reserved its price). An escalation that
        cannot be decided (the window's store is unreachable) delivers the edge images as they are.
    """
    floor = None if below is None else -below  # a score -value at or below it: value at or above `below`
    decided: dict[int, dict[str, Any]] = {}
    for name, (controller, group) in windows.items():
        try:
            verdicts = controller.decide_many([BudgetRequest(-value, floor=floor) for _, value in group])
        except Exception as exc:
            log.warning("escalation not decided; the edge images are delivered", extra={"error": str(exc)})
            for i, value in group:
                decided[i] = {
                    "metric": metric,
                    "value": value,
                    "window": name,
                    "escalated": False,
                    "reason": f"not decided: {exc}",
                }
            continue
        for (i, value), verdict in zip(group, verdicts, strict=True):
            threshold = None if verdict.threshold is None else 0.0 - verdict.threshold  # (never -0.0)
            info: dict[str, Any] = {
                "metric": metric,
                "value": round(value, 6),
                "threshold": None if threshold is None else round(threshold, 6),
                "window": name,
                "escalated": verdict.cloud,
                "reason": escalation_reason(verdict, controller.config, metric, value, threshold, below),
            }
            if verdict.cloud and verdict.reserved_usd:
                info["reserved_usd"] = verdict.reserved_usd
                info["spend_period"] = verdict.state.get("spend_period")
            decided[i] = info
    return decided


def escalation_reason(
    verdict: BudgetVerdict,
    config: BudgetConfig,
    metric: str,
    value: float,
    threshold: float | None,
    below: float | None,
) -> str:
    """The escalation window's verdict in the metric's own terms (the window ranks the metric's negative)."""
    state = verdict.state
    if verdict.cloud:
        assert threshold is not None
        return f"{metric} {value:.4g} below the escalation threshold {threshold:.4g}"
    if below is not None and value >= below:
        return f"{metric} {value:.4g} is not below {below:.4g}"
    if state["recent_cloud"] + 1 > state["cap"]:
        return (
            f"escalation budget full: {state['recent_cloud']} of the last {state['recent_decisions']} edge images "
            f"escalated, at most {state['cap']} allowed"
        )
    if threshold is None:
        return "no edge image scored yet to compare with"
    if value < threshold and "spent_usd" in state and not config.affordable(state["spent_usd"]):
        return f"{metric} {value:.4g} below the escalation threshold {threshold:.4g}, but the spend limit is reached"
    return f"{metric} {value:.4g} not below the escalation threshold {threshold:.4g}"
