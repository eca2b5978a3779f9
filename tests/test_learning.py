"""The learning loop's rules (router/learning.py): the split, the paired comparison, the verdict, the prior
choice, the warm-started blend and the shadow rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from router.base import Router, create_router, load_router
from router.learning import (
    BlendRouter,
    LoopConfig,
    choose_prior,
    cloud_shares,
    compare,
    judge,
    shadow_rate,
    split_recent,
)
from router.log import LogRecord
from router.types import QualityVector


class Fixed(Router):
    """Scores given by the prompt's index (``"p7"`` scores ``scores[7]``)."""

    name = "fixed-test"

    def __init__(self, scores: Sequence[float], floor: float | None = None) -> None:
        self.scores = list(scores)
        self.floor = floor

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([self.scores[int(p[1:])] for p in prompts], dtype=np.float64)

    def edge_floor(self) -> float | None:
        return self.floor


def records(gains: Sequence[float]) -> list[LogRecord]:
    return [
        LogRecord(id=str(i), prompt=f"p{i}", edge=QualityVector({"q": 1.0}), cloud=QualityVector({"q": 1.0 + g}))
        for i, g in enumerate(gains)
    ]


def test_the_most_recent_labels_are_held_out() -> None:
    log = records([0.1] * 100)
    train, holdout = split_recent(log, LoopConfig(holdout_share=0.25, min_holdout=20))
    assert [r.id for r in holdout] == [str(i) for i in range(75, 100)] and len(train) == 75
    train, holdout = split_recent(log[:40], LoopConfig(holdout_share=0.25, min_holdout=20))
    assert len(holdout) == 20 and len(train) == 20  # never fewer than min_holdout


def test_cloud_shares_split_ties_and_respect_the_floor() -> None:
    scores = np.array([3.0, 2.0, 2.0, 1.0])
    assert cloud_shares(scores, 0.5, None).tolist() == [1.0, 0.5, 0.5, 0.0]
    assert cloud_shares(scores, 1.0, 1.5).tolist() == [1.0, 1.0, 1.0, 0.0]  # the floor keeps the last one home
    assert cloud_shares(scores, 0.25, None).sum() == pytest.approx(1.0)


def test_the_paired_comparison_measures_the_difference_and_its_noise() -> None:
    gain = [1.0, 1.0, 0.5, 0.0, -0.5, 0.0, 0.2, 0.8]
    log = records(gain)
    oracle = Fixed(gain)
    backwards = Fixed([-g for g in gain])
    result = compare(backwards, oracle, log, 0.5)["pgr"]
    total = sum(gain)
    assert result.challenger == pytest.approx((1.0 + 1.0 + 0.8 + 0.5) / total)
    assert result.champion == pytest.approx((-0.5 + 0.0 + 0.0 + 0.2) / total)
    assert result.difference == pytest.approx(result.challenger - result.champion)
    assert result.standard_error > 0 and result.n == 8
    same = compare(oracle, oracle, log, 0.5)["pgr"]
    assert same.difference == 0.0 and same.standard_error == 0.0


def test_a_worse_challenger_is_refused_and_a_better_one_promoted() -> None:
    rng = np.random.default_rng(0)
    gain = rng.normal(0.2, 0.5, 200)
    log = records(gain)
    good, bad = Fixed(gain), Fixed(-gain)
    config = LoopConfig()
    refused = judge(good, bad, log, 0.5, config, trained_on=10)
    assert not refused.promote and refused.reason.startswith("worse beyond noise")
    promoted = judge(bad, good, log, 0.5, config, trained_on=10)
    assert promoted.promote and promoted.reason.startswith("ahead on pgr")
    tied = judge(good, Fixed(gain), log, 0.5, config, trained_on=10)
    assert not tied.promote and tied.reason.startswith("not ahead")  # equal is not ahead
    demanding = judge(bad, good, log, 0.5, LoopConfig(min_gain=10.0), trained_on=10)
    assert not demanding.promote
    assert set(promoted.to_dict()["comparisons"]) == {"pgr", "apgr"}


