"""Learning a deployment's own models: the pure parts of the loop that retrains, judges and promotes routers.

A router trained on one model pair ranks another pair's prompts little better than chance; the labels a
deployment collects (shadow-sampled jobs: both tiers' quality on one prompt) make it right for its own models.
The loop, run by ``routet2i learn`` on the database and by ``routet2i simulate`` on a rated log, is:

1. **Split** the labels collected so far: the most recent ``holdout_share`` (at least ``min_holdout``) are held
   out; the rest train a challenger (:func:`split_recent`).
2. **Train** a challenger of the configured router on them (:func:`train_challenger`). With a prior (a router
   trained elsewhere: the pooled carried ratings, the shipped artifact, a prompt rule), the challenger is warm
   started: its score is a blend of the prior's and its own, each standardised, with the prior's weight chosen by
   inner cross-validation on the training labels (:class:`BlendRouter`); with few labels the prior dominates.
3. **Judge** the challenger against the champion on the held-out labels (:func:`judge`): paired, prompt by
   prompt, the difference of the share of the cloud's gain each recovers at the budget (``pgr``) and over every
   budget (``apgr``), with the standard error of the difference. It is promoted only when it is ahead on the
   chosen value (``promote_on``) by more than ``min_gain`` plus ``promote_z`` standard errors, and no worse
   beyond noise (``noise_z`` standard errors) on either value; the verdict is recorded either way.

Before any challenger, the champion is chosen among the available priors on the first labels
(:func:`choose_prior`): the deployed router stays unless another prior is ahead by the same margin. A few dozen
labels rarely prove anything, so the incumbent keeps its place until they do. How many labels to collect is
:func:`shadow_rate`'s answer.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from router.base import Router, RouterError, create_router, load_router, read_manifest, write_manifest
from router.log import LogRecord, metric_names
from router.pgr import composite_gain, gain_scales, quality_arrays
from router.splits import split_folds
from router.types import Prediction

if TYPE_CHECKING:
    from router.embeddings import SentenceEncoder

VALUES = ("pgr", "apgr")
"""What a router is judged on: the share of the cloud's gain it recovers at the deployment's budget, and its
mean over every budget from 0 to 1."""


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the loop (``ROUTET2I_LEARN_*``).

    Attributes:
        router: the router a challenger is (a registry name).
        holdout_share: share of the labels, the most recent, held out to judge the challenger.
        min_holdout: fewest labels held out; with fewer labels than ``min_holdout + min_train`` no challenger
            is trained.
        min_train: fewest labels a challenger is trained on.
        promote_on: the value the challenger must be ahead on (``pgr`` or ``apgr``).
        min_gain: how far ahead on it, beyond ``promote_z`` standard errors.
        promote_z: standard errors of the paired difference the challenger must be ahead by (0: any point
            estimate above the champion's plus ``min_gain``).
        noise_z: standard errors of the paired difference beyond which a challenger counts as worse.
        warm_start: blend the challenger with the prior it starts from (when there is one).
        blend_weights: the prior's weights the warm start chooses among.
    """

    router: str = "routet2i"
    holdout_share: float = 0.25
    min_holdout: int = 20
    min_train: int = 30
    promote_on: str = "pgr"
    min_gain: float = 0.0
    promote_z: float = 2.0
    noise_z: float = 2.0
    warm_start: bool = True
    blend_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        if self.promote_on not in VALUES:
            raise ValueError(f"promote_on must be one of {', '.join(VALUES)}, got {self.promote_on!r}")
        if not 0.0 < self.holdout_share < 1.0:
            raise ValueError(f"holdout_share must be within (0, 1), got {self.holdout_share}")
        if self.min_holdout < 5 or self.min_train < 10:
            raise ValueError("min_holdout must be at least 5 and min_train at least 10")
        if self.promote_z < 0 or self.noise_z <= 0:
            raise ValueError("promote_z must be at least 0 and noise_z above 0")
        if not self.blend_weights or any(not 0.0 <= w <= 1.0 for w in self.blend_weights):
            raise ValueError("blend_weights must be within [0, 1]")

    @property
    def min_labels(self) -> int:
        """Labels needed before a challenger can be trained and judged."""
        return self.min_train + self.min_holdout


@dataclass(frozen=True)
class Comparison:
    """Two routers on the same held-out prompts, paired prompt by prompt."""

    value: str
    champion: float
    challenger: float
    difference: float
    """``challenger − champion``."""
    standard_error: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Verdict:
    """What the loop concluded about one challenger."""

    promote: bool
    reason: str
    comparisons: Mapping[str, Comparison] = field(default_factory=dict)
    trained_on: int = 0
    held_out: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "trained_on": self.trained_on,
            "held_out": self.held_out,
            "comparisons": {name: c.to_dict() for name, c in self.comparisons.items()},
        }


