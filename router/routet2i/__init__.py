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
   (:func:`~router.routet2i.training.fit_prior`); they are training targets only, never inputs.
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

Modules: :mod:`~router.routet2i.config` (the settings), :mod:`~router.routet2i.model` (the router: the fitted
state and the numpy forward pass decisions run, what a route worker loads), :mod:`~router.routet2i.training`
(fitting: the ridge prior, the torch network and its training loop) and :mod:`~router.routet2i.artifact` (saving,
loading and versioning, the shipped artifacts). This module re-exports their public names and holds the ablations.
"""

from __future__ import annotations

from typing import Any, ClassVar

from router.routet2i.artifact import DEFAULT_ARTIFACT, LATER_SETTINGS, WEIGHTS
from router.routet2i.config import RouteT2IConfig
from router.routet2i.model import N_STATISTICS, PIECE_ROWS, RouteT2IRouter, prompt_statistics
from router.routet2i.training import PRIOR_ALPHAS, PRIOR_RANKS, build_network, correction_share, fit_prior

__all__ = [
    "DEFAULT_ARTIFACT",
    "LATER_SETTINGS",
    "N_STATISTICS",
    "PIECE_ROWS",
    "PRIOR_ALPHAS",
    "PRIOR_RANKS",
    "WEIGHTS",
    "NoDualGateRouter",
    "NoMultiMetricRouter",
    "NoNeighboursRouter",
    "NoTokenSelectionRouter",
    "RouteT2IConfig",
    "RouteT2IRouter",
    "build_network",
    "correction_share",
    "fit_prior",
    "prompt_statistics",
]


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