def test_a_challenger_ahead_within_noise_is_not_promoted() -> None:
    rng = np.random.default_rng(1)
    gain = rng.normal(0.2, 0.5, 40)
    log = records(gain)
    champion = Fixed(rng.normal(size=40))  # a guess
    challenger = Fixed(gain + rng.normal(0.0, 2.0, 40))  # the truth, much blurred
    lenient = judge(champion, challenger, log, 0.5, LoopConfig(promote_z=0.0), trained_on=10)
    pgr = lenient.comparisons["pgr"]
    assert lenient.promote and 0 < pgr.difference < 2 * pgr.standard_error  # ahead, but within noise
    strict = judge(champion, challenger, log, 0.5, LoopConfig(), trained_on=10)
    assert not strict.promote and strict.reason.startswith("not ahead")
    assert f"needs more than {2 * pgr.standard_error:+.3f}" in strict.reason


def test_the_deployed_router_stays_unless_another_prior_is_ahead_beyond_noise() -> None:
    rng = np.random.default_rng(2)
    gain = rng.normal(0.2, 0.5, 30)
    log = records(gain)
    backwards, right = Fixed(-gain), Fixed(gain)
    best, values = choose_prior({"deployed": backwards, "right": right}, log, 0.5, LoopConfig())
    assert best == "right" and values["right"] > values["deployed"]
    blurred = Fixed(-gain + rng.normal(0.0, 3.0, 30))  # about as bad as a guess
    guess = Fixed(rng.normal(size=30))
    best, values = choose_prior({"deployed": blurred, "guess": guess}, log, 0.5, LoopConfig())
    assert best == "deployed"
    best, _ = choose_prior({"deployed": blurred, "guess": guess}, log, 0.5, LoopConfig(promote_z=0.0))
    assert best == max(values, key=lambda name: values[name])  # no margin: the point estimates decide


def test_the_shadow_rate_is_high_while_new_or_poor_and_falls_as_the_router_settles() -> None:
    rate = {"max_rate": 0.3, "min_rate": 0.02, "settle_labels": 1000}
    assert shadow_rate(0, **rate) == pytest.approx(0.3)
    assert shadow_rate(500, **rate) == pytest.approx(0.02 + 0.28 * 0.5)
    assert shadow_rate(2000, **rate) == pytest.approx(0.02)
    assert shadow_rate(2000, **rate, recent_error=0.9) == pytest.approx(0.02 + 0.28 * 0.9)  # poor: more labels
    assert shadow_rate(2000, **rate, recent_error=0.1) == pytest.approx(0.02 + 0.28 * 0.1)
    assert shadow_rate(0, max_rate=0.0, min_rate=0.0, settle_labels=10) == 0.0


def test_a_blend_saves_loads_and_scores_as_it_was_made(tmp_path: Path) -> None:
    log = records(np.linspace(-0.5, 0.5, 30))
    prior = create_router("longest-prompt-first")
    # A blend's parts are saved routers: the trained part is a registered learned router.
    learned = create_router("gap-regressor")
    named = [
        LogRecord(id=r.id, prompt=f"a prompt about {'many ' * (i % 7)}thing number {i}", edge=r.edge, cloud=r.cloud)
        for i, r in enumerate(log)
    ]
    learned.fit(named, seed=0)
    blend = BlendRouter.of(prior, learned, 0.25, named)
    blend.save(tmp_path / "blend")
    loaded = load_router("blend", tmp_path / "blend")
    prompts = [r.prompt for r in named]
    assert loaded.version == blend.version
    np.testing.assert_allclose(loaded.score(prompts), blend.score(prompts))
    only_prior = BlendRouter.of(prior, learned, 1.0, named).score(prompts)
    z = (prior.score(prompts) - prior.score(prompts).mean()) / prior.score(prompts).std()
    np.testing.assert_allclose(only_prior, z)
