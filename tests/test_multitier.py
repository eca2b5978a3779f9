"""K-tier routers and their evaluation: utilities, a RouteT2I round trip, curves known by hand, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from router.base import RouterError
from router.embeddings import SentenceEncoder
from router.multitier import (
    create_tier_router,
    load_tier_router,
    prs_utilities,
    quality_utilities,
    tier_scales,
)
from router.tierdata import genai_bench_tiers
from router.tiereval import (
    BUDGETS,
    evaluate_tiers,
    measure_run,
    mixture_policy,
    single_tier_policy,
    upper_hull,
    utility_policy,
)
from router.tierlog import TierRecord, tier_log, write_tier_log
from router.tierresults import TierReport
from router.tiers import choose, multiplier_for_budget
from router.types import QualityVector

SMALL = {"members": 2, "max_epochs": 15, "patience": 4, "threads": 1}


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def test_utilities_are_the_prs_over_the_cheapest_tier_minus_one_half() -> None:
    # One prompt, three tiers, two metrics with scales 1 and 2, equal weights, temperature 1.
    q = np.array([[[3.0, 4.0], [3.5, 4.0], [2.0, 6.0]]])
    u = prs_utilities(q, np.array([1.0, 2.0]), np.array([0.5, 0.5]), 1.0)
    sigma = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert u[0, 0] == 0.0
    assert u[0, 1] == pytest.approx(0.5 * sigma(0.5) + 0.5 * 0.5 - 0.5)
    assert u[0, 2] == pytest.approx(0.5 * sigma(-1.0) + 0.5 * sigma(1.0) - 0.5)
    assert quality_utilities(q, np.array([1.0, 2.0]), np.array([0.5, 0.5])).tolist() == [[0.0, 0.25, 0.0]]
    # The scale of a metric pools every dearer tier's gain over the cheapest: mean gains 0.5 here.
    assert tier_scales(np.array([[[0.0], [1.0], [0.0]], [[0.0], [0.0], [1.0]]])).tolist() == [0.5]


def test_k_tier_routet2i_fits_predicts_saves_and_loads(tmp_path: Path, encoder: SentenceEncoder) -> None:
    records = genai_bench_tiers(["DALLE_3", "SDXL_Turbo", "Midjourney_6"])[:80]
    router = create_tier_router("routet2i", encoder=encoder, **SMALL).fit(records[:60], seed=1)
    assert router.tiers == ("SDXL_Turbo", "Midjourney_6", "DALLE_3") and router.metrics == ("alignment",)
    prompts = [r.prompt for r in records[60:]]
    qualities, utilities = router.qualities(prompts), router.utilities(prompts)
    assert qualities.shape == (20, 3, 1) and utilities.shape == (20, 3)
    assert np.all(utilities[:, 0] == 0) and np.all(np.abs(utilities) < 0.5)
    assert 2.0 < qualities.mean() < 4.5  # on the ratings' 1-5 scale
    assert router.calibration.shape == (60, 3)
    prices = [0.0002, 0.05, 0.08]
    lam = router.calibrated_multiplier(prices, 0.03)
    assert lam is not None and lam > 0
    router.save(tmp_path / "k")
    loaded = load_tier_router("routet2i", tmp_path / "k", encoder=encoder)
    assert loaded.version == router.version and loaded.version.startswith("routet2i:")
    assert loaded.tiers == router.tiers and np.array_equal(loaded.utilities(prompts), utilities)
    spend = multiplier_for_budget(utilities, prices, 0.03)
    assert np.array(prices)[choose(utilities, prices, spend)].mean() <= 0.03
    with pytest.raises(RouterError, match="not K-tier 'ridge'"):
        load_tier_router("ridge", tmp_path / "k", encoder=encoder)
    with pytest.raises(ValueError, match="auxiliary"):
        create_tier_router("routet2i", encoder=encoder, auxiliary=True)
    (tmp_path / "k" / "arrays.npz").write_bytes(b"broken")
    with pytest.raises(RouterError, match="corrupt"):
        load_tier_router("routet2i", tmp_path / "k", encoder=encoder)


@pytest.mark.parametrize("name", ["ridge", "knn"])
def test_the_regressors_learn_which_tier_wins(name: str, encoder: SentenceEncoder) -> None:
    # The dear tier wins by 2 on prompts about text on signs and loses by 1 elsewhere.
    records = []
    for i in range(60):
        sign = i % 2 == 0
        prompt = f'a shop sign that says "sale {i}"' if sign else f"a quiet lake number {i} at dawn"
        quality = {"cheap": {"q": 3.0}, "dear": {"q": 5.0 if sign else 2.0}}
        records.append(TierRecord.from_dict({"id": str(i), "prompt": prompt, "quality": quality,
                                             "cost": {"cheap": 0.01, "dear": 0.05}}))  # fmt: skip
    router = create_tier_router(name, encoder=encoder).fit(records[:50], seed=0)
    utilities = router.utilities([r.prompt for r in records[50:]])
    signs = np.array([i % 2 == 0 for i in range(50, 60)])
    assert np.all(utilities[signs, 1] > 0.1) and np.all(utilities[~signs, 1] < -0.1)


# --- the evaluation: a curve known by hand -----------------------------------------------------------------

PRICES = np.array([0.0, 1.0, 2.0])
TRUTH = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 3.0]])
"""Prompt A gains 1 on the middle tier and no more on the dearest; prompt B gains only on the dearest (3)."""


def test_the_oracle_curve_aqc_and_cost_to_best_match_the_hand_computation() -> None:
    # By hand: λ > 1.5 keeps both on tier 0; 1 ≤ λ < 1.5 sends B to tier 2 (cost 1, quality 1.5); λ < 1 also A to
    # tier 1 (cost 1.5, quality 2). Between, the leftover share mixes: quality 1.5·b on [0, 1], 1.5 + (b − 1) on
    # [1, 1.5], 2 beyond. The best single tier (mean 2) is 1: normalised 0.75·b, 0.75 + 0.5·(b − 1), then 1.
    budgets = np.linspace(0.0, 2.0, BUDGETS)
    run = measure_run("oracle", 0, 0, utility_policy(TRUTH, PRICES, TRUTH), budgets, TRUTH, (2, 2.0))
    expected = np.where(budgets <= 1, 0.75 * budgets, np.minimum(0.75 + 0.5 * (budgets - 1), 1.0))
    assert run.quality == pytest.approx(expected)
    assert run.cost == pytest.approx(np.minimum(budgets, 1.5))
    assert run.aqc == pytest.approx((0.375 + 0.4375 + 0.5) / 2)  # the integral over [0, 2], over 2
    assert run.cost_to_best == pytest.approx(1.5 / 2)
    # At $1 prompt B is on tier 2; at $1.25 half of the way to also sending A to tier 1.
    assert run.shares[50] == pytest.approx([0.5, 0.0, 0.5]) and run.shares[62] == pytest.approx([0.26, 0.24, 0.5])
    best = measure_run("tier:2", 0, 0, single_tier_policy(2, PRICES, TRUTH), budgets, TRUTH, (2, 2.0))
    assert best.cost_to_best == 1.0 and best.quality[-1] == 1.0 and best.quality[-2] == 0.0
    # Tier 1 lies under the chord from tier 0 to tier 2: the best blind mixture skips it, quality b/2.
    assert upper_hull(PRICES, TRUTH.mean(axis=0)) == [0, 2]
    mixture = measure_run("mix", 0, 0, mixture_policy([0, 2], PRICES, TRUTH), budgets, TRUTH, (2, 2.0))
    assert mixture.quality == pytest.approx(budgets / 2) and mixture.aqc == pytest.approx(0.5)
    assert mixture.cost_to_best == pytest.approx(1.0)


def test_the_upper_hull_keeps_only_tiers_worth_mixing() -> None:
    assert upper_hull(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 2.0, 3.0, 3.5])) == [0, 1, 2, 3]
    assert upper_hull(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 2.0, 1.0, 3.5])) == [0, 1, 3]
    assert upper_hull(np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0])) == [0, 2]


def _hand_log(n: int) -> list[TierRecord]:
    """Prompt i gains on the middle tier when i is even, on the dearest when i is odd."""
    records = []
    for i in range(n):
        q = [0.0, 1.0, 1.0] if i % 2 == 0 else [0.0, 0.0, 3.0]
        records.append(
            TierRecord(
                id=str(i),
                prompt=f"prompt number {i} of a small test log about {'boats' if i % 2 else 'trees'}",
                quality={t: QualityVector({"q": v}, "t") for t, v in zip(("a", "b", "c"), q, strict=True)},
                cost={"a": 0.0, "b": 1.0, "c": 2.0},
            )
        )
    return records


def test_evaluate_tiers_reports_every_row_and_the_paired_differences() -> None:
    log = tier_log(_hand_log(20))
    report = evaluate_tiers(log, ["random-mixture", "oracle"], folds=2, seeds=2)
    assert isinstance(report, TierReport)
    doc = report.to_dict()
    assert list(doc["routers"]) == ["tier:a", "tier:b", "tier:c", "random-mixture", "oracle"]
    assert doc["log"]["best_tier"] == "c" and doc["protocol"] == {"folds": 2, "seeds": [0, 1], "budgets": BUDGETS}
    # Every fold holds the two kinds of prompt, so the oracle's curve is the hand-computed one in every run.
    oracle = doc["routers"]["oracle"]
    assert oracle["aqc"] == pytest.approx(0.65625, abs=0.02) and len(oracle["runs"]) == 4
    assert doc["routers"]["tier:a"]["aqc"] == 0.0 and doc["routers"]["tier:a"]["cost_to_best"] is None
    assert doc["routers"]["tier:c"]["cost_to_best"] == 1.0
    assert doc["routers"]["tier:b"]["shares_at_mid_budget"] == {"a": 0.0, "b": 1.0, "c": 0.0}  # the mid budget is $1
    with pytest.raises(ValueError, match="unknown routers"):
        evaluate_tiers(log, ["nope"], folds=2, seeds=1)


def test_cli_eval_on_a_k_tier_log_prints_json_and_a_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "k.jsonl"
    write_tier_log(path, _hand_log(24))
    plot = tmp_path / "curves.png"
    args = ["eval", "--log", str(path), "--routers", "random-mixture,oracle", "--folds", "2", "--seeds", "1"]
    result = CliRunner().invoke(main, [*args, "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc["routers"]) == {"tier:a", "tier:b", "tier:c", "random-mixture", "oracle"}
    assert doc["comparison"] == {"routet2i": []}  # no K-tier RouteT2I row asked for
    assert doc["routers"]["oracle"]["aqc"] > doc["routers"]["random-mixture"]["aqc"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = CliRunner().invoke(main, [*args[:3], "--routers", "oracle", "--folds", "2", "--seeds", "1"])
    assert table.exit_code == 0 and "tier:c" in table.output and "best single tier c" in table.output
    bad = CliRunner().invoke(main, [*args[:3], "--routers", "gap-regressor"])
    assert bad.exit_code == 2 and "'--routers'" in bad.output
    unpriced = tmp_path / "unpriced.jsonl"
    lines = [{k: v for k, v in r.to_dict().items() if k != "cost"} for r in _hand_log(4)]
    unpriced.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(main, ["eval", "--log", str(unpriced), "--routers", "oracle", "--folds", "2"])
    assert result.exit_code == 2 and "'cost'" in result.output
