"""``routet2i eval``, ``routet2i replay`` and ``routet2i data import`` through the real click entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from router.log import read_log


@pytest.fixture()
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    return CliRunner()


def write_lines(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def line(i: int, prompt: str, edge: float, cloud: float, **extra: object) -> dict:
    return {"id": f"p{i}", "prompt": prompt, "quality": {"edge": {"q": edge}, "cloud": {"q": cloud}}, **extra}


@pytest.fixture()
def small_log(tmp_path: Path) -> Path:
    # Prompt i is i words long; the cloud gains 1 on the four longest prompts only.
    return write_lines(
        tmp_path / "log.jsonl", [line(i, " ".join(["w"] * (i + 1)), 1.0, 2.0 if i >= 4 else 1.0) for i in range(8)]
    )


def test_eval_prints_a_table_and_writes_a_plot(runner: CliRunner, small_log: Path, tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    result = runner.invoke(
        main,
        ["eval", "--log", str(small_log), "--routers", "all-edge,longest-prompt-first,oracle", "--folds", "2",
         "--seeds", "2", "--plot", str(plot)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {r.split()[0]: r.split() for r in result.output.splitlines() if r and r.split()[0] in ("all-edge", "oracle")}
    assert rows["all-edge"][1] == "0.000±0.000"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_json_has_every_router_and_fraction(runner: CliRunner, small_log: Path) -> None:
    args = ["eval", "--log", str(small_log), "--routers", "random,all-cloud,oracle", "--folds", "2", "--seeds", "3"]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert list(doc["routers"]) == ["random", "all-cloud", "oracle"]
    assert doc["routers"]["all-cloud"]["pgr"]["0.5"] == pytest.approx(1.0)
    # longest prompts gain; the oracle recovers everything once the budget covers the gainers of its fold
    assert doc["routers"]["oracle"]["apgr"] > doc["routers"]["random"]["apgr"]
    again = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert again["routers"] == doc["routers"]


def test_eval_errors_name_the_argument(runner: CliRunner, small_log: Path, tmp_path: Path) -> None:
    bad = write_lines(tmp_path / "bad.jsonl", [line(0, "a", 1, 2), "{not json", line(2, "b", 1, 2)])
    result = runner.invoke(main, ["eval", "--log", str(bad)])
    assert result.exit_code == 2
    assert "'--log'" in result.output and "bad.jsonl:2" in result.output

    missing = write_lines(tmp_path / "missing.jsonl", [{"id": "x", "prompt": "a", "quality": {"edge": {"q": 1}}}])
    result = runner.invoke(main, ["eval", "--log", str(missing)])
    assert result.exit_code == 2 and "missing.jsonl:1" in result.output and "'edge' and 'cloud'" in result.output

    result = runner.invoke(main, ["eval", "--log", str(small_log), "--routers", "random,nope"])
    assert result.exit_code == 2 and "'--routers'" in result.output and "unknown router 'nope'" in result.output

    result = runner.invoke(main, ["eval", "--log", str(small_log), "--folds", "9"])
    assert result.exit_code == 2 and "'--folds'" in result.output

    result = runner.invoke(main, ["eval"])
    assert result.exit_code == 2 and "--log FILE or --suite NAME" in result.output


def test_replay_decisions_quality_and_cost(runner: CliRunner, tmp_path: Path) -> None:
    log = write_lines(
        tmp_path / "log.jsonl",
        [
            line(0, "a b c d", 1.0, 3.0, cost={"edge": 0.01, "cloud": 0.1}),
            line(1, "a", 2.0, 1.0, cost={"edge": 0.01, "cloud": 0.1}),
            line(2, "a b c", 1.0, 1.0, cost={"edge": 0.01, "cloud": 0.1}),
            line(3, "a b", 1.0, 2.0, cost={"edge": 0.01, "cloud": 0.1}),
        ],
    )
    result = runner.invoke(
        main, ["replay", "--log", str(log), "--router", "longest-prompt-first", "--budget", "0.5", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    # floor(0.5 * 4) = 2 prompts: the two longest (p0, p2).
    assert [(d["id"], d["tier"]) for d in doc["decisions"]] == [
        ("p0", "cloud"), ("p1", "edge"), ("p2", "cloud"), ("p3", "edge"),
    ]  # fmt: skip
    assert doc["decisions"][0]["score"] == 7.0
    # routed quality (3 + 2 + 1 + 1) / 4; gain recovered 2 of the total 2 - 1 + 0 + 1 = 2.
    assert doc["quality"]["routed"]["q"] == pytest.approx(1.75)
    assert doc["pgr"]["q"] == pytest.approx(1.0)
    assert doc["cost_usd"] == pytest.approx({"routed": 0.22, "edge_only": 0.04, "cloud_only": 0.4})
    assert doc["pareto_no_worse"] == pytest.approx(0.75)  # p3 on the edge is worse than its cloud image

    text = runner.invoke(main, ["replay", "--log", str(log), "--router", "oracle", "--budget", "0.25"])
    assert text.exit_code == 0, text.output
    assert "1 of 4 prompts to the cloud" in text.output


def test_replay_online_decides_in_log_order_against_the_budget_window(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts get shorter as the log goes on: each scores below every recent one, so only the window's
    # minimum share sends any of them to the cloud once the first threshold exists.
    log = write_lines(tmp_path / "log.jsonl", [line(i, " ".join(["w"] * (120 - i)), 1.0, 2.0) for i in range(120)])
    monkeypatch.setenv("ROUTET2I_BUDGET_WINDOW", "20")
    args = ["replay", "--log", str(log), "--router", "longest-prompt-first", "--budget", "0.3"]
    online = runner.invoke(main, [*args, "--online", "--json"])
    assert online.exit_code == 0, online.output
    doc = json.loads(online.output)
    cloud = [d["tier"] == "cloud" for d in doc["decisions"]]
    windows = [sum(cloud[start : start + 20]) for start in range(len(cloud) - 19)]
    assert min(windows) >= 5 and max(windows) <= 6  # floor(0.28 · 20), floor(0.3 · 20)
    assert doc["online"]["window"] == 20 and doc["online"]["tolerance"] == 0.02
    assert doc["online"]["lowest_window_share"] == min(windows) / 20
    assert doc["online"]["highest_window_share"] == max(windows) / 20
    assert doc["online"]["cloud_by_minimum_share"] > 0
    offline = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert offline["online"] is None and offline["cloud"] == 36  # the 36 longest, all at the start
    assert [d["tier"] == "cloud" for d in offline["decisions"]] == [i < 36 for i in range(120)]
    text = runner.invoke(main, [*args, "--online"])
    assert text.exit_code == 0 and "sent to the cloud by the window's minimum share" in text.output


def test_replay_prices_from_settings_when_the_log_has_no_cost(
    runner: CliRunner, small_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTET2I_EDGE__PRICE_PER_IMAGE", "0.5")
    monkeypatch.setenv("ROUTET2I_CLOUD__PRICE_PER_IMAGE", "2")
    result = runner.invoke(
        main, ["replay", "--log", str(small_log), "--router", "all-cloud", "--budget", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["cloud_share"] == 1.0  # all-cloud ignores the budget
    assert doc["cost_usd"] == pytest.approx({"routed": 16.0, "edge_only": 4.0, "cloud_only": 16.0})


def test_replay_errors_name_the_argument(runner: CliRunner, small_log: Path) -> None:
    base = ["replay", "--log", str(small_log)]
    result = runner.invoke(main, [*base, "--router", "random", "--budget", "1.5"])
    assert result.exit_code == 2 and "'--budget'" in result.output and "1.5" in result.output
    result = runner.invoke(main, [*base, "--router", "nope", "--budget", "0.5"])
    assert result.exit_code == 2 and "'--router'" in result.output
    result = runner.invoke(main, [*base, "--router", "gap-regressor", "--budget", "0.5"])
    assert result.exit_code == 2 and "'--model'" in result.output


def test_data_import_writes_the_carried_ratings(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "genai.jsonl"
    result = runner.invoke(main, ["data", "import", "genai-bench", "--edge", "SDXL_Turbo", "--cloud", "DALLE_3", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_log(out)
    assert len(records) == 527 and records[0].metrics == ("alignment",)
    assert all(1.0 <= r.edge["alignment"] <= 5.0 for r in records)

    out = tmp_path / "agiqa.jsonl"
    result = runner.invoke(main, ["data", "import", "agiqa-3k", "--edge", "sd1.5_normal", "--cloud", "xl2.2_normal", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_log(out)
    assert len(records) == 300 and set(records[0].metrics) == {"quality", "alignment"}

    result = runner.invoke(main, ["data", "import", "genai-bench", "--edge", "SDXL", "--cloud", "DALLE_3", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "'--edge'" in result.output and "SDXL_Turbo" in result.output


def test_suite_writes_logs_tables_json_and_plots(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    args = ["eval", "--suite", "standard", "--routers", "random,oracle", "--folds", "2", "--seeds", "1"]
    result = runner.invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    slugs = [
        "genai-bench_SDXL_Turbo-DALLE_3",
        "genai-bench_SDXL_2_1-Midjourney_6",
        "agiqa-3k_sd1.5_normal-xl2.2_normal",
    ]
    for slug in slugs:
        doc = json.loads((out / f"{slug}.json").read_text())
        assert list(doc["routers"]) == ["random", "oracle"]
        assert (out / f"{slug}.png").read_bytes()[:4] == b"\x89PNG"
        assert len(read_log(out / "logs" / f"{slug}.jsonl")) == doc["log"]["records"]
    assert len(read_log(out / "logs" / f"{slugs[0]}.jsonl")) == 527
    table = (out / "results.md").read_text()
    # One aggregate row per log, and AGIQA-3K's per-metric table adds a row per metric.
    assert table.count("| oracle |") == 3 + 2 and "| router | metric |" in table
    assert "--routers random,oracle --folds 2 --seeds 1" in table


@pytest.fixture()
def train_log(tmp_path: Path) -> Path:
    words = ["cat", "dog", "boat", "house", "tree", "bridge", "violin", "car", "lamp", "chair", "clock", "kite"]
    lines = [
        line(i, f"a {word} " + ("with a sign that says hello" if i % 2 else "on a table"), 1.0, 2.0 if i % 2 else 1.0)
        for i, word in enumerate(words * 2)
    ]
    return write_lines(tmp_path / "train.jsonl", lines)


def test_train_writes_a_versioned_artifact_that_replay_loads(
    runner: CliRunner, train_log: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    result = runner.invoke(
        main,
        ["train", "--log", str(train_log), "--out", str(out), "--seed", "1", "--set", "members=2",
         "--set", "max_epochs=20", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["router"] == "routet2i" and manifest["version"].startswith("routet2i:")
    assert manifest["config"]["members"] == 2 and len(manifest["training"]["members"]) == 2
    assert json.loads((out / "manifest.json").read_text())["version"] == manifest["version"]

    replayed = runner.invoke(
        main,
        ["replay", "--log", str(train_log), "--router", "routet2i", "--model", str(out), "--budget", "0.5", "--json"],
    )
    assert replayed.exit_code == 0, replayed.output
    assert json.loads(replayed.stdout)["version"] == manifest["version"]


@pytest.mark.parametrize(
    ("args", "param"),
    [
        (["--router", "random"], "'--router'"),
        (["--router", "no-such-router"], "'--router'"),
        (["--set", "members"], "'--set'"),
        (["--set", "members=0"], "'--set'"),
        (["--set", "colour=1"], "'--set'"),
    ],
)
def test_train_refuses_bad_arguments_naming_them(
    runner: CliRunner, train_log: Path, tmp_path: Path, args: list[str], param: str
) -> None:
    out = tmp_path / "never"
    result = runner.invoke(main, ["train", "--log", str(train_log), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert param in result.output
    assert not out.exists()
