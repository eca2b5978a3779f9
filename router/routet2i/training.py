"""Fitting the RouteT2I router on a replay log (the method: :mod:`router.routet2i`).

Each ensemble member gets a validation split of the training prompts, a ridge prior fitted on the rest
(:func:`fit_prior`) and the mixture-of-experts network (:func:`build_network`, torch) trained on the prior's
residuals (:func:`train_member`); then the neighbours are kept and the training prompts' PRS become the offline
calibration. Decisions never run this code: they run the numpy forward pass of :mod:`router.routet2i.model`.

The members' training (:func:`fit_members`) takes the qualities of any number of tiers (the last axis of its
targets): two for this router, more for the K-tier RouteT2I of :mod:`router.multitier`, whose heads predict every
tier and whose gap terms compare each dearer tier with the cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from router.base import RouterError
from router.embeddings import TokenStates
from router.learned import INNER_FOLDS, ridge_path, standardise
from router.log import LogRecord, auxiliary_names, metric_names
from router.pgr import gain_scales, quality_arrays
from router.routet2i.config import RouteT2IConfig
from router.routet2i.model import N_STATISTICS, pad_batch, prompt_statistics
from router.splits import group_ids, inner_splits, split_folds

if TYPE_CHECKING:
    from router.routet2i.model import RouteT2IRouter

R = TypeVar("R", bound="RouteT2IRouter")

MemberTrainer = Callable[
    [RouteT2IConfig, int, Sequence[TokenStates], np.ndarray, np.ndarray, np.ndarray, np.ndarray, int],
    tuple[dict[str, np.ndarray], dict[str, Any]],
]
"""Trains one ensemble member (:func:`train_member`'s arguments): its network's weights and its report."""

PRIOR_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(0, 5, 11))
"""L2 strengths tried for the ridge prior (standardised features)."""

PRIOR_RANKS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
"""Ranks tried for the prior's shared output space (full rank, plain ridge, is always tried too)."""


def _torch() -> Any:
    import torch

    return torch


def fit(router: R, records: Sequence[LogRecord], *, seed: int = 0, member: MemberTrainer | None = None) -> R:
    """Fit ``router`` on ``records``: every member's prior and network, the neighbours and the calibration.

    Args:
        seed: makes the fit reproducible (member ``i`` trains with seed ``1000·seed + i``).
        member: trains one member's network (default: :func:`train_member`; studies pass variants).
    """
    if len(records) < 10:
        raise RouterError(f"{router.name} needs at least 10 training records, got {len(records)}")
    prompts = [r.prompt for r in records]
    y, tokens, stats, features = _standardised_inputs(router, records)
    auxiliary = _auxiliary_labels(records) if router.cfg.auxiliary else None
    groups = fit_members(router, prompts, y, tokens, stats, features, auxiliary, seed=seed, member=member)
    # Each training prompt is calibrated without its own ratings among its neighbours, as a new prompt would be.
    router.calibration = np.sort(router.prs_from_tokens(tokens, stats, groups=groups))
    return router


def fit_members(
    router: RouteT2IRouter,
    prompts: Sequence[str],
    y: np.ndarray,
    tokens: list[TokenStates],
    stats: np.ndarray,
    features: np.ndarray,
    auxiliary: np.ndarray | None,
    *,
    seed: int,
    member: MemberTrainer | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Train ``router``'s members on standardised qualities ``y`` (n, m, T) of any number ``T`` of tiers (the
    last axis, cheapest first; two for the edge and the cloud), install their weights and priors and keep the
    neighbours; set its training report. Returns the prompt groups of the neighbours (see
    :meth:`~router.routet2i.model.RouteT2IRouter.prs_from_tokens`; None: no neighbour blend).

    ``router``'s metrics, targets, scales and standardisations must already be set for ``y``.
    """
    torch = _torch()
    n_valid_folds = max(2, round(1.0 / router.cfg.validation_share))
    # A standardised gap moves ½ − PRS by about w_i·std_i / (4Γ·s_i): the prior's L2 strength is chosen on that.
    prs_relevance = router.prs_weights() * router.std / router.scales
    states: list[dict[str, np.ndarray]] = []
    priors: list[tuple[np.ndarray, np.ndarray]] = []
    reports: list[dict[str, Any]] = []
    with _threads(router.cfg.threads):
        for index in range(router.cfg.members):
            member_seed = seed * 1000 + index
            folds = split_folds(prompts, n_valid_folds, member_seed)
            holdout = index % n_valid_folds
            train = np.flatnonzero(folds != holdout)
            valid = np.flatnonzero(folds == holdout)
            torch.manual_seed(member_seed)
            prior = np.zeros_like(y)
            chosen: dict[str, float] = {}
            if router.cfg.prior:
                coef, intercept, chosen = fit_prior(
                    features[train],
                    y[train],
                    [prompts[int(i)] for i in train],
                    member_seed,
                    prs_relevance,
                    None if auxiliary is None else auxiliary[train],
                )
                priors.append((coef, intercept))
                prior = np.einsum("np,pmo->nmo", features, coef) + intercept
            state, report = (member or train_member)(
                router.cfg, len(router.targets), tokens, stats, y - prior, train, valid, member_seed
            )
            if chosen:
                report["prior"] = chosen
            states.append(state)
            reports.append(report)
            if router.on_member is not None:
                router.on_member(index, report)
    router.set_weights(states, priors)
    router.training_report = {"members": reports, "n_train": len(prompts)}
    return _keep_neighbours(router, prompts, tokens, y, seed)


def _standardised_inputs(
    router: RouteT2IRouter, records: Sequence[LogRecord]
) -> tuple[np.ndarray, list[TokenStates], np.ndarray, np.ndarray]:
    """Set ``router``'s metrics, targets, gain scales and standardisations from ``records``; return the
    standardised qualities ``y`` (n, m, 2), the prompts' token states, their standardised statistics and the
    prior's standardised features."""
    router.metrics = metric_names(records)
    router.targets = router.metrics if router.cfg.multi_metric else ("composite",)
    edge, cloud = _target_qualities(router, records)
    router.scales = gain_scales(edge, cloud)
    router.mean, router.std = standardise(np.concatenate([edge, cloud]))
    y = np.stack([(edge - router.mean) / router.std, (cloud - router.mean) / router.std], axis=-1)  # (n, m, 2)
    prompts = [r.prompt for r in records]
    tokens = router.encoder.encode_tokens(prompts)
    router.stats_mean, router.stats_std = standardise(prompt_statistics(prompts))
    stats = router.standardised_stats(prompts)
    raw_features = router.raw_features(tokens, stats)
    router.feature_mean, router.feature_std = standardise(raw_features)
    features = (raw_features - router.feature_mean) / router.feature_std
    return y, tokens, stats, features


def _target_qualities(router: RouteT2IRouter, records: Sequence[LogRecord]) -> tuple[np.ndarray, np.ndarray]:
    """Edge and cloud quality per target (the metrics, or one composite for the ablation)."""
    edge, cloud = quality_arrays(records, router.metrics)
    if router.cfg.multi_metric:
        return edge, cloud
    scales = gain_scales(edge, cloud)
    return (edge / scales).mean(axis=1, keepdims=True), (cloud / scales).mean(axis=1, keepdims=True)


def _keep_neighbours(
    router: RouteT2IRouter, prompts: Sequence[str], tokens: list[TokenStates], y: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Keep the training prompts (a seeded sample of ``neighbour_limit`` of a longer log) as ``router``'s
    neighbours; return every prompt's group and the kept prompts' groups (None: no neighbour blend)."""
    if router.cfg.neighbour_share <= 0:
        return None
    kept = np.arange(len(prompts))
    if len(kept) > router.cfg.neighbour_limit:
        chosen_rows = np.random.default_rng(seed).choice(len(kept), router.cfg.neighbour_limit, replace=False)
        kept = np.sort(chosen_rows)
    router.neighbour_keys = np.stack([tokens[i].sentence for i in kept]).astype(np.float32)
    router.neighbour_values = y[kept].astype(np.float32)
    every = group_ids(prompts)
    return every, every[kept]


def train_member(
    cfg: RouteT2IConfig,
    n_targets: int,
    tokens: Sequence[TokenStates],
    stats: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    valid: np.ndarray,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One member's network trained on the residuals ``y`` (n, k, T) of the ``train`` rows (``T`` tiers, two for
    the edge and the cloud), stopped early on the ``valid`` rows: its weights (those of the epoch with the lowest
    validation loss) and its report."""
    torch = _torch()
    net = build_network(cfg, tokens[0].states.shape[1], n_targets, y.shape[-1])
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    target = torch.from_numpy(y.astype(np.float32))
    valid_batch = pad_batch([tokens[i] for i in valid], stats[valid])
    rng = np.random.default_rng(seed)
    best, best_epoch, best_state = math.inf, 0, None
    for epoch in range(cfg.max_epochs):
        net.train()
        order = rng.permutation(train)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = pad_batch([tokens[i] for i in idx], stats[idx])
            out, _, _ = net(*batch.inputs())
            loss = training_loss(out, target[idx], cfg.gap_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        net.eval()
        with torch.inference_mode():
            out, _, _ = net(*valid_batch.inputs())
            valid_loss = float(training_loss(out, target[valid], cfg.gap_weight))
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


def build_network(config: RouteT2IConfig, d: int, n_metrics: int, n_tiers: int = 2) -> Any:
    """The mixture-of-experts predictor as a torch module (built lazily: torch loads only when needed); its heads
    predict each metric on ``n_tiers`` tiers (the edge and the cloud by default)."""
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
            self.head_w = nn.Parameter(torch.randn(k, h + hs_in, n_tiers) * (h + hs_in) ** -0.5 * 0.1)
            self.head_b = nn.Parameter(torch.zeros(k, n_tiers))
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


def fit_prior(
    x: np.ndarray,
    y: np.ndarray,
    prompts: Sequence[str],
    seed: int,
    weights: np.ndarray | None = None,
    auxiliary: np.ndarray | None = None,
    ranks: Sequence[int] = PRIOR_RANKS,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Reduced-rank multi-output ridge of ``y`` (n, m, T) on features ``x`` (n, p), optionally learnt together
    with auxiliary targets: coefficients (p, m, T), intercepts (m, T) and the chosen L2 strength and rank.

    The outputs are ``y`` and the columns of ``auxiliary`` (n, q) standardised (NaN: the label is missing;
    it counts as the column's mean). Every output is ridge-regressed on ``x`` with one L2 strength, and the
    fitted values are projected onto their top ``r`` principal directions, so all outputs share an
    ``r``-dimensional space of prompt features: auxiliary labels (other generators' ratings of the same
    prompt) then shape the directions the tiers' predictions use, which lowers their variance on a few
    hundred noisy labels. The L2 strength and the rank (full rank, plain ridge, included) are the pair with
    the smallest inner cross-validated error of the predicted gaps to the cheapest tier combined with
    ``weights`` (m,) per metric (what routing ranks by: the linearised PRS); None: the sum of the metrics'
    squared gap errors. Only the coefficients of ``y`` are returned: decisions need nothing else.
    """
    flat = y.reshape(len(y), -1)
    n_main = flat.shape[1]
    outputs = _with_auxiliary(flat, auxiliary)
    # Full rank is plain ridge, whose coefficients of each output do not depend on the others: the search
    # can always fall back on the prior without auxiliary labels.
    errors, candidates = _prior_errors(x, y, outputs, inner_splits(prompts, INNER_FOLDS, seed), ranks, weights)
    j, k = np.unravel_index(int(np.argmin(errors)), errors.shape)
    ((coef, intercept),) = ridge_path(x, outputs, (PRIOR_ALPHAS[j],))
    rank = candidates[k]
    if rank < outputs.shape[1]:
        centre = x.mean(axis=0)
        means = intercept + centre @ coef
        top = _principal_directions(x, coef)[:rank]
        coef = (coef @ top.T) @ top
        intercept = means - centre @ coef
    chosen = {"alpha": float(PRIOR_ALPHAS[j]), "rank": int(rank), "outputs": int(outputs.shape[1])}
    return coef[:, :n_main].reshape(x.shape[1], *y.shape[1:]), intercept[:n_main].reshape(y.shape[1:]), chosen


def _with_auxiliary(flat: np.ndarray, auxiliary: np.ndarray | None) -> np.ndarray:
    """The prior's outputs: the qualities ``flat`` (n, m·2) and the auxiliary labels known at least twice,
    standardised, a missing label counting as its column's mean."""
    if auxiliary is None or not auxiliary.size:
        return flat
    aux = auxiliary[:, (~np.isnan(auxiliary)).sum(axis=0) >= 2]  # a label known once carries nothing
    if not aux.size:
        return flat
    mean, std = np.nanmean(aux, axis=0), np.nanstd(aux, axis=0)
    aux = np.where(np.isnan(aux), 0.0, (aux - mean) / np.where(std > 1e-12, std, 1.0))
    return np.concatenate([flat, aux], axis=1)


def _principal_directions(x_fit: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Principal directions (rows, strongest first) of the fitted outputs, and zero rows to their number."""
    _, _, vt = np.linalg.svd((x_fit - x_fit.mean(axis=0)) @ coef, full_matrices=False)
    full = np.zeros((coef.shape[1], coef.shape[1]))
    full[: len(vt)] = vt
    return full


def _prior_errors(
    x: np.ndarray,
    y: np.ndarray,
    outputs: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    ranks: Sequence[int],
    weights: np.ndarray | None,
) -> tuple[np.ndarray, list[int]]:
    """Inner cross-validated routing error per (L2 strength, rank) and the ranks tried; without auxiliary
    outputs, plain ridge (full rank) alone."""
    n_main, n_out = y.reshape(len(y), -1).shape[1], outputs.shape[1]
    candidates = sorted({min(int(r), n_out) for r in (*ranks, n_out)}) if n_out > n_main else [n_out]
    errors = np.zeros((len(PRIOR_ALPHAS), len(candidates)))
    for train, valid in splits:
        truth = _gaps(y[valid])
        centre = x[train].mean(axis=0)
        for j, (coef, intercept) in enumerate(ridge_path(x[train], outputs[train], PRIOR_ALPHAS)):
            if len(candidates) > 1:
                directions = _principal_directions(x[train], coef)
                deviation = (x[valid] - centre) @ coef  # the fitted values' deviation from the output means
                means = intercept + centre @ coef
            for k, rank in enumerate(candidates):
                if rank == n_out:
                    fitted = x[valid] @ coef + intercept
                else:
                    fitted = (deviation @ directions[:rank].T) @ directions[:rank] + means
                pred = fitted[:, :n_main].reshape(-1, *y.shape[1:])
                gap_error = _gaps(pred) - truth  # (n, m), or (n, m, T − 1) with more than two tiers
                if weights is not None:
                    gap_error = (
                        gap_error @ weights if gap_error.ndim == 2 else np.einsum("nmt,m->nt", gap_error, weights)
                    )
                errors[j, k] += float((gap_error**2).sum())
    return errors, candidates


def correction_share(out: np.ndarray, target: np.ndarray, gap_weight: float) -> float:
    """The share ``λ ∈ [0, 1]`` of the network's corrections ``out`` (n, k, T) that minimises the training loss
    of ``λ·out`` against the residual targets ``target`` on validation data (closed form: the loss is quadratic
    in ``λ``). 0 keeps the prior alone; 1 the corrections as trained."""
    gap_out, gap_target = _gaps(out), _gaps(target)
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


def _gaps(values: Any) -> Any:
    """Each dearer tier's value minus the cheapest tier's, over the last axis (numpy or torch): (..., T − 1), or
    the cloud-minus-edge gap (...) with two tiers."""
    if values.shape[-1] == 2:
        return values[..., 1] - values[..., 0]
    return values[..., 1:] - values[..., :1]


def training_loss(out: Any, target: Any, gap_weight: float) -> Any:
    """Mean squared error over every tier plus ``gap_weight`` times that of the gaps to the cheapest tier."""
    torch = _torch()
    tiers = torch.mean((out - target) ** 2)
    gap = torch.mean((_gaps(out) - _gaps(target)) ** 2)
    return tiers + gap_weight * gap


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
