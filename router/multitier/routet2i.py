"""K-tier RouteT2I: the RouteT2I network (:mod:`router.routet2i`) with a quality head per tier.

The predictor is the two-tier router's, with the tier axis grown from two to K: token selection and the dual-gate
mixture of experts (one expert per metric) as before, each metric's head predicting its quality on every tier;
the ridge prior, the ensemble of members, early stopping and the neighbour blend unchanged. Training is the
two-tier training (:func:`router.routet2i.training.fit_members`) on the qualities of every tier, standardised
per metric over all tiers, with the loss's gap term comparing each dearer tier with the cheapest (with two tiers
it is exactly the two-tier loss). The fitted state lives in a :class:`~router.routet2i.model.RouteT2IRouter`
(:attr:`RouteT2ITierRouter.model`), whose numpy forward pass gives the ``(n, M, K)`` outputs; the utilities are
those of :mod:`router.multitier` (PRS over the cheapest tier).

Calibration: the training prompts' utilities, each with its own ratings left out of its neighbours (as for the
two-tier router), kept as :attr:`~router.multitier.TierRouter.calibration` for a first price multiplier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from router.embeddings import TokenStates
from router.learned import standardise
from router.multitier import TierRouter, prs_utilities
from router.routet2i import artifact
from router.routet2i.config import RouteT2IConfig
from router.routet2i.model import PIECE_ROWS, RouteT2IRouter, pad_batch, prompt_statistics

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder


class RouteT2ITierRouter(TierRouter):
    """RouteT2I predicting every tier's every metric; utilities by PRS over the cheapest tier.

    Args:
        config: the RouteT2I settings (also accepted as keyword arguments); its temperature and metric weights
            are the utilities'. The ``multi_metric`` ablation and the ``auxiliary`` labels are not offered with K
            tiers.
        encoder: the sentence encoder (see :class:`~router.multitier.TierRouter`).
    """

    name: ClassVar[str] = "routet2i"

    def __init__(
        self, config: RouteT2IConfig | None = None, *, encoder: SentenceEncoder | None = None, **settings: Any
    ) -> None:
        cfg = replace(config or RouteT2IConfig(), **settings)
        if not cfg.multi_metric:
            raise ValueError("the K-tier RouteT2I predicts every metric: multi_metric must stay true")
        if cfg.auxiliary:
            raise ValueError("the K-tier RouteT2I does not learn auxiliary labels: auxiliary must stay false")
        super().__init__(encoder=encoder, temperature=cfg.temperature, metric_weights=cfg.metric_weights)
        self.cfg = cfg
        self.model = RouteT2IRouter(cfg, encoder=encoder)
        """The fitted network, prior and neighbours (its tier axis is this router's tiers)."""

    @property
    def encoder(self) -> SentenceEncoder:
        return self.model.encoder

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def warm(self, prompts: Sequence[str]) -> None:
        self.encoder.reserve(len(prompts))
        self.encoder.encode_tokens(prompts)

    def _fit(self, prompts: list[str], qualities: np.ndarray, seed: int) -> None:
        from router.routet2i.training import fit_members

        model = self.model
        model.metrics = model.targets = self.metrics
        model.scales = self.scales
        model.mean, model.std = standardise(qualities.reshape(-1, qualities.shape[2]))
        y = ((qualities - model.mean) / model.std).transpose(0, 2, 1)  # (n, M, K), as the network's outputs
        tokens = self.encoder.encode_tokens(prompts)
        model.stats_mean, model.stats_std = standardise(prompt_statistics(prompts))
        stats = model.standardised_stats(prompts)
        raw = model.raw_features(tokens, stats)
        model.feature_mean, model.feature_std = standardise(raw)
        features = (raw - model.feature_mean) / model.feature_std
        groups = fit_members(model, prompts, y, tokens, stats, features, None, seed=seed)
        predicted = self._qualities(tokens, stats, groups)
        self.calibration = prs_utilities(predicted, self.scales, self.weights(), self.temperature)

    def qualities(self, prompts: Sequence[str]) -> np.ndarray:
        self._check_fitted()
        if not prompts:
            return np.zeros((0, len(self.tiers), len(self.metrics)))
        tokens = self.encoder.encode_tokens(prompts)
        return self._qualities(tokens, self.model.standardised_stats(prompts))

    def _qualities(
        self,
        tokens: Sequence[TokenStates],
        stats: np.ndarray,
        groups: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Predicted qualities ``(n, K, M)`` in pieces of :data:`~router.routet2i.model.PIECE_ROWS` prompts;
        ``groups``: the prompts are the training prompts, none its own neighbour (as in the two-tier
        calibration)."""
        parts = []
        for start in range(0, len(tokens), PIECE_ROWS):
            rows = slice(start, start + PIECE_ROWS)
            exclude = None if groups is None else groups[0][rows, None] == groups[1][None, :]
            parts.append(self._forward(tokens[rows], stats[rows], exclude))
        return np.concatenate(parts)

    def _forward(self, tokens: Sequence[TokenStates], stats: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        """The two-tier router's eval-mode forward pass over K tiers: the members' mixture of experts, plus the
        ridge prior, blended with the neighbours' ratings; ``(n, K, M)`` in the metrics' own units."""
        model = self.model
        batch = pad_batch(tokens, stats)
        out, _ = model._moe(batch, explain=False)  # (n, M, K) standardised
        out = out.astype(np.float64)
        if model.priors:
            features = (model.raw_features(tokens, stats) - model.feature_mean) / model.feature_std
            weights = model._stacked()
            coef = weights["prior_coef"]
            prior = (features @ coef.reshape(coef.shape[0], -1)).reshape(-1, *coef.shape[1:])
            out = out + prior + weights["prior_intercept"]
        if len(model.neighbour_keys):
            near = model._neighbours(batch.sentence, exclude)
            if exclude is not None:  # a row with every neighbour excluded keeps the ensemble alone
                alone = np.isnan(near).any(axis=(1, 2))
                near[alone] = out[alone]
            share = self.cfg.neighbour_share
            out = (1.0 - share) * out + share * near
        result: np.ndarray = (out * model.std[:, None] + model.mean[:, None]).transpose(0, 2, 1)
        return result

    # --- artifact ------------------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        return artifact.arrays(self.model)

    def install(self, arrays: dict[str, np.ndarray], manifest: Mapping[str, Any]) -> None:
        found = {key: value.astype(np.float64) for key, value in arrays.items()}
        members = sum(1 for key in found if key.startswith("m") and key.endswith(".experts"))
        facts = {"metrics": self.metrics, "targets": self.metrics, "members": members, "training": {}}
        artifact.install(self.model, facts, found)
        self.model.training_report = dict(manifest.get("training", {}))

    def training_report(self) -> dict[str, Any]:
        return self.model.training_report
