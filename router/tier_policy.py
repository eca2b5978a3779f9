"""The online routing policy with more than two tiers: a K-tier router's predictions, judged against the money
budget (:mod:`router.spend`).

The route task calls it for each batch of jobs when the deployment has more than two tiers (with two it keeps
:class:`router.policy.RoutingPolicy`). The router predicts every tier's per-metric quality; each tier's utility is
the Pareto relative superiority of its predicted vector over the cheapest tier's; the controller picks the tier
with the best utility for its price among those that may take the job. Every decision records all tiers'
predictions and utilities, λ, the tiers held out and why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from router.multitier import TierRouter, prs_utilities
from router.spend import SpendController, TierRequest, TierVerdict
from router.types import QualityVector, RoutingDecision


@dataclass(frozen=True)
class TierRouteRequest:
    """One prompt to route.

    Attributes:
        prompt: the job's prompt.
        requested_tier: a tier the caller forced; the router still predicts (for the audit trail) but the
            budget is neither consulted nor charged.
        budget: a budget other than the policy's own (a tenant with its own budget).
    """

    prompt: str
    requested_tier: str | None = None
    budget: SpendController | None = None


class TierRoutingPolicy:
    """Routes prompts among a deployment's tiers with ``router`` under ``budget``.

    The router's tiers are the deployment's, matched by position (both cheapest first): a router trained on
    the ratings of SDXL-Turbo, SDXL and DALL·E 3 routes a deployment whose tiers ``edge,mid,cloud`` run them.
    """

    def __init__(self, router: TierRouter, budget: SpendController) -> None:
        if len(router.tiers) != len(budget.config.tiers):
            raise ValueError(
                f"router {router.name!r} predicts {len(router.tiers)} tiers ({', '.join(router.tiers)}), the "
                f"deployment has {len(budget.config.tiers)} ({', '.join(budget.config.tiers)})"
            )
        self.router = router
        self.budget = budget

    @property
    def tiers(self) -> tuple[str, ...]:
        return self.budget.config.tiers

    def decide_many(
        self, requests: Sequence[TierRouteRequest], *, held_out: Mapping[str, str] | None = None
    ) -> list[RoutingDecision]:
        """Route several prompts: one router call for all of them, one budget transaction per budget.

        Args:
            requests: the prompts, in order; decisions against one budget each see the ones before them.
            held_out: tiers that may not take a job now, with why (a circuit breaker open).
        """
        if not requests:
            return []
        started = time.perf_counter()
        prompts = [r.prompt for r in requests]
        qualities = self.router.qualities(prompts)
        utilities = prs_utilities(qualities, self.router.scales, self.router.weights(), self.router.temperature)
        held = dict(held_out or {})
        allowed = [t not in held for t in self.tiers]
        why_not = {k: held[t] for k, t in enumerate(self.tiers) if t in held}
        verdicts: dict[int, TierVerdict] = {}
        by_budget: dict[int, tuple[SpendController, list[int]]] = {}
        for i, request in enumerate(requests):
            if request.requested_tier is None:
                controller = request.budget or self.budget
                by_budget.setdefault(id(controller), (controller, []))[1].append(i)
        for controller, indices in by_budget.values():
            asked = [TierRequest(utilities[i].tolist(), allowed, why_not) for i in indices]
            verdicts.update(zip(indices, controller.decide_many(asked), strict=True))
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [
            self._decision(request, qualities[i], utilities[i], verdicts.get(i), latency_ms, len(requests))
            for i, request in enumerate(requests)
        ]

    def _decision(
        self,
        request: TierRouteRequest,
        quality: np.ndarray,
        utility: np.ndarray,
        verdict: TierVerdict | None,
        latency_ms: float,
        batch: int,
    ) -> RoutingDecision:
        controller = request.budget or self.budget
        config = controller.config
        inputs: dict[str, Any] = {"prompt_chars": len(request.prompt), "batch": batch}
        if verdict is None:
            assert request.requested_tier is not None
            tier = request.requested_tier
            index = self.tiers.index(tier)
            state: dict[str, Any] = {"budget_usd_per_image": config.budget_usd, "forced": True}
            reason = f"tier {tier!r} requested by the caller"
            inputs["requested_tier"] = tier
            multiplier = None
        else:
            index, tier = verdict.tier, self.tiers[verdict.tier]
            state, reason, multiplier = dict(verdict.state), verdict.reason, verdict.multiplier
            if verdict.reserved_usd:
                state["reserved_tier"] = tier
        state["budget"] = controller.name
        state["prices"] = dict(zip(self.tiers, config.prices, strict=True))
        metric_set = "routet2i-predicted"
        predicted = {
            t: QualityVector(dict(zip(self.router.metrics, quality[k].tolist(), strict=True)), metric_set).to_dict()
            for k, t in enumerate(self.tiers)
        }
        low, high = config.prices[0], config.prices[-1]
        return RoutingDecision(
            tier=tier,
            router_name=self.router.name,
            router_version=self.router.version,
            score=float(utility[index]),
            threshold=multiplier,
            budget=(config.budget_usd - low) / (high - low) if high > low else 1.0,
            budget_state=state,
            reason=reason,
            inputs=inputs,
            predicted=predicted,
            explanation={"utilities": {t: round(float(u), 6) for t, u in zip(self.tiers, utility, strict=True)}},
            latency_ms=latency_ms,
        )
