"""Replay log format, importers of the carried ratings, and the prompt-complexity rule."""

from __future__ import annotations

import json

import pytest

from router.base import RouterError, available_routers, load_router
from router.complexity import PromptComplexityRouter, content_words
from router.datasets import DatasetError, agiqa_3k, genai_bench
from router.log import LogFormatError, read_log, write_log


def test_genai_bench_import_has_every_prompt_and_the_mean_rating() -> None:
    records = genai_bench("SDXL_Turbo", "DALLE_3")
    assert len(records) == 527
    first = records[0]
    assert first.prompt == "A baker pulling freshly baked bread out of an oven in a bakery."
    assert first.edge["alignment"] == pytest.approx(3.0)  # ratings 2, 4, 3
    assert first.cloud["alignment"] == pytest.approx(5.0)  # ratings 5, 5, 5


def test_genai_bench_import_carries_the_other_models_ratings_as_auxiliary_labels() -> None:
    first = genai_bench("SDXL_Turbo", "DALLE_3")[0]
    assert first.auxiliary == pytest.approx(
        {
            "SDXL_2_1:alignment": 7 / 3,  # ratings 3, 2, 2
            "SDXL_Base:alignment": 8 / 3,
            "DeepFloyd_I_XL_v1:alignment": 10 / 3,
            "Midjourney_6:alignment": 3.0,
        }
    )


def test_agiqa_import_carries_the_other_configurations_as_auxiliary_labels() -> None:
    records = agiqa_3k("sd1.5_normal", "xl2.2_normal")
    first = records[0]
    assert len(first.auxiliary) == 16  # 8 other configurations x 2 metrics
    assert not any(name.startswith(("sd1.5_normal:", "xl2.2_normal:")) for name in first.auxiliary)
    assert first.auxiliary["midjourney_normal:quality"] == pytest.approx(4.324875409)
    # DALL-E 2 rendered 290 of the 300 prompts: its labels are absent from the other 10.
    assert sum("DALLE2_normal:quality" in r.auxiliary for r in records) == 290


def test_agiqa_import_pairs_configurations_by_prompt_index() -> None:
    records = agiqa_3k("sd1.5_normal", "xl2.2_normal")
    assert len(records) == 300
    assert set(records[0].metrics) == {"quality", "alignment"}
    assert len(agiqa_3k("sd1.5_normal", "DALLE2_normal")) == 290  # DALL-E 2 rendered 290 prompts


@pytest.mark.parametrize("call", [lambda: genai_bench("SDXL", "DALLE_3"), lambda: agiqa_3k("sd1.5_normal", "sdxl")])
def test_importers_name_the_unknown_model(call) -> None:
    with pytest.raises(DatasetError, match="choose one of"):
        call()


def test_log_round_trip(tmp_path) -> None:
    records = genai_bench("SDXL_2_1", "Midjourney_6")[:20]
    path = tmp_path / "log.jsonl"
    assert write_log(path, records) == 20
    assert read_log(path) == records
    assert read_log(path)[0].auxiliary["DALLE_3:alignment"] == pytest.approx(5.0)


def test_a_log_without_auxiliary_labels_reads_and_writes_without_them(tmp_path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"id": "0", "prompt": "ok", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}}) + "\n")
    (record,) = read_log(path)
    assert record.auxiliary == {} and record.extra == {}
    write_log(path, [record])
    assert "auxiliary" not in json.loads(path.read_text())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}}}', "exactly the keys"),
        ('{"id": "1", "prompt": "", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}}', "'prompt'"),
        ('{"id": "1", "prompt": "a", "quality": {"edge": {"q": "x"}, "cloud": {"q": 2}}}', "quality.edge.q"),
        ('{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"r": 2}}}', "same metrics"),
        ('{"prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}}', "'id'"),
        (
            '{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}, "auxiliary": [1]}',
            "'auxiliary'",
        ),
        (
            '{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}, "auxiliary": {"m:q": "4"}}',
            "'auxiliary.m:q'",
        ),
        (
            '{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}, "auxiliary": {"m:q": true}}',
            "'auxiliary.m:q'",
        ),
        ('{"id": "1", "prompt": "a", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}, "auxiliary": {"": 1}}', "empty"),
    ],
)
def test_malformed_lines_are_refused_with_their_line_number(tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"id": "0", "prompt": "ok", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}}) + "\n" + line + "\n"
    )
    with pytest.raises(LogFormatError, match=message) as info:
        read_log(path)
    assert f"{path}:2" in str(info.value)


def test_duplicate_ids_are_refused(tmp_path) -> None:
    line = json.dumps({"id": "7", "prompt": "ok", "quality": {"edge": {"q": 1}, "cloud": {"q": 2}}})
    path = tmp_path / "dup.jsonl"
    path.write_text(line + "\n" + line + "\n")
    with pytest.raises(LogFormatError, match="duplicate id"):
        read_log(path)


def test_complexity_counts_content_words_and_breaks_ties_by_length() -> None:
    assert content_words("A red car and a tree on the hill") == ["red", "car", "tree", "hill"]
    scores = PromptComplexityRouter().score(["a cat", "a black cat", "a black cat!!"])
    assert scores[0] < scores[1] < scores[2] < 3


@pytest.mark.parametrize("name", ["prompt-complexity", "longest-prompt-first", "noun-count"])
def test_prompt_rules_are_calibrated_to_send_about_rho_of_partiprompts(name: str) -> None:
    from router.data import partiprompts

    router = load_router(name, None)
    scores = router.score(partiprompts())
    for rho in (0.1, 0.3, 0.5):
        threshold = router.calibrated_threshold(rho)
        assert threshold is not None
        # The threshold splits the prompts at ρ; noun counts are small integers, so many prompts tie at it.
        above, at_or_above = float((scores > threshold).mean()), float((scores >= threshold).mean())
        assert above <= rho + 0.01 and at_or_above >= rho - 0.01
        if name != "noun-count":
            assert abs(above - rho) < 0.05


@pytest.mark.parametrize("name", ["prompt-complexity", "longest-prompt-first"])
def test_a_prompt_rule_routes_from_its_first_request_at_about_rho(name: str) -> None:
    # Without a calibration the first request has no threshold and the next ones take it from a handful of
    # scores; with it the cold start is decided on the PartiPrompts' split and routes about ρ to the cloud.
    from router.budget import MIN_SCORES_FOR_QUANTILE, BudgetConfig, BudgetController, MemoryBudgetStore
    from router.data import sample_prompts
    from router.policy import RoutingPolicy

    policy = RoutingPolicy(
        load_router(name, None),
        BudgetController(BudgetConfig(rho=0.3, window=500), MemoryBudgetStore(500)),
    )
    decisions = [policy.decide(p) for p in sample_prompts(200, seed=3)]
    first = decisions[: MIN_SCORES_FOR_QUANTILE - 1]
    assert {d.budget_state["threshold_source"] for d in first} == {"offline calibration"}
    assert 0.1 <= sum(d.tier == "cloud" for d in decisions[:100]) / 100 <= 0.4


def test_registry() -> None:
    assert "prompt-complexity" in available_routers()
    assert load_router("prompt-complexity", None).name == "prompt-complexity"
    with pytest.raises(RouterError, match="unknown router"):
        load_router("nope", None)
