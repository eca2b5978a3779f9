"""K-tier replay logs: validation, tier order, two-tier logs read by both readers, and the K-tier import."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from router.log import LogFormatError, read_log, write_log
from router.tierdata import price_table, prices
from router.tierlog import TierRecord, read_tier_log, tier_log, two_tier_records, write_tier_log


def _line(i: int, quality: dict, **extra: object) -> dict:
    return {"id": f"p{i}", "prompt": f"prompt {i}", "quality": quality, **extra}


def _write(path: Path, lines: Sequence[dict | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


THREE = {"small": {"q": 1.0}, "large": {"q": 3.0}, "medium": {"q": 2.0}}
COST = {"small": 0.001, "large": 0.08, "medium": 0.01}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (_line(1, {"a": {"q": 1.0}}), "'quality'"),
        (_line(1, {"a": {"q": 1.0}, "b": {"r": 2.0}}), "'quality.b'"),
        (_line(1, {"a": {"q": 1.0}, "b": {"q": "x"}}), "'quality.b.q'"),
        (_line(1, {"a": {"q": 1.0}, "b": {}}), "'quality.b'"),
        (_line(1, THREE, cost={"small": 0.1, "large": 0.2}), "'cost.medium'"),
        (_line(1, THREE, cost={**COST, "huge": 1.0}), "'cost.huge'"),
        (_line(1, THREE, cost={**COST, "large": -1}), "'cost.large'"),
        (_line(1, THREE, auxiliary={"x": "y"}), "'auxiliary.x'"),
        ({"id": "p1", "quality": THREE}, "'prompt'"),
    ],
)
def test_a_bad_line_is_refused_naming_the_line_and_the_field(tmp_path: Path, line: dict, field: str) -> None:
    path = _write(tmp_path / "log.jsonl", [_line(0, THREE), line])
    with pytest.raises(LogFormatError) as error:
        read_tier_log(path)
    assert f"{path}:2" in str(error.value) and field in str(error.value)


def test_lines_must_share_tiers_metrics_and_ids(tmp_path: Path) -> None:
    other_tiers = _write(tmp_path / "a.jsonl", [_line(0, THREE), _line(1, {"small": {"q": 1}, "x": {"q": 2}})])
    with pytest.raises(LogFormatError, match="'p1' has tiers"):
        read_tier_log(other_tiers)
    renamed = {t: {"r": 1.0} for t in THREE}
    with pytest.raises(LogFormatError, match="'p1' has metrics"):
        read_tier_log(_write(tmp_path / "b.jsonl", [_line(0, THREE), _line(1, renamed)]))
    with pytest.raises(LogFormatError, match="duplicate id 'p0'"):
        read_tier_log(_write(tmp_path / "c.jsonl", [_line(0, THREE), _line(0, THREE)]))
    with pytest.raises(LogFormatError, match="empty"):
        read_tier_log(_write(tmp_path / "d.jsonl", []))


def test_tiers_are_ordered_cheapest_first_by_mean_cost_else_as_written(tmp_path: Path) -> None:
    costly = read_tier_log(_write(tmp_path / "a.jsonl", [_line(0, THREE, cost=COST), _line(1, THREE)]))
    assert costly.tiers == ("small", "medium", "large")
    assert costly.prices is not None and costly.prices.tolist() == [0.001, 0.01, 0.08]
    assert costly.qualities()[0, :, 0].tolist() == [1.0, 2.0, 3.0]
    unpriced = read_tier_log(_write(tmp_path / "b.jsonl", [_line(0, THREE)]))
    assert unpriced.tiers == ("small", "large", "medium") and unpriced.prices is None
    # Equal prices keep the written order.
    tied = tier_log([TierRecord.from_dict(_line(0, THREE, cost=dict.fromkeys(THREE, 0.01)))])
    assert tied.tiers == ("small", "large", "medium")


def test_a_two_tier_log_reads_with_both_readers_and_round_trips(tmp_path: Path) -> None:
    two = [
        _line(i, {"edge": {"q": 1.0 + i}, "cloud": {"q": 2.0}}, cost={"edge": 0.009, "cloud": 0.065}) for i in range(3)
    ]
    path = _write(tmp_path / "two.jsonl", two)
    old = read_log(path)
    new = read_tier_log(path)
    assert new.tiers == ("edge", "cloud") and new.is_two_tier()
    assert new.prices is not None and new.prices.tolist() == [0.009, 0.065]
    assert [TierRecord.from_log_record(r) for r in old] == list(new.records)
    back = two_tier_records(new.records, "edge", "cloud")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in old]
    write_log(tmp_path / "again.jsonl", back)
    assert read_log(tmp_path / "again.jsonl") == old
    write_tier_log(tmp_path / "k.jsonl", new.records)
    assert read_tier_log(tmp_path / "k.jsonl").records == new.records


def test_import_with_tiers_and_prices_writes_a_k_tier_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    runner = CliRunner()
    out = tmp_path / "genai.jsonl"
    args = ["data", "import", "genai-bench", "--tiers", "DALLE_3,SDXL_Turbo,Midjourney_6", "-o", str(out)]
    result = runner.invoke(main, [*args, "--price", "DALLE_3=0.04"])
    assert result.exit_code == 0, result.output
    log = read_tier_log(out)
    assert len(log.records) == 527 and log.metrics == ("alignment",)
    assert log.tiers == ("SDXL_Turbo", "DALLE_3", "Midjourney_6")  # DALLE_3 at $0.04 is cheaper than Midjourney
    assert log.prices is not None
    assert log.prices.tolist() == [prices("genai-bench")["SDXL_Turbo"], 0.04, 0.05]
    first = log.records[0]
    assert set(first.auxiliary) == {"SDXL_2_1:alignment", "SDXL_Base:alignment", "DeepFloyd_I_XL_v1:alignment"}
    assert first.quality["DALLE_3"]["alignment"] == 5.0  # the mean of its three ratings (5, 5, 5)

    out = tmp_path / "agiqa.jsonl"
    args = ["data", "import", "agiqa-3k", "--tiers", "sd1.5_normal,xl2.2_normal,DALLE2_normal", "-o", str(out)]
    assert runner.invoke(main, args).exit_code == 0
    log = read_tier_log(out)
    assert len(log.records) == 290 and set(log.metrics) == {"quality", "alignment"}  # DALL·E 2 rendered 290
    assert log.tiers == ("sd1.5_normal", "xl2.2_normal", "DALLE2_normal")


@pytest.mark.parametrize(
    ("args", "hint", "words"),
    [
        (["--tiers", "SDXL_Turbo"], "'--tiers'", "at least two"),
        (["--tiers", "SDXL_Turbo,SDXL"], "'--tiers'", "unknown model 'SDXL'"),
        (["--tiers", "SDXL_Turbo,SDXL_Turbo"], "'--tiers'", "twice"),
        (["--tiers", "SDXL_Turbo,DALLE_3", "--price", "DALLE_3"], "'--price'", "MODEL=USD"),
        (["--tiers", "SDXL_Turbo,DALLE_3", "--price", "DALLE_3=cheap"], "'--price'", "MODEL=USD"),
        (["--tiers", "SDXL_Turbo,DALLE_3", "--price", "Imagen=0.1"], "'--price'", "unknown model 'Imagen'"),
        (["--tiers", "SDXL_Turbo,DALLE_3", "--price", "DALLE_3=-1"], "'--price'", "at least 0"),
        (["--edge", "SDXL_Turbo", "--cloud", "DALLE_3", "--price", "DALLE_3=1"], "'--price'", "--tiers"),
        (["--edge", "SDXL_Turbo"], "", "--tiers"),
        (["--edge", "SDXL_Turbo", "--tiers", "SDXL_Turbo,DALLE_3"], "", "not both"),
    ],
)
def test_bad_import_arguments_are_refused_naming_the_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], hint: str, words: str
) -> None:
    monkeypatch.setenv("ROUTET2I_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["data", "import", "genai-bench", *args, "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and hint in result.output and words in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_the_price_table_prices_every_generator_and_its_gpu_estimates_follow_its_rule() -> None:
    from router.tierdata import DATASETS

    table = price_table()
    rate = table["gpu_estimate"]["usd_per_gpu_hour"] / 3600 / table["gpu_estimate"]["utilisation"]
    for dataset, models in DATASETS.items():
        assert set(table[dataset]) == set(models)
        for entry in table[dataset].values():
            assert entry["basis"] in ("table-1", "estimate-subscription", "estimate-gpu") and entry["usd"] >= 0
            if entry["basis"] == "estimate-gpu":  # seconds x rate, rounded to at most two significant digits
                assert entry["usd"] == pytest.approx(entry["gpu_seconds"] * rate, rel=0.5)
