"""Choosing among any number of tiers under a money budget.

Each prompt has a predicted utility per tier: how much better than the cheapest tier's image that tier's image
is expected to be (the Pareto relative superiority of its predicted metric vector over the cheapest tier's, minus
one half, so the cheapest tier's own utility is 0 and a tier predicted better on every metric approaches 0.5).
A price multiplier λ turns utility into a choice: each prompt goes to the tier with the largest utility minus
λ times its price per image (ties to the cheaper tier). λ is the Lagrange multiplier of the budget constraint
"mean price per image ≤ B": the smallest λ whose choices over a set of prompts cost at most B on average is
:func:`multiplier_for_budget`, the K-tier analogue of the two-tier threshold at the (1 − ρ) quantile.

With two tiers the rule is the two-tier one: the dearer tier is chosen when its utility (the two-tier router's
score) exceeds λ times the price difference, and a budget of ``B = p_edge + ρ·(p_cloud − p_edge)`` per image is a
cloud share of ρ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Prices = Sequence[float] | np.ndarray
"""Prices per image of the tiers, cheapest first."""

MAX_BISECTIONS = 60
"""Bisection steps of :func:`multiplier_for_budget`: the multiplier's bracket shrinks by 2⁻⁶⁰."""


def check_prices(prices: Prices) -> np.ndarray:
    """The prices per image as an array, refused unless non-negative and in non-decreasing order (cheapest
    first, the order tiers are configured in)."""
    array = np.asarray(prices, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError("prices: at least two tiers' prices are needed")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise ValueError("prices: every price per image must be a finite number of at least 0")
    if np.any(np.diff(array) < 0):
        raise ValueError(f"prices: tiers must be listed cheapest first, got {array.tolist()}")
    return array


def choose(utilities: np.ndarray, prices: Prices, multiplier: float) -> np.ndarray:
    """The index of the chosen tier per prompt: the largest ``utility − multiplier·price``, the cheapest on ties.

    Args:
        utilities: (n, K) predicted utility of each tier per prompt, cheapest tier first.
        prices: (K,) price per image of each tier, cheapest first.
        multiplier: λ ≥ 0, in utility per dollar.
    """
    utilities = np.asarray(utilities, dtype=np.float64)
    price = check_prices(prices)
    if utilities.ndim != 2 or utilities.shape[1] != price.size:
        raise ValueError(f"utilities must be (n, {price.size}), got {utilities.shape}")
    net = utilities - multiplier * price[None, :]
    # argmax returns the first maximum: the cheapest tier among equals, since tiers are cheapest first.
    chosen: np.ndarray = np.argmax(net, axis=1)
    return chosen


def mean_price(utilities: np.ndarray, prices: Prices, multiplier: float) -> float:
    """Mean price per image of :func:`choose`'s choices."""
    if len(utilities) == 0:
        return 0.0
    price = check_prices(prices)
    return float(price[choose(utilities, price, multiplier)].mean())


def multiplier_for_budget(utilities: np.ndarray, prices: Prices, budget_usd: float) -> float:
    """The smallest λ whose choices over ``utilities`` cost at most ``budget_usd`` per image on average.

    The mean price falls as λ grows (each prompt's choice moves to cheaper tiers), so λ is found by bisection.
    A budget at or above what every prompt's best tier costs gives 0; one below the cheapest tier's price gives
    the λ that sends every prompt to the cheapest tier.
    """
    price = check_prices(prices)
    utilities = np.asarray(utilities, dtype=np.float64)
    if len(utilities) == 0 or mean_price(utilities, price, 0.0) <= budget_usd:
        return 0.0
    spread = float(price[-1] - price[0])
    if spread <= 0:
        return 0.0
    # Above this λ every prompt's cheapest tier wins: no utility gap exceeds the largest one over the smallest
    # price step.
    steps = np.diff(price)
    smallest_step = float(steps[steps > 0].min())
    gap = float(np.max(utilities - utilities[:, :1])) if utilities.size else 0.0
    high = max(gap, 0.0) / smallest_step + 1.0
    low = 0.0
    for _ in range(MAX_BISECTIONS):
        middle = 0.5 * (low + high)
        if mean_price(utilities, price, middle) <= budget_usd:
            high = middle
        else:
            low = middle
    return high


def budget_for_share(prices: Prices, rho: float) -> float:
    """The mean price per image of sending a share ``rho`` to the dearest tier and the rest to the cheapest: how
    a two-tier ρ reads as a money budget."""
    price = check_prices(prices)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be within [0, 1], got {rho}")
    return float(price[0] + rho * (price[-1] - price[0]))
