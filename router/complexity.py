"""A rule that needs no training: longer, denser prompts go to the cloud first.

The score is the number of content words in the prompt (words of two or more letters that are not English
function words), plus a tie-breaker proportional to its length. It stands on the observation behind
RouteT2I that prompts with more objects and attributes are where large models win most often. It is the
default policy until a trained router artifact is configured, and a baseline in evaluations.

Its budget threshold before live traffic has been seen is calibrated on the carried PartiPrompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from router.base import PromptRule
from router.types import Prediction

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "nor",
        "so",
        "yet",
        "of",
        "in",
        "on",
        "at",
        "by",
        "for",
        "with",
        "without",
        "to",
        "from",
        "into",
        "onto",
        "upon",
        "over",
        "under",
        "above",
        "below",
        "between",
        "among",
        "through",
        "during",
        "before",
        "after",
        "behind",
        "beside",
        "near",
        "off",
        "out",
        "up",
        "down",
        "about",
        "against",
        "along",
        "around",
        "across",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "has",
        "have",
        "had",
        "having",
        "it",
        "its",
        "it's",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "he",
        "she",
        "they",
        "them",
        "his",
        "her",
        "their",
        "our",
        "your",
        "my",
        "me",
        "we",
        "you",
        "i",
        "as",
        "than",
        "then",
        "too",
        "very",
        "just",
        "not",
        "no",
        "can",
        "could",
        "should",
        "would",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "also",
        "some",
        "any",
        "each",
        "every",
        "all",
        "both",
        "either",
        "neither",
        "such",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "where",
        "when",
        "while",
        "how",
        "why",
        "if",
        "else",
        "one",
    ]
)


def content_words(prompt: str) -> list[str]:
    return [w for w in _WORD.findall(prompt.lower()) if w not in STOPWORDS]


class PromptComplexityRouter(PromptRule):
    """Score = content-word count + length / 10,000 (the tie-breaker never outweighs one word)."""

    name = "prompt-complexity"

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([len(content_words(p)) + len(p) / 10_000 for p in prompts], dtype=np.float64)

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        return [
            Prediction(score=float(s), features={"content_words": len(content_words(p)), "chars": len(p)})
            for p, s in zip(prompts, self.score(prompts), strict=True)
        ]