def split_recent(records: Sequence[LogRecord], config: LoopConfig) -> tuple[list[LogRecord], list[LogRecord]]:
    """The labels (oldest first) split into training labels and the most recent ones, held out."""
    held = max(config.min_holdout, round(config.holdout_share * len(records)))
    return list(records[: len(records) - held]), list(records[len(records) - held :])


def gains(records: Sequence[LogRecord]) -> np.ndarray:
    """Each prompt's cloud-minus-edge gain on the composite of its metrics, each metric in units of its typical
    gain on these prompts (:func:`router.pgr.gain_scales`): what routing a prompt to the cloud is worth."""
    metrics = metric_names(records)
    edge, cloud = quality_arrays(records, metrics)
    return composite_gain(edge, cloud, gain_scales(edge, cloud))


def normaliser(gain: np.ndarray) -> float:
    """What captured gain is divided by: the total gain, so values are the share of the cloud's gain recovered
    (PGR), unless the cloud is no better on these prompts on the whole (the total is below a tenth of the total
    absolute gain), where PGR is undefined and the total absolute gain is used instead. Either way a positive
    constant: comparisons keep their sign."""
    total, absolute = float(gain.sum()), float(np.abs(gain).sum())
    if absolute == 0.0:
        return 1.0
    return total if total > 0.1 * absolute else absolute


def cloud_shares(scores: np.ndarray, rho: float, floor: float | None) -> np.ndarray:
    """How much of each prompt goes to the cloud when the top ``rho`` of the scores do (a fraction for the
    marginal prompt and inside a block of ties, as :mod:`router.pgr` counts them); never a prompt at or below the
    router's edge floor."""
    n = len(scores)
    share = np.zeros(n)
    eligible = np.ones(n, dtype=bool) if floor is None else scores > floor
    budget = min(rho * n, float(eligible.sum()))
    order = np.argsort(-scores, kind="stable")
    taken = 0.0
    start = 0
    while start < n and taken < budget:
        stop = start
        while stop + 1 < n and scores[order[stop + 1]] == scores[order[start]]:
            stop += 1
        block = [i for i in order[start : stop + 1] if eligible[i]]
        if block:
            part = min(1.0, (budget - taken) / len(block))
            share[block] = part
            taken += part * len(block)
        start = stop + 1
    return share


def paired(gain: np.ndarray, champion: np.ndarray, challenger: np.ndarray) -> tuple[float, float, float, float]:
    """The champion's and the challenger's value on these prompts, their difference and its standard error.

    ``champion`` and ``challenger`` are each prompt's cloud share (at the budget for ``pgr``, averaged over
    budgets for ``apgr``). The difference is a sum over prompts of ``gain·(share_b − share_a) / Σ gain``, so its
    standard error is that of a sum of paired per-prompt terms."""
    total = normaliser(gain)
    a, b = gain * champion / total, gain * challenger / total
    terms = b - a
    return float(a.sum()), float(b.sum()), float(terms.sum()), float(math.sqrt(len(terms)) * terms.std(ddof=1))


APGR_GRID = tuple(np.linspace(0.0, 1.0, 21))


def shares_for(router: Router, records: Sequence[LogRecord], rho: float) -> dict[str, np.ndarray]:
    """A router's per-prompt cloud shares for each value: at the budget, and averaged over budgets."""
    scores = np.asarray(router.score_records(records), dtype=np.float64)
    floor = router.edge_floor()
    return {
        "pgr": cloud_shares(scores, rho, floor),
        "apgr": np.mean([cloud_shares(scores, f, floor) for f in APGR_GRID], axis=0),
    }


def compare(champion: Router, challenger: Router, records: Sequence[LogRecord], rho: float) -> dict[str, Comparison]:
    """Both routers on the held-out ``records``, on every value."""
    gain = gains(records)
    ours, theirs = shares_for(champion, records, rho), shares_for(challenger, records, rho)
    result = {}
    for value in VALUES:
        a, b, diff, se = paired(gain, ours[value], theirs[value])
        result[value] = Comparison(value, a, b, diff, se, len(records))
    return result


