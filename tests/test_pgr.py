"""Replay metrics on hand-made numbers whose right answers are worked out in the comments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from router.pgr import aggregate_weights, cumulative_gain, routing_curves


def curves(scores, edge, cloud, metrics=("q",), **kwargs):
    return routing_curves(
        np.asarray(scores, dtype=float),
        np.asarray(edge, dtype=float).reshape(len(scores), -1),
        np.asarray(cloud, dtype=float).reshape(len(scores), -1),
        metrics=metrics,
        **kwargs,
    )


def test_cumulative_gain_takes_prompts_by_decreasing_score() -> None:
    # Scores rank prompt 0, 1, 2; their gains are 1, -1, 2: G = 0, 1, 1-1, 1-1+2.
    assert cumulative_gain(np.array([3.0, 2.0, 1.0]), np.array([1.0, -1.0, 2.0])).tolist() == [0, 1, 0, 2]
    # Same prompts in another log order: identical curve.
    assert cumulative_gain(np.array([1.0, 3.0, 2.0]), np.array([2.0, 1.0, -1.0])).tolist() == [0, 1, 0, 2]


def test_tied_scores_count_at_their_expectation() -> None:
    # Two tied prompts with gains 2 and 0: sending one at random gains 1 on average.
    assert cumulative_gain(np.array([1.0, 1.0]), np.array([2.0, 0.0])).tolist() == [0, 1, 2]
    # A tie block in the middle: [5] then tie {3, 1} then [-2].
    got = cumulative_gain(np.array([9.0, 4.0, 4.0, 0.0]), np.array([5.0, 3.0, 1.0, -2.0]))
    assert got.tolist() == [0, 5, 7, 9, 7]


def test_pgr_cpt_apgr_arithmetic() -> None:
    # Gains 4, 2, 0, -2 (total 4), ranked best first: G = 0, 4, 6, 6, 4 -> PGR = 0, 1, 1.5, 1.5, 1.
    c = curves([4, 3, 2, 1], [0, 0, 0, 2], [4, 2, 0, 0])
    assert c.pgr.tolist() == [0, 1, 1.5, 1.5, 1]
    # PGR at budget 0.5 is k = 2; at 0.1 it is k = 0.4 -> 0.4 by interpolation; 0.9 -> k=3.6 -> 1.5-0.6*0.5.
    assert c.at(c.pgr, [0.5, 0.1, 0.9]).tolist() == pytest.approx([1.5, 0.4, 1.2])
    # CPT(50%): PGR reaches 0.5 halfway to the first prompt: share 0.5/4. CPT(80%): 0.8/4.
    assert c.cpt(0.5) == pytest.approx(0.125)
    assert c.cpt(0.8) == pytest.approx(0.2)
    # APGR: trapezoid over k/4 = (0 + 1 + 1.5 + 1.5 + 1 - (0 + 1)/2) / 4.
    assert c.apgr() == pytest.approx(4.5 / 4)
    # Quality: mean edge 0.5, mean cloud 1.5; at k=2 the routed mean is (4 + 2 + 0 + 2) / 4.
    assert c.quality[2, 0] == pytest.approx(2.0)
    assert c.edge_mean[0] == 0.5 and c.cloud_mean[0] == 1.5


def test_apgr_of_a_perfect_and_of_a_random_router() -> None:
    edge, cloud = [0, 0, 0, 0], [1, 0, 0, 0]  # only prompt 0 gains
    perfect = curves([1, 0, 0, 0], edge, cloud)
    # PGR = 0, 1, 1, 1, 1 -> APGR = (4 - 1/2) / 4.
    assert perfect.apgr() == pytest.approx(0.875)
    # Constant scores: every order equally likely -> PGR(f) = f exactly, APGR 1/2, CPT(x) = x.
    constant = curves([7, 7, 7, 7], edge, cloud)
    assert constant.pgr.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert constant.apgr() == pytest.approx(0.5)
    assert constant.cpt(0.8) == pytest.approx(0.8)
    # The worst router takes the gaining prompt last: PGR 0, 0, 0, 0, 1 -> APGR 1/8.
    assert curves([0, 1, 1, 1], edge, cloud).apgr() == pytest.approx(0.125)


def test_fixed_tier_routers_ignore_the_budget() -> None:
    edge, cloud = [1, 2, 3], [2, 2, 5]
    all_edge = curves([0, 0, 0], edge, cloud, fixed_tier="edge")
    assert all_edge.pgr.tolist() == [0, 0, 0, 0]
    assert all_edge.share.tolist() == [0, 0, 0, 0]
    assert math.isnan(all_edge.cpt(0.5))
    all_cloud = curves([1, 1, 1], edge, cloud, fixed_tier="cloud")
    assert all_cloud.pgr.tolist() == [1, 1, 1, 1]
    assert all_cloud.share.tolist() == [1, 1, 1, 1]
    assert all_cloud.cpt(0.5) == 1.0  # it reaches any PGR only by spending the whole cloud
    assert all_cloud.quality[0].tolist() == [3.0]


def test_edge_floor_stops_the_cloud_share() -> None:
    # Scores 2, 1, -1 with floor 0: the third prompt never goes to the cloud.
    c = curves([2, 1, -1], [0, 0, 0], [1, 1, 1], floor=0.0)
    assert c.gain[:, 0].tolist() == [0, 1, 2, 2]
    assert c.share.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    assert math.isnan(c.cpt(0.9))  # PGR stops at 2/3
    assert c.cpt(0.5) == pytest.approx(0.5)


def test_aggregate_is_mean_of_per_metric_pgr_and_the_oracle_maximises_it() -> None:
    rng = np.random.default_rng(3)
    edge = rng.normal(size=(7, 2))
    cloud = edge + rng.normal(loc=(0.5, 0.2), size=(7, 2))
    weights = aggregate_weights(edge, cloud)
    oracle = (cloud - edge) @ weights
    c = routing_curves(oracle, edge, cloud, metrics=("a", "b"))
    assert c.pgr.tolist() == pytest.approx(c.metric_pgr.mean(axis=1).tolist())
    # The aggregate PGR is the PGR of the composite gain: cumulative oracle scores.
    assert c.pgr.tolist() == pytest.approx(cumulative_gain(oracle, oracle).tolist())
    # No subset of k prompts beats the oracle's top k (brute force).
    gains = cloud - edge
    for k in range(8):
        best = max(
            (
                np.mean([gains[list(s), i].sum() / gains[:, i].sum() for i in range(2)])
                for s in itertools.combinations(range(7), k)
            ),
            default=0.0,
        )
        assert c.pgr[k] == pytest.approx(best)


def test_pareto_no_worse_share() -> None:
    # Two metrics. Prompt 0: cloud dominates edge. Prompt 1: edge dominates. Prompt 2: a trade-off.
    edge = np.array([[1.0, 1.0], [3.0, 3.0], [1.0, 3.0]])
    cloud = np.array([[2.0, 2.0], [2.0, 2.0], [3.0, 1.0]])
    c = routing_curves(np.array([3.0, 2.0, 1.0]), edge, cloud, metrics=("a", "b"))
    # k=0: all edge -> prompt 0 is dominated, others fine: 2/3. k=1: prompt 0 on cloud: 3/3.
    # k=2: prompt 1 on cloud is dominated: 2/3. k=3: still 2/3 (prompt 2 trade-off is fine either way).
    assert c.no_worse.tolist() == pytest.approx([2 / 3, 1, 2 / 3, 2 / 3])
    # Per metric "a": edge >= cloud holds for prompt 1 only at k=0, cloud >= edge for prompts 0 and 2.
    assert c.metric_no_worse[:, 0].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3, 2 / 3])


def test_metric_without_gain_is_left_out_of_the_aggregate() -> None:
    edge = np.array([[0.0, 1.0], [0.0, 1.0]])
    cloud = np.array([[1.0, 1.0], [0.0, 1.0]])  # metric b: no gain anywhere
    c = routing_curves(np.array([1.0, 0.0]), edge, cloud, metrics=("a", "b"))
    assert np.isnan(c.metric_pgr[:, 1]).all()
    assert c.pgr.tolist() == [0, 1, 1]


def test_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        cumulative_gain(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        cumulative_gain(np.array([1.0]), np.array([1.0, 2.0]))
