"""The settings of the RouteT2I router: its predictor, its training and the PRS comparison (the method:
:mod:`router.routet2i`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
            ratings of the same prompts) in one reduced-rank regression with the tiers' qualities
            (:func:`~router.routet2i.training.fit_prior`); only training uses them, and a log without them is fitted
            on the tiers' qualities alone. Off by default: on the standard suite it moved APGR by +0.001 and
            PGR@30%/50% by +0.008/−0.010 on average (docs/router.md).
        prompt_statistics: the heads also see the prompt's length and noun count (log-scaled, standardised):
            the paper's observation that more objects make the cloud win more often, made explicit.
        shrink_correction: after early stopping, each member's corrections are scaled by the share in [0, 1]
            that minimises its validation loss (:func:`~router.routet2i.training.correction_share`): 0 when the
            trained network does not improve on the prior, so a network that cannot help cannot hurt.
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