def judge(
    champion: Router,
    challenger: Router,
    holdout: Sequence[LogRecord],
    rho: float,
    config: LoopConfig,
    *,
    trained_on: int,
) -> Verdict:
    """Whether ``challenger`` replaces ``champion`` (see the module's docstring)."""
    comparisons = compare(champion, challenger, holdout, rho)
    chosen = comparisons[config.promote_on]
    worse = [c for c in comparisons.values() if c.difference < -config.noise_z * c.standard_error]
    if worse:
        c = worse[0]
        reason = (
            f"worse beyond noise on {c.value}: {c.challenger:.3f} against {c.champion:.3f} "
            f"(difference {c.difference:+.3f} ± {c.standard_error:.3f}, {c.n} held-out labels)"
        )
        promote = False
    elif not _ahead(chosen.difference, chosen.standard_error, config):
        reason = (
            f"not ahead on {chosen.value}: {chosen.challenger:.3f} against {chosen.champion:.3f} "
            f"(difference {chosen.difference:+.3f} ± {chosen.standard_error:.3f}; needs more than "
            f"{_margin(chosen.standard_error, config):+.3f})"
        )
        promote = False
    else:
        reason = (
            f"ahead on {chosen.value}: {chosen.challenger:.3f} against {chosen.champion:.3f} "
            f"(difference {chosen.difference:+.3f} ± {chosen.standard_error:.3f}, {chosen.n} held-out labels)"
        )
        promote = True
    return Verdict(promote, reason, comparisons, trained_on=trained_on, held_out=len(holdout))


def _margin(standard_error: float, config: LoopConfig) -> float:
    """How far ahead a router must be to replace the one in place."""
    return config.min_gain + config.promote_z * standard_error


def _ahead(difference: float, standard_error: float, config: LoopConfig) -> bool:
    return difference > _margin(standard_error, config)


def choose_prior(
    candidates: Mapping[str, Router], records: Sequence[LogRecord], rho: float, config: LoopConfig
) -> tuple[str, dict[str, float]]:
    """The prior to route with after ``records`` (the first labels), and every candidate's value on them (the
    share of the cloud's gain it recovers at the budget).

    The first-named candidate is the router in place: it stays unless another is ahead of it on these labels by
    the margin a challenger needs (``min_gain`` plus ``promote_z`` standard errors of the paired difference);
    among those that are, the one with the highest value.
    """
    gain = gains(records)
    shares = {name: shares_for(router, records, rho)["pgr"] for name, router in candidates.items()}
    incumbent = next(iter(candidates))
    values: dict[str, float] = {}
    ahead: list[str] = []
    for name, share in shares.items():
        _, value, difference, se = paired(gain, shares[incumbent], share)
        values[name] = value
        if name != incumbent and _ahead(difference, se, config):
            ahead.append(name)
    return max(ahead, key=lambda name: values[name], default=incumbent), values


def train_challenger(
    records: Sequence[LogRecord],
    config: LoopConfig,
    *,
    prior: Router | None = None,
    encoder: SentenceEncoder | None = None,
    seed: int = 0,
    **router_settings: Any,
) -> Router:
    """A new router trained on ``records`` (oldest first), warm started from ``prior`` when the config says so.

    The warm start keeps both routers and blends their standardised scores; the prior's weight is the one of
    ``blend_weights`` whose inner cross-validated value (PGR at the middle budget, folds by prompt) is best on the
    training labels (the largest within one standard error of the best), so the blend leans on the prior until
    the labels show they do better alone.
    """
    model = create_router(config.router, encoder=encoder, **router_settings).fit(records, seed=seed)
    if prior is None or not config.warm_start:
        return model
    weight = _blend_weight(records, config, prior=prior, encoder=encoder, seed=seed, **router_settings)
    return BlendRouter.of(prior, model, weight, records)


BLEND_FOLDS = 5


def _blend_weight(
    records: Sequence[LogRecord],
    config: LoopConfig,
    *,
    prior: Router,
    encoder: SentenceEncoder | None,
    seed: int,
    **router_settings: Any,
) -> float:
    """The prior's weight in the blend, by inner cross-validation on the training labels (folds by prompt): each
    weight's APGR on the held-out folds, per prompt, and the largest weight within one standard error of the best
    (a few labels rarely prove the prior wrong, and its weight falls as they accumulate)."""
    folds = split_folds([r.prompt for r in records], BLEND_FOLDS, seed)
    terms: dict[float, list[np.ndarray]] = {w: [] for w in config.blend_weights}
    for fold in range(BLEND_FOLDS):
        train = [r for r, f in zip(records, folds, strict=True) if f != fold]
        valid = [r for r, f in zip(records, folds, strict=True) if f == fold]
        if len(train) < 10 or len(valid) < 3:
            continue
        model = create_router(config.router, encoder=encoder, **router_settings).fit(train, seed=seed)
        gain = gains(valid)
        total = normaliser(gain)
        for weight in config.blend_weights:
            blend = BlendRouter.of(prior, model, weight, train)
            terms[weight].append(gain * shares_for(blend, valid, 0.5)["apgr"] / total)
    if not any(terms.values()):
        return max(config.blend_weights)
    per_prompt = {w: np.concatenate(t) for w, t in terms.items()}
    best = max(per_prompt, key=lambda w: per_prompt[w].sum())
    # Paired against the best weight: the standard error of each weight's shortfall.
    within = [
        w
        for w, t in per_prompt.items()
        if (per_prompt[best] - t).sum() <= math.sqrt(len(t)) * float((per_prompt[best] - t).std(ddof=1))
    ]
    return max(within)


