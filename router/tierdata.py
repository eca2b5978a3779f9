"""K-tier replay logs built from the human ratings carried in ``router/data``, priced per image.

A log of any two or more of a data set's generators: each becomes a tier named after it, with the data set's
metrics (GenAI-Bench: ``alignment``, the mean of three 1-5 ratings; AGIQA-3K: MOS ``quality`` and
``alignment``), and each line carries every tier's price per image (``cost``) from the carried price table
``router/data/prices.json`` (its sources and estimates: ``router/data/README.md``), which a caller may override
per generator. The tiers are written cheapest first (ties in the order asked for); the generators not chosen
become the lines' ``auxiliary`` labels, as in the two-tier importers of :mod:`router.datasets`.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from router.data import path
from router.datasets import AGIQA_CONFIGS, GENAI_BENCH_MODELS, DatasetError
from router.tierlog import TierRecord
from router.types import QualityVector

DATASETS: dict[str, tuple[str, ...]] = {"genai-bench": GENAI_BENCH_MODELS, "agiqa-3k": AGIQA_CONFIGS}
"""The carried data sets by name, with their generators."""


def price_table() -> dict[str, Any]:
    """The carried price table (``router/data/prices.json``) as it is stored."""
    table: dict[str, Any] = json.loads(path("prices.json").read_text(encoding="utf-8"))
    return table


def prices(dataset: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """US dollars per image of every generator of ``dataset``, with ``overrides`` (by generator) applied.

    Raises:
        DatasetError: an unknown data set, an override for a generator it does not have, or a negative price.
    """
    if dataset not in DATASETS:
        raise DatasetError(f"unknown data set {dataset!r}; choose one of: {', '.join(DATASETS)}")
    table = {model: float(entry["usd"]) for model, entry in price_table()[dataset].items()}
    for model, usd in (overrides or {}).items():
        if model not in table:
            raise DatasetError(f"unknown model {model!r} in a price; choose one of: {', '.join(DATASETS[dataset])}")
        if not math.isfinite(usd) or usd < 0:
            raise DatasetError(f"the price of {model!r} must be a finite number of at least 0, got {usd}")
        table[model] = float(usd)
    return table


def check_tiers(dataset: str, tiers: Sequence[str]) -> tuple[str, ...]:
    """``tiers`` validated against ``dataset``'s generators: at least two, each known, none twice."""
    models = DATASETS[dataset]
    if len(tiers) < 2:
        raise DatasetError(f"give at least two tiers, got {len(tiers)}")
    for tier in tiers:
        if tier not in models:
            raise DatasetError(f"unknown model {tier!r}; choose among: {', '.join(models)}")
    if len(set(tiers)) != len(tiers):
        raise DatasetError("a model is named twice")
    return tuple(tiers)


def _cheapest_first(tiers: Sequence[str], price: Mapping[str, float]) -> tuple[str, ...]:
    return tuple(sorted(tiers, key=lambda t: (price[t], list(tiers).index(t))))


def genai_bench_tiers(tiers: Sequence[str], overrides: Mapping[str, float] | None = None) -> list[TierRecord]:
    """GenAI-Bench with ``tiers`` (generator names, any order): one record per prompt, tiers cheapest first."""
    chosen = check_tiers("genai-bench", tiers)
    price = prices("genai-bench", overrides)
    ordered = _cheapest_first(chosen, price)
    data = json.loads(path("genai_bench_527", "genai_image.json").read_text(encoding="utf-8"))
    records = []
    for key in sorted(data):
        entry = data[key]
        mean = {model: sum(r) / len(r) for model, r in entry["models"].items()}
        records.append(
            TierRecord(
                id=f"genai-{entry['id']}",
                prompt=entry["prompt"].strip(),
                quality={t: QualityVector({"alignment": mean[t]}, metric_set="human") for t in ordered},
                cost={t: price[t] for t in ordered},
                extra={"source": "genai-bench-527"},
                auxiliary={f"{m}:alignment": mean[m] for m in GENAI_BENCH_MODELS if m not in ordered and m in mean},
            )
        )
    return records


def agiqa_3k_tiers(tiers: Sequence[str], overrides: Mapping[str, float] | None = None) -> list[TierRecord]:
    """AGIQA-3K with ``tiers`` (configurations, any order): one record per prompt that every one of them
    rendered, with MOS ``quality`` and ``alignment``, tiers cheapest first."""
    chosen = check_tiers("agiqa-3k", tiers)
    price = prices("agiqa-3k", overrides)
    ordered = _cheapest_first(chosen, price)
    by_prompt: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    with path("agiqa_3k", "data.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            config, index = row["name"].removesuffix(".jpg").rsplit("_", 1)
            by_prompt[index][config] = row

    def vector(row: dict[str, str]) -> QualityVector:
        return QualityVector(
            {"quality": float(row["mos_quality"]), "alignment": float(row["mos_align"])}, metric_set="human"
        )

    records = []
    for index in sorted(by_prompt):
        rows = by_prompt[index]
        if any(t not in rows for t in ordered):
            continue
        records.append(
            TierRecord(
                id=f"agiqa-{index}",
                prompt=rows[ordered[0]]["prompt"].strip(),
                quality={t: vector(rows[t]) for t in ordered},
                cost={t: price[t] for t in ordered},
                extra={"source": "agiqa-3k"},
                auxiliary={
                    f"{config}:{metric}": value
                    for config in AGIQA_CONFIGS
                    if config not in ordered and config in rows
                    for metric, value in vector(rows[config]).values.items()
                },
            )
        )
    return records


IMPORTERS = {"genai-bench": genai_bench_tiers, "agiqa-3k": agiqa_3k_tiers}
"""The K-tier importer of each carried data set."""
