"""The simulated deployment (router/simulation.py), its report, the priors (router/priors.py) and
``routet2i simulate``: on small synthetic logs, a one-member RouteT2I trained for a few epochs as the loop's router."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cli.main import main
from router.base import Router
from router.baselines import RandomRouter
from router.datasets import GENAI_BENCH_MODELS, genai_bench
from router.embeddings import SentenceEncoder
from router.learning import LoopConfig
from router.log import LogRecord, write_log
from router.priors import datasets_of, pooled_records
from router.simulation import Run, Simulation, SimulationConfig, simulate
from router.simulation_report import last_quarter_start, stretch_pgr, summarise, unit_gains
from router.types import QualityVector

SMALL = {"members": 1, "max_epochs": 5, "patience": 3, "threads": 1}
"""A RouteT2I that trains in a fraction of a second."""

WORDS = [
    "red",
    "fox",
    "river",
    "castle",
    "lantern",
    "violin",
    "garden",
    "dragon",
    "mountain",
    "robot",
    "teapot",
    "harbor",
    "forest",
    "candle",
    "wizard",
    "bicycle",
    "glacier",
    "owl",
    "market",
    "desert",
    "spaceship",
    "library",
    "painting",
    "sunset",
    "crown",
    "ladder",
    "whale",
    "tower",
    "bridge",
    "meadow",
    "clock",
    "mirror",
    "feather",
    "canyon",
    "island",
    "temple",
    "orchard",
]


def long_log(n: int, *, seed: int = 0, cost: dict[str, float] | None = None) -> list[LogRecord]:
    """``n`` prompts of 2 to 21 words; the cloud is better exactly on prompts longer than 11 words."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        words = int(rng.integers(2, 22))
        prompt = " ".join(rng.choice(WORDS, size=words))
        edge = 3.0 + float(rng.normal(0, 0.1))
        gain = 1.0 if words > 11 else -0.3
        records.append(
            LogRecord(
                id=f"p{i}",
                prompt=f"{prompt} {i}",
                edge=QualityVector({"q": edge}),
                cloud=QualityVector({"q": edge + gain}),
                extra={} if cost is None else {"cost": cost},
            )
        )
    return records


class ShortestFirst(Router):
    """The wrong rule for these logs: short prompts to the cloud first."""

    name = "shortest-first"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return -np.array([len(p.split()) for p in prompts], dtype=np.float64)


class LongestFirst(Router):
    """The right rule for these logs, uncalibrated."""

    name = "longest-first"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([len(p.split()) for p in prompts], dtype=np.float64)


def priors() -> dict[str, Router]:
    # "shipped" is wrong for this log and "rule" blind: only labels can make a loop route well.
    return {"shipped": ShortestFirst(), "rule": RandomRouter(seed=99), "pooled": LongestFirst()}


CONFIG = SimulationConfig(
    budget=0.5,
    seeds=2,
    window=60,
    retrain_every=15,
    min_prior_labels=10,
    shadow_rate=0.6,
    shadow_min_rate=0.2,
    settle_labels=60,
    loop=LoopConfig(min_holdout=10, min_train=20),
    router_settings=SMALL,
    prices={"edge": 0.01, "cloud": 0.1},
    curve_points=4,
    cv_folds=3,
    shadow_paid_from="window",
)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(backend="torch", threads=1)


@pytest.fixture(scope="module")
def log() -> list[LogRecord]:
    records = long_log(200)
    # A few lines carry their own prices, which the labels' cost must use.
    return [
        LogRecord(r.id, r.prompt, r.edge, r.cloud, extra={"cost": {"edge": 0.002, "cloud": 0.5}}) if i % 10 == 0 else r
        for i, r in enumerate(records)
    ]


@pytest.fixture(scope="module")
def sim(log: list[LogRecord], encoder: SentenceEncoder) -> Simulation:
    return simulate(log, priors(), CONFIG, encoder=encoder)


