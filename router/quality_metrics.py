"""Image-quality metric sets, as versioned data.

RouteT2I measures an image on several dimensions. Each contrastive metric is a pair of texts, a positive
one (what a good image on that dimension looks like) and a negative one; a CLIP model scores the image by
comparing it with both (the formula lives in :mod:`worker.scoring`). A set may also include prompt-image
alignment (CLIPScore), which compares the image with the prompt it was generated from.

Sets are values: a name, a version and the texts. Scores are only comparable between images scored with
the same set (``"<name>@<version>"``, stored with every quality vector) and the same CLIP model, so a set's
texts never change under a released version: edit the texts, bump the version.

Users define their own set in a JSON or TOML file::

    name = "product-photos"
    version = "2"
    alignment = true          # add CLIPScore against the prompt (default true)
    alignment_weight = 2.5    # w in w * max(cos, 0) (default 2.5, as in CLIPScore)

    [[metrics]]
    name = "definition"
    positive = "High definition photo"
    negative = "Low definition photo"

This module is pure: no torch, no I/O beyond reading the file it is given.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALIGNMENT = "alignment"
"""Name of the prompt-image alignment metric (CLIPScore) in quality vectors."""

CLIPSCORE_WEIGHT = 2.5
"""w in CLIPScore = w * max(cos(image, prompt), 0) (Hessel et al., 2021), which stretches CLIP's typical
cosines (about 0.2 to 0.4 for matching pairs) over a wider range. The result lies in [0, w]."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SET_KEYS = frozenset({"name", "version", "metrics", "alignment", "alignment_weight", "description"})
_METRIC_KEYS = frozenset({"name", "positive", "negative"})
MAX_TEXT_CHARS = 300
"""Longest metric text accepted; CLIP reads at most 77 tokens anyway."""


class MetricSetError(ValueError):
    """A metric set definition is invalid. The message names the offending field."""


@dataclass(frozen=True)
class Metric:
    """One contrastive metric: the image is compared with ``positive`` and with ``negative``.

    Attributes:
        name: key of the metric in quality vectors (lower case, digits and underscores).
        positive: text describing an image that is good on this dimension.
        negative: text describing an image that is bad on it.
    """

    name: str
    positive: str
    negative: str


