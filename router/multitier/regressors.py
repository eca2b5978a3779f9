"""Per-tier quality regressors on the MiniLM sentence embedding: the K-tier baselines.

- ``ridge``: a ridge regression of every (tier, metric) quality on the standardised embedding, each output's
  L2 strength chosen by 5-fold inner cross-validation from :data:`router.learned.RIDGE_ALPHAS` (squared error).
- ``knn``: the mean qualities of the k training prompts nearest by cosine similarity, k chosen by inner
  cross-validation from :data:`router.learned.KNN_KS` (squared error of every output, each in units of its
  standard deviation).

The inner folds split by prompt, seeded by the fit's seed (:func:`router.splits.inner_splits`), like the
two-tier baselines of :mod:`router.learned`, which these follow with one output per tier and metric instead of
one composite gain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from router.learned import INNER_FOLDS, KNN_KS, RIDGE_ALPHAS, ridge_path, standardise
from router.multitier import TierRouter
from router.splits import inner_splits


class _EmbeddingTierRouter(TierRouter):
    """A K-tier router whose only feature is the prompt's sentence embedding; :attr:`params` holds its fit."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.params: dict[str, np.ndarray] = {}

    def _embed(self, prompts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(prompts).astype(np.float64)

    def qualities(self, prompts: Sequence[str]) -> np.ndarray:
        self._check_fitted()
        if not prompts:
            return np.zeros((0, len(self.tiers), len(self.metrics)))
        flat = self._predict(self._embed(prompts))
        return flat.reshape(len(prompts), len(self.tiers), len(self.metrics))

    def _predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted qualities, flattened to (n, K·M)."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.params)

    def install(self, arrays: dict[str, np.ndarray], manifest: Mapping[str, Any]) -> None:
        self.params = dict(arrays)


class RidgeTierRouter(_EmbeddingTierRouter):
    """Ridge regression of every tier's every metric on the standardised sentence embedding."""

    name: ClassVar[str] = "ridge"

    def _fit(self, prompts: list[str], qualities: np.ndarray, seed: int) -> None:
        x = self._embed(prompts)
        y = qualities.reshape(len(prompts), -1)
        mean, std = standardise(x)
        z = (x - mean) / std
        errors = np.zeros((len(RIDGE_ALPHAS), y.shape[1]))
        for train, valid in inner_splits(prompts, INNER_FOLDS, seed):
            for j, (coef, intercept) in enumerate(ridge_path(z[train], y[train], RIDGE_ALPHAS)):
                errors[j] += ((z[valid] @ coef + intercept - y[valid]) ** 2).sum(axis=0)
        best = np.argmin(errors, axis=0)  # one L2 strength per output
        path = ridge_path(z, y, RIDGE_ALPHAS)
        coef = np.stack([path[j][0][:, o] for o, j in enumerate(best)], axis=1)
        intercept = np.array([path[j][1][o] for o, j in enumerate(best)])
        alpha = np.array([RIDGE_ALPHAS[j] for j in best])
        self.params = {"mean": mean, "std": std, "coef": coef, "intercept": intercept, "alpha": alpha}

    def _predict(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        result: np.ndarray = ((x - p["mean"]) / p["std"]) @ p["coef"] + p["intercept"]
        return result

    def training_report(self) -> dict[str, Any]:
        return {"alpha": [float(a) for a in self.params.get("alpha", [])]}


class KNNTierRouter(_EmbeddingTierRouter):
    """The mean qualities of the k training prompts most similar to the prompt (cosine similarity)."""

    name: ClassVar[str] = "knn"

    def _fit(self, prompts: list[str], qualities: np.ndarray, seed: int) -> None:
        x = self._embed(prompts)
        y = qualities.reshape(len(prompts), -1)
        _, spread = standardise(y)
        splits = inner_splits(prompts, INNER_FOLDS, seed)
        candidates = [k for k in KNN_KS if k < min(len(train) for train, _ in splits)] or [1]
        errors = np.zeros(len(candidates))
        for train, valid in splits:
            ranked = _nearest_first(x[valid], x[train])
            cum = np.cumsum(y[train][ranked], axis=1)  # (n_valid, n_train, K·M)
            for j, k in enumerate(candidates):
                errors[j] += float((((cum[:, k - 1] / k - y[valid]) / spread) ** 2).sum())
        k = candidates[int(np.argmin(errors))]
        self.params = {"x": x.astype(np.float32), "y": y, "k": np.array(float(k))}

    def _predict(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        ranked = _nearest_first(x, p["x"])[:, : int(p["k"])]
        result: np.ndarray = p["y"][ranked].mean(axis=1)
        return result

    def training_report(self) -> dict[str, Any]:
        return {"k": int(self.params["k"])} if self.params else {}


def _nearest_first(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices of ``keys`` by decreasing cosine similarity to each query (unit-length embeddings); equal
    similarities keep training order."""
    similarity = queries.astype(np.float64) @ keys.astype(np.float64).T
    order: np.ndarray = np.argsort(-similarity, axis=1, kind="stable")
    return order
