"""The priors a deployment's learning loop can start from (:mod:`router.learning`).

A deployment's first champion is chosen among these on its first labels (:func:`router.learning.choose_prior`),
and a challenger may be warm started from one of them:

- ``shipped``: the shipped RouteT2I artifact (trained on one carried pair, AGIQA-3K SD 1.5 → SDXL);
- ``rule``: longest-prompt-first, the prompt rule (calibrated on the carried PartiPrompts);
- ``pooled``: a RouteT2I fitted on :func:`pooled_records`, every carried human-rated data set's model pairs
  pooled, so that it knows what makes a prompt hard for the weaker of two generators in general rather than
  for one pair.

The pooled records use the metric every carried data set shares, ``alignment``. GenAI-Bench rates it from 1 to
5 and AGIQA-3K on its own opinion scale, so each data set's ratings are standardised over all its models'
ratings before they are pooled. A simulation on a carried data set must use a pooled prior that never saw it
(``exclude``).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from router.base import Router, create_router, load_router
from router.data import path
from router.log import LogRecord
from router.types import QualityVector

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder

DATASETS = ("genai-bench", "agiqa-3k")
"""The carried human-rated data sets, by the names ``exclude`` takes."""

SOURCES = {"genai-bench-527": "genai-bench", "agiqa-3k": "agiqa-3k"}
"""A log record's ``source`` (as :mod:`router.datasets` writes it) to its data set's name."""

METRIC = "alignment"
"""The metric every carried data set rates, on which they are pooled."""

PAIRS_PER_PROMPT = 2
"""Model pairs drawn per prompt and data set: 1,654 records with both data sets (a RouteT2I keeps 1.5 KB per
training record as neighbours, about 2.5 MB), fitted in seconds."""

RULE = "longest-prompt-first"
"""The prompt rule among the candidate priors."""

POOLED_SEED = 0
"""Seed of the pooled prior's fit."""


def _genai_bench() -> dict[str, tuple[str, dict[str, float]]]:
    """Prompt id → (prompt, model → mean alignment rating)."""
    data = json.loads(path("genai_bench_527", "genai_image.json").read_text(encoding="utf-8"))
    return {
        f"genai-{entry['id']}": (
            entry["prompt"].strip(),
            {model: sum(r) / len(r) for model, r in entry["models"].items() if r},
        )
        for entry in (data[key] for key in sorted(data))
    }


def _agiqa_3k() -> dict[str, tuple[str, dict[str, float]]]:
    """Prompt id → (prompt, configuration → alignment opinion score)."""
    prompts: dict[str, str] = {}
    ratings: dict[str, dict[str, float]] = defaultdict(dict)
    with path("agiqa_3k", "data.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            config, index = row["name"].removesuffix(".jpg").rsplit("_", 1)
            prompts.setdefault(index, row["prompt"].strip())
            ratings[index][config] = float(row["mos_align"])
    return {f"agiqa-{index}": (prompts[index], ratings[index]) for index in sorted(ratings)}


_LOADERS = {"genai-bench": _genai_bench, "agiqa-3k": _agiqa_3k}


def _dataset_records(name: str, rng: np.random.Generator) -> list[LogRecord]:
    """One data set's pooled records: per prompt, ``PAIRS_PER_PROMPT`` distinct model pairs drawn at random, the
    model with the lower mean rating over the data set as edge; ratings standardised over the data set."""
    table = _LOADERS[name]()
    by_model: dict[str, list[float]] = defaultdict(list)
    for _, ratings in table.values():
        for model, value in ratings.items():
            by_model[model].append(value)
    strength = {model: float(np.mean(values)) for model, values in by_model.items()}
    every = np.array([v for values in by_model.values() for v in values])
    mean, std = float(every.mean()), float(every.std()) or 1.0
    records = []
    for key, (prompt, ratings) in table.items():
        models = sorted(ratings, key=lambda m: (strength[m], m))  # weakest first
        pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
        if not pairs:
            continue
        chosen = rng.choice(len(pairs), size=min(PAIRS_PER_PROMPT, len(pairs)), replace=False)
        for index in sorted(int(i) for i in chosen):
            edge, cloud = pairs[index]
            records.append(
                LogRecord(
                    id=f"{key}:{edge}:{cloud}",
                    prompt=prompt,
                    edge=QualityVector({METRIC: (ratings[edge] - mean) / std}, metric_set="human-standardised"),
                    cloud=QualityVector({METRIC: (ratings[cloud] - mean) / std}, metric_set="human-standardised"),
                    extra={"source": f"pooled:{name}", "edge_model": edge, "cloud_model": cloud},
                )
            )
    return records


def pooled_records(*, exclude: Collection[str] = frozenset(), seed: int = 0) -> list[LogRecord]:
    """Replay records pooled from every carried human-rated data set except ``exclude``.

    Args:
        exclude: data sets to leave out (names of :data:`DATASETS`).
        seed: seeds the pairs drawn per prompt.

    Returns:
        Per data set and prompt, :data:`PAIRS_PER_PROMPT` pairs of two of its models, the weaker (lower mean
        rating over the data set) as edge, metric ``alignment`` standardised per data set; data sets in
        :data:`DATASETS` order, prompts in each data set's order.
    """
    unknown = set(exclude) - set(DATASETS)
    if unknown:
        raise ValueError(f"unknown data set {sorted(unknown)[0]!r}; choose among {', '.join(DATASETS)}")
    records: list[LogRecord] = []
    for offset, name in enumerate(DATASETS):
        if name not in exclude:
            records += _dataset_records(name, np.random.default_rng([seed, offset]))
    if not records:
        raise ValueError("every carried data set is excluded: nothing to pool")
    return records


def datasets_of(records: Collection[LogRecord]) -> set[str]:
    """The carried data sets a log's records come from (by their ``source`` field), so a prior can leave them out."""
    found = set()
    for record in records:
        source = str(record.extra.get("source", ""))
        name = SOURCES.get(source) or SOURCES.get(source.removeprefix("pooled:")) or source.removeprefix("pooled:")
        if name in DATASETS:
            found.add(name)
    return found


def pooled_prior(
    encoder: SentenceEncoder | None = None, *, exclude: Collection[str] = frozenset(), seed: int = 0
) -> Router:
    """A RouteT2I (default settings) fitted on :func:`pooled_records`."""
    return create_router("routet2i", encoder=encoder).fit(pooled_records(exclude=exclude, seed=seed), seed=POOLED_SEED)


def candidate_priors(
    encoder: SentenceEncoder | None = None,
    *,
    exclude: Collection[str] = frozenset(),
    seed: int = 0,
    pooled: bool = True,
) -> dict[str, Router]:
    """The priors a deployment can start from: ``shipped``, ``rule`` and (with ``pooled``) ``pooled``, fitted
    without the data sets in ``exclude``."""
    priors: dict[str, Router] = {
        "shipped": load_router("routet2i", None, encoder=encoder),
        "rule": create_router(RULE),
    }
    if pooled:
        priors["pooled"] = pooled_prior(encoder, exclude=exclude, seed=seed)
    return priors