@dataclass(frozen=True)
class MetricSet:
    """A versioned set of metrics.

    Attributes:
        name: the set's name.
        version: the set's version; bump it whenever a text changes.
        metrics: the contrastive metrics, in a fixed order.
        alignment: whether prompt-image alignment (CLIPScore) is scored, under the name ``"alignment"``.
        alignment_weight: w in CLIPScore = w * max(cos, 0).
        description: one line for humans.
    """

    name: str
    version: str
    metrics: tuple[Metric, ...]
    alignment: bool = True
    alignment_weight: float = CLIPSCORE_WEIGHT
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "alignment_weight", float(self.alignment_weight))
        # Sets built in code obey the same rules as sets read from a file.
        _check_set(self)

    @property
    def id(self) -> str:
        """``"<name>@<version>"``, the value of ``QualityVector.metric_set`` for scores from this set."""
        return f"{self.name}@{self.version}"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric the set produces, contrastive ones first, ``"alignment"`` last when included."""
        names = tuple(m.name for m in self.metrics)
        return (*names, ALIGNMENT) if self.alignment else names

    def to_dict(self) -> dict[str, Any]:
        """The set as plain JSON (the same shape a metric-set file has)."""
        data: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "alignment": self.alignment,
            "alignment_weight": self.alignment_weight,
            "metrics": [{"name": m.name, "positive": m.positive, "negative": m.negative} for m in self.metrics],
        }
        if self.description:
            data["description"] = self.description
        return data


def _check_name(value: str, field: str, pattern: re.Pattern[str], rule: str) -> None:
    if not pattern.match(value):
        raise MetricSetError(f"{field}: {value!r} {rule}")


def _check_text(value: str, field: str) -> None:
    if not value.strip():
        raise MetricSetError(f"{field}: must be a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise MetricSetError(f"{field}: must be at most {MAX_TEXT_CHARS} characters")


def _check_set(metric_set: MetricSet) -> None:
    """The rules every metric set obeys, with the offending field named in the error."""
    _check_name(metric_set.name, "name", _NAME, "must be 1-64 letters, digits, '.', '_' or '-'")
    _check_name(metric_set.version, "version", _NAME, "must be 1-64 letters, digits, '.', '_' or '-'")
    if not 0 < metric_set.alignment_weight < float("inf"):
        raise MetricSetError(f"alignment_weight: must be a positive number, not {metric_set.alignment_weight!r}")
    seen: set[str] = set()
    for i, metric in enumerate(metric_set.metrics):
        where = f"metrics[{i}]"
        _check_name(
            metric.name, f"{where}.name", _METRIC_NAME, "is not a metric name (a-z first, then a-z, 0-9 or '_')"
        )
        if metric.name == ALIGNMENT:
            raise MetricSetError(f"{where}.name: {ALIGNMENT!r} is reserved for prompt alignment; set alignment = true")
        if metric.name in seen:
            raise MetricSetError(f"{where}.name: {metric.name!r} appears twice")
        seen.add(metric.name)
        _check_text(metric.positive, f"{where}.positive")
        _check_text(metric.negative, f"{where}.negative")
        if metric.positive == metric.negative:
            raise MetricSetError(f"{where}.negative: identical to positive, so the metric would always be 0.5")
    if not metric_set.metrics and not metric_set.alignment:
        raise MetricSetError("metrics: empty, and alignment is off: the set would score nothing")


def _unknown_keys(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise MetricSetError(f"{prefix}{unknown[0]}: unknown field (expected one of {', '.join(sorted(allowed))})")


def _string(data: Mapping[str, Any], key: str, where: str) -> str:
    field = f"{where}.{key}" if where else key
    if key not in data:
        raise MetricSetError(f"{field}: missing")
    value = data[key]
    if not isinstance(value, str):
        raise MetricSetError(f"{field}: must be a string, not {type(value).__name__}")
    return value.strip()


def _metric(data: Any, where: str) -> Metric:
    if not isinstance(data, Mapping):
        raise MetricSetError(f"{where}: must be an object with name, positive and negative")
    _unknown_keys(data, _METRIC_KEYS, where)
    return Metric(
        name=_string(data, "name", where),
        positive=_string(data, "positive", where),
        negative=_string(data, "negative", where),
    )


def parse_metric_set(data: Any, *, source: str = "metric set") -> MetricSet:
    """Validate a metric set given as plain data (a parsed JSON or TOML document).

    Args:
        data: the document.
        source: where it came from, prefixed to error messages.

    Returns:
        The metric set.

    Raises:
        MetricSetError: naming the first invalid field, e.g. ``metrics[2].negative: missing``.
    """
    try:
        if not isinstance(data, Mapping):
            raise MetricSetError("the document must be an object (a table in TOML)")
        _unknown_keys(data, _SET_KEYS, "")
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)  # `version = 2` is as good as `version = "2"`
        alignment = data.get("alignment", True)
        if not isinstance(alignment, bool):
            raise MetricSetError(f"alignment: must be true or false, not {alignment!r}")
        weight = data.get("alignment_weight", CLIPSCORE_WEIGHT)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise MetricSetError(f"alignment_weight: must be a positive number, not {weight!r}")
        raw_metrics = data.get("metrics", [])
        if not isinstance(raw_metrics, list):
            raise MetricSetError("metrics: must be a list of {name, positive, negative} objects")
        return MetricSet(
            name=_string(data, "name", ""),
            version=_string({"version": version} if version is not None else {}, "version", ""),
            metrics=tuple(_metric(m, f"metrics[{i}]") for i, m in enumerate(raw_metrics)),
            alignment=alignment,
            alignment_weight=float(weight),
            description=_string(data, "description", "") if "description" in data else "",
        )
    except MetricSetError as exc:
        raise MetricSetError(f"{source}: {exc}") from None


def load_metric_set(path: str | Path) -> MetricSet:
    """Read a metric set from a ``.json`` or ``.toml`` file.

    Raises:
        MetricSetError: the file is missing, unreadable, not JSON/TOML, or fails validation; the message
            names the file and the field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise MetricSetError(f"{path}: a metric set file must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricSetError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise MetricSetError(f"{path}: not UTF-8 text") from None
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise MetricSetError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MetricSetError(f"{path}: invalid TOML: {exc}") from None
    return parse_metric_set(data, source=str(path))


ROUTET2I_V1 = MetricSet(
    name="routet2i",
    version="1",
    description="The ten contrastive metrics of RouteT2I, plus prompt alignment (CLIPScore).",
    metrics=(
        # The paper gives this pair's wording; the other nine follow its "<quality> photo" style.
        Metric("definition", "High definition photo", "Low definition photo"),
        Metric("detail", "Highly detailed photo", "Photo lacking detail"),
        Metric("clarity", "Clear photo", "Hazy photo"),
        Metric("sharpness", "Sharp photo", "Blurry photo"),
        Metric("harmony", "Harmonious photo", "Disharmonious photo"),
        Metric("realism", "Realistic photo", "Unrealistic photo"),
        Metric("color", "Photo with natural, vivid colors", "Photo with dull, washed-out colors"),
        Metric("consistency", "Coherent, consistent photo", "Incoherent, inconsistent photo"),
        Metric("layout", "Well composed photo", "Poorly composed photo"),
        Metric("integrity", "Photo of complete, intact objects", "Photo of deformed, broken objects"),
    ),
)
"""The built-in set: RouteT2I's ten metrics and alignment (``routet2i@1``)."""

BUILTIN_SETS: dict[str, MetricSet] = {ROUTET2I_V1.name: ROUTET2I_V1}
DEFAULT_METRIC_SET = ROUTET2I_V1.name

METRIC_NAMES: tuple[str, ...] = ROUTET2I_V1.metric_names
"""The metric names of the built-in set, in order: what routers predict by default."""


def resolve_metric_set(spec: str | Path) -> MetricSet:
    """A built-in set by name (``"routet2i"``), or a set read from a ``.json``/``.toml`` file.

    Raises:
        MetricSetError: neither a built-in name nor a valid file.
    """
    text = str(spec)
    if text in BUILTIN_SETS:
        return BUILTIN_SETS[text]
    path = Path(text)
    if path.suffix.lower() not in (".json", ".toml") and not path.exists():
        raise MetricSetError(
            f"{text!r} is neither a built-in metric set ({', '.join(BUILTIN_SETS)}) nor a .json/.toml file"
        )
    return load_metric_set(path)