def test_every_policy_routes_within_the_budget(sim: Simulation) -> None:
    window, rho = sim.window, CONFIG.budget
    for policy, runs in sim.runs.items():
        for run in runs:
            assert np.array_equal(run.in_window, run.uses_cloud)  # labels paid from ρ take room in the window
            uses = run.uses_cloud.astype(int)
            for end in range(1, len(uses) + 1):  # every window of `window` decisions, and the first ones
                start = max(0, end - window)
                assert uses[start:end].sum() <= math.floor(rho * (end - start) + 1e-9), (policy, run.seed, end)
            assert run.uses_cloud.mean() >= rho - 0.1, (policy, run.seed)  # and the budget is spent


def test_labels_only_for_the_loops_and_their_cost_is_counted(sim: Simulation, log: list[LogRecord]) -> None:
    for policy, runs in sim.runs.items():
        for run in runs:
            if policy.startswith("loop"):
                assert run.shadow.sum() == run.labels[-1] > 20
                assert np.all(np.diff(run.labels) >= 0)
                expected = 0.0
                for position in np.flatnonzero(run.shadow):
                    cost = log[run.order[position]].extra.get("cost", {"edge": 0.01, "cloud": 0.1})
                    expected += cost["edge"] if run.cloud[position] else cost["cloud"]
                assert run.shadow_cost_usd == pytest.approx(expected)
                assert any(e["event"] == "judged" for e in run.events)
            else:
                assert run.labels[-1] == 0 and not run.shadow.any() and run.shadow_cost_usd == 0.0


def test_seed_zero_keeps_the_log_order_and_others_shuffle(sim: Simulation) -> None:
    first, second = sim.runs["frozen"]
    assert list(first.order) == list(range(len(sim.records)))
    assert sorted(second.order) == list(range(len(sim.records))) and list(second.order) != list(first.order)


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in ("wall_s", "train_s", "paired")}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_the_simulation_is_deterministic_per_seed(
    sim: Simulation, log: list[LogRecord], encoder: SentenceEncoder
) -> None:
    policies = ("random", "loop", "loop-warm", "cv-reference")
    again = simulate(log, priors(), CONFIG, encoder=encoder, policies=policies)
    for policy in policies:
        for a, b in zip(sim.runs[policy], again.runs[policy], strict=True):
            assert np.array_equal(a.cloud, b.cloud) and np.array_equal(a.shadow, b.shadow), policy
    first, second = summarise(sim)["policies"], summarise(again)["policies"]
    assert _without_timing({p: first[p] for p in policies}) == _without_timing(second)


def test_a_loop_learns_that_the_cloud_wins_on_long_prompts(sim: Simulation) -> None:
    doc = summarise(sim)["policies"]
    # its priors are wrong (shortest first) or blind (random): what it routes well it learnt from its labels
    assert all(run.promotions >= 1 for run in sim.runs["loop"])
    # (it keeps a wrong prior until labels prove another better beyond noise, so it learns late in this short log)
    assert doc["loop"]["pgr_last_quarter"] > doc["random"]["pgr_last_quarter"] + 0.15
    assert doc["loop"]["pgr_last_quarter"] > doc["frozen"]["pgr_last_quarter"] + 0.5
    assert doc["loop"]["paired"]["random"]["difference"] > 2 * doc["loop"]["paired"]["random"]["se"]
    curve = [point["pgr"] for point in doc["loop"]["pgr_curve"]]
    assert curve[-1] > curve[0] + 0.3
    # the right rule, among the priors of loop-pooled, is at least as good as any on the first labels
    for run in sim.runs["loop-pooled"]:
        values = run.events[0]["values"]
        assert values["pooled"] == max(values.values()) > values["shipped"]
    assert doc["cv-reference"]["pgr_last_quarter"] > doc["random"]["pgr_last_quarter"] + 0.3


@pytest.fixture(scope="module")
def beside(log: list[LogRecord], encoder: SentenceEncoder) -> Simulation:
    """The frozen artifact and the loop with labels paid beside ρ (the default)."""
    config = replace(CONFIG, shadow_paid_from=SimulationConfig().shadow_paid_from)
    assert config.shadow_paid_from == "allowance"
    return simulate(log, priors(), config, encoder=encoder, policies=("frozen", "loop"))


def _first_change(run: Run) -> int:
    """The position of the first label after which the loop routes with another router than it started with."""
    changes = [
        e["position"]
        for e in run.events
        if (e["event"] == "prior" and e["chosen"] != "shipped") or (e["event"] == "judged" and e["promote"])
    ]
    return min(changes, default=len(run.order) - 1)


