"""The load-aware plan (router/load.py): predicted latency, no change below capacity, spill order, the burst
allowance's exhaustion, the steps knob, and dearer tiers held out for load."""

from __future__ import annotations

import math

import pytest

from router.load import LoadJob, TierLoad, held_out_for_load, plan

PRICES = {"edge": 0.01, "cloud": 0.05}


def loads(
    edge_backlog: float, *, cloud_backlog: float = 0, edge_slots: int = 2, cloud_slots: int = 8
) -> list[TierLoad]:
    return [TierLoad("edge", edge_backlog, edge_slots, 0.4), TierLoad("cloud", cloud_backlog, cloud_slots, 3.0)]


def job(gain: float, *, tier: str = "edge", left: float | None = 10.0, movable: bool = True) -> LoadJob:
    return LoadJob(tier, {"edge": 0.0, "cloud": gain}, left, movable)


def test_latency_is_the_queue_ahead_drained_by_the_slots_plus_its_own_generation() -> None:
    load = TierLoad("edge", 10, 2, 0.4)
    assert load.latency_s() == pytest.approx((10 - 2 + 1) * 0.4 / 2 + 0.4)
    assert load.latency_s(0) == pytest.approx(0.4)  # a free slot: only its own generation
    assert load.latency_s(1) == pytest.approx(0.4)
    assert load.latency_s(0, share=0.5) == pytest.approx(0.2)
    assert TierLoad("edge", 3, 0, 0.4).latency_s() == math.inf  # no live worker
    assert TierLoad("edge", 3, 2, None).latency_s() is None  # never measured: not predictable


def test_below_capacity_nothing_moves() -> None:
    jobs = [job(g) for g in (0.9, -0.2, 0.4)] + [job(0.7, tier="cloud")]
    chosen = plan(jobs, loads(3), prices=PRICES, allowance_usd=10.0, degrade_steps=0.5)
    assert [v.tier for v in chosen.verdicts] == ["edge", "edge", "edge", "cloud"]
    assert {v.action for v in chosen.verdicts} == {"kept"}
    assert chosen.spill_usd == []


def test_the_edge_keeps_the_lowest_gains_and_the_largest_spill_first() -> None:
    # 2 slots at 0.4 s: a job meets 4 s left behind at most 19 jobs; 17 are ahead already.
    gains = [0.1, 0.8, -0.3, 0.5, 0.9, 0.2]
    jobs = [job(g, left=4.0) for g in gains]
    chosen = plan(jobs, loads(17), prices=PRICES, allowance_usd=2 * 0.05, degrade_steps=0.0)
    actions = [v.action for v in chosen.verdicts]
    # Room for 3 more on the edge: the three lowest gains stay.
    assert [gains[i] for i, a in enumerate(actions) if a == "kept"] == [0.1, -0.3, 0.2]
    # The allowance pays two spills: the two largest gains, 0.9 then 0.8.
    spilled = [i for i, a in enumerate(actions) if a == "spilled"]
    assert sorted(gains[i] for i in spilled) == [0.8, 0.9]
    assert all(chosen.verdicts[i].tier == "cloud" for i in spilled)
    assert chosen.spill_usd == [0.05, 0.05]
    # The allowance is spent: the remaining late job (0.5) is queued late on the edge, and says so.
    late = chosen.verdicts[gains.index(0.5)]
    assert (late.tier, late.action) == ("edge", "late")
    assert "burst allowance spent" in late.reason


def test_a_spill_goes_only_where_the_slo_is_met() -> None:
    # The cloud itself is full: nowhere to spill, so the job queues late.
    jobs = [job(0.9, left=4.0)]
    chosen = plan(jobs, loads(20, cloud_backlog=40), prices=PRICES, allowance_usd=1.0, degrade_steps=0.0)
    assert chosen.verdicts[0].action == "late"
    assert "no other tier meets it" in chosen.verdicts[0].reason
    # Held out (breaker open): not a target either.
    chosen = plan(jobs, loads(20), prices=PRICES, allowance_usd=1.0, degrade_steps=0.0, held_out={"cloud": "down"})
    assert chosen.verdicts[0].action == "late"


