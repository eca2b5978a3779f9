"""Learned baselines on MiniLM sentence embeddings: the router families the literature compares against.

- ``cloud-win-classifier`` (RouteLLM style): logistic regression of "the cloud strictly wins" on the prompt
  embedding; the score is the predicted probability of a cloud win. RouteLLM fine-tunes a BERT classifier;
  here the encoder is frozen and only the head is learned, which is what ~400 labelled prompts support.
- ``gap-regressor`` (ZOOTER / Hybrid-LLM style): ridge regression of the cloud's quality gain; the score is the
  predicted gain.
- ``knn`` (RouterBench style): the mean gain of the k most similar training prompts (cosine similarity).

All three learn the composite gain of :mod:`router.pgr`: per-metric gain divided by the training fold's
scale of that metric (:func:`router.pgr.gain_scales`), averaged over metrics, so a multi-metric log is
learned in the same units the aggregate PGR is reported in. Features are the mean-pooled, normalised MiniLM
embeddings of :mod:`router.embeddings`, standardised with the training fold's statistics for the linear models.

Hyper-parameters (inverse regularisation C, ridge alpha, k) are chosen by 5-fold inner cross-validation on the
training records only, split by prompt like the outer folds, with the seed given to :meth:`Router.fit`:
log-loss for the classifier, squared error for the regressor and kNN. The grids are module constants.

The same inner folds give each training record a score from a model that did not see its prompt (with the
chosen hyper-parameters): sorted, these are the router's offline calibration, the scores it gives prompts it
has not seen, from which :meth:`EmbeddingRouter.calibrated_threshold` sets a live router's first thresholds
before its budget window has scores of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from router.base import Router, RouterError, read_manifest, write_manifest
from router.budget import sorted_quantile
from router.embeddings import SentenceEncoder
from router.log import LogRecord, metric_names
from router.pgr import composite_gain, gain_scales, quality_arrays
from router.splits import inner_splits

INNER_FOLDS = 5
"""Folds of the inner cross-validation that picks hyper-parameters."""

CLASSIFIER_CS: tuple[float, ...] = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
"""Inverse L2 strengths tried for the logistic regression (standardised 384-d features; on the carried logs the
search picks 3e-4 to 3e-3, and weaker regularisation only costs solver iterations)."""

RIDGE_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))
"""L2 strengths tried for the ridge regression (standardised features)."""

KNN_KS: tuple[int, ...] = (5, 10, 20, 40, 80)
"""Neighbourhood sizes tried for k-nearest neighbours (capped below the training size)."""

PARAMS = "params.npz"


class EmbeddingRouter(Router):
    """Base of routers that learn on sentence embeddings of the prompt.

    Args:
        encoder: the sentence encoder (shared by every router that should share its caches); default: one of the
            router's own, the packaged MiniLM on the default backend, built at first use.
    """

    learned: ClassVar[bool] = True
    uses_encoder: ClassVar[bool] = True

    def __init__(self, encoder: SentenceEncoder | None = None) -> None:
        self._encoder = encoder
        self.params: dict[str, np.ndarray] = {}
        self.metrics: tuple[str, ...] = ()
        self.scales: np.ndarray | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        """The encoder given to the constructor, else the router's own (built at first use, never shared)."""
        if self._encoder is None:
            self._encoder = SentenceEncoder()
        return self._encoder

    def warm(self, prompts: Sequence[str]) -> None:
        self.encoder.encode(prompts)

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> EmbeddingRouter:
        if len(records) < 2:
            raise RouterError(f"{self.name} needs at least 2 training records, got {len(records)}")
        prompts = [r.prompt for r in records]
        self.metrics = metric_names(records)
        edge, cloud = quality_arrays(records, self.metrics)
        self.scales = gain_scales(edge, cloud)
        target = composite_gain(edge, cloud, self.scales)
        x = self.encoder.encode(prompts).astype(np.float64)
        self.params = self._fit(x, target, prompts, seed)
        return self

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        if not self.params:
            raise RouterError(f"router {self.name!r} is not fitted")
        if not prompts:
            return np.zeros(0)
        return self._score(self.encoder.encode(prompts).astype(np.float64)).astype(np.float64)

    def _fit(self, x: np.ndarray, y: np.ndarray, prompts: Sequence[str], seed: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _score(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def calibrated_threshold(self, rho: float) -> float | None:
        """The score above which a share ``rho`` of the training records' out-of-fold scores lie (``None`` for
        an artifact without them: one trained before they were kept, or a search that did not run)."""
        calibration = self.params.get("calibration")
        if calibration is None or calibration.size == 0:
            return None
        return sorted_quantile(calibration, 1.0 - rho)

    # --- artifact -------------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        if not self.params:
            return self.name
        digest = hashlib.sha256(self.encoder.key.encode())
        for key in sorted(self.params):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(self.params[key]).tobytes())
        return f"{self.name}:{digest.hexdigest()[:12]}"

    def save(self, directory: Path) -> Path:
        if not self.params:
            raise RouterError(f"router {self.name!r} is not fitted; nothing to save")
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / PARAMS, **self.params)  # type: ignore[arg-type]
        write_manifest(
            directory,
            {
                "router": self.name,
                "version": self.version,
                "config": self.config(),
                "metrics": list(self.metrics),
                "scales": [float(s) for s in (self.scales if self.scales is not None else [])],
                "encoder": self.encoder.key,
            },
        )
        return directory

    @classmethod
    def load(cls, directory: Path, *, encoder: SentenceEncoder | None = None) -> Router:
        manifest = read_manifest(directory)
        router = cls(encoder=encoder, **manifest.get("config", {}))
        if manifest.get("encoder") != router.encoder.key:
            raise RouterError(
                f"artifact {directory} was trained on encoder {manifest.get('encoder')!r}, "
                f"this process has {router.encoder.key!r}"
            )
        with np.load(directory / PARAMS, allow_pickle=False) as data:
            router.params = {key: data[key] for key in data.files}
        router.metrics = tuple(manifest.get("metrics", ()))
        router.scales = np.asarray(manifest.get("scales", []), dtype=np.float64)
        if manifest.get("version") not in (None, router.version):
            raise RouterError(f"artifact {directory} is corrupt: its parameters do not hash to its version")
        return router

    def describe(self) -> dict[str, Any]:
        """The chosen hyper-parameters, for reports."""
        return {k: float(v) for k, v in self.params.items() if np.ndim(v) == 0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.describe())})"


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (1 where a column is constant), for ``(x − mean) / std``."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


