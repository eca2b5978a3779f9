"""The online budget controller (pure) and its Redis store shared by processes."""

from __future__ import annotations

import random

import pytest

from router.budget import BudgetConfig, BudgetController, BudgetState, MemoryBudgetStore, decide, quantile
from worker.budget_store import RedisBudgetStore


def test_quantile_matches_linear_interpolation() -> None:
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([5.0], 0.9) == 5.0
    assert quantile([3.0, 1.0, 2.0], 0.0) == 1.0
    assert quantile([3.0, 1.0, 2.0], 1.0) == 3.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


@pytest.mark.parametrize("rho", [-0.1, 1.1])
def test_config_refuses_a_budget_outside_0_1(rho: float) -> None:
    with pytest.raises(ValueError, match="rho"):
        BudgetConfig(rho=rho)


def test_zero_budget_never_sends_to_the_cloud() -> None:
    controller = BudgetController(BudgetConfig(rho=0.0, window=50), MemoryBudgetStore(50))
    assert not any(controller.decide(s, calibrated_threshold=0.0).cloud for s in range(100))


def test_floor_keeps_prompts_on_the_edge_whatever_the_budget() -> None:
    verdict = decide(0.0, BudgetState((), ()), BudgetConfig(rho=1.0, window=10), floor=0.0, calibrated_threshold=-5)
    assert not verdict.cloud and "edge" in verdict.reason


def test_cold_start_without_calibration_routes_to_the_edge() -> None:
    verdict = decide(10.0, BudgetState((), ()), BudgetConfig(rho=0.5, window=10))
    assert not verdict.cloud and verdict.threshold is None


def test_high_scores_go_to_the_cloud_once_there_is_a_threshold() -> None:
    config = BudgetConfig(rho=0.5, window=100)
    state = BudgetState(decisions=(0, 0, 0, 1) * 10, scores=tuple(float(i % 10) for i in range(40)))
    assert decide(9.5, state, config).cloud
    assert not decide(0.5, state, config).cloud


@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 0.8])
def test_no_window_ever_exceeds_the_budget_and_the_share_tracks_it(rho: float) -> None:
    window = 200
    controller = BudgetController(BudgetConfig(rho=rho, window=window), MemoryBudgetStore(window))
    rng = random.Random(1)
    decisions = []
    for i in range(3000):
        drift = 2.0 * (i // 1000)  # the score distribution shifts twice
        decisions.append(controller.decide(rng.gauss(drift, 1.0), calibrated_threshold=0.0).cloud)
    for start in range(0, len(decisions) - window + 1):
        assert sum(decisions[start : start + window]) <= int(rho * window)
    share = sum(decisions[window:]) / len(decisions[window:])
    assert rho - 0.05 <= share <= rho


@pytest.mark.integration
def test_redis_store_is_shared_and_trimmed(redis_client) -> None:
    config = BudgetConfig(rho=0.5, window=20)
    first = BudgetController(config, RedisBudgetStore(redis_client, window=20, name="t"))
    second = BudgetController(config, RedisBudgetStore(redis_client, window=20, name="t"))
    other = RedisBudgetStore(redis_client, window=20, name="other")
    for i in range(30):
        (first if i % 2 else second).decide(float(i), calibrated_threshold=10.0)
    state = first.store.snapshot()
    assert len(state.decisions) == len(state.scores) == 20
    assert state.scores[0] == 29.0  # newest first, from either controller
    assert sum(state.decisions) <= 10
    assert other.snapshot() == BudgetState((), ())
    first.store.reset()
    assert first.store.snapshot() == BudgetState((), ())
