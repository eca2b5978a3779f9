"""The online routing policy: a router's prediction, judged against the shared cloud budget.

This is the one function the route task calls for each job. It is pure apart from the budget store it is
given (in memory for tests and replay, Redis for router workers).
"""

from __future__ import annotations

import hashlib
import time

from router.base import Router
from router.budget import BudgetController
from router.types import Prediction, RoutingDecision, Tier


class RoutingPolicy:
    """Routes single prompts with ``router`` under ``budget``."""

    def __init__(self, router: Router, budget: BudgetController) -> None:
        self.router = router
        self.budget = budget

    def decide(
        self,
        prompt: str,
        *,
        requested_tier: Tier | None = None,
        budget: BudgetController | None = None,
        shadow: bool = False,
    ) -> RoutingDecision:
        """Route one prompt.

        Args:
            prompt: the job's prompt.
            requested_tier: a tier the caller forced; the router still predicts (for the audit trail) but the
                budget is neither consulted nor charged.
            budget: a budget other than the policy's own (a tenant with its own cloud budget).
            shadow: the job was sampled to run on both tiers (done only if the budget has room).

        Returns:
            The decision with everything the audit trail needs.
        """
        started = time.perf_counter()
        budget = budget or self.budget
        prediction: Prediction = self.router.predict([prompt])[0]
        inputs = {"prompt_chars": len(prompt), **dict(prediction.features)}
        config = budget.config

        shadowed = False
        if requested_tier is not None:
            tier: Tier = requested_tier
            threshold = None
            state = {"rho": config.rho, "window": config.window, "budget": budget.name, "forced": True}
            reason = f"tier {requested_tier!r} requested by the caller"
            inputs["requested_tier"] = requested_tier
        else:
            verdict = budget.decide(
                prediction.score,
                floor=prediction.max_score_for_edge,
                calibrated_threshold=self.router.calibrated_threshold(config.rho),
                shadow=shadow,
            )
            shadowed = verdict.shadow
            tier = "cloud" if verdict.cloud else "edge"
            threshold, state, reason = verdict.threshold, {**verdict.state, "budget": budget.name}, verdict.reason

        return RoutingDecision(
            tier=tier,
            router_name=self.router.name,
            router_version=self.router.version,
            score=prediction.score,
            threshold=threshold,
            budget=config.rho,
            budget_state=state,
            reason=reason,
            inputs=inputs,
            predicted=prediction.predicted_dict(),
            explanation=dict(prediction.explanation) if prediction.explanation else None,
            shadow=shadowed,
            latency_ms=(time.perf_counter() - started) * 1000.0,
        )


def shadow_sampled(job_id: str, rate: float) -> bool:
    """Whether a job belongs to the shadow sample: a stable hash of its id, so a redelivery agrees."""
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(job_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate
