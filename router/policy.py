"""The online routing policy: a router's prediction, judged against the shared cloud budget.

The route task calls it for each batch of jobs. It is pure apart from the budget store it is given (in memory
for tests and replay, Redis for router workers).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.base import Router
from router.budget import BudgetController, BudgetRequest
from router.types import BudgetVerdict, Prediction, RoutingDecision


@dataclass(frozen=True)
class RouteRequest:
    """One prompt to route.

    Attributes:
        prompt: the job's prompt.
        requested_tier: a tier the caller forced; the router still predicts (for the audit trail) but the
            budget is neither consulted nor charged.
        budget: a budget other than the policy's own (a tenant with its own cloud budget).
        shadow: the job was sampled to run on both tiers (done only if its cloud image can be paid for, from ρ
            or beside it: :func:`router.budget.decide`).
    """

    prompt: str
    requested_tier: str | None = None
    budget: BudgetController | None = None
    shadow: bool = False


class RoutingPolicy:
    """Routes prompts with ``router`` under ``budget``, one at a time or a batch at once, between two tiers:
    ``tiers`` names the cheaper (the router's edge) and the dearer (its cloud)."""

    def __init__(self, router: Router, budget: BudgetController, *, tiers: tuple[str, str] = ("edge", "cloud")) -> None:
        self.router = router
        self.budget = budget
        self.tiers = tiers

    def decide(
        self,
        prompt: str,
        *,
        requested_tier: str | None = None,
        budget: BudgetController | None = None,
        shadow: bool = False,
    ) -> RoutingDecision:
        """Route one prompt (see :class:`RouteRequest` for the arguments)."""
        return self.decide_many([RouteRequest(prompt, requested_tier, budget, shadow)])[0]

    def decide_many(
        self, requests: Sequence[RouteRequest], *, held_out: Mapping[str, str] | None = None
    ) -> list[RoutingDecision]:
        """Route several prompts: one router call for all of them, one budget transaction per budget.

        Decisions against one budget are taken in the order given, each seeing the ones before it, exactly as
        if they had come one by one. While the dearer tier is ``held_out`` (its circuit breaker open, with why),
        routed prompts go to the cheaper one without taking a place in the budget's window.

        Returns:
            One decision per request, in order, with everything the audit trail needs. ``latency_ms`` is the
            time the whole batch took (what each of its jobs waited for its decision).
        """
        if not requests:
            return []
        started = time.perf_counter()
        predictions: list[Prediction] = self.router.predict([r.prompt for r in requests])
        verdicts: dict[int, BudgetVerdict] = {}
        by_budget: dict[int, tuple[BudgetController, list[int]]] = {}
        down = (held_out or {}).get(self.tiers[1])
        for i, request in enumerate(requests):
            if request.requested_tier is None and down is not None:
                reason = f"{self.tiers[1]!r} is held out ({down}): {self.tiers[0]!r}"
                verdicts[i] = BudgetVerdict(False, None, {"held_out": {self.tiers[1]: down}}, reason)
            elif request.requested_tier is None:
                controller = request.budget or self.budget
                by_budget.setdefault(id(controller), (controller, []))[1].append(i)
        for controller, indices in by_budget.values():
            calibrated = self.router.calibrated_threshold(controller.config.rho)
            asked = [
                BudgetRequest(
                    predictions[i].score,
                    floor=predictions[i].max_score_for_edge,
                    calibrated_threshold=calibrated,
                    shadow=requests[i].shadow,
                )
                for i in indices
            ]
            verdicts.update(zip(indices, controller.decide_many(asked), strict=True))
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [
            self._decision(request, prediction, verdicts.get(i), latency_ms, len(requests))
            for i, (request, prediction) in enumerate(zip(requests, predictions, strict=True))
        ]

    def _decision(
        self,
        request: RouteRequest,
        prediction: Prediction,
        verdict: BudgetVerdict | None,
        latency_ms: float,
        batch: int,
    ) -> RoutingDecision:
        inputs = {"prompt_chars": len(request.prompt), **dict(prediction.features), "batch": batch}
        config = (request.budget or self.budget).config
        shadowed = False
        if verdict is None:
            assert request.requested_tier is not None
            tier = request.requested_tier
            threshold = None
            state = {
                "rho": config.rho,
                "window": config.window,
                "budget": (request.budget or self.budget).name,
                "forced": True,
            }
            reason = f"tier {request.requested_tier!r} requested by the caller"
            inputs["requested_tier"] = request.requested_tier
        else:
            shadowed = verdict.shadow
            tier = self.tiers[1] if verdict.cloud else self.tiers[0]
            threshold = verdict.threshold
            state = {**verdict.state, "budget": (request.budget or self.budget).name}
            if verdict.reserved_usd:  # the dearer tier's image: the one delivered, or the shadow
                state["reserved_tier"] = self.tiers[1]
            reason = verdict.reason
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
            latency_ms=latency_ms,
        )


def shadow_sampled(job_id: str, rate: float) -> bool:
    """Whether a job belongs to the shadow sample: a stable hash of its id, so a redelivery agrees."""
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(job_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate
