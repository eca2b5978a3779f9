"""The shipped RouteT2I artifacts score every carried prompt as they did when they were shipped.

``tests/data/shipped_scores.npz`` holds each artifact's score (½ − PRS) of the 2,459 distinct carried prompts
(PartiPrompts, GenAI-Bench, AGIQA-3K, in that order), computed by the router code the artifacts were trained
with, and the versions (content hashes) the artifacts had then. A change to how the router or its encoder
computes (a refactoring, a new piece size, a changed export) shows here before it reaches a decision.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from router.base import load_router
from router.data import partiprompts
from router.datasets import agiqa_3k, genai_bench
from router.embeddings import SentenceEncoder

FIXTURE = Path(__file__).parent / "data" / "shipped_scores.npz"

TOLERANCE = 1e-6
"""Scores are sums of float32 products: the prompts a piece pads together move them by ~4e-9 (measured), and
another CPU's kernels by more; a change in what is computed moves them by far more than this."""


def carried_prompts() -> list[str]:
    every = (
        partiprompts()
        + [record.prompt for record in genai_bench("SDXL_Turbo", "DALLE_3")]
        + [record.prompt for record in agiqa_3k("sd1.5_normal", "xl2.2_normal")]
    )
    return list(dict.fromkeys(every))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_the_shipped_artifact_scores_every_carried_prompt_unchanged(backend: str, model_cache: Path) -> None:
    expected = np.load(FIXTURE)
    prompts = carried_prompts()
    assert len(prompts) == 2459
    assert hashlib.sha256("\n".join(prompts).encode()).hexdigest() == str(expected["prompts_sha256"])
    key = backend.replace("-", "_")
    encoder = SentenceEncoder(backend=backend, graph_dir=model_cache / "encoders")
    router = load_router("routet2i", None, encoder=encoder)
    assert router.version == str(expected[f"{key}_version"])
    scores = router.score(prompts)
    difference = np.abs(scores - expected[key])
    assert difference.max() < TOLERANCE, (
        f"{int((difference >= TOLERANCE).sum())} prompts moved, most by {difference.max()}"
    )
