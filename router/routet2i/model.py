"""The RouteT2I router at decision time: what a route worker loads and runs.

The router's fitted state (the ensemble members' weights, their ridge priors, the neighbours, the standardisation
and the calibration) and the numpy forward pass over it: token states from the encoder, the members' mixture of
experts with its dual gates, the ridge prior and the neighbour blend give predicted qualities of both tiers per
metric; Pareto relative superiority compares them (:meth:`RouteT2IRouter.score`), and :meth:`RouteT2IRouter.predict`
adds the qualities and the words that moved them. The method is described in :mod:`router.routet2i`; fitting
lives in :mod:`router.routet2i.training`, the artifact in :mod:`router.routet2i.artifact`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from router.base import Router, RouterError
from router.budget import sorted_quantile
from router.embeddings import SentenceEncoder, TokenStates
from router.routet2i import artifact
from router.routet2i.config import RouteT2IConfig
from router.types import Prediction, QualityVector

if TYPE_CHECKING:
    from router.log import LogRecord

PIECE_ROWS = 32
"""Prompts per pass of the router's own network when scoring: a batch's pieces run side by side on the
encoder's threads once its forward passes are done (about 1.05 times the batched throughput of one pass over
the whole batch on 2 cores, docs/performance.md)."""

N_STATISTICS = 4
"""Prompt statistics per prompt (:func:`prompt_statistics`)."""

R = TypeVar("R", bound="RouteT2IRouter")


def prompt_statistics(prompts: Sequence[str]) -> np.ndarray:
    """Per prompt: log(1 + characters), log(1 + words), log(1 + nouns), log(1 + content words); shape (n, 4)."""
    from router.complexity import content_words
    from router.nouns import count_nouns

    rows = [(len(p), len(p.split()), count_nouns(p), len(content_words(p))) for p in prompts]
    return np.log1p(np.array(rows, dtype=np.float64).reshape(len(prompts), N_STATISTICS))


def prs_weights(targets: Sequence[str], named: Mapping[str, float]) -> np.ndarray:
    """The PRS weight ``w_i`` of each target: ``named`` ones as given, the rest sharing what is left equally,
    normalised to sum to 1 (equal weights when every weight is 0)."""
    fixed = {m: float(named[m]) for m in targets if m in named}
    rest = [m for m in targets if m not in named]
    left = max(1.0 - sum(fixed.values()), 0.0)
    weights = np.array([fixed.get(m, left / len(rest) if rest else 0.0) for m in targets])
    total = weights.sum()
    return weights / total if total > 0 else np.full(len(targets), 1.0 / len(targets))


@dataclass
class Batch:
    """Padded token states (B, L, d), their mask (B, L), sentence embeddings (B, d) and statistics (B, 4)."""

    states: np.ndarray
    mask: np.ndarray
    sentence: np.ndarray
    stats: np.ndarray

    def inputs(self) -> tuple[Any, Any, Any, Any]:
        """The same as torch tensors (training)."""
        from torch import from_numpy

        return from_numpy(self.states), from_numpy(self.mask), from_numpy(self.sentence), from_numpy(self.stats)


def pad_batch(items: Sequence[TokenStates], stats: np.ndarray) -> Batch:
    """The prompts' token states padded to the longest of them, with their sentence embeddings and statistics."""
    length = max(len(item.tokens) for item in items)
    d = items[0].states.shape[1]
    states = np.zeros((len(items), length, d), dtype=np.float32)
    mask = np.zeros((len(items), length), dtype=bool)
    for row, item in enumerate(items):
        states[row, : len(item.tokens)] = item.states
        mask[row, : len(item.tokens)] = True
    sentence = np.stack([item.sentence for item in items]).astype(np.float32)
    return Batch(states, mask, sentence, stats.astype(np.float32))


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


class RouteT2IRouter(Router):
    """RouteT2I: multi-metric quality prediction for both tiers, compared by Pareto relative superiority.

    Args:
        config: predictor, training and PRS settings (also accepted as keyword arguments).
        encoder: the sentence encoder (shared by every router that should share its caches); default: one of the
            router's own, the packaged MiniLM on the default backend, built at first use.
    """

    name = "routet2i"
    learned: ClassVar[bool] = True
    uses_encoder: ClassVar[bool] = True
    ablation: ClassVar[dict[str, Any]] = {}
    """Settings a named ablation forces (see :mod:`router.routet2i`)."""

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
        """The encoder given to the constructor, else the router's own (built at first use, never shared)."""
        if self._encoder is None:
            self._encoder = SentenceEncoder()
        return self._encoder

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    def warm(self, prompts: Sequence[str]) -> None:
        self.encoder.reserve(len(prompts))
        self.encoder.encode_tokens(prompts)

    def fit(self, records: Sequence[LogRecord], *, seed: int = 0) -> RouteT2IRouter:
        """Train on a replay log (:func:`router.routet2i.training.fit`)."""
        from router.routet2i.training import fit

        return fit(self, records, seed=seed)

    def set_weights(self, states: list[dict[str, np.ndarray]], priors: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Install the members' network weights and ridge priors (training, loading), dropping what was derived
        from earlier ones."""
        self.states, self.priors = states, priors
        self._inference, self._version = None, None

    def raw_features(self, tokens: Sequence[TokenStates], stats: np.ndarray) -> np.ndarray:
        """The ridge prior's inputs: sentence embedding and (standardised) prompt statistics."""
        sentence = np.stack([t.sentence for t in tokens]).astype(np.float64)
        return np.concatenate([sentence, stats], axis=1) if self.cfg.prompt_statistics else sentence

    def standardised_stats(self, prompts: Sequence[str]) -> np.ndarray:
        result: np.ndarray = (prompt_statistics(prompts) - self.stats_mean) / self.stats_std
        return result

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

    def _moe(self, batch: Batch, explain: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
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

    def _prior_pushes(self, batch: Batch) -> np.ndarray:
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
        batch = pad_batch(tokens, stats)
        out, pushes = self._moe(batch, explain)
        out = out.astype(np.float64)
        if self.priors:
            features = (self.raw_features(tokens, stats) - self.feature_mean) / self.feature_std
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
        return prs_weights(self.targets, self.cfg.metric_weights)

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

    def prs_from_tokens(
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
        result: np.ndarray = 0.5 - self.prs_from_tokens(tokens, self.standardised_stats(prompts))
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
        pieces = self._pieces(tokens, self.standardised_stats(prompts), explain=True)
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

    # --- artifact: router.routet2i.artifact ----------------------------------------------------------

    @property
    def version(self) -> str:
        """The router's name and a hash of its encoder, settings and every array (computed once per fit or load)."""
        if not self.states:
            return self.name
        if self._version is None:
            self._version = artifact.version_hash(self)
        return self._version

    def save(self, directory: Path) -> Path:
        return artifact.save(self, directory)

    @classmethod
    def load(cls: type[R], directory: Path, *, encoder: SentenceEncoder | None = None) -> R:
        return artifact.load(cls, directory, encoder=encoder)

    @classmethod
    def default_artifact(cls, encoder: SentenceEncoder | None = None) -> Path | None:
        """The artifact shipped with the package for ``encoder`` (None: the one the router would build;
        :func:`router.routet2i.artifact.shipped`); none for a variant of the router."""
        if cls is not RouteT2IRouter:
            return None
        return artifact.shipped(encoder if encoder is not None else SentenceEncoder())