class CloudWinClassifierRouter(EmbeddingRouter):
    """RouteLLM-style: P(cloud strictly beats edge) from a logistic regression on the prompt embedding."""

    name = "cloud-win-classifier"

    def _fit(self, x: np.ndarray, y: np.ndarray, prompts: Sequence[str], seed: int) -> dict[str, np.ndarray]:
        from sklearn.linear_model import LogisticRegression

        labels = (y > 0).astype(np.int64)
        mean, std = standardise(x)
        z = (x - mean) / std
        positives = int(labels.sum())
        if positives in (0, len(labels)):
            # One class only: nothing to separate; every prompt gets the training win rate.
            return {
                "mean": mean,
                "std": std,
                "coef": np.zeros(x.shape[1]),
                "intercept": np.array(0.0),
                "constant": np.array(float(positives > 0)),
                "C": np.array(0.0),
                "calibration": np.zeros(0),
            }
        splits = [
            (train, valid)
            for train, valid in inner_splits(prompts, INNER_FOLDS, seed)
            if 0 < labels[train].sum() < len(train)
        ]
        calibration = np.zeros(0)
        if len(splits) >= 2:
            losses = np.zeros(len(CLASSIFIER_CS))
            held_out = np.full((len(CLASSIFIER_CS), len(labels)), np.nan)
            for train, valid in splits:
                for j, c in enumerate(CLASSIFIER_CS):
                    fitted = LogisticRegression(C=c, max_iter=2000).fit(z[train], labels[train])
                    p = np.clip(fitted.predict_proba(z[valid])[:, 1], 1e-12, 1 - 1e-12)
                    losses[j] -= float(np.sum(labels[valid] * np.log(p) + (1 - labels[valid]) * np.log(1 - p)))
                    held_out[j, valid] = p
            best = int(np.argmin(losses))
            c = CLASSIFIER_CS[best]
            calibration = np.sort(held_out[best][~np.isnan(held_out[best])])  # a one-class fold was skipped
        else:
            c = 1.0  # too few of one class for an inner search: a fixed, documented default
        model = LogisticRegression(C=c, max_iter=2000).fit(z, labels)
        return {
            "mean": mean,
            "std": std,
            "coef": model.coef_.ravel().astype(np.float64),
            "intercept": np.array(float(model.intercept_[0])),
            "constant": np.array(np.nan),
            "C": np.array(c),
            "calibration": calibration,
        }

    def _score(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        if not np.isnan(p["constant"]):
            return np.full(x.shape[0], float(p["constant"]))
        logits = ((x - p["mean"]) / p["std"]) @ p["coef"] + p["intercept"]
        result: np.ndarray = 1.0 / (1.0 + np.exp(-logits))
        return result


class GapRegressorRouter(EmbeddingRouter):
    """ZOOTER / Hybrid-LLM style: ridge regression of the cloud's (composite) quality gain."""

    name = "gap-regressor"

    def _fit(self, x: np.ndarray, y: np.ndarray, prompts: Sequence[str], seed: int) -> dict[str, np.ndarray]:
        mean, std = standardise(x)
        z = (x - mean) / std
        splits = inner_splits(prompts, INNER_FOLDS, seed)
        errors = np.zeros(len(RIDGE_ALPHAS))
        held_out = np.zeros((len(RIDGE_ALPHAS), len(y)))
        for train, valid in splits:
            for j, (coef, intercept) in enumerate(ridge_path(z[train], y[train], RIDGE_ALPHAS)):
                held_out[j, valid] = z[valid] @ coef + intercept
                errors[j] += float(((held_out[j, valid] - y[valid]) ** 2).sum())
        best = int(np.argmin(errors))
        alpha = RIDGE_ALPHAS[best]
        ((coef, intercept),) = ridge_path(z, y, (alpha,))
        return {
            "mean": mean,
            "std": std,
            "coef": coef,
            "intercept": np.array(intercept),
            "alpha": np.array(alpha),
            "calibration": np.sort(held_out[best]),
        }

    def _score(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        result: np.ndarray = ((x - p["mean"]) / p["std"]) @ p["coef"] + p["intercept"]
        return result


class KNNRouter(EmbeddingRouter):
    """RouterBench style: the mean composite gain of the k training prompts nearest by cosine similarity."""

    name = "knn"

    def _fit(self, x: np.ndarray, y: np.ndarray, prompts: Sequence[str], seed: int) -> dict[str, np.ndarray]:
        splits = inner_splits(prompts, INNER_FOLDS, seed)
        candidates = [k for k in KNN_KS if k < min(len(train) for train, _ in splits)] or [1]
        errors = np.zeros(len(candidates))
        held_out = np.zeros((len(candidates), len(y)))
        for train, valid in splits:
            ranked = _neighbour_order(x[valid], x[train])
            cum = np.cumsum(y[train][ranked], axis=1)
            for j, k in enumerate(candidates):
                held_out[j, valid] = cum[:, k - 1] / k
                errors[j] += float(((held_out[j, valid] - y[valid]) ** 2).sum())
        best = int(np.argmin(errors))
        return {
            "x": x.astype(np.float32),
            "y": y.astype(np.float64),
            "k": np.array(float(candidates[best])),
            "calibration": np.sort(held_out[best]),
        }

    def _score(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        k = int(p["k"])
        ranked = _neighbour_order(x, p["x"])[:, :k]
        result: np.ndarray = p["y"][ranked].mean(axis=1)
        return result

    def describe(self) -> dict[str, Any]:
        return {"k": int(self.params["k"])} if self.params else {}


def ridge_path(z: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list[tuple[np.ndarray, Any]]:
    """Ridge solutions (coefficients, intercept) for several alphas from one SVD of the centred features.

    Minimises ``‖y − z·w − b‖² + α‖w‖²`` with an unpenalised intercept, as ``sklearn.linear_model.Ridge`` does.
    ``y`` may be one target ``(n,)`` (intercept a scalar) or several ``(n, t)`` (intercepts ``(t,)``).
    """
    z_mean, y_mean = z.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(z - z_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    path = []
    for alpha in alphas:
        shrink = (s / (s**2 + alpha)).reshape(-1, *([1] * (uty.ndim - 1)))
        coef = vt.T @ (shrink * uty)
        path.append((coef, y_mean - z_mean @ coef))
    return path


def _neighbour_order(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices of ``keys`` by decreasing cosine similarity to each query (embeddings have unit length);
    equal similarities keep training order, so the result is deterministic."""
    similarity = queries.astype(np.float64) @ keys.astype(np.float64).T
    order: np.ndarray = np.argsort(-similarity, axis=1, kind="stable")
    return order