def test_labels_paid_beside_rho_take_no_room_in_the_window(sim: Simulation, beside: Simulation) -> None:
    window, rho = beside.window, CONFIG.budget
    for policy, runs in beside.runs.items():
        for run in runs:
            assert np.array_equal(run.in_window, run.cloud), policy  # only the delivered cloud images count
            for end in range(1, len(run.cloud) + 1):
                start = max(0, end - window)
                assert run.cloud[start:end].sum() <= math.floor(rho * (end - start) + 1e-9), (policy, run.seed, end)
            assert run.cloud.mean() >= rho - 0.1, (policy, run.seed)  # the budget goes to routed images
    frozen, loops = beside.runs["frozen"], beside.runs["loop"]
    assert all(run.labels[-1] > 20 and run.promotions >= 1 for run in loops)
    # Until its router changes the loop routes every prompt as the frozen artifact does: its labels cost the
    # routed traffic nothing. Paid from ρ, they take places in the window from the first one.
    for run, still, paid_from_rho in zip(loops, frozen, sim.runs["loop"], strict=True):
        until = _first_change(run) + 1
        assert np.array_equal(run.cloud[:until], still.cloud[:until]), run.seed
        assert run.uses_cloud[:until].sum() > still.cloud[:until].sum()  # cloud images beyond ρ: the labels'
        assert not np.array_equal(paid_from_rho.cloud, sim.runs["frozen"][run.seed].cloud)
    doc = summarise(beside)
    assert doc["settings"]["shadow_paid_from"] == "allowance"
    loop = doc["policies"]["loop"]
    assert loop["highest_window_share"] <= rho and loop["cloud_use_share"] > loop["cloud_share"]


def test_stretch_pgr_is_the_share_of_the_gain_recovered() -> None:
    records = long_log(40, seed=3)
    gains = np.array([r.cloud["q"] - r.edge["q"] for r in records])
    unit = unit_gains(records)
    everything = np.arange(40)
    assert stretch_pgr(unit, everything, np.ones(40, dtype=bool)) == pytest.approx(1.0)
    assert stretch_pgr(unit, everything, np.zeros(40, dtype=bool)) == pytest.approx(0.0)
    winners = gains > 0
    assert stretch_pgr(unit, everything, winners) == pytest.approx(gains[winners].sum() / gains.sum())
    # a stretch is measured against the log's mean gain per prompt
    stretch = np.arange(30, 40)
    expected = gains[stretch][winners[stretch]].sum() / (10 * gains.mean())
    assert stretch_pgr(unit, stretch, winners[stretch]) == pytest.approx(expected)
    assert last_quarter_start(40) == 30 and last_quarter_start(527) == 395


def test_a_simulation_refuses_what_it_cannot_run(log: list[LogRecord]) -> None:
    with pytest.raises(ValueError, match="pooled"):
        simulate(log, {"shipped": ShortestFirst(), "rule": RandomRouter()}, CONFIG, policies=["loop-pooled"])
    with pytest.raises(ValueError, match="policies"):
        simulate(log, priors(), CONFIG, policies=["nope"])
    with pytest.raises(ValueError, match="swap"):
        SimulationConfig(swap="drop")
    with pytest.raises(ValueError, match="shadow"):
        SimulationConfig(shadow_rate=0.1, shadow_min_rate=0.2)
    with pytest.raises(ValueError, match="shadow_paid_from"):
        SimulationConfig(shadow_paid_from="ledger")  # type: ignore[arg-type]


# --- priors -----------------------------------------------------------------------------------------------


