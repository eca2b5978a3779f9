"""How much the gap regressor's PGR depends on its regularisation (GenAI-Bench SDXL_Turbo -> DALLE_3, 5x3 CV).

Compares the inner-CV choice of alpha that ``gap-regressor`` makes with fixed alphas, on raw and on standardised
MiniLM embeddings. Run from the repository root: ``python ops/eval/ridge_alpha_study.py``.
"""

import os
from functools import partial
from pathlib import Path

import numpy as np

from router.datasets import genai_bench
from router.embeddings import SentenceEncoder
from router.evaluation import evaluate
from router.learned import GapRegressorRouter, ridge_path

encoder = SentenceEncoder(cache_dir=Path(os.environ.get("ROUTET2I_CACHE_DIR", "var/cache")) / "embeddings")


def fixed(alpha, standardise):
    class R(GapRegressorRouter):
        def _fit(self, x, y, prompts, seed):
            mean, std = (x.mean(0), x.std(0)) if standardise else (np.zeros(x.shape[1]), np.ones(x.shape[1]))
            ((coef, b),) = ridge_path((x - mean) / std, y, (alpha,))
            return {"mean": mean, "std": std, "coef": coef, "intercept": np.array(b), "alpha": np.array(alpha)}

    return R


variants = {"cv (ours)": GapRegressorRouter}
for a in (0.1, 1.0, 10.0):
    variants[f"raw a={a}"] = fixed(a, False)
for a in (1.0, 100.0, 1000.0):
    variants[f"std a={a}"] = fixed(a, True)
rep = evaluate(
    genai_bench("SDXL_Turbo", "DALLE_3"), {k: partial(v, encoder) for k, v in variants.items()}, folds=5, seeds=3
)
for k, s in rep.routers.items():
    print(f"{k:14s} PGR@50 {s.mean['pgr@0.5']:.3f}  APGR {s.mean['apgr']:.3f}")
