"""Cross-validation harness, splits and fixed baselines on small hand-made logs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pytest

from router.base import Router, RouterError, available_routers, create_router
from router.baselines import OracleRouter, RandomRouter
from router.evaluation import evaluate
from router.log import LogRecord
from router.nouns import count_nouns, nouns
from router.pgr import FRACTIONS
from router.splits import prompt_key, split_folds
from router.types import QualityVector


def record(i: int, prompt: str, edge: float, cloud: float, **extra: object) -> LogRecord:
    return LogRecord(
        id=f"p{i}", prompt=prompt, edge=QualityVector({"q": edge}), cloud=QualityVector({"q": cloud}), extra=extra
    )


def hand_log(n: int = 40) -> list[LogRecord]:
    """Prompt i has i words; the cloud gains exactly on the longer half, so longest-first is perfect."""
    return [record(i, " ".join(["word"] * (i + 1)) + f" {i}", 1.0, 2.0 if i >= n // 2 else 1.0) for i in range(n)]


# --- splits ---------------------------------------------------------------------------------------------


def test_folds_never_split_a_prompt_even_when_it_repeats() -> None:
    prompts = [f"prompt {i % 13}" for i in range(60)] + ["A  Cat", "a cat", " a CAT "]
    for seed in range(5):
        folds = split_folds(prompts, 4, seed)
        by_key: dict[str, set[int]] = {}
        for prompt, fold in zip(prompts, folds, strict=True):
            by_key.setdefault(prompt_key(prompt), set()).add(int(fold))
        assert all(len(f) == 1 for f in by_key.values())
        assert set(folds.tolist()) == {0, 1, 2, 3}


def test_folds_are_balanced_reproducible_and_seed_dependent() -> None:
    prompts = [f"prompt {i}" for i in range(103)]
    a = split_folds(prompts, 5, seed=1)
    assert np.bincount(a).tolist() in ([21, 21, 21, 20, 20], sorted([21, 21, 21, 20, 20], reverse=True))
    assert (split_folds(prompts, 5, seed=1) == a).all()
    assert not (split_folds(prompts, 5, seed=2) == a).all()


def test_fold_count_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        split_folds(["a", "b"], 1, 0)
    with pytest.raises(ValueError, match="distinct prompts"):
        split_folds(["a", "A", "b"], 3, 0)


# --- fixed baselines ------------------------------------------------------------------------------------


def test_registry_has_every_baseline() -> None:
    expected = {
        "random",
        "all-edge",
        "all-cloud",
        "longest-prompt-first",
        "noun-count",
        "cloud-win-classifier",
        "gap-regressor",
        "knn",
        "oracle",
    }
    assert expected <= set(available_routers())
    for name in expected:
        assert create_router(name).name == name


def test_random_router_is_a_fixed_function_of_seed_and_prompt() -> None:
    prompts = [f"p{i}" for i in range(50)]
    a = RandomRouter().fit([], seed=4).score(prompts)
    assert (RandomRouter().fit([], seed=4).score(prompts[::-1])[::-1] == a).all()  # order does not matter
    assert not (RandomRouter().fit([], seed=5).score(prompts) == a).all()
    assert ((a >= 0) & (a < 1)).all()


def test_oracle_reads_labels_and_refuses_bare_prompts() -> None:
    log = [record(0, "a", 1.0, 3.0), record(1, "b", 2.0, 1.0), record(2, "c", 0.0, 1.0)]
    # Gains 2, -1, 1 over a total of 2: weights 1/2.
    assert OracleRouter().score_records(log).tolist() == [1.0, -0.5, 0.5]
    with pytest.raises(RouterError, match="bare prompts"):
        OracleRouter().score(["a"])


def test_noun_count_on_hand_tagged_prompts() -> None:
    assert nouns("a red car parked next to a brick wall") == ["car", "brick", "wall"]
    assert nouns("a man walks his dog in the park") == ["man", "dog", "park"]
    assert nouns("they dance under three lanterns") == ["lanterns"]
    assert nouns("an oil painting of a running horse") == ["oil", "horse"]
    assert count_nouns("Pikachu eating a pizza") == 2  # out-of-lexicon names count
    assert count_nouns("a beautiful, majestic and colorful") == 0


# --- the harness ----------------------------------------------------------------------------------------

FIXED = ["random", "all-edge", "all-cloud", "longest-prompt-first", "oracle"]


def test_known_numbers_on_a_hand_made_log() -> None:
    log = hand_log()
    report = evaluate(log, FIXED, folds=4, seeds=2)
    s = report.routers
    for f in FRACTIONS:
        key = f"pgr@{round(f, 4)}"
        assert s["all-edge"].mean[key] == 0.0
        assert s["all-cloud"].mean[key] == pytest.approx(1.0)
        assert s["oracle"].mean[key] >= s["longest-prompt-first"].mean[key] - 1e-12
        assert s["oracle"].mean[key] >= s["random"].mean[key]
    # Longest-first is perfect here: in each fold the gaining prompts are exactly the longer ones, so at budget
    # f it recovers min(f·n_test / gainers in the fold, 1), the oracle's value.
    assert s["longest-prompt-first"].mean["apgr"] == pytest.approx(s["oracle"].mean["apgr"])
    for run in s["longest-prompt-first"].runs:
        folds = split_folds([r.prompt for r in log], 4, run.seed)
        gainers = sum(1 for r, f in zip(log, folds, strict=True) if f == run.fold and r.cloud["q"] > r.edge["q"])
        for f in FRACTIONS:
            assert run.values[f"pgr@{round(f, 4)}"] == pytest.approx(min(f * run.n_test / gainers, 1.0))
    assert s["all-edge"].mean["apgr"] == 0.0 and s["all-cloud"].mean["apgr"] == 1.0
    assert np.isnan(s["all-edge"].mean["cpt_50"]) and s["all-edge"].reached["cpt_50"] == 0.0
    assert s["all-cloud"].mean["cpt_50"] == 1.0


def test_random_router_expected_pgr_is_the_budget() -> None:
    log = [record(i, f"prompt {i}", 0.0, float(i % 7)) for i in range(70)]
    report = evaluate(log, ["random"], folds=2, seeds=range(60))
    for f in FRACTIONS:
        assert report.routers["random"].mean[f"pgr@{round(f, 4)}"] == pytest.approx(f, abs=0.05)
    assert report.routers["random"].mean["apgr"] == pytest.approx(0.5, abs=0.03)


def test_fixed_seeds_give_identical_numbers() -> None:
    log = hand_log(30)
    first = evaluate(log, FIXED, folds=3, seeds=2).to_dict()
    second = evaluate(log, FIXED, folds=3, seeds=2).to_dict()
    assert json.dumps(first["routers"], sort_keys=True) == json.dumps(second["routers"], sort_keys=True)
    third = evaluate(log, FIXED, folds=3, seeds=[5, 6]).to_dict()
    assert third["routers"]["random"]["pgr"] != first["routers"]["random"]["pgr"]


class SpyRouter(Router):
    """Records what it was fitted on and asked to score; scores by prompt length."""

    name = "spy"
    learned = True
    calls: ClassVar[list[tuple[str, frozenset[str], frozenset[str]]]] = []

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.trained: frozenset[str] = frozenset()

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> SpyRouter:
        self.trained = frozenset(r.prompt for r in records)
        return self

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        SpyRouter.calls.append((self.tag, self.trained, frozenset(prompts)))
        return np.array([len(p) for p in prompts], dtype=float)


def test_routers_are_never_scored_on_their_training_prompts_and_share_test_folds() -> None:
    log = [*hand_log(24), record(100, "word 3", 1.0, 1.5), record(101, "WORD   3", 1.0, 1.5)]
    SpyRouter.calls = []
    evaluate(log, {"a": lambda: SpyRouter("a"), "b": lambda: SpyRouter("b")}, folds=4, seeds=3)
    a_runs = [c for c in SpyRouter.calls if c[0] == "a"]
    b_runs = [c for c in SpyRouter.calls if c[0] == "b"]
    assert len(a_runs) == len(b_runs) == 12
    keys = lambda prompts: {prompt_key(p) for p in prompts}  # noqa: E731
    for (_, trained, tested), (_, _, tested_b) in zip(a_runs, b_runs, strict=True):
        assert not keys(trained) & keys(tested)  # no prompt text (up to case and spaces) on both sides
        assert tested == tested_b  # both routers scored on the same test fold
        assert trained | tested == {r.prompt for r in log}
    for seed in range(3):
        tested = [c[2] for c in a_runs[seed * 4 : seed * 4 + 4]]
        assert frozenset().union(*tested) == {r.prompt for r in log}  # each seed tests every prompt once


def test_json_document_shape() -> None:
    log = [
        LogRecord(
            f"p{i}",
            f"prompt number {i}",
            QualityVector({"quality": i % 3, "alignment": 1.0}),
            QualityVector({"quality": 1.0, "alignment": 1.0 + i % 2}),
        )
        for i in range(20)
    ]
    doc = evaluate(log, ["random", "oracle"], folds=2, seeds=2).to_dict()
    json.dumps(doc, allow_nan=False)  # plain JSON: NaN is written as null
    router = doc["routers"]["oracle"]
    assert set(router["pgr"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"}
    for key in ("cpt_50", "cpt_80", "apgr", "apgr_std", "pgr_std", "pareto_no_worse", "metrics", "runs", "curve"):
        assert key in router
    assert set(router["metrics"]) == {"quality", "alignment"}
    assert set(router["metrics"]["quality"]["quality"]) == {"0.0", *router["pgr"], "1.0"}
    assert len(router["runs"]) == 4
    assert doc["protocol"]["folds"] == 2 and doc["protocol"]["seeds"] == [0, 1]
    assert doc["log"] == {"records": 20, "prompts": 20, "metrics": ["quality", "alignment"]}
    agg = router["pgr"]["0.5"]
    per_metric = [router["metrics"][m]["pgr"]["0.5"] for m in ("quality", "alignment")]
    assert agg == pytest.approx(np.mean(per_metric), abs=1e-5)


def test_a_router_is_compared_with_the_best_baseline_of_each_value_paired_over_runs() -> None:
    """The comparison takes, per value, the baseline with the best mean (never a bound such as the oracle, nor
    the router's own variants), and pairs the runs fold by fold."""
    log = hand_log()
    routers = {
        "routet2i": lambda: create_router("random", seed=3),
        "routet2i-variant": lambda: create_router("longest-prompt-first"),  # perfect here, but a variant
        "oracle": lambda: create_router("oracle"),
        "random": lambda: create_router("random", seed=0),
        "noun-count": lambda: create_router("noun-count"),
    }
    report = evaluate(log, routers, folds=4, seeds=2)
    found = report.compare("routet2i")
    assert [c.key for c in found] == ["apgr", "pgr@0.3", "pgr@0.5"]
    for c in found:
        baselines = ("random", "noun-count")
        assert c.best == max(baselines, key=lambda n: report.routers[n].mean[c.key])
        ours = [r.values[c.key] for r in report.routers["routet2i"].runs]
        theirs = [r.values[c.key] for r in report.routers[c.best].runs]
        differences = np.subtract(ours, theirs)
        assert c.difference == pytest.approx(differences.mean())
        assert c.se == pytest.approx(differences.std(ddof=1) / np.sqrt(8))
        assert c.ahead == int((differences >= 0).sum()) and c.runs == 8
        assert c.mean - c.best_mean == pytest.approx(c.difference)
    assert report.compare("no-such-router") == []
    alone = evaluate(log, {"routet2i": routers["routet2i"], "oracle": routers["oracle"]}, folds=4, seeds=1)
    assert alone.compare("routet2i") == []  # a bound is no baseline

    text = report.table(markdown=True)
    assert "routet2i against the best baseline" in text
    level = sum(c.mean >= c.best_mean for c in found)
    assert f"at least the baseline's on {level} of 3" in text
    doc = report.to_dict()
    json.dumps(doc, allow_nan=False)
    assert [entry["best_baseline"] for entry in doc["comparison"]["routet2i"]] == [c.best for c in found]
    assert alone.to_dict()["comparison"] == {}


def test_unknown_router_fails_before_any_work() -> None:
    with pytest.raises(RouterError, match="unknown router 'nope'"):
        evaluate(hand_log(), ["random", "nope"], folds=2, seeds=1)
