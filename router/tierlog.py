"""Replay logs of any number of tiers: JSON Lines, one prompt per line, with the quality every tier achieved on it.

Format of one line::

    {"id": "genai-00001", "prompt": "...",
     "quality": {"SDXL_Turbo": {"alignment": 3.0}, "SDXL_Base": {"alignment": 2.67},
                 "DALLE_3": {"alignment": 5.0}},
     "cost": {"SDXL_Turbo": 0.0002, "SDXL_Base": 0.009, "DALLE_3": 0.08},   # optional: USD per image
     "metric_set": "human",                                                # optional
     "auxiliary": {"Midjourney_6:alignment": 3.0}}                         # optional, training only

At least two tiers; every tier of a line carries the same metrics, and every line the same tiers and metrics.
``cost`` prices every tier of its line or is absent (a log may have it on some lines only). **Tier order** is
cheapest first: by each tier's mean cost over the lines that carry one, ties (and a log without any cost) in
the order the first line lists them. The two-tier logs of :mod:`router.log` (tiers ``edge`` and ``cloud``)
are K-tier logs with K = 2, so this reader reads them too; :mod:`router.log`'s reader stays the one the
two-tier code path uses. Errors name the file, the line and the field, as :mod:`router.log`'s do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.log import LogFormatError, LogRecord, json_lines, write_log
from router.types import QualityVector

__all__ = [
    "LogFormatError",
    "TierLog",
    "TierRecord",
    "iter_tier_log",
    "read_tier_log",
    "tier_log",
    "two_tier_records",
    "write_tier_log",
]

RESERVED = ("id", "prompt", "quality", "cost", "metric_set", "auxiliary")
"""Fields a line's reader interprets; any other is kept in :attr:`TierRecord.extra`."""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True)
class TierRecord:
    """One prompt with the quality each of its tiers achieved on it, and optionally each tier's cost."""

    id: str
    prompt: str
    quality: Mapping[str, QualityVector]
    """Quality vector by tier name, in the order the line lists the tiers."""
    cost: Mapping[str, float] = field(default_factory=dict)
    """US dollars per image by tier name: every tier, or empty."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    auxiliary: Mapping[str, float] = field(default_factory=dict)
    """Training-only labels of the prompt by name (as :attr:`router.log.LogRecord.auxiliary`)."""

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self.quality)

    @property
    def metrics(self) -> tuple[str, ...]:
        return next(iter(self.quality.values())).metrics

    def to_dict(self) -> dict[str, Any]:
        first = next(iter(self.quality.values()))
        return {
            "id": self.id,
            "prompt": self.prompt,
            "quality": {tier: dict(vector.values) for tier, vector in self.quality.items()},
            **({"cost": dict(self.cost)} if self.cost else {}),
            "metric_set": first.metric_set,
            **({"auxiliary": dict(self.auxiliary)} if self.auxiliary else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "record") -> TierRecord:
        """Validate one line; :class:`LogFormatError` names ``where`` and the field."""
        for key in ("id", "prompt", "quality"):
            if key not in data:
                raise LogFormatError(f"{where}: missing field {key!r}")
        if not isinstance(data["prompt"], str) or not data["prompt"].strip():
            raise LogFormatError(f"{where}: field 'prompt' must be a non-empty string")
        metric_set = str(data.get("metric_set", "log"))
        quality = _quality(data["quality"], metric_set, where)
        return cls(
            id=str(data["id"]),
            prompt=data["prompt"],
            quality=quality,
            cost=_cost(data.get("cost"), tuple(quality), where),
            extra={k: v for k, v in data.items() if k not in RESERVED},
            auxiliary=_auxiliary(data.get("auxiliary", {}), where),
        )

    @classmethod
    def from_log_record(cls, record: LogRecord) -> TierRecord:
        """The two-tier record as a K-tier one (tiers ``edge`` and ``cloud``; its ``cost`` field, if valid)."""
        data = record.to_dict()
        data["quality"] = {"edge": dict(record.edge.values), "cloud": dict(record.cloud.values)}
        return cls.from_dict(data, where=f"record {record.id!r}")


def _quality(value: Any, metric_set: str, where: str) -> dict[str, QualityVector]:
    if not isinstance(value, Mapping) or len(value) < 2:
        raise LogFormatError(f"{where}: field 'quality' must be an object of at least two tiers")
    vectors: dict[str, QualityVector] = {}
    for tier, values in value.items():
        if not isinstance(tier, str) or not tier.strip():
            raise LogFormatError(f"{where}: field 'quality' has an empty tier name")
        if not isinstance(values, Mapping) or not values:
            raise LogFormatError(f"{where}: field 'quality.{tier}' must be a non-empty object")
        for metric, number in values.items():
            if not _is_number(number):
                raise LogFormatError(f"{where}: field 'quality.{tier}.{metric}' must be a finite number")
        vectors[tier] = QualityVector(values=values, metric_set=metric_set)
    first, *others = vectors
    for tier in others:
        if set(vectors[tier].metrics) != set(vectors[first].metrics):
            raise LogFormatError(
                f"{where}: field 'quality.{tier}' has metrics {sorted(vectors[tier].metrics)}, "
                f"expected those of 'quality.{first}': {sorted(vectors[first].metrics)}"
            )
    return vectors


def _cost(value: Any, tiers: tuple[str, ...], where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LogFormatError(f"{where}: field 'cost' must be an object of US dollars by tier")
    for tier in tiers:
        if tier not in value:
            raise LogFormatError(f"{where}: field 'cost' must price every tier; 'cost.{tier}' is missing")
    for tier, usd in value.items():
        if tier not in tiers:
            raise LogFormatError(f"{where}: field 'cost.{tier}' names a tier the line's 'quality' does not have")
        if not _is_number(usd) or usd < 0:
            raise LogFormatError(f"{where}: field 'cost.{tier}' must be a finite number of at least 0")
    return {tier: float(value[tier]) for tier in tiers}


def _auxiliary(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise LogFormatError(f"{where}: field 'auxiliary' must be an object of numbers by label name")
    for name, number in value.items():
        if not name:
            raise LogFormatError(f"{where}: field 'auxiliary' has an empty label name")
        if not _is_number(number):
            raise LogFormatError(f"{where}: field 'auxiliary.{name}' must be a finite number")
    return {str(k): float(v) for k, v in value.items()}


@dataclass(frozen=True, eq=False)
class TierLog:
    """A validated K-tier log.

    Attributes:
        records: the lines, in file order.
        tiers: tier names, cheapest first.
        metrics: metric names, in the first line's order.
        prices: mean US dollars per image of each tier (in :attr:`tiers` order) over the lines that carry a
            cost; None when no line does.
    """

    records: tuple[TierRecord, ...]
    tiers: tuple[str, ...]
    metrics: tuple[str, ...]
    prices: np.ndarray | None

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def qualities(self, records: Sequence[TierRecord] | None = None) -> np.ndarray:
        """Qualities as an ``(n, K, M)`` array: tiers cheapest first, metrics in :attr:`metrics` order."""
        chosen = self.records if records is None else records
        return quality_array(chosen, self.tiers, self.metrics)

    def is_two_tier(self) -> bool:
        """True for the two-tier logs of :mod:`router.log` (tiers ``edge`` and ``cloud``)."""
        return set(self.tiers) == {"edge", "cloud"}


def quality_array(records: Sequence[TierRecord], tiers: Sequence[str], metrics: Sequence[str]) -> np.ndarray:
    """The records' qualities as an ``(n, K, M)`` float array, tiers and metrics in the given orders."""
    values = [[[r.quality[t][m] for m in metrics] for t in tiers] for r in records]
    return np.asarray(values, dtype=np.float64).reshape(len(records), len(tiers), len(metrics))