def test_the_steps_knob_when_it_alone_meets_the_slo() -> None:
    # 1 slot at 0.4 s, 2 ahead: full steps 0.8 + 0.4 = 1.2 s; half the steps 0.8 + 0.2 = 1.0 s.
    edge = [TierLoad("edge", 2, 1, 0.4), TierLoad("cloud", 0, 1, 3.0)]
    chosen = plan([job(0.5, left=1.1)], edge, prices=PRICES, allowance_usd=0.0, degrade_steps=0.5)
    verdict = chosen.verdicts[0]
    assert (verdict.tier, verdict.action, verdict.steps_share) == ("edge", "degraded", 0.5)
    assert verdict.predicted_s == pytest.approx(1.0)
    # Not enough even at half the steps: queued late at full steps.
    chosen = plan([job(0.5, left=0.9)], edge, prices=PRICES, allowance_usd=0.0, degrade_steps=0.5)
    assert (chosen.verdicts[0].action, chosen.verdicts[0].steps_share) == ("late", 1.0)
    # The knob off: queued late.
    chosen = plan([job(0.5, left=1.1)], edge, prices=PRICES, allowance_usd=0.0, degrade_steps=0.0)
    assert chosen.verdicts[0].action == "late"


def test_forced_and_shadow_jobs_never_move_but_take_their_place() -> None:
    jobs = [job(0.9, left=4.0, movable=False), job(0.9, left=4.0)]
    chosen = plan(jobs, loads(30), prices=PRICES, allowance_usd=1.0, degrade_steps=0.0)
    assert (chosen.verdicts[0].tier, chosen.verdicts[0].action) == ("edge", "late")
    assert (chosen.verdicts[1].tier, chosen.verdicts[1].action) == ("cloud", "spilled")


def test_jobs_without_an_slo_are_not_judged() -> None:
    chosen = plan([job(0.9, left=None)], loads(100), prices=PRICES, allowance_usd=1.0, degrade_steps=0.5)
    assert (chosen.verdicts[0].tier, chosen.verdicts[0].action) == ("edge", "unjudged")


def test_a_dearer_tier_over_the_slo_is_held_out_while_the_cheapest_meets_it() -> None:
    held = held_out_for_load(loads(0, cloud_backlog=40), 10.0)
    assert set(held) == {"cloud"} and "SLO 10 s" in held["cloud"]
    assert held_out_for_load(loads(100, cloud_backlog=40), 10.0) == {}  # both late: the router decides as usual
    assert held_out_for_load(loads(0), 10.0) == {}


def test_more_tiers_spill_to_the_cheapest_one_that_meets_the_slo() -> None:
    tiers = [TierLoad("edge", 30, 2, 0.4), TierLoad("mid", 0, 4, 1.0), TierLoad("cloud", 0, 8, 3.0)]
    prices = {"edge": 0.0, "mid": 0.02, "cloud": 0.05}
    gains = {"edge": 0.0, "mid": 0.3, "cloud": 0.6}
    chosen = plan([LoadJob("edge", gains, 2.0)], tiers, prices=prices, allowance_usd=1.0, degrade_steps=0.0)
    assert (chosen.verdicts[0].tier, chosen.spill_usd) == ("mid", [0.02])


def test_the_time_a_job_has_left_is_the_slo_from_its_submission_or_less_before_its_deadline() -> None:
    from datetime import UTC, datetime, timedelta

    from db.models import Job
    from worker.slo import LiveLoad

    now = datetime(2026, 12, 8, 12, 0, 0, tzinfo=UTC)
    submitted = now - timedelta(seconds=4)
    live = LiveLoad(loads(0), 10.0, now)
    assert live.left_s(Job(created_at=submitted)) == pytest.approx(6.0)
    assert live.left_s(Job(created_at=submitted, deadline_at=now + timedelta(seconds=2))) == pytest.approx(2.0)
    assert live.left_s(Job(created_at=submitted, deadline_at=now + timedelta(seconds=60))) == pytest.approx(6.0)
    no_slo = LiveLoad(loads(0), None, now)
    assert no_slo.left_s(Job(created_at=submitted)) is None
    assert no_slo.left_s(Job(created_at=submitted, deadline_at=now + timedelta(seconds=3))) == pytest.approx(3.0)