def test_pooled_records_leave_out_a_data_set_and_put_the_weaker_model_on_the_edge() -> None:
    only_genai = pooled_records(exclude={"agiqa-3k"})
    assert datasets_of(only_genai) == {"genai-bench"}
    assert len(only_genai) == 2 * 527 and len({r.prompt for r in only_genai}) == 527
    assert {r.metrics for r in only_genai} == {("alignment",)}
    mean = {m: np.mean([r.edge["alignment"] for r in genai_bench(m, "DALLE_3" if m != "DALLE_3" else "SDXL_Turbo")])
            for m in GENAI_BENCH_MODELS}  # fmt: skip
    for record in only_genai:
        assert mean[record.extra["edge_model"]] < mean[record.extra["cloud_model"]], record.id
    only_agiqa = pooled_records(exclude={"genai-bench"})
    assert datasets_of(only_agiqa) == {"agiqa-3k"} and len(only_agiqa) == 2 * 300
    both = pooled_records()
    assert datasets_of(both) == {"genai-bench", "agiqa-3k"} and len(both) == len(only_genai) + len(only_agiqa)
    assert [r.id for r in pooled_records(seed=1)] != [r.id for r in both]
    assert [r.id for r in pooled_records()] == [r.id for r in both]
    with pytest.raises(ValueError, match="nothing to pool"):
        pooled_records(exclude={"genai-bench", "agiqa-3k"})
    with pytest.raises(ValueError, match="unknown data set"):
        pooled_records(exclude={"parti"})


# --- the command --------------------------------------------------------------------------------------------


@pytest.fixture()
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ROUTET2I_ENCODER_BACKEND", "torch")  # no ONNX export in a fresh cache directory
    return CliRunner()


def test_the_command_prints_the_json_the_issue_asks_for(runner: CliRunner, tmp_path: Path) -> None:
    log_file = tmp_path / "log.jsonl"
    write_log(log_file, long_log(120))
    plot = tmp_path / "curves.png"
    args = ["simulate", "--log", str(log_file), "--policies", "frozen,random,rule,loop", "--seeds", "2",
            "--retrain-every", "10", "--prior-labels", "10", "--shadow-rate", "0.5", "--window", "50",
            "--shadow-paid-from", "allowance",
            "--set", "members=1", "--set", "max_epochs=5", "--set", "threads=1", "--json", "--plot", str(plot)]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc["policies"]) == ["frozen", "random", "rule", "loop"]
    for policy in doc["policies"].values():
        assert {"pgr_last_quarter", "pgr_curve", "labels", "shadow_cost_usd", "promotions"} <= set(policy)
        assert len(policy["pgr_curve"]) == 8
    assert doc["labels"] == doc["policies"]["loop"]["labels"] > 0
    assert doc["shadow_cost_usd"] == doc["policies"]["loop"]["shadow_cost_usd"] > 0
    assert doc["policies"]["frozen"]["labels"] == 0
    assert doc["settings"]["shadow_paid_from"] == "allowance"
    assert doc["policies"]["loop"]["highest_window_share"] <= doc["budget"]
    assert set(doc["policies"]["loop"]["paired"]) == {"frozen", "random"}
    assert set(doc["policies"]["frozen"]["paired"]) == {"random", "loop"}
    assert doc["all_cloud"]["pgr_last_quarter"] > 0 and len(doc["all_cloud"]["pgr_curve"]) == 8
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--budget", "1.5"], "'--budget'"),
        (["--policies", "frozen,nope"], "'--policies'"),
        (["--seeds", "0"], "'--seeds'"),
        (["--set", "nonsense=1"], "'--set'"),
        (["--router", "random"], "'--router'"),
        (["--shadow-rate", "0.1", "--shadow-min-rate", "0.2"], "'--shadow-min-rate'"),
        (["--shadow-paid-from", "ledger"], "'--shadow-paid-from'"),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_it(
    runner: CliRunner, tmp_path: Path, args: list[str], named: str
) -> None:
    log_file = tmp_path / "log.jsonl"
    write_log(log_file, long_log(20))
    result = runner.invoke(main, ["simulate", "--log", str(log_file), *args])
    assert result.exit_code == 2, result.output
    assert named in result.output


def test_carried_data_needs_both_models(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["simulate", "--data", "genai-bench", "--edge", "SDXL_Turbo"])
    assert result.exit_code == 2 and "'--cloud'" in result.output
    result = runner.invoke(main, ["simulate", "--data", "genai-bench", "--edge", "SDXL_Turbo", "--cloud", "GPT"])
    assert result.exit_code == 2 and "'--cloud'" in result.output and "unknown cloud model" in result.output
    result = runner.invoke(main, ["simulate"])
    assert result.exit_code == 2 and "--log" in result.output