def shadow_rate(
    labels: int, *, max_rate: float, min_rate: float, settle_labels: int, recent_error: float | None = None
) -> float:
    """The share of jobs to shadow-sample now (run on both tiers to collect a label).

    ``max_rate`` while the deployment has few labels, falling with the labels collected towards ``min_rate`` at
    ``settle_labels``; raised again when the champion's recent predictions are poor: ``recent_error`` is the
    share of the cloud's gain the champion missed on the latest held-out labels (``1 − PGR``-like, 0: perfect;
    None: not known yet). The two are combined by taking the larger need.
    """
    if max_rate <= 0:
        return 0.0
    newness = max(0.0, 1.0 - labels / max(1, settle_labels))
    poorness = 0.0 if recent_error is None else min(1.0, max(0.0, recent_error))
    need = max(newness, poorness)
    return min_rate + (max_rate - min_rate) * need


# --- the warm-started router ------------------------------------------------------------------------------


class BlendRouter(Router):
    """A prior's score and a trained router's score, each standardised on the training prompts, blended.

    Saved as an artifact with both routers' artifacts inside, so a route worker loads it like any other.
    """

    name = "blend"
    learned: ClassVar[bool] = True
    uses_encoder: ClassVar[bool] = True
    standalone: ClassVar[bool] = False

    def __init__(self, *, encoder: SentenceEncoder | None = None, weight: float = 0.5) -> None:
        self.weight = weight
        self.encoder = encoder
        self.prior: Router | None = None
        self.model: Router | None = None
        self.stats = np.array([[0.0, 1.0], [0.0, 1.0]])
        """Mean and standard deviation of the prior's and the model's scores on the training prompts."""

    @classmethod
    def of(cls, prior: Router, model: Router, weight: float, records: Sequence[LogRecord]) -> BlendRouter:
        blend = cls(weight=weight)
        blend.prior, blend.model = prior, model
        prompts = [r.prompt for r in records]
        rows = []
        for part in (prior, model):
            scores = np.asarray(part.score(prompts), dtype=np.float64)
            rows.append([float(scores.mean()), float(scores.std()) or 1.0])
        blend.stats = np.array(rows)
        return blend

    def config(self) -> dict[str, Any]:
        return {"weight": self.weight}

    def _parts(self) -> tuple[Router, Router]:
        if self.prior is None or self.model is None:
            raise RouterError("the blend router is not fitted")
        return self.prior, self.model

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        prior, model = self._parts()
        z_prior = (np.asarray(prior.score(prompts)) - self.stats[0, 0]) / self.stats[0, 1]
        z_model = (np.asarray(model.score(prompts)) - self.stats[1, 0]) / self.stats[1, 1]
        result: np.ndarray = self.weight * z_prior + (1.0 - self.weight) * z_model
        return result

    def predict(self, prompts: Sequence[str]) -> list[Prediction]:
        """The trained part's predictions (qualities, explanations: what the audit shows), with the blend's score."""
        _, model = self._parts()
        scores = self.score(prompts)
        return [
            replace(p, score=float(s), max_score_for_edge=None, features={**p.features, "prior_weight": self.weight})
            for p, s in zip(model.predict(prompts), scores, strict=True)
        ]

    def calibrated_threshold(self, rho: float) -> float | None:
        return None  # the budget window's own scores set the threshold after its first requests

    @property
    def version(self) -> str:
        prior, model = self._parts()
        text = json.dumps(
            {"weight": self.weight, "stats": self.stats.tolist(), "parts": [prior.version, model.version]}
        )
        return f"blend:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def save(self, directory: Path) -> Path:
        prior, model = self._parts()
        directory.mkdir(parents=True, exist_ok=True)
        prior.save(directory / "prior")
        model.save(directory / "model")
        manifest = {
            "router": self.name,
            "version": self.version,
            "config": self.config(),
            "stats": self.stats.tolist(),
            "parts": {"prior": prior.name, "model": model.name},
        }
        write_manifest(directory, manifest)
        return directory

    @classmethod
    def load(cls, directory: Path, *, encoder: SentenceEncoder | None = None) -> BlendRouter:
        manifest = read_manifest(directory)
        blend = cls(encoder=encoder, weight=float(manifest["config"]["weight"]))
        blend.prior = load_router(manifest["parts"]["prior"], directory / "prior", encoder=encoder)
        blend.model = load_router(manifest["parts"]["model"], directory / "model", encoder=encoder)
        blend.stats = np.array(manifest["stats"], dtype=np.float64)
        if blend.version != manifest.get("version"):
            raise RouterError(f"artifact {directory} does not hash to its recorded version {manifest.get('version')}")
        return blend
