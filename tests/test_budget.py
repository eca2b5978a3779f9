"""The online budget controller (pure) and its Redis store shared by processes."""

from __future__ import annotations

import random

import pytest

from db.redis_state import RedisBudgetStore
from router.budget import BudgetConfig, BudgetController, BudgetState, MemoryBudgetStore, decide, quantile


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
    # Target share 0.75: the threshold is the 25th percentile (no minimum share: this is about the threshold).
    config = BudgetConfig(rho=0.5, window=100, gain=1.0, tolerance=1.0)
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


def _drifting_scores(n: int = 3000, seed: int = 3) -> list[float]:
    """Scores whose distribution steps down by two standard deviations halfway (traffic changes)."""
    rng = random.Random(seed)
    return [rng.gauss(0.0 if i < n // 2 else -2.0, 1.0) for i in range(n)]


def _window_counts(decisions: list[bool], window: int) -> list[int]:
    return [sum(decisions[start : start + window]) for start in range(len(decisions) - window + 1)]


def test_every_window_keeps_its_minimum_share_when_the_scores_drift_down() -> None:
    rho, window = 0.3, 200
    config = BudgetConfig(rho=rho, window=window)
    controller = BudgetController(config, MemoryBudgetStore(window))
    verdicts = [controller.decide(s, calibrated_threshold=0.5) for s in _drifting_scores()]
    decisions = [v.cloud for v in verdicts]
    assert config.minimum == 56 and config.cap == 60  # floor(0.28 · 200), floor(0.3 · 200)
    assert all(56 <= count <= 60 for count in _window_counts(decisions, window))
    for n in range(1, window):  # the first decisions, too: the share so far stays within the band
        assert int((rho - config.tolerance) * n + 1e-9) <= sum(decisions[:n]) <= int(rho * n + 1e-9)
    forced = [v for v in verdicts if v.cloud and "the 200 decisions ending here hold at least 56" in v.reason]
    assert forced and all(v.state["minimum"] == 56 for v in forced)
    # The controller it replaced (whole-window threshold and feedback, no minimum) lets the share sag here.
    before = BudgetConfig(rho=rho, window=window, tolerance=1.0, score_horizon=window, share_horizon=window - 1)
    old = BudgetController(before, MemoryBudgetStore(window))
    sagging = [old.decide(s, calibrated_threshold=0.5).cloud for s in _drifting_scores()]
    assert min(_window_counts(sagging, window)) < (rho - 0.03) * window


def test_the_minimum_share_never_overrides_the_floor_or_the_spend_limit() -> None:
    full_of_edge = BudgetState(decisions=(0,) * 9, scores=(1.0,) * 9)
    config = BudgetConfig(rho=0.5, window=10, spend_limit_usd=1.0, cloud_cost_usd=0.5)
    assert config.minimum == 4
    forced = decide(0.2, full_of_edge, config, floor=0.0)
    assert forced.cloud and "0 of the last 9 went to the cloud" in forced.reason and forced.reserved_usd == 0.5
    assert not decide(-0.2, full_of_edge, config, floor=0.0).cloud  # the edge is predicted at least as good
    broke = BudgetState(decisions=full_of_edge.decisions, scores=full_of_edge.scores, spent_usd=1.0)
    refused = decide(0.2, broke, config, floor=0.0)
    assert (
        not refused.cloud
        and "the 10 decisions ending here hold at least 4, but the spend limit is reached" in refused.reason
    )


@pytest.mark.parametrize(
    "field,value", [("tolerance", -0.1), ("tolerance", 1.5), ("score_horizon", 0), ("share_horizon", 11)]
)
def test_config_refuses_bad_tolerances_and_horizons(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BudgetConfig(rho=0.5, window=10, **{field: value})  # type: ignore[arg-type]


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


# --- the spend limit ---------------------------------------------------------------------------------------

CLOUD_PRICE = 0.065


def test_spend_limit_sends_to_the_edge_what_the_period_cannot_pay_for() -> None:
    config = BudgetConfig(rho=1.0, window=100, spend_limit_usd=3 * CLOUD_PRICE, cloud_cost_usd=CLOUD_PRICE)
    controller = BudgetController(config, MemoryBudgetStore(100))
    verdicts = [controller.decide(10.0, calibrated_threshold=0.0) for _ in range(6)]
    # Three prices sum to a hair above the limit in floating point; the third still fits.
    assert [v.cloud for v in verdicts] == [True, True, True, False, False, False]
    assert [v.reserved_usd for v in verdicts] == [CLOUD_PRICE] * 3 + [0.0] * 3
    assert all("the spend limit is reached: $0.1950 of $0.1950 spent this period" in v.reason for v in verdicts[3:])
    assert verdicts[3].state["spent_usd"] == pytest.approx(3 * CLOUD_PRICE)
    assert verdicts[3].state["spend_limit_usd"] == pytest.approx(3 * CLOUD_PRICE)
    assert controller.store.snapshot().spent_usd == pytest.approx(3 * CLOUD_PRICE)


def test_without_a_spend_limit_nothing_is_reserved_or_reported() -> None:
    controller = BudgetController(BudgetConfig(rho=1.0, window=10, cloud_cost_usd=CLOUD_PRICE), MemoryBudgetStore(10))
    verdicts = [controller.decide(10.0, calibrated_threshold=0.0) for _ in range(5)]
    assert all(v.cloud and v.reserved_usd == 0.0 and "spent_usd" not in v.state for v in verdicts)
    assert controller.store.snapshot().spent_usd == 0.0


def test_shadow_samples_are_paid_from_the_spend_limit_too() -> None:
    config = BudgetConfig(rho=1.0, window=10, spend_limit_usd=CLOUD_PRICE, cloud_cost_usd=CLOUD_PRICE)
    controller = BudgetController(config, MemoryBudgetStore(10))
    # Predicted better on the edge, shadow-sampled: its cloud image takes the period's only price.
    shadowed = controller.decide(-1.0, floor=0.0, calibrated_threshold=0.0, shadow=True)
    assert not shadowed.cloud and shadowed.shadow and shadowed.reserved_usd == CLOUD_PRICE
    routed = controller.decide(10.0, floor=0.0, calibrated_threshold=0.0)
    assert not routed.cloud and "spend limit is reached" in routed.reason
    refused = controller.decide(-1.0, floor=0.0, calibrated_threshold=0.0, shadow=True)
    assert not refused.shadow and refused.reason.endswith("no budget left to shadow-sample")


@pytest.mark.parametrize("field,value", [("spend_limit_usd", -1.0), ("cloud_cost_usd", -0.01)])
def test_config_refuses_negative_money(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        BudgetConfig(rho=0.5, **{field: value})  # type: ignore[arg-type]


@pytest.mark.integration
def test_one_spend_limit_holds_across_windows_processes_and_periods(redis_url: str, redis_client) -> None:
    """Routers on two budget windows (the deployment's and a tenant's), each in its own thread with its own
    Redis connection, race for a limit of 10 cloud images: exactly 10 are decided. Money billed beyond the
    reservations counts too, and the next period starts from zero."""
    import threading

    import redis as redis_lib

    from db.redis_state import SpendLedger

    now = [1_000_000.0]
    period = 3600
    config = BudgetConfig(rho=1.0, window=500, spend_limit_usd=10 * CLOUD_PRICE, cloud_cost_usd=CLOUD_PRICE)
    clients = [redis_lib.Redis.from_url(redis_url) for _ in range(4)]

    def controller(client: redis_lib.Redis, window: str) -> BudgetController:
        ledger = SpendLedger(client, period_s=period, name="spend-test", clock=lambda: now[0])
        return BudgetController(config, RedisBudgetStore(client, window=500, name=window, spend=ledger))

    routers = [controller(client, "default" if i % 2 else "tenant-x") for i, client in enumerate(clients)]
    clouds: list[bool] = []
    lock = threading.Lock()
    # Rising scores: at ρ = 1 every score above the window's lowest would go to the cloud, so only the money
    # can stop them.
    scores = iter(float(i) for i in range(10, 1000))

    def score() -> float:
        with lock:
            return next(scores)

    def run(router: BudgetController) -> None:
        for _ in range(25):
            verdict = router.decide(score(), calibrated_threshold=0.0)
            with lock:
                clouds.append(verdict.cloud)

    threads = [threading.Thread(target=run, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clouds) == 100 and sum(clouds) == 10
    ledger = SpendLedger(redis_client, period_s=period, name="spend-test", clock=lambda: now[0])
    assert ledger.spent() == pytest.approx(10 * CLOUD_PRICE)
    assert 0 < redis_client.ttl(ledger.key()) <= 2 * period

    # A new period: the limit is available again; GPU-seconds billed later count against it as well.
    now[0] += period
    assert ledger.spent() == 0.0
    ledger.add(8 * CLOUD_PRICE)
    assert sum(routers[0].decide(score(), calibrated_threshold=0.0).cloud for _ in range(5)) == 2
    assert ledger.spent() == pytest.approx(10 * CLOUD_PRICE)
    for client in clients:
        client.close()


@pytest.mark.integration
def test_a_router_that_loses_the_last_dollar_to_another_window_decides_again(redis_client) -> None:
    """Router A reads the period's spend, router B (another budget window) takes the last price before A
    writes: A's transaction is refused and A decides again on the fresh spend, so the limit holds."""
    from db.redis_state import SpendLedger

    config = BudgetConfig(rho=1.0, window=10, spend_limit_usd=CLOUD_PRICE, cloud_cost_usd=CLOUD_PRICE)
    ledger = SpendLedger(redis_client, period_s=3600, name="race-test", clock=lambda: 1_000_000.0)
    a = RedisBudgetStore(redis_client, window=10, name="a", spend=ledger)
    b = BudgetController(config, RedisBudgetStore(redis_client, window=10, name="b", spend=ledger))
    seen: list[float] = []

    def decide_a(state: BudgetState) -> list:
        seen.append(state.spent_usd)
        if len(seen) == 1:
            assert b.decide(5.0, calibrated_threshold=0.0).cloud  # B spends the last price meanwhile
        return [decide(5.0, state, config, calibrated_threshold=0.0)]

    (verdict,) = a.transact(decide_a, [5.0])
    assert seen == [0.0, pytest.approx(CLOUD_PRICE)]
    assert not verdict.cloud and "spend limit is reached" in verdict.reason
    assert ledger.spent() == pytest.approx(CLOUD_PRICE)