def tier_log(records: Iterable[TierRecord], *, source: str = "log") -> TierLog:
    """Validate records as one log (unique ids, the same tiers and metrics on every line) and order its tiers.

    Raises:
        LogFormatError: an empty log, a duplicate id, or a line whose tiers or metrics differ from the first's;
            the message names ``source``.
    """
    chosen = tuple(records)
    if not chosen:
        raise LogFormatError(f"{source}: the log is empty")
    first = chosen[0]
    tiers, metrics = first.tiers, first.metrics
    seen: set[str] = set()
    for record in chosen:
        if record.id in seen:
            raise LogFormatError(f"{source}: duplicate id {record.id!r}")
        seen.add(record.id)
        if set(record.tiers) != set(tiers):
            raise LogFormatError(
                f"{source}: record {record.id!r} has tiers {sorted(record.tiers)}, expected {sorted(tiers)}"
            )
        if set(record.metrics) != set(metrics):
            raise LogFormatError(
                f"{source}: record {record.id!r} has metrics {sorted(record.metrics)}, expected {sorted(metrics)}"
            )
    priced = [r.cost for r in chosen if r.cost]
    if not priced:
        return TierLog(chosen, tiers, metrics, None)
    mean = {tier: _mean([cost[tier] for cost in priced]) for tier in tiers}
    ordered = tuple(sorted(tiers, key=lambda t: (mean[t], tiers.index(t))))
    return TierLog(chosen, ordered, metrics, np.array([mean[t] for t in ordered]))


def _mean(values: Sequence[float]) -> float:
    """The mean, exact when every value is the same (a price per image repeated on every line)."""
    return values[0] if min(values) == max(values) else float(np.mean(values))


def iter_tier_log(path: Path) -> Iterator[TierRecord]:
    for where, data in json_lines(path):
        yield TierRecord.from_dict(data, where=where)


def read_tier_log(path: Path) -> TierLog:
    """Read and validate a whole K-tier (or two-tier) log; see :func:`tier_log`."""
    return tier_log(iter_tier_log(path), source=str(path))


def write_tier_log(path: Path, records: Iterable[TierRecord]) -> int:
    """Write records atomically (:func:`router.log.write_log`); returns how many were written."""
    return write_log(path, records)


def two_tier_records(records: Sequence[TierRecord], edge: str, cloud: str) -> list[LogRecord]:
    """The records as two-tier ones between tiers ``edge`` and ``cloud`` (for the two-tier routers); the other
    tiers are dropped, the auxiliary labels kept."""
    result = []
    for r in records:
        extra = {**r.extra, **({"cost": {"edge": r.cost[edge], "cloud": r.cost[cloud]}} if r.cost else {})}
        result.append(
            LogRecord(
                id=r.id,
                prompt=r.prompt,
                edge=r.quality[edge],
                cloud=r.quality[cloud],
                extra=extra,
                auxiliary=r.auxiliary,
            )
        )
    return result
