"""Replay logs: JSON Lines, one prompt per line, with the quality each tier achieved on it.

Format of one line::

    {"id": "00001", "prompt": "...",
     "quality": {"edge": {"alignment": 3.0}, "cloud": {"alignment": 4.3}},
     "metric_set": "human",                            # optional: where the numbers come from
     "auxiliary": {"SDXL_Base:alignment": 2.67},       # optional: other labels of the same prompt
     "cost": {"edge": 0.009, "cloud": 0.065}}          # optional, and any other extra fields

Both tiers must carry the same metrics. ``auxiliary`` holds labels of the prompt that are neither tier's quality
(for the carried data sets: the ratings other generators received on the same prompt), by name; a name may be
missing from some lines. Learned routers may train on them; decisions never see them. Extra fields are kept in
:attr:`LogRecord.extra`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from router.types import QualityVector


class LogFormatError(ValueError):
    """A replay log line is malformed; the message names the line and the field."""


@dataclass(frozen=True)
class LogRecord:
    """One prompt with the quality each tier achieved on it."""

    id: str
    prompt: str
    edge: QualityVector
    cloud: QualityVector
    extra: Mapping[str, Any] = field(default_factory=dict)
    auxiliary: Mapping[str, float] = field(default_factory=dict)
    """Training-only labels of the prompt by name (e.g. another generator's rating of it); may be empty."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.edge.metrics

    def quality(self, tier: str) -> QualityVector:
        if tier == "edge":
            return self.edge
        if tier == "cloud":
            return self.cloud
        raise ValueError(f"unknown tier {tier!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "quality": {"edge": dict(self.edge.values), "cloud": dict(self.cloud.values)},
            "metric_set": self.edge.metric_set,
            **({"auxiliary": dict(self.auxiliary)} if self.auxiliary else {}),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "record") -> LogRecord:
        for key in ("id", "prompt", "quality"):
            if key not in data:
                raise LogFormatError(f"{where}: missing field {key!r}")
        if not isinstance(data["prompt"], str) or not data["prompt"].strip():
            raise LogFormatError(f"{where}: field 'prompt' must be a non-empty string")
        quality = data["quality"]
        if not isinstance(quality, Mapping) or set(quality) != {"edge", "cloud"}:
            raise LogFormatError(f"{where}: field 'quality' must have exactly the keys 'edge' and 'cloud'")
        vectors = {}
        for tier in ("edge", "cloud"):
            values = quality[tier]
            if not isinstance(values, Mapping) or not values:
                raise LogFormatError(f"{where}: field 'quality.{tier}' must be a non-empty object")
            for metric, value in values.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise LogFormatError(f"{where}: field 'quality.{tier}.{metric}' must be a number")
            vectors[tier] = QualityVector(values=values, metric_set=str(data.get("metric_set", "log")))
        if set(vectors["edge"].metrics) != set(vectors["cloud"].metrics):
            raise LogFormatError(f"{where}: 'quality.edge' and 'quality.cloud' must have the same metrics")
        auxiliary = data.get("auxiliary", {})
        if not isinstance(auxiliary, Mapping):
            raise LogFormatError(f"{where}: field 'auxiliary' must be an object of numbers by label name")
        for name, value in auxiliary.items():
            if not name:
                raise LogFormatError(f"{where}: field 'auxiliary' has an empty label name")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise LogFormatError(f"{where}: field 'auxiliary.{name}' must be a finite number")
        reserved = ("id", "prompt", "quality", "metric_set", "auxiliary")
        extra = {k: v for k, v in data.items() if k not in reserved}
        return cls(
            id=str(data["id"]),
            prompt=data["prompt"],
            edge=vectors["edge"],
            cloud=vectors["cloud"],
            extra=extra,
            auxiliary={str(k): float(v) for k, v in auxiliary.items()},
        )


def json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of a JSON Lines file as ``(where, object)``, ``where`` naming the file and line.

    Raises:
        LogFormatError: a line that is not JSON, or not a JSON object.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LogFormatError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(data, dict):
                raise LogFormatError(f"{where}: each line must be a JSON object")
            yield where, data


def iter_log(path: Path) -> Iterator[LogRecord]:
    for where, data in json_lines(path):
        yield LogRecord.from_dict(data, where=where)


def read_log(path: Path) -> list[LogRecord]:
    """Read and validate a whole log: unique ids, the same metrics on every line."""
    records = list(iter_log(path))
    if not records:
        raise LogFormatError(f"{path}: the log is empty")
    seen: set[str] = set()
    metrics = set(records[0].metrics)
    for record in records:
        if record.id in seen:
            raise LogFormatError(f"{path}: duplicate id {record.id!r}")
        seen.add(record.id)
        if set(record.metrics) != metrics:
            raise LogFormatError(
                f"{path}: record {record.id!r} has metrics {sorted(record.metrics)}, expected {sorted(metrics)}"
            )
    return records


class Writable(Protocol):
    """A log line: a two-tier :class:`LogRecord` or a K-tier record."""

    def to_dict(self) -> dict[str, Any]: ...


def write_log(path: Path, records: Iterable[Writable]) -> int:
    """Write records (two-tier or K-tier) atomically (temporary file, then rename); returns how many were
    written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def metric_names(records: Sequence[LogRecord]) -> tuple[str, ...]:
    return records[0].metrics if records else ()


def auxiliary_names(records: Sequence[LogRecord]) -> tuple[str, ...]:
    """Every auxiliary label name that occurs in ``records``, sorted."""
    return tuple(sorted({name for record in records for name in record.auxiliary}))
