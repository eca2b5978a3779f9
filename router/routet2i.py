"""The RouteT2I router: a dual-gated token-selection mixture of experts predicts every quality metric of both
tiers from the prompt, Pareto relative superiority compares the two predicted vectors, and the budget decides.

**Predictor** (one expert per metric). The frozen, pretrained MiniLM encoder (:mod:`router.embeddings`) gives
token states ``T`` (n × d) and the sentence embedding ``s``. For expert ``i`` with embedding ``e_i``:

1. *Token selection*: affinities ``a = softmax_t(T·e_i / √d)`` over the prompt's tokens; the expert keeps its
   top-K tokens and renormalises their affinities into weights ``w``. (The paper writes ``softmax(T·Eᵀ)``
   without naming the axis; over tokens is the reading that stays meaningful with a single expert, which a
   one-metric log such as GenAI-Bench has.)
2. *Dual gate*: ``T⁺ = T·P⁺_i·S`` and ``T⁻ = T·P⁻_i·S`` with low-rank ``P±_i`` (d × r) and a scoring matrix ``S``
   (r × h) shared by all experts; ``Ĝ = σ(T⁺ − T⁻)`` says per token and channel whether the token pushes the
   metric up or down. The expert's summary is ``z_i = Σ_t w_t·(2Ĝ_t − 1)``.
3. *Head* of metric ``i``: a linear map of ``[z_i, prompt statistics]`` (optionally also ``φ(s)``, a projection of
   the sentence embedding: ``sentence_width``) to the metric's quality on the edge and on the cloud, in units
   standardised on the training data.
4. *Ridge prior*: the network predicts corrections to a closed-form ridge regression of every output on the
   sentence embedding and the prompt statistics (``prior``). Optionally (``auxiliary``, off by default: it did
   not raise PGR at 50% in the measurements of docs/router.md), where the log carries auxiliary labels (other
   generators' ratings of the same prompts, :attr:`router.log.LogRecord.auxiliary`), the prior learns them
   too, in one reduced-rank regression whose shared output space shapes the tiers' predictions
   (:func:`fit_prior`); they are training targets only, never inputs.
5. *Neighbours*: the ensemble's predicted qualities are blended, with share ``neighbour_share`` (⅓), with the
   qualities the training prompts most similar to the prompt received: a softmax over their cosine
   similarities to its sentence embedding at temperature ``neighbour_temperature``. The ridge prior and the
   network are global and smooth in the embedding; the neighbours are local, and remember what prompts of the
   same subject or style got (the training embeddings and ratings are kept in the artifact).

Training: AdamW, mean squared error on both tiers plus ``gap_weight`` times the error of the predicted gap
(routing depends on the gap), early stopping on a validation split carved out of the training records by
prompt; optionally each member's corrections are then scaled by the share in [0, 1] that is best on that
split (``shrink_correction``, off by default). ``members`` predictors are trained on different validation splits
and averaged (a small ensemble: on a few hundred labelled prompts single runs vary more than the differences
between routers).

The encoder is frozen: its token states are computed once per prompt and cached, so one fit costs seconds;
an epoch that back-propagates through the encoder costs about 80 times more on a CPU, and tuning its top one
or two layers with the heads changed no PGR measurably on the standard logs (docs/router.md).
Training runs the torch module; decisions run the same eval-mode forward pass in numpy with every member
stacked and each gate's ``P⁺ − P⁻`` taken as one projection ahead of time (one matrix product projects the
tokens for all gates, one per member applies its ``S``), which is what keeps a one-prompt decision a fraction
of a millisecond above the encoder.

**Pareto relative superiority.** ``D_i = σ((q̂_i(edge) − q̂_i(cloud)) / (Γ·s_i))`` with ``s_i`` the metric's gain
scale on the training data (:func:`router.pgr.gain_scales`: the mean gain, or the std of the gains when the mean
is near zero) and ``PRS = Σ_i w_i·D_i``. PRS below ½: the cloud is predicted better. The router's score is
``½ − PRS``; prompts with PRS ≥ ½ never go to the cloud (:meth:`RouteT2IRouter.edge_floor`), and the budget
sends the lowest PRS first: the largest ``α ≤ ½`` with ``P{PRS < α} ≤ ρ``.

**Ablations** (the paper's): ``routet2i-no-multi-metric`` collapses the metrics into one composite quality
(each metric divided by its gain scale, averaged) learned by one expert; ``routet2i-no-token-selection``
weights all tokens by affinity; ``routet2i-no-dual-gate`` replaces ``σ(T⁺ − T⁻)`` by one projection ``tanh(T·P_i·S)``.
``routet2i-no-neighbours`` leaves out the neighbour blend, which the paper does not have.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from router.base import Router, RouterError, read_manifest, write_manifest
from router.budget import sorted_quantile
from router.embeddings import SentenceEncoder, TokenStates, default_encoder, default_model_path
from router.learned import standardise
from router.log import LogRecord, auxiliary_names, metric_names
from router.pgr import gain_scales, quality_arrays
from router.splits import group_ids, split_folds
from router.types import Prediction, QualityVector

WEIGHTS = "weights.npz"

LATER_SETTINGS: dict[str, Any] = {"neighbour_share": 0.0, "neighbour_temperature": 0.05, "neighbour_limit": 20_000}
"""Settings added after artifacts were first written, at the values that reproduce an artifact trained before
them: a manifest without one loads with this value, and a setting at this value is left out of the version's
hash, so those artifacts keep their versions and keep loading."""

PIECE_ROWS = 32
"""Prompts per pass of the router's own network when scoring: a batch's pieces run side by side on the
encoder's threads once its forward passes are done (about 1.05 times the batched throughput of one pass over
the whole batch on 2 cores, docs/performance.md)."""

DEFAULT_ARTIFACT = "default"
"""Name of the artifact shipped in ``router/artifacts/`` (``-int8``: its twin for the int8 encoder);
``routet2i train`` reproduces both (docs/router.md)."""


@dataclass(frozen=True)
class RouteT2IConfig:
    """Every setting of the predictor, its training and the PRS comparison.

    Attributes:
        top_k: tokens each expert keeps (token selection).
        rank: rank ``r`` of the positive/negative projections ``P±``.
        width: width ``h`` of the shared scoring matrix ``S`` (the gate's channels).
        sentence_width: width of the sentence-embedding projection the heads also see (0: none).
        prior: the network predicts corrections to a closed-form ridge regression of every output on the
            sentence embedding and prompt statistics (L2 strength by inner cross-validation on the member's
            training split); early stopping keeps the correction of the epoch with the lowest validation error
            (after at least one epoch).
        auxiliary: the prior also learns the log's auxiliary labels (``LogRecord.auxiliary``: other generators'
            ratings of the same prompts) in one reduced-rank regression with the tiers' qualities (:func:`fit_prior`);
            only training uses them, and a log without them is fitted on the tiers' qualities alone. Off by
            default: on the standard suite it moved APGR by +0.001 and PGR@30%/50% by +0.008/−0.010 on average
            (docs/router.md).
        prompt_statistics: the heads also see the prompt's length and noun count (log-scaled, standardised):
            the paper's observation that more objects make the cloud win more often, made explicit.
        shrink_correction: after early stopping, each member's corrections are scaled by the share in [0, 1]
            that minimises its validation loss (:func:`correction_share`): 0 when the trained network does not
            improve on the prior, so a network that cannot help cannot hurt.
        dropout: dropout on the heads' inputs while training.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: prompts per step.
        max_epochs: most passes over the training records per member.
        patience: epochs without a better validation loss before a member stops.
        validation_share: share of the training prompts held out for early stopping.
        gap_weight: weight of the gap error in the loss, next to the two tiers' errors.
        members: predictors trained on different validation splits and averaged.
        temperature: Γ of the PRS.
        metric_weights: ``w_i`` of the PRS by metric name; metrics not named share the rest equally
            (empty: equal weights).
        floor: prompts with PRS ≥ ½ never go to the cloud (the paper's α ≤ ½ rule).
        token_selection: keep only the top-K tokens per expert (ablation: all tokens).
        dual_gate: the σ(T⁺ − T⁻) gate (ablation: one projection).
        multi_metric: one expert per metric (ablation: one expert on a composite metric).
        neighbour_share: share of the predicted qualities taken from the most similar training prompts' ratings
            (0: the ensemble alone; 1: the neighbours alone).
        neighbour_temperature: temperature of the softmax over cosine similarities that weighs those prompts
            (lower: fewer, closer prompts count).
        neighbour_limit: most training prompts kept as neighbours; a longer log keeps a seeded random sample
            of this many. The artifact stores 1.5 KB per kept prompt and every decision compares its prompt
            with all of them, so a log that grows with live traffic must not grow them without bound.
        explain_tokens: tokens reported per metric in explanations.
        threads: torch threads while fitting (None: leave torch's setting).
    """

    top_k: int = 8
    rank: int = 32
    width: int = 64
    sentence_width: int = 0
    prompt_statistics: bool = True
    prior: bool = True
    auxiliary: bool = False
    shrink_correction: bool = False
    dropout: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 32
    max_epochs: int = 150
    patience: int = 15
    validation_share: float = 0.15
    gap_weight: float = 2.0
    members: int = 5
    temperature: float = 1.0
    metric_weights: dict[str, float] = field(default_factory=dict)
    floor: bool = True
    token_selection: bool = True
    dual_gate: bool = True
    multi_metric: bool = True
    neighbour_share: float = 1.0 / 3.0
    neighbour_temperature: float = 0.05
    neighbour_limit: int = 20_000
    explain_tokens: int = 5
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "top_k",
            "rank",
            "width",
            "batch_size",
            "max_epochs",
            "members",
            "explain_tokens",
            "neighbour_limit",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sentence_width < 0:
            raise ValueError(f"sentence_width must not be negative, got {self.sentence_width}")
        if not 0.0 < self.validation_share < 1.0:
            raise ValueError(f"validation_share must be within (0, 1), got {self.validation_share}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.neighbour_share <= 1.0:
            raise ValueError(f"neighbour_share must be within [0, 1], got {self.neighbour_share}")
        if self.neighbour_temperature <= 0:
            raise ValueError(f"neighbour_temperature must be positive, got {self.neighbour_temperature}")
        if any(w < 0 for w in self.metric_weights.values()):
            raise ValueError("metric_weights must not be negative")


def _torch() -> Any:
    import torch

    return torch


def prompt_statistics(prompts: Sequence[str]) -> np.ndarray:
    """Per prompt: log(1 + characters), log(1 + words), log(1 + nouns), log(1 + content words); shape (n, 4)."""
    from router.complexity import content_words
    from router.nouns import count_nouns

    rows = [(len(p), len(p.split()), count_nouns(p), len(content_words(p))) for p in prompts]
    return np.log1p(np.array(rows, dtype=np.float64).reshape(len(prompts), 4))


N_STATISTICS = 4


def build_network(config: RouteT2IConfig, d: int, n_metrics: int) -> Any:
    """The mixture-of-experts predictor as a torch module (built lazily: torch loads only when needed)."""
    torch = _torch()
    nn = torch.nn

    class DualGateMoE(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            k, r, h, hs = n_metrics, config.rank, config.width, config.sentence_width
            hs_in = hs + (N_STATISTICS if config.prompt_statistics else 0)
            self.experts = nn.Parameter(torch.randn(k, d) * d**-0.5)
            self.p_pos = nn.Parameter(torch.randn(k, d, r) * d**-0.5)
            self.p_neg = nn.Parameter(torch.randn(k, d, r) * d**-0.5)
            self.shared = nn.Parameter(torch.randn(r, h) * r**-0.5)
            self.sentence = nn.Linear(d, hs) if hs else None
            self.head_w = nn.Parameter(torch.randn(k, h + hs_in, 2) * (h + hs_in) ** -0.5 * 0.1)
            self.head_b = nn.Parameter(torch.zeros(k, 2))
            self.dropout = nn.Dropout(config.dropout)

        def token_weights(self, states: Any, mask: Any) -> Any:
            """Per expert, the weights of the tokens it selected: shape (B, k, L)."""
            logits = torch.einsum("bld,kd->bkl", states, self.experts) * d**-0.5
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            affinity = torch.softmax(logits, dim=-1)
            if config.token_selection:
                k_sel = min(config.top_k, states.shape[1])
                top = torch.topk(affinity, k_sel, dim=-1).indices
                keep = torch.zeros_like(affinity, dtype=torch.bool).scatter_(-1, top, True) & mask[:, None, :]
                affinity = affinity * keep
            return affinity / affinity.sum(dim=-1, keepdim=True).clamp(min=1e-12)

        def gates(self, states: Any) -> Any:
            """Signed per-token pushes, shape (B, k, L, h), in (−1, 1)."""
            pos = torch.einsum("bld,kdr,rh->bklh", states, self.p_pos, self.shared)
            if config.dual_gate:
                neg = torch.einsum("bld,kdr,rh->bklh", states, self.p_neg, self.shared)
                return 2.0 * torch.sigmoid(pos - neg) - 1.0
            return torch.tanh(pos)

        def forward(self, states: Any, mask: Any, sentence: Any, stats: Any) -> tuple[Any, Any, Any]:
            weights = self.token_weights(states, mask)
            gates = self.gates(states)
            z = torch.einsum("bkl,bklh->bkh", weights, gates)
            extra = []
            if self.sentence is not None:
                extra.append(torch.nn.functional.gelu(self.sentence(sentence)))
            if config.prompt_statistics:
                extra.append(stats)
            if extra:
                shared = torch.cat(extra, dim=-1)
                z = torch.cat([z, shared[:, None, :].expand(-1, z.shape[1], -1)], dim=-1)
            out = torch.einsum("bkh,kho->bko", self.dropout(z), self.head_w) + self.head_b
            return out, weights, gates

    return DualGateMoE()


@dataclass
class _Batch:
    """Padded token states (B, L, d), their mask (B, L), sentence embeddings (B, d) and statistics (B, 4)."""

    states: np.ndarray
    mask: np.ndarray
    sentence: np.ndarray
    stats: np.ndarray

    def inputs(self) -> tuple[Any, Any, Any, Any]:
        """The same as torch tensors (training)."""
        torch = _torch()
        return tuple(torch.from_numpy(a) for a in (self.states, self.mask, self.sentence, self.stats))


PRIOR_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))
"""L2 strengths tried for the ridge prior (standardised features)."""

PRIOR_RANKS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
"""Ranks tried for the prior's shared output space (full rank, plain ridge, is always tried too)."""


def fit_prior(
    x: np.ndarray,
    y: np.ndarray,
    prompts: Sequence[str],
    seed: int,
    weights: np.ndarray | None = None,
    auxiliary: np.ndarray | None = None,
    ranks: Sequence[int] = PRIOR_RANKS,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Reduced-rank multi-output ridge of ``y`` (n, m, 2) on features ``x`` (n, p), optionally learnt together
    with auxiliary targets: coefficients (p, m, 2), intercepts (m, 2) and the chosen L2 strength and rank.

    The outputs are ``y`` and the columns of ``auxiliary`` (n, q) standardised (NaN: the label is missing;
    it counts as the column's mean). Every output is ridge-regressed on ``x`` with one L2 strength, and the
    fitted values are projected onto their top ``r`` principal directions, so all outputs share an
    ``r``-dimensional space of prompt features: auxiliary labels (other generators' ratings of the same
    prompt) then shape the directions the tiers' predictions use, which lowers their variance on a few
    hundred noisy labels. The L2 strength and the rank (full rank, plain ridge, included) are the pair with
    the smallest inner cross-validated error of the predicted cloud-minus-edge gaps combined with
    ``weights`` (m,) per metric (what routing ranks by: the linearised PRS); None: the sum of the metrics'
    squared gap errors. Only the coefficients of ``y`` are returned: decisions need nothing else.
    """
    from router.learned import INNER_FOLDS, ridge_path
    from router.splits import inner_splits

    flat = y.reshape(len(y), -1)
    n_main = flat.shape[1]
    outputs = flat
    if auxiliary is not None and auxiliary.size:
        aux = auxiliary[:, (~np.isnan(auxiliary)).sum(axis=0) >= 2]  # a label known once carries nothing
        if aux.size:
            mean, std = np.nanmean(aux, axis=0), np.nanstd(aux, axis=0)
            aux = np.where(np.isnan(aux), 0.0, (aux - mean) / np.where(std > 1e-12, std, 1.0))
            outputs = np.concatenate([flat, aux], axis=1)
    splits = inner_splits(prompts, INNER_FOLDS, seed)

    def basis(x_fit: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """Principal directions (rows, strongest first) of the fitted outputs, and zero rows to their number."""
        _, _, vt = np.linalg.svd((x_fit - x_fit.mean(axis=0)) @ coef, full_matrices=False)
        full = np.zeros((coef.shape[1], coef.shape[1]))
        full[: len(vt)] = vt
        return full

    def search(outputs: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Inner cross-validated routing error per (L2 strength, rank); without auxiliary outputs, plain ridge."""
        n_out = outputs.shape[1]
        candidates = sorted({min(int(r), n_out) for r in (*ranks, n_out)}) if n_out > n_main else [n_out]
        errors = np.zeros((len(PRIOR_ALPHAS), len(candidates)))
        for train, valid in splits:
            truth = y[valid, :, 1] - y[valid, :, 0]
            centre = x[train].mean(axis=0)
            for j, (coef, intercept) in enumerate(ridge_path(x[train], outputs[train], PRIOR_ALPHAS)):
                if len(candidates) > 1:
                    directions = basis(x[train], coef)
                    deviation = (x[valid] - centre) @ coef  # the fitted values' deviation from the output means
                    means = intercept + centre @ coef
                for k, rank in enumerate(candidates):
                    if rank == n_out:
                        fitted = x[valid] @ coef + intercept
                    else:
                        fitted = (deviation @ directions[:rank].T) @ directions[:rank] + means
                    pred = fitted[:, :n_main].reshape(-1, *y.shape[1:])
                    gap_error = (pred[..., 1] - pred[..., 0]) - truth
                    if weights is not None:
                        gap_error = gap_error @ weights
                    errors[j, k] += float((gap_error**2).sum())
        return errors, candidates

    # Full rank is plain ridge, whose coefficients of each output do not depend on the others: the search
    # can always fall back on the prior without auxiliary labels.
    errors, candidates = search(outputs)
    j, k = np.unravel_index(int(np.argmin(errors)), errors.shape)
    ((coef, intercept),) = ridge_path(x, outputs, (PRIOR_ALPHAS[j],))
    rank = candidates[k]
    if rank < outputs.shape[1]:
        centre = x.mean(axis=0)
        means = intercept + centre @ coef
        top = basis(x, coef)[:rank]
        coef = (coef @ top.T) @ top
        intercept = means - centre @ coef
    chosen = {"alpha": float(PRIOR_ALPHAS[j]), "rank": int(rank), "outputs": int(outputs.shape[1])}
    return coef[:, :n_main].reshape(x.shape[1], *y.shape[1:]), intercept[:n_main].reshape(y.shape[1:]), chosen


def _pad(items: Sequence[TokenStates], stats: np.ndarray) -> _Batch:
    length = max(len(item.tokens) for item in items)
    d = items[0].states.shape[1]
    states = np.zeros((len(items), length, d), dtype=np.float32)
    mask = np.zeros((len(items), length), dtype=bool)
    for row, item in enumerate(items):
        states[row, : len(item.tokens)] = item.states
        mask[row, : len(item.tokens)] = True
    sentence = np.stack([item.sentence for item in items]).astype(np.float32)
    return _Batch(states, mask, sentence, stats.astype(np.float32))


class RouteT2IRouter(Router):
    """RouteT2I: multi-metric quality prediction for both tiers, compared by Pareto relative superiority.

    Args:
        config: predictor, training and PRS settings (also accepted as keyword arguments).
        encoder: the sentence encoder; default: the process-wide one.
    """

    name = "routet2i"
    learned: ClassVar[bool] = True
    ablation: ClassVar[dict[str, Any]] = {}
    """Settings a named ablation forces (see the module docstring)."""

    def __init__(
        self, config: RouteT2IConfig | None = None, *, encoder: SentenceEncoder | None = None, **settings: Any
    ) -> None:
        base = config or RouteT2IConfig()
        self.cfg = replace(base, **{**settings, **self.ablation})
        self._encoder = encoder
        self.metrics: tuple[str, ...] = ()
        self.targets: tuple[str, ...] = ()
        self.mean = np.zeros(0)
        self.std = np.ones(0)
        self.scales = np.ones(0)
        self.calibration = np.zeros(0)
        self.stats_mean = np.zeros(N_STATISTICS)
        self.stats_std = np.ones(N_STATISTICS)
        self.states: list[dict[str, np.ndarray]] = []
        self.priors: list[tuple[np.ndarray, np.ndarray]] = []
        self.feature_mean = np.zeros(0)
        self.feature_std = np.ones(0)
        self.neighbour_keys = np.zeros((0, 0), dtype=np.float32)
        """Sentence embeddings of the training prompts (N, d), for the neighbour blend."""
        self.neighbour_values = np.zeros((0, 0, 2), dtype=np.float32)
        """Their standardised qualities (N, k, 2)."""
        self._inference: dict[str, np.ndarray] | None = None
        self._version: str | None = None
        self.training_report: dict[str, Any] = {}
        self.on_member: Callable[[int, dict[str, Any]], None] | None = None
        """Called after each ensemble member is trained (progress bars)."""

    @property
    def encoder(self) -> SentenceEncoder:
        return self._encoder if self._encoder is not None else default_encoder()

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def warm(self, prompts: Sequence[str]) -> None:
        self.encoder.reserve(len(prompts))
        self.encoder.encode_tokens(prompts)

    # --- fitting ----------------------------------------------------------------------------------------

    def _targets(self, records: Sequence[LogRecord]) -> tuple[np.ndarray, np.ndarray]:
        """Edge and cloud quality per target (the metrics, or one composite for the ablation)."""
        edge, cloud = quality_arrays(records, self.metrics)
        if self.cfg.multi_metric:
            return edge, cloud
        scales = gain_scales(edge, cloud)
        return (edge / scales).mean(axis=1, keepdims=True), (cloud / scales).mean(axis=1, keepdims=True)

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> RouteT2IRouter:
        torch = _torch()
        if len(records) < 10:
            raise RouterError(f"{self.name} needs at least 10 training records, got {len(records)}")
        self.metrics = metric_names(records)
        self.targets = self.metrics if self.cfg.multi_metric else ("composite",)
        edge, cloud = self._targets(records)
        self.scales = gain_scales(edge, cloud)
        self.mean, self.std = standardise(np.concatenate([edge, cloud]))
        y = np.stack([(edge - self.mean) / self.std, (cloud - self.mean) / self.std], axis=-1)  # (n, m, 2)
        prompts = [r.prompt for r in records]
        tokens = self.encoder.encode_tokens(prompts)
        self.stats_mean, self.stats_std = standardise(prompt_statistics(prompts))
        stats = self._standardised_stats(prompts)
        raw_features = self._raw_features(tokens, stats)
        self.feature_mean, self.feature_std = standardise(raw_features)
        features = (raw_features - self.feature_mean) / self.feature_std
        auxiliary = _auxiliary_labels(records) if self.cfg.auxiliary else None
        n_valid_folds = max(2, round(1.0 / self.cfg.validation_share))
        # A standardised gap moves ½ − PRS by about w_i·std_i / (4Γ·s_i): the prior's L2 strength is chosen on that.
        prs_relevance = self.prs_weights() * self.std / self.scales
        self.states, self.priors, reports = [], [], []
        with _threads(self.cfg.threads):
            for member in range(self.cfg.members):
                member_seed = seed * 1000 + member
                folds = split_folds(prompts, n_valid_folds, member_seed)
                holdout = member % n_valid_folds
                train = np.flatnonzero(folds != holdout)
                valid = np.flatnonzero(folds == holdout)
                torch.manual_seed(member_seed)
                prior = np.zeros_like(y)
                chosen: dict[str, float] = {}
                if self.cfg.prior:
                    coef, intercept, chosen = fit_prior(
                        features[train],
                        y[train],
                        [prompts[i] for i in train],
                        member_seed,
                        prs_relevance,
                        None if auxiliary is None else auxiliary[train],
                    )
                    self.priors.append((coef, intercept))
                    prior = np.einsum("np,pmo->nmo", features, coef) + intercept
                state, report = self._fit_member(tokens, stats, y - prior, train, valid, member_seed)
                if chosen:
                    report["prior"] = chosen
                self.states.append(state)
                reports.append(report)
                if self.on_member is not None:
                    self.on_member(member, report)
        self._inference, self._version = None, None
        groups = None
        if self.cfg.neighbour_share > 0:
            kept = np.arange(len(prompts))
            if len(kept) > self.cfg.neighbour_limit:
                chosen_rows = np.random.default_rng(seed).choice(len(kept), self.cfg.neighbour_limit, replace=False)
                kept = np.sort(chosen_rows)
            self.neighbour_keys = np.stack([tokens[i].sentence for i in kept]).astype(np.float32)
            self.neighbour_values = y[kept].astype(np.float32)
            every = group_ids(prompts)
            groups = (every, every[kept])
        # Each training prompt is calibrated without its own ratings among its neighbours, as a new prompt would be.
        self.calibration = np.sort(self._prs_from_tokens(tokens, stats, groups=groups))
        self.training_report = {"members": reports, "n_train": len(records)}
        return self

    def _raw_features(self, tokens: Sequence[TokenStates], stats: np.ndarray) -> np.ndarray:
        """The ridge prior's inputs: sentence embedding and (standardised) prompt statistics."""
        sentence = np.stack([t.sentence for t in tokens]).astype(np.float64)
        return np.concatenate([sentence, stats], axis=1) if self.cfg.prompt_statistics else sentence

    def _standardised_stats(self, prompts: Sequence[str]) -> np.ndarray:
        result: np.ndarray = (prompt_statistics(prompts) - self.stats_mean) / self.stats_std
        return result

    def _fit_member(
        self,
        tokens: Sequence[TokenStates],
        stats: np.ndarray,
        y: np.ndarray,
        train: np.ndarray,
        valid: np.ndarray,
        seed: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        torch = _torch()
        cfg = self.cfg
        net = build_network(cfg, tokens[0].states.shape[1], len(self.targets))
        optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        target = torch.from_numpy(y.astype(np.float32))
        valid_batch = _pad([tokens[i] for i in valid], stats[valid])
        rng = np.random.default_rng(seed)
        best, best_epoch, best_state = math.inf, 0, None
        for epoch in range(cfg.max_epochs):
            net.train()
            order = rng.permutation(train)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                batch = _pad([tokens[i] for i in idx], stats[idx])
                out, _, _ = net(*batch.inputs())
                loss = _loss(out, target[idx], cfg.gap_weight)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            net.eval()
            with torch.inference_mode():
                out, _, _ = net(*valid_batch.inputs())
                valid_loss = float(_loss(out, target[valid], cfg.gap_weight))
            if valid_loss < best - 1e-6:
                best, best_epoch = valid_loss, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            elif epoch - best_epoch >= cfg.patience:
                break
        assert best_state is not None
        state = {k: v.numpy() for k, v in best_state.items()}
        report: dict[str, Any] = {"best_epoch": best_epoch + 1, "epochs": epoch + 1, "valid_loss": round(best, 6)}
        if cfg.shrink_correction:
            net.load_state_dict(best_state)
            net.eval()
            with torch.inference_mode():
                out, _, _ = net(*valid_batch.inputs())
            share = correction_share(out.numpy().astype(np.float64), y[valid], cfg.gap_weight)
            # The outputs are linear in the heads' weights and biases: scaling both scales the correction.
            state["head_w"] = (state["head_w"] * share).astype(np.float32)
            state["head_b"] = (state["head_b"] * share).astype(np.float32)
            report["correction_share"] = round(share, 6)
        return state, report

    # --- prediction -------------------------------------------------------------------------------------

    def _stacked(self) -> dict[str, np.ndarray]:
        """The members' weights stacked for inference, with each gate's two projections taken as one
        (``T⁺ − T⁻ = x·(P⁺ − P⁻)·S``): every gate's projection of the tokens is one matrix product, and each
        member's shared scoring matrix a second one (cheaper than folding ``P⁺ − P⁻`` into ``S``, as the rank
        ``r`` is below the width ``h``)."""
        if not self.states:
            raise RouterError(f"router {self.name!r} is not fitted")
        if self._inference is None:
            members = self.states
            # (M, k, d), (M, k, d, r)
            experts = np.stack([m["experts"] for m in members])
            projections = np.stack([m["p_pos"] - m["p_neg"] if self.cfg.dual_gate else m["p_pos"] for m in members])
            n_members, k, d, rank = projections.shape
            stacked = {
                "experts": experts.reshape(n_members * k, d).T,  # (d, M·k): one product scores every expert
                # (d, M·k·r): one product projects the tokens for every gate; then (M, r, h), one per member
                "projection": projections.transpose(2, 0, 1, 3).reshape(d, n_members * k * rank),
                "shared": np.stack([m["shared"] for m in members]),
                "head_w": np.stack([m["head_w"] for m in members]),  # (M, k, h + extra, 2)
                "head_b": np.stack([m["head_b"] for m in members]),  # (M, k, 2)
            }
            # The members' priors are linear: their mean is one product with the mean coefficients (p, k, 2).
            prior_coef = np.mean([c for c, _ in self.priors], axis=0) if self.priors else None
            if prior_coef is not None:
                d = experts.shape[-1]
                coef = prior_coef[:d]  # the embedding's features
                stacked["prior_gap"] = (coef[..., 1] - coef[..., 0]) / self.feature_std[:d, None]  # (d, k)
            if self.cfg.sentence_width:
                stacked["sentence_w"] = np.stack([m["sentence.weight"] for m in members])  # (M, hs, d)
                stacked["sentence_b"] = np.stack([m["sentence.bias"] for m in members])  # (M, hs)
            self._inference = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in stacked.items()}
            if prior_coef is not None:  # kept in float64, as the members' priors are
                self._inference["prior_coef"] = prior_coef
                self._inference["prior_intercept"] = np.mean([b for _, b in self.priors], axis=0)
        return self._inference

    def _moe(self, batch: _Batch, explain: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """The members' mixture-of-experts outputs averaged, (B, k, 2) standardised, and per-token gap pushes
        (B, k, L) in standardised units (None unless ``explain``): the network's eval-mode forward pass, all
        members at once in numpy (two matrix products for every gate; tests hold it to the torch module)."""
        w = self._stacked()
        states, mask = batch.states, batch.mask
        n, length, d = states.shape
        m, k = w["head_b"].shape[:2]
        rank, h = w["shared"].shape[1:]
        logits = (states.reshape(n * length, d) @ w["experts"]).reshape(n, length, m, k)
        logits = np.where(mask[:, None, None, :], logits.transpose(0, 2, 3, 1) * d**-0.5, -np.inf)  # (B, M, k, L)
        affinity = np.exp(logits - logits.max(axis=-1, keepdims=True))
        affinity /= affinity.sum(axis=-1, keepdims=True)
        if self.cfg.token_selection and self.cfg.top_k < length:
            top = np.argpartition(-affinity, self.cfg.top_k - 1, axis=-1)[..., : self.cfg.top_k]
            keep = np.zeros(affinity.shape, dtype=bool)
            np.put_along_axis(keep, top, True, axis=-1)
            affinity = affinity * (keep & mask[:, None, None, :])
        weights = affinity / np.maximum(affinity.sum(axis=-1, keepdims=True), 1e-12)
        x = (states.reshape(n * length, d) @ w["projection"]).reshape(n * length, m, k * rank)
        x = np.matmul(x.transpose(1, 0, 2).reshape(m, n * length * k, rank), w["shared"])  # (M, B·L·k, h)
        x = x.reshape(m, n, length, k, h).transpose(1, 0, 3, 2, 4)  # (B, M, k, L, h)
        gates = np.tanh(0.5 * x) if self.cfg.dual_gate else np.tanh(x)  # 2σ(x) − 1 = tanh(x / 2)
        z = np.einsum("bmkl,bmklh->bmkh", weights, gates)
        extra = []
        if self.cfg.sentence_width:
            from scipy.special import erf

            projected = np.einsum("bd,msd->bms", batch.sentence, w["sentence_w"]) + w["sentence_b"]
            extra.append(0.5 * projected * (1.0 + erf(projected / np.sqrt(2.0))))  # exact GELU, as torch's default
        if self.cfg.prompt_statistics:
            extra.append(np.broadcast_to(batch.stats[:, None, :], (n, m, batch.stats.shape[1])))
        if extra:
            shared = np.concatenate(extra, axis=-1).astype(np.float32)
            z = np.concatenate([z, np.broadcast_to(shared[:, :, None, :], (n, m, k, shared.shape[-1]))], axis=-1)
        out = np.einsum("bmkh,mkho->bmko", z, w["head_w"]) + w["head_b"]
        if not explain:
            return out.mean(axis=1), None
        direction = w["head_w"][:, :, :h, 1] - w["head_w"][:, :, :h, 0]  # (M, k, h): gap per channel
        pushes = np.einsum("bmklh,mkh->bmkl", gates, direction) * weights
        return out.mean(axis=1), pushes.mean(axis=1)

    def _prior_pushes(self, batch: _Batch) -> np.ndarray:
        """Each token's share of the ridge prior's predicted gap (B, k, L), standardised units.

        The sentence embedding is the normalised mean of the token states, ``s = Σ_t T_t / (n·‖m‖)``, and the
        prior is linear in it, so token ``t`` moves the prior's gap by ``T_t·c / (n·‖m‖)`` with ``c`` the gap
        coefficients of the (standardised) embedding features, averaged over members.
        """
        w = self._stacked()
        states, mask = batch.states, batch.mask
        count = np.maximum(mask.sum(axis=1), 1).astype(np.float32)  # (B,)
        norm = np.linalg.norm(states.sum(axis=1) / count[:, None], axis=1)  # ‖m‖, (B,)
        scale = 1.0 / (count * np.maximum(norm, 1e-12))
        n, length, d = states.shape
        pushes = (states.reshape(n * length, d) @ w["prior_gap"]).reshape(n, length, -1)
        result: np.ndarray = pushes.transpose(0, 2, 1) * scale[:, None, None]
        return result

    def _forward(
        self,
        tokens: Sequence[TokenStates],
        stats: np.ndarray,
        exclude: np.ndarray | None = None,
        explain: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Predicted edge and cloud qualities (n, m) in the metrics' own units, per-token gap pushes (n, m, L) in
        the same units (averaged over members; None unless ``explain``), and the neighbours' share of the
        predicted gap (n, m).

        Args:
            exclude: (n, N) mask of training prompts that may not serve as a row's neighbours (calibration
                leaves each training prompt's own ratings out).
            explain: compute the per-token pushes (decisions store them; scores alone do not need them).
        """
        batch = _pad(tokens, stats)
        out, pushes = self._moe(batch, explain)
        out = out.astype(np.float64)
        if self.priors:
            features = (self._raw_features(tokens, stats) - self.feature_mean) / self.feature_std
            w = self._stacked()
            coef = w["prior_coef"]
            prior = (features @ coef.reshape(coef.shape[0], -1)).reshape(-1, *coef.shape[1:])
            out = out + prior + w["prior_intercept"]
            if pushes is not None:
                pushes = pushes + self._prior_pushes(batch)
        near_gap = np.zeros(out.shape[:2])
        if len(self.neighbour_keys):
            share = self.cfg.neighbour_share
            near = self._neighbours(batch.sentence, exclude)
            if exclude is not None:  # a row with every neighbour excluded keeps the ensemble alone
                alone = np.isnan(near).any(axis=(1, 2))
                near[alone] = out[alone]
            out = (1.0 - share) * out + share * near
            if pushes is not None:
                pushes = (1.0 - share) * pushes
            near_gap = share * (near[..., 1] - near[..., 0]) * self.std
        edge = out[..., 0] * self.std + self.mean
        cloud = out[..., 1] * self.std + self.mean
        return edge, cloud, None if pushes is None else pushes * self.std[None, :, None], near_gap

    def _neighbours(self, sentence: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
        """The training prompts' standardised qualities (n, k, 2) weighed by a softmax over their cosine
        similarities to each prompt (sentence embeddings have unit length) at ``neighbour_temperature``."""
        similarity = sentence.astype(np.float32) @ self.neighbour_keys.T  # (n, N)
        if exclude is not None:
            similarity = np.where(exclude, -np.inf, similarity)
        logits = (similarity - similarity.max(axis=1, keepdims=True)) / self.cfg.neighbour_temperature
        with np.errstate(invalid="ignore"):  # a row with every neighbour excluded comes out NaN
            weights = np.exp(logits.astype(np.float64))
            weights /= weights.sum(axis=1, keepdims=True)
        result: np.ndarray = np.einsum("bn,nko->bko", weights, self.neighbour_values.astype(np.float64))
        return result

    def _prs(self, edge: np.ndarray, cloud: np.ndarray) -> np.ndarray:
        d = 1.0 / (1.0 + np.exp(-(edge - cloud) / (self.cfg.temperature * self.scales)))
        result: np.ndarray = d @ self.prs_weights()
        return result

    def prs_weights(self) -> np.ndarray:
        named = self.cfg.metric_weights
        fixed = {m: float(named[m]) for m in self.targets if m in named}
        rest = [m for m in self.targets if m not in named]
        left = max(1.0 - sum(fixed.values()), 0.0)
        weights = np.array([fixed.get(m, left / len(rest) if rest else 0.0) for m in self.targets])
        total = weights.sum()
        return weights / total if total > 0 else np.full(len(self.targets), 1.0 / len(self.targets))

    def _pieces(
        self,
        tokens: Sequence[TokenStates],
        stats: np.ndarray,
        *,
        explain: bool,
        groups: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]]:
        """:meth:`_forward` over pieces of :data:`PIECE_ROWS` prompts, run side by side on the encoder's threads
        (:meth:`SentenceEncoder.map`), with numpy's BLAS on one thread; ``groups``: the prompts are the training
        prompts, with these prompt groups (:func:`router.splits.group_ids`) and their neighbours these groups,
        and none is its own neighbour.

        The pieces depend on the number of prompts alone, not on the threads, so neither do the results."""

        def forward(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
            exclude = None if groups is None else groups[0][rows, None] == groups[1][None, :]
            return self._forward(tokens[rows], stats[rows], exclude, explain)

        pieces = [slice(start, start + PIECE_ROWS) for start in range(0, len(tokens), PIECE_ROWS)]
        with _one_blas_thread():  # entered here: the limit is the process's, not a thread's
            return self.encoder.map(forward, pieces)

    def _prs_from_tokens(
        self, tokens: Sequence[TokenStates], stats: np.ndarray, groups: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """PRS of every prompt (``groups``: see :meth:`_pieces`)."""
        parts = [
            self._prs(edge, cloud) for edge, cloud, _, _ in self._pieces(tokens, stats, explain=False, groups=groups)
        ]
        return np.concatenate(parts) if parts else np.zeros(0)

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        tokens = self.encoder.encode_tokens(prompts)
        result: np.ndarray = 0.5 - self._prs_from_tokens(tokens, self._standardised_stats(prompts))
        return result

    def edge_floor(self) -> float | None:
        return 0.0 if self.cfg.floor else None

    def calibrated_threshold(self, rho: float) -> float | None:
        """Score threshold sending a share ``rho`` of the training prompts to the cloud (lowest PRS first)."""
        if self.calibration.size == 0:
            return None
        # The calibration is sorted once (np.quantile would sort it at every decision: twenty times the cost).
        return 0.5 - sorted_quantile(self.calibration, rho)

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        if not prompts:
            return []
        tokens = self.encoder.encode_tokens(prompts)
        pieces = self._pieces(tokens, self._standardised_stats(prompts), explain=True)
        edge, cloud, near_gap = (np.concatenate([piece[i] for piece in pieces]) for i in (0, 1, 3))
        pushes = [row for piece in pieces if piece[2] is not None for row in piece[2]]  # (k, L) each, own padding
        prs = self._prs(edge, cloud)
        metric_set = "routet2i-predicted"
        return [
            Prediction(
                score=float(0.5 - prs[j]),
                edge=QualityVector(dict(zip(self.targets, edge[j].tolist(), strict=True)), metric_set),
                cloud=QualityVector(dict(zip(self.targets, cloud[j].tolist(), strict=True)), metric_set),
                max_score_for_edge=self.edge_floor(),
                explanation=self._explain(tokens[j], pushes[j], near_gap[j]),
                features={"prs": round(float(prs[j]), 6), "tokens": len(tokens[j].tokens) - 2},
            )
            for j in range(len(prompts))
        ]

    def _explain(self, item: TokenStates, pushes: np.ndarray, near_gap: np.ndarray) -> dict[str, Any]:
        """Per metric, the words whose selected tokens moved the predicted cloud-minus-edge gap the most, and
        the part of the gap that came from the most similar training prompts."""
        words: list[str] = []
        owner: list[int] = []
        for token in item.tokens:
            if token in ("[CLS]", "[SEP]", "[PAD]"):
                owner.append(-1)
            elif token.startswith("##") and words:
                words[-1] += token[2:]
                owner.append(len(words) - 1)
            else:
                words.append(token)
                owner.append(len(words) - 1)
        explanation: dict[str, Any] = {}
        for i, metric in enumerate(self.targets):
            per_word = np.zeros(len(words))
            for t, w in enumerate(owner):
                if w >= 0:
                    per_word[w] += pushes[i, t]
            ranked = np.argsort(-np.abs(per_word), kind="stable")[: self.cfg.explain_tokens]
            explanation[metric] = [
                {"token": words[w], "push": round(float(per_word[w]), 6)} for w in ranked if per_word[w] != 0.0
            ]
        result: dict[str, Any] = {
            "tokens_by_metric": explanation,
            "push": "predicted cloud-minus-edge gap the token moved",
        }
        if len(self.neighbour_keys):
            result["neighbours_gap"] = {m: round(float(near_gap[i]), 6) for i, m in enumerate(self.targets)}
        return result

    # --- artifact ---------------------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"m{i}.{k}": np.asarray(v) for i, state in enumerate(self.states) for k, v in state.items()}
        arrays.update(
            mean=self.mean,
            std=self.std,
            scales=self.scales,
            calibration=self.calibration,
            stats_mean=self.stats_mean,
            stats_std=self.stats_std,
            feature_mean=self.feature_mean,
            feature_std=self.feature_std,
        )
        if len(self.neighbour_keys):
            arrays.update(neighbour_keys=self.neighbour_keys, neighbour_values=self.neighbour_values)
        for i, (coef, intercept) in enumerate(self.priors):
            arrays[f"prior{i}.coef"], arrays[f"prior{i}.intercept"] = coef, intercept
        return arrays

    @property
    def version(self) -> str:
        """The router's name and a hash of its encoder, settings and every array (computed once per fit or load)."""
        if not self.states:
            return self.name
        if self._version is None:
            self._version = self._hash()
        return self._version

    def _hash(self) -> str:
        digest = hashlib.sha256(self.encoder.key.encode())
        config = {k: v for k, v in self.config().items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}
        digest.update(json.dumps({"config": config, "metrics": self.metrics}, sort_keys=True).encode())
        arrays = self._arrays()
        for key in sorted(arrays):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
        return f"{self.name}:{digest.hexdigest()[:12]}"

    def save(self, directory: Path) -> Path:
        if not self.states:
            raise RouterError(f"router {self.name!r} is not fitted; nothing to save")
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / WEIGHTS, **{k: v.astype(np.float32) for k, v in self._arrays().items()})  # type: ignore[arg-type]
        write_manifest(
            directory,
            {
                "router": self.name,
                "version": self.version,
                "config": self.config(),
                "metrics": list(self.metrics),
                "targets": list(self.targets),
                "members": len(self.states),
                "encoder": self.encoder.key,
                "training": self.training_report,
                "sha256": {WEIGHTS: hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()},
            },
        )
        return directory

    @classmethod
    def load(cls, directory: Path, *, encoder: SentenceEncoder | None = None) -> RouteT2IRouter:
        manifest = read_manifest(directory)
        router = cls(RouteT2IConfig(**{**LATER_SETTINGS, **manifest.get("config", {})}), encoder=encoder)
        if manifest.get("encoder") != router.encoder.key:
            raise RouterError(
                f"artifact {directory} was trained on encoder {manifest.get('encoder')!r}, "
                f"this process has {router.encoder.key!r}"
            )
        weights = directory / WEIGHTS
        expected = manifest.get("sha256", {}).get(WEIGHTS)
        if not weights.is_file() or hashlib.sha256(weights.read_bytes()).hexdigest() != expected:
            raise RouterError(f"artifact {directory} is corrupt: {WEIGHTS} is missing or does not match its hash")
        with np.load(weights, allow_pickle=False) as data:
            arrays = {key: data[key].astype(np.float64) for key in data.files}
        router.metrics = tuple(manifest["metrics"])
        router.targets = tuple(manifest["targets"])
        router.mean, router.std = arrays.pop("mean"), arrays.pop("std")
        router.scales, router.calibration = arrays.pop("scales"), arrays.pop("calibration")
        router.stats_mean, router.stats_std = arrays.pop("stats_mean"), arrays.pop("stats_std")
        router.feature_mean, router.feature_std = arrays.pop("feature_mean"), arrays.pop("feature_std")
        if "neighbour_keys" in arrays:
            router.neighbour_keys = arrays.pop("neighbour_keys").astype(np.float32)
            router.neighbour_values = arrays.pop("neighbour_values").astype(np.float32)
        router.priors = [
            (arrays.pop(f"prior{i}.coef"), arrays.pop(f"prior{i}.intercept"))
            for i in range(int(manifest["members"]))
            if f"prior{i}.coef" in arrays
        ]
        router.states = [
            {k.split(".", 1)[1]: v.astype(np.float32) for k, v in arrays.items() if k.startswith(f"m{i}.")}
            for i in range(int(manifest["members"]))
        ]
        router.training_report = manifest.get("training", {})
        if router.version != manifest.get("version"):
            raise RouterError(f"artifact {directory} does not hash to its recorded version {manifest.get('version')}")
        return router

    @classmethod
    def default_artifact(cls) -> Path | None:
        """The artifact shipped with the package for the process's encoder (trained on the carried AGIQA-3K
        ratings): ``default`` for the fp32 encoder backends, ``default-int8`` for ``onnx-int8``; None for an
        encoder model other than the packaged MiniLM."""
        encoder = default_encoder()
        if cls is not RouteT2IRouter or encoder.model_path.resolve() != default_model_path().resolve():
            return None  # none ships for another encoder model, or for a variant of the router
        name = DEFAULT_ARTIFACT + ("-int8" if encoder.backend == "onnx-int8" else "")
        path = Path(str(resources.files("router") / "artifacts" / name))
        return path if (path / "manifest.json").is_file() else None


def correction_share(out: np.ndarray, target: np.ndarray, gap_weight: float) -> float:
    """The share ``λ ∈ [0, 1]`` of the network's corrections ``out`` (n, k, 2) that minimises the training loss
    of ``λ·out`` against the residual targets ``target`` on validation data (closed form: the loss is quadratic
    in ``λ``). 0 keeps the prior alone; 1 the corrections as trained."""
    gap_out, gap_target = out[..., 1] - out[..., 0], target[..., 1] - target[..., 0]
    curvature = float(np.mean(out**2) + gap_weight * np.mean(gap_out**2))
    slope = float(np.mean(out * target) + gap_weight * np.mean(gap_out * gap_target))
    return float(np.clip(slope / curvature, 0.0, 1.0)) if curvature > 0 else 0.0


def _auxiliary_labels(records: Sequence[LogRecord]) -> np.ndarray | None:
    """The records' auxiliary labels as an (n, q) array by sorted label name, NaN where a record lacks one;
    None when no record has any."""
    names = auxiliary_names(records)
    if not names:
        return None
    return np.array([[r.auxiliary.get(name, np.nan) for name in names] for r in records], dtype=np.float64)


def _loss(out: Any, target: Any, gap_weight: float) -> Any:
    torch = _torch()
    tiers = torch.mean((out - target) ** 2)
    gap = torch.mean(((out[..., 1] - out[..., 0]) - (target[..., 1] - target[..., 0])) ** 2)
    return tiers + gap_weight * gap


_BLAS_CONTROLLER: Any = None


def _one_blas_thread() -> Any:
    """numpy's BLAS on one thread for a block (about 7 µs to enter and leave; the limit covers the BLAS
    libraries loaded at the first call, numpy's among them, which is the one these products run on).

    The products here are small, and the encoder's ONNX Runtime threads hold the cores between them: idle
    OpenBLAS threads spin for a while after each product and take those cores from the next forward pass
    (batched scoring on 2 cores: 64% of the bare encoder's throughput with 2 BLAS threads, 85% with one).
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


class _threads:
    """Sets torch's CPU thread count for a block and restores it."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.previous: int | None = None

    def __enter__(self) -> None:
        if self.threads is not None:
            torch = _torch()
            self.previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            _torch().set_num_threads(self.previous)


class NoMultiMetricRouter(RouteT2IRouter):
    """Ablation: one expert learns a composite quality instead of one expert per metric."""

    name = "routet2i-no-multi-metric"
    ablation: ClassVar[dict[str, Any]] = {"multi_metric": False}


class NoTokenSelectionRouter(RouteT2IRouter):
    """Ablation: every token, weighted by affinity, instead of each expert's top-K."""

    name = "routet2i-no-token-selection"
    ablation: ClassVar[dict[str, Any]] = {"token_selection": False}


class NoDualGateRouter(RouteT2IRouter):
    """Ablation: one projection ``tanh(T·P·S)`` instead of the σ(T⁺ − T⁻) gate."""

    name = "routet2i-no-dual-gate"
    ablation: ClassVar[dict[str, Any]] = {"dual_gate": False}


class NoNeighboursRouter(RouteT2IRouter):
    """Ablation (of this implementation's addition): the ensemble's predictions alone, no neighbour blend."""

    name = "routet2i-no-neighbours"
    ablation: ClassVar[dict[str, Any]] = {"neighbour_share": 0.0}
