"""Metric sets as data: the built-in set, user files in JSON and TOML, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.quality_metrics import (
    ALIGNMENT,
    BUILTIN_SETS,
    METRIC_NAMES,
    ROUTET2I_V1,
    Metric,
    MetricSet,
    MetricSetError,
    load_metric_set,
    parse_metric_set,
    resolve_metric_set,
)

PAPER_METRICS = (
    "definition",
    "detail",
    "clarity",
    "sharpness",
    "harmony",
    "realism",
    "color",
    "consistency",
    "layout",
    "integrity",
)

CUSTOM_TOML = """
name = "product-photos"
version = 2
alignment = false

[[metrics]]
name = "definition"
positive = "High definition photo"
negative = "Low definition photo"

[[metrics]]
name = "background"
positive = "Photo on a clean white background"
negative = "Photo on a cluttered background"
"""


def test_builtin_set_has_the_papers_ten_metrics_and_alignment() -> None:
    assert tuple(m.name for m in ROUTET2I_V1.metrics) == PAPER_METRICS
    assert (*PAPER_METRICS, ALIGNMENT) == METRIC_NAMES
    assert ROUTET2I_V1.id == "routet2i@1"
    definition = ROUTET2I_V1.metrics[0]
    assert (definition.positive, definition.negative) == ("High definition photo", "Low definition photo")
    assert all(m.positive != m.negative for m in ROUTET2I_V1.metrics)
    assert ROUTET2I_V1.alignment and ROUTET2I_V1.alignment_weight == 2.5
    assert BUILTIN_SETS["routet2i"] is ROUTET2I_V1


def test_set_round_trips_through_its_dict_form() -> None:
    assert parse_metric_set(ROUTET2I_V1.to_dict()) == ROUTET2I_V1
    assert parse_metric_set(json.loads(json.dumps(ROUTET2I_V1.to_dict()))) == ROUTET2I_V1


def test_toml_and_json_files_define_the_same_set(tmp_path: Path) -> None:
    toml_file = tmp_path / "set.toml"
    toml_file.write_text(CUSTOM_TOML)
    from_toml = load_metric_set(toml_file)
    json_file = tmp_path / "set.json"
    json_file.write_text(json.dumps(from_toml.to_dict()))
    from_json = load_metric_set(json_file)

    assert from_toml == from_json
    assert from_toml.id == "product-photos@2"  # an integer version reads as its string
    assert from_toml.metric_names == ("definition", "background")  # no alignment: switched off
    assert from_toml.metrics[1] == Metric(
        "background", "Photo on a clean white background", "Photo on a cluttered background"
    )


def test_resolve_finds_builtins_by_name_and_files_by_path(tmp_path: Path) -> None:
    assert resolve_metric_set("routet2i") is ROUTET2I_V1
    path = tmp_path / "mine.toml"
    path.write_text(CUSTOM_TOML)
    assert resolve_metric_set(str(path)).name == "product-photos"
    with pytest.raises(MetricSetError, match="neither a built-in metric set"):
        resolve_metric_set("routet2i-v9")


def test_alignment_only_set_is_valid() -> None:
    only = parse_metric_set({"name": "align", "version": "1", "alignment": True})
    assert only.metrics == () and only.metric_names == (ALIGNMENT,)


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": "s",
        "version": "1",
        "metrics": [{"name": "sharpness", "positive": "Sharp photo", "negative": "Blurry photo"}],
    }
    doc.update(changes)
    return doc


def _metric(**changes: object) -> dict[str, object]:
    metric: dict[str, object] = {"name": "sharpness", "positive": "Sharp photo", "negative": "Blurry photo"}
    metric.update(changes)
    return {k: v for k, v in metric.items() if v is not None}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "must be an object"),
        (_doc(name=None), "name: must be a string"),
        (_doc(name="has space"), "name: 'has space' must be"),
        ({"name": "s", "metrics": []}, "version: missing"),
        (_doc(version=1.5), "version: must be a string"),
        (_doc(colour="red"), "colour: unknown field"),
        (_doc(alignment="yes"), "alignment: must be true or false"),
        (_doc(alignment_weight=0), "alignment_weight: must be a positive number"),
        (_doc(alignment_weight="2"), "alignment_weight: must be a positive number"),
        (_doc(metrics={"a": 1}), "metrics: must be a list"),
        (_doc(metrics=["sharp"]), r"metrics\[0\]: must be an object"),
        (_doc(metrics=[_metric(negative=None)]), r"metrics\[0\]\.negative: missing"),
        (_doc(metrics=[_metric(positive=3)]), r"metrics\[0\]\.positive: must be a string, not int"),
        (_doc(metrics=[_metric(positive="  ")]), r"metrics\[0\]\.positive: must be a non-empty string"),
        (_doc(metrics=[_metric(negative="x" * 301)]), r"metrics\[0\]\.negative: must be at most 300"),
        (_doc(metrics=[_metric(name="Sharp")]), r"metrics\[0\]\.name: 'Sharp' is not a metric name"),
        (_doc(metrics=[_metric(name="alignment")]), r"metrics\[0\]\.name: 'alignment' is reserved"),
        (_doc(metrics=[_metric(), _metric()]), r"metrics\[1\]\.name: 'sharpness' appears twice"),
        (_doc(metrics=[_metric(negative="Sharp photo")]), r"metrics\[0\]\.negative: identical to positive"),
        (_doc(metrics=[_metric(weight=1)]), r"metrics\[0\]\.weight: unknown field"),
        (_doc(metrics=[], alignment=False), "would score nothing"),
    ],
)
def test_invalid_documents_are_refused_naming_the_field(doc: object, message: str) -> None:
    with pytest.raises(MetricSetError, match=message) as caught:
        parse_metric_set(doc, source="my-set.toml")
    assert str(caught.value).startswith("my-set.toml: ")


def test_sets_built_in_code_obey_the_same_rules() -> None:
    with pytest.raises(MetricSetError, match=r"metrics\[0\]\.negative: identical to positive"):
        MetricSet(name="s", version="1", metrics=(Metric("a", "Same photo", "Same photo"),))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("set.toml", "name = [unclosed", "invalid TOML"),
        ("set.json", '{"name": "s",', "invalid JSON at line 1"),
        ("set.yaml", "name: s", "must end in .json or .toml"),
        ("set.json", b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(MetricSetError, match=message) as caught:
        load_metric_set(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MetricSetError, match="cannot read"):
        load_metric_set(tmp_path / "absent.toml")
