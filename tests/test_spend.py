"""The money budget with any number of tiers (router.tiers, router.spend): the decision rule, λ, and the
controller that holds a window's mean price per image to the budget."""

from __future__ import annotations

import numpy as np
import pytest

from router.base import load_router
from router.datasets import genai_bench
from router.multitier import create_tier_router
from router.spend import MemorySpendStore, SpendConfig, SpendController, SpendState, TierRequest, decide_tier
from router.tierdata import genai_bench_tiers
from router.tiers import budget_for_share, choose, mean_price, multiplier_for_budget

PRICES = (0.009, 0.065)


@pytest.fixture(scope="module")
def shipped_scores() -> np.ndarray:
    """The shipped two-tier RouteT2I's scores on the carried GenAI-Bench prompts (SDXL-Turbo → DALL·E 3)."""
    records = genai_bench("SDXL_Turbo", "DALLE_3")
    return load_router("routet2i", None).score([r.prompt for r in records])


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5])
def test_with_two_tiers_the_money_rule_sends_the_same_prompts_as_the_share_rule(
    shipped_scores: np.ndarray, rho: float
) -> None:
    """The two-tier router's decision: the ρ share of prompts with the highest scores (above its floor of 0)
    goes to the cloud. The K-tier rule on utilities (0, score) with the budget ρ means in money sends exactly
    those prompts."""
    scores = shipped_scores
    n = len(scores)
    eligible = np.flatnonzero(scores > 0)
    ranked = eligible[np.argsort(-scores[eligible], kind="stable")]
    by_share = set(ranked[: int(np.floor(rho * n))].tolist())

    utilities = np.column_stack([np.zeros(n), scores])
    budget = budget_for_share(PRICES, rho)
    multiplier = multiplier_for_budget(utilities, PRICES, budget)
    by_money = set(np.flatnonzero(choose(utilities, PRICES, multiplier) == 1).tolist())

    assert len(set(np.round(scores, 12))) == n  # no ties: "the top ρ share" is one set of prompts
    assert by_money == by_share
    assert mean_price(utilities, PRICES, multiplier) <= budget + 1e-12


def test_the_multiplier_is_the_smallest_within_budget() -> None:
    rng = np.random.default_rng(0)
    utilities = np.column_stack([np.zeros(200), rng.uniform(-0.2, 0.4, (200, 2)).cumsum(axis=1)])
    prices = (0.0, 0.02, 0.07)
    for budget in (0.005, 0.02, 0.04):
        multiplier = multiplier_for_budget(utilities, prices, budget)
        assert mean_price(utilities, prices, multiplier) <= budget
        assert mean_price(utilities, prices, multiplier * 0.99) > budget
    assert multiplier_for_budget(utilities, prices, 1.0) == 0.0  # every prompt's best tier fits
    below = multiplier_for_budget(utilities, prices, 0.0)
    assert (choose(utilities, prices, below) == 0).all()


def test_prices_must_be_listed_cheapest_first() -> None:
    with pytest.raises(ValueError, match="cheapest first"):
        choose(np.zeros((1, 2)), (0.05, 0.01), 0.0)
    with pytest.raises(ValueError, match="at least two"):
        multiplier_for_budget(np.zeros((1, 1)), (0.01,), 0.01)


@pytest.fixture(scope="module")
def three_tiers() -> tuple[np.ndarray, tuple[str, ...], tuple[float, ...]]:
    """A ridge K-tier router's utilities of the carried GenAI-Bench prompts on three tiers (fitted on their
    human ratings), with the carried prices."""
    records = genai_bench_tiers(["SDXL_Turbo", "SDXL_Base", "DALLE_3"])
    tiers = records[0].tiers
    prices = tuple(records[0].cost[t] for t in tiers)
    router = create_tier_router("ridge").fit(records)
    return router.utilities([r.prompt for r in records]), tiers, prices


@pytest.mark.parametrize("seed", [0, 1])
def test_the_controller_holds_the_windows_mean_price_to_the_budget(
    three_tiers: tuple[np.ndarray, tuple[str, ...], tuple[float, ...]], seed: int
) -> None:
    """Shuffled streams of real prompts' predicted utilities: every window of 100 decisions after the first
    spends within ±10% of the budget per image, on all three tiers."""
    predicted, tiers, prices = three_tiers
    utilities = predicted[np.random.default_rng(seed).permutation(len(predicted))]
    budget = prices[0] + 0.4 * (prices[-1] - prices[0])
    window = 100
    controller = SpendController(
        SpendConfig(tiers=tiers, prices=prices, budget_usd=budget, window=window), MemorySpendStore(window)
    )
    chosen = []
    for start in range(0, len(utilities), 16):  # batches of 16, as router workers take them
        batch = [TierRequest(row.tolist()) for row in utilities[start : start + 16]]
        chosen += [v.tier for v in controller.decide_many(batch)]
    spent = np.asarray(prices)[chosen]
    means = [spent[i : i + window].mean() for i in range(window, len(spent) - window + 1, window)]
    assert all(abs(m - budget) <= 0.1 * budget for m in means), (budget, means)
    assert set(chosen) == {0, 1, 2}
    # It spends its money on the prompts the dearer tiers help most.
    gain = utilities[np.arange(len(chosen)), chosen]
    assert gain[np.asarray(chosen) > 0].mean() > utilities[:, 1:].max(axis=1).mean()


def test_a_held_out_tier_is_never_chosen_and_the_reason_says_why() -> None:
    config = SpendConfig(tiers=("edge", "mid", "cloud"), prices=(0.009, 0.03, 0.065), budget_usd=0.065)
    request = TierRequest([0.0, 0.1, 0.4], allowed=[True, True, False], why_not={2: "circuit breaker open"})
    verdict = decide_tier(request, SpendState(prices=(), utilities=()), config)
    assert verdict.tier == 1
    assert "'cloud' would be higher: circuit breaker open" in verdict.reason
    assert verdict.state["excluded"] == {"cloud": "circuit breaker open"}


def test_the_spend_limit_keeps_an_unaffordable_tier_out() -> None:
    config = SpendConfig(
        tiers=("edge", "mid", "cloud"), prices=(0.009, 0.03, 0.065), budget_usd=0.065, spend_limit_usd=1.0
    )
    request = TierRequest([0.0, 0.1, 0.4])
    rich = decide_tier(request, SpendState(prices=(), utilities=(), spent_usd=0.5), config)
    assert (rich.tier, rich.reserved_usd) == (2, 0.065)
    poor = decide_tier(request, SpendState(prices=(), utilities=(), spent_usd=0.95), config)
    assert (poor.tier, poor.reserved_usd) == (1, 0.03)
    assert "spend limit reached" in poor.state["excluded"]["cloud"]
    broke = decide_tier(request, SpendState(prices=(), utilities=(), spent_usd=0.99), config)
    assert (broke.tier, broke.reserved_usd) == (0, 0.0)
