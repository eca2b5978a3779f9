"""Routers among any number of tiers: predicted quality of every tier, turned into a utility per tier.

A K-tier router (:class:`TierRouter`) is fitted on a K-tier log (:mod:`router.tierlog`) and predicts, for each
prompt, every metric's quality on every tier (:meth:`TierRouter.qualities`, shape ``(n, K, M)``, tiers cheapest
first). Its **utilities** (:meth:`TierRouter.utilities`, ``(n, K)``) are the Pareto relative superiority of each
tier's predicted metric vector over the cheapest tier's, minus ½, in the form of the two-tier RouteT2I
(:mod:`router.routet2i`)::

    U_k = Σ_m w_m · σ((q̂_km − q̂_0m) / (Γ · s_m)) − ½

with the RouteT2I settings' temperature ``Γ`` and metric weights ``w`` and the per-metric scale ``s_m`` of the
dearer tiers' gains over the cheapest on the training log (:func:`tier_scales`). ``U_0 = 0``; a tier predicted
better on every metric approaches ½. The decision among tiers is :mod:`router.tiers`' (``choose``,
``multiplier_for_budget``), never the router's. With two tiers, ``U_1`` is the two-tier RouteT2I's score
``½ − PRS``.

Routers (:func:`available_tier_routers`): ``ridge`` and ``knn`` regress every tier's qualities on the MiniLM
sentence embedding (:mod:`router.multitier.regressors`); ``routet2i`` is the RouteT2I network with a quality
head per tier (:mod:`router.multitier.routet2i`). Each saves a versioned artifact (``manifest.json`` and the
arrays) that :func:`load_tier_router` restores.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from router.base import RouterError, read_manifest, write_manifest
from router.pgr import gain_scales
from router.routet2i.model import prs_weights
from router.tierlog import TierRecord, tier_log
from router.tiers import check_prices, multiplier_for_budget

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder

__all__ = [
    "ARRAYS",
    "TierRouter",
    "available_tier_routers",
    "create_tier_router",
    "load_tier_router",
    "prs_utilities",
    "quality_utilities",
    "tier_router_class",
    "tier_scales",
]

ARRAYS = "arrays.npz"
"""A K-tier artifact's arrays, next to its ``manifest.json``."""

T = TypeVar("T", bound="TierRouter")


def tier_scales(qualities: np.ndarray) -> np.ndarray:
    """Per-metric scale ``s_m`` of the dearer tiers' gains over the cheapest, pooled over tiers and prompts:
    :func:`router.pgr.gain_scales` of every gain ``q_km − q_0m`` (k ≥ 1), so (M,)."""
    gains = (qualities[:, 1:, :] - qualities[:, :1, :]).reshape(-1, qualities.shape[2])
    return gain_scales(np.zeros_like(gains), gains)


