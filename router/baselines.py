"""Baselines that learn nothing from the log: random, all-edge, all-cloud, longest-prompt-first, noun count,
and the per-prompt oracle (an upper bound that reads the log's true qualities).

The learned baselines (a RouteLLM-style classifier, a quality-gap regressor, k-nearest neighbours) live in
:mod:`router.learned`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from router.base import PromptRule, Router, RouterError
from router.log import LogRecord, metric_names
from router.pgr import aggregate_weights, quality_arrays
from router.types import Prediction, Tier


class RandomRouter(Router):
    """Uniform random scores: the budget is spent blindly. Its expected PGR at cloud fraction f is f.

    A prompt's score is a hash of the seed and the prompt text, so it does not depend on the order or the
    company a prompt is scored in, and the same seed always gives the same routing. :meth:`fit` takes the
    seed it is given (cross-validation passes a different one per fold and seed).
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> RandomRouter:
        self.seed = seed
        return self

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([_uniform(self.seed, p) for p in prompts], dtype=np.float64)

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @property
    def version(self) -> str:
        return f"{self.name}:seed={self.seed}"


def _uniform(seed: int, prompt: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _FixedTierRouter(Router):
    """Sends every prompt to one tier whatever the budget: the two ends of every PGR curve."""

    fixed_tier: ClassVar[Tier | None]

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.full(len(prompts), 1.0 if self.fixed_tier == "cloud" else 0.0)

    def edge_floor(self) -> float | None:
        # All-edge: every score (0) is at the floor, so live routing never sends anything to the cloud either.
        return 0.0 if self.fixed_tier == "edge" else None

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        floor = self.edge_floor()
        return [Prediction(score=float(s), max_score_for_edge=floor) for s in self.score(prompts)]


class AllEdgeRouter(_FixedTierRouter):
    """Every prompt on the edge tier: PGR 0 at every budget, and the cheapest routing."""

    name = "all-edge"
    fixed_tier = "edge"


class AllCloudRouter(_FixedTierRouter):
    """Every prompt on the cloud tier, ignoring the budget: PGR 1 everywhere at the price of a cloud share of 1."""

    name = "all-cloud"
    fixed_tier = "cloud"


class LongestPromptFirstRouter(PromptRule):
    """Score = prompt length in characters: long, detailed prompts go to the cloud first."""

    name = "longest-prompt-first"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([len(p) for p in prompts], dtype=np.float64)


class NounCountRouter(PromptRule):
    """Score = number of nouns (RouteT2I's observation: more objects, more often a cloud win).

    Nouns come from an offline lexicon with context rules (:mod:`router.nouns`, which documents its limits).
    Prompts with the same count tie; evaluation takes tied prompts in random order (at their expectation).
    """

    name = "noun-count"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        from router.nouns import count_nouns

        return np.array([count_nouns(p) for p in prompts], dtype=np.float64)

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        from router.nouns import nouns

        found = [nouns(p) for p in prompts]
        return [Prediction(score=float(len(f)), features={"nouns": f}) for f in found]


class OracleRouter(Router):
    """The per-prompt oracle: scores are the true cloud gains read from the log being evaluated.

    It is the upper bound of what any router can reach on a log, not a router: it can only score records
    that carry labels (:meth:`score_records`), never bare prompts. On a log with several metrics its score is
    the composite gain that the aggregate PGR is linear in (see :mod:`router.pgr`), computed on the
    records it is given, so it maximises the aggregate PGR exactly at every budget.
    """

    name = "oracle"
    needs_labels = True

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        raise RouterError("the oracle scores a log's records from their true qualities; it cannot score bare prompts")

    def score_records(self, records: Sequence[LogRecord]) -> np.ndarray:
        if not records:
            return np.zeros(0)
        edge, cloud = quality_arrays(records, metric_names(records))
        weights = aggregate_weights(edge, cloud)
        scores: np.ndarray = (cloud - edge) @ weights
        return scores