def prs_utilities(qualities: np.ndarray, scales: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """Each tier's Pareto relative superiority over the cheapest tier, minus ½: ``(n, K)`` from predicted
    qualities ``(n, K, M)``; column 0 is exactly 0."""
    gaps = (qualities - qualities[:, :1, :]) / (temperature * scales)
    utilities: np.ndarray = (1.0 / (1.0 + np.exp(-gaps))) @ weights - 0.5
    utilities[:, 0] = 0.0
    return utilities


def quality_utilities(qualities: np.ndarray, scales: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each tier's predicted quality gain over the cheapest tier, each metric in units of its scale, weighted over
    metrics: ``(n, K)``, column 0 zero. Choosing by it is choosing the best predicted quality minus λ·price."""
    result: np.ndarray = ((qualities - qualities[:, :1, :]) / scales) @ weights
    return result


class TierRouter(ABC):
    """Base of the K-tier routers: fitted on a K-tier log, it predicts every tier's qualities per prompt.

    Args:
        encoder: the sentence encoder (shared by every router that should share its caches); None: one of the
            router's own, the packaged MiniLM, built at first use.
        temperature: ``Γ`` of the utilities' PRS (default: the RouteT2I settings').
        metric_weights: ``w_m`` by metric name; metrics not named share the rest (empty: equal weights).
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        encoder: SentenceEncoder | None = None,
        temperature: float = 1.0,
        metric_weights: Mapping[str, float] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self._encoder = encoder
        self.temperature = float(temperature)
        self.metric_weights = dict(metric_weights or {})
        self.tiers: tuple[str, ...] = ()
        """Tier names, cheapest first (those of the training log)."""
        self.metrics: tuple[str, ...] = ()
        self.scales = np.ones(0)
        """Per-metric gain scales of the training log (:func:`tier_scales`)."""
        self.calibration = np.zeros((0, 0))
        """Utilities (n, K) of training prompts as a new prompt would get them, for a first multiplier (may be
        empty)."""
        self._version: str | None = None

    @property
    def encoder(self) -> SentenceEncoder:
        """The encoder given to the constructor, else the router's own (built at first use, never shared)."""
        if self._encoder is None:
            from router.embeddings import SentenceEncoder

            self._encoder = SentenceEncoder()
        return self._encoder

    def config(self) -> dict[str, Any]:
        """Constructor arguments that reproduce this router (before fitting)."""
        return {"temperature": self.temperature, "metric_weights": self.metric_weights}

    def weights(self) -> np.ndarray:
        """The metrics' PRS weights ``w_m`` (they sum to 1)."""
        return prs_weights(self.metrics, self.metric_weights)

    # --- fitting and predicting ---------------------------------------------------------------------------

    def warm(self, prompts: Sequence[str]) -> None:
        """Encode prompts it will be fitted on or asked about, once, in large batches (no labels read)."""
        self.encoder.encode(prompts)

    def fit(self, records: Sequence[TierRecord], *, seed: int = 0) -> TierRouter:
        """Learn every tier's qualities from a K-tier log (tiers ordered cheapest first by its costs,
        :func:`router.tierlog.tier_log`); ``seed`` makes every random choice reproducible."""
        log = tier_log(records, source="training records")
        if len(log.records) < 10:
            raise RouterError(f"{self.name} needs at least 10 training records, got {len(log.records)}")
        self.tiers, self.metrics = log.tiers, log.metrics
        qualities = log.qualities()
        self.scales = tier_scales(qualities)
        self._fit(log.prompts, qualities, seed)
        self._version = None
        return self

    @abstractmethod
    def _fit(self, prompts: list[str], qualities: np.ndarray, seed: int) -> None:
        """Fit on the training prompts' qualities ``(n, K, M)`` (tiers and metrics already set)."""

    @abstractmethod
    def qualities(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted quality of every metric on every tier: ``(n, K, M)``, tiers cheapest first."""

    def utilities(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted utility of every tier, ``(n, K)``: PRS over the cheapest tier minus ½ (column 0 is 0)."""
        self._check_fitted()
        if not prompts:
            return np.zeros((0, len(self.tiers)))
        return prs_utilities(self.qualities(prompts), self.scales, self.weights(), self.temperature)

    def calibrated_multiplier(self, prices: Sequence[float], budget_usd: float) -> float | None:
        """The price multiplier λ that keeps the training prompts' :attr:`calibration` utilities within
        ``budget_usd`` per image (:func:`router.tiers.multiplier_for_budget`): a live router's first λ before
        its own window has utilities. None when the artifact has no calibration."""
        if self.calibration.size == 0:
            return None
        return multiplier_for_budget(self.calibration, list(check_prices(prices)), budget_usd)

    def _check_fitted(self) -> None:
        if not self.tiers:
            raise RouterError(f"K-tier router {self.name!r} is not fitted")

    # --- artifact ------------------------------------------------------------------------------------------

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Every fitted array by name (what :data:`ARRAYS` holds, besides the scales and calibration)."""

    @abstractmethod
    def install(self, arrays: dict[str, np.ndarray], manifest: Mapping[str, Any]) -> None:
        """Set the fitted state from an artifact's arrays (as :meth:`arrays` named them) and manifest."""

    def _all_arrays(self) -> dict[str, np.ndarray]:
        return {**self.arrays(), "_scales": self.scales, "_calibration": self.calibration}

    @property
    def version(self) -> str:
        """``name:hash`` of the encoder's key, the settings, the tiers, the metrics and every array (the name
        alone before fitting)."""
        if not self.tiers:
            return self.name
        if self._version is None:
            digest = hashlib.sha256(self.encoder.key.encode())
            facts = {"config": self.config(), "tiers": self.tiers, "metrics": self.metrics}
            digest.update(json.dumps(facts, sort_keys=True).encode())
            found = self._all_arrays()
            for key in sorted(found):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(found[key], dtype=np.float64).tobytes())
            self._version = f"{self.name}:{digest.hexdigest()[:12]}"
        return self._version

    def save(self, directory: Path) -> Path:
        """Write the artifact (``manifest.json`` and :data:`ARRAYS`) that :func:`load_tier_router` restores."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / ARRAYS, **self._all_arrays())  # type: ignore[arg-type]
        write_manifest(
            directory,
            {
                "router": self.name,
                "kind": "tiers",
                "version": self.version,
                "config": self.config(),
                "tiers": list(self.tiers),
                "metrics": list(self.metrics),
                "encoder": self.encoder.key,
                "training": self.training_report(),
                "sha256": {ARRAYS: hashlib.sha256((directory / ARRAYS).read_bytes()).hexdigest()},
            },
        )
        return directory

    def training_report(self) -> dict[str, Any]:
        """What the fit chose (hyper-parameters, epochs), for the manifest."""
        return {}

    @classmethod
    def load(cls: type[T], directory: Path, *, encoder: SentenceEncoder | None = None) -> T:
        """The router saved in ``directory``, on ``encoder`` (None: its own).

        Raises:
            RouterError: another router's artifact, another encoder's, corrupt arrays, or arrays that do not hash
                to the recorded version.
        """
        manifest = read_manifest(directory)
        if manifest.get("router") != cls.name or manifest.get("kind") != "tiers":
            raise RouterError(f"artifact {directory} holds {manifest.get('router')!r}, not K-tier {cls.name!r}")
        router = cls(encoder=encoder, **manifest.get("config", {}))
        if manifest.get("encoder") != router.encoder.key:
            raise RouterError(
                f"artifact {directory} was trained on encoder {manifest.get('encoder')!r}, "
                f"this process has {router.encoder.key!r}"
            )
        path = directory / ARRAYS
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != manifest["sha256"].get(ARRAYS):
            raise RouterError(f"artifact {directory} is corrupt: {ARRAYS} is missing or does not match its hash")
        with np.load(path, allow_pickle=False) as data:
            found = {key: data[key] for key in data.files}
        router.tiers, router.metrics = tuple(manifest["tiers"]), tuple(manifest["metrics"])
        router.scales, router.calibration = found.pop("_scales"), found.pop("_calibration")
        router.install(found, manifest)
        if router.version != manifest.get("version"):
            raise RouterError(f"artifact {directory} does not hash to its recorded version {manifest.get('version')}")
        return router


# --- registry ---------------------------------------------------------------------------------------------

_BUILTIN: dict[str, str] = {
    "ridge": "router.multitier.regressors:RidgeTierRouter",
    "knn": "router.multitier.regressors:KNNTierRouter",
    "routet2i": "router.multitier.routet2i:RouteT2ITierRouter",
}
"""K-tier routers by name, as ``module:Class`` (torch loads only with the one that needs it)."""


def available_tier_routers() -> list[str]:
    return sorted(_BUILTIN)


def tier_router_class(name: str) -> type[TierRouter]:
    target = _BUILTIN.get(name)
    if target is None:
        raise RouterError(f"unknown K-tier router {name!r}; available: {', '.join(available_tier_routers())}")
    module_name, _, class_name = target.partition(":")
    cls: type[TierRouter] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_tier_router(name: str, *, encoder: SentenceEncoder | None = None, **settings: Any) -> TierRouter:
    """A new, unfitted K-tier router with ``settings`` (the RouteT2I settings for ``routet2i``)."""
    return tier_router_class(name)(encoder=encoder, **settings)


def load_tier_router(name: str, directory: Path, *, encoder: SentenceEncoder | None = None) -> TierRouter:
    """The K-tier router ``name`` saved in ``directory`` (:meth:`TierRouter.save`), ready to predict."""
    return tier_router_class(name).load(directory, encoder=encoder)
