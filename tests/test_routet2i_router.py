"""The RouteT2I router: PRS arithmetic, learning a known signal, artifacts, explanations and the ablations."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from router.base import RouterError, create_router, load_router
from router.embeddings import SentenceEncoder
from router.log import LogRecord
from router.routet2i import (
    PIECE_ROWS,
    RouteT2IConfig,
    RouteT2IRouter,
    build_network,
    correction_share,
    fit_prior,
    prompt_statistics,
)
from router.routet2i.model import Batch, pad_batch
from router.types import QualityVector

SMALL = {"members": 2, "max_epochs": 40, "patience": 8, "threads": 1}

SUBJECTS = ["a cat", "a dog", "a red car", "an old house", "a tall tree", "a small boat", "a mountain", "a violin"]
PLACES = ["on a beach", "in a forest", "at night", "in the rain", "under a bridge", "in a field"]


def _log() -> list[LogRecord]:
    """The cloud wins by a lot exactly on prompts that mention text ("a sign that says ..."); otherwise the
    edge is as good. Two metrics: the gap shows on both, twice as large on alignment."""
    records = []
    for i, (subject, place) in enumerate((s, p) for s in SUBJECTS for p in PLACES):
        for with_text in (False, True):
            prompt = f"{subject} {place}" + (f' next to a sign that says "open {i}"' if with_text else "")
            gap = 1.0 if with_text else 0.0
            edge = {"quality": 3.0, "alignment": 3.0}
            cloud = {"quality": 3.0 + 0.5 * gap, "alignment": 3.0 + gap}
            records.append(
                LogRecord(f"{i}-{int(with_text)}", prompt, QualityVector(edge, "t"), QualityVector(cloud, "t"))
            )
    return records


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    """The encoder every router of this module shares (and its cache of token states)."""
    return SentenceEncoder()


@pytest.fixture(scope="module")
def fitted(encoder: SentenceEncoder) -> RouteT2IRouter:
    log = _log()
    router = RouteT2IRouter(**SMALL, encoder=encoder)
    router.fit(log[: len(log) - 12], seed=0)
    return router


def test_prs_is_one_half_for_equal_predictions_and_above_when_the_edge_is_better() -> None:
    router = RouteT2IRouter()
    router.targets = ("a", "b")
    router.scales = np.array([1.0, 2.0])
    same = router._prs(np.array([[3.0, 4.0]]), np.array([[3.0, 4.0]]))
    assert same[0] == pytest.approx(0.5)
    edge_better = router._prs(np.array([[3.5, 4.0]]), np.array([[3.0, 4.0]]))
    cloud_better = router._prs(np.array([[3.0, 4.0]]), np.array([[3.0, 6.0]]))
    assert edge_better[0] > 0.5 > cloud_better[0]
    # By hand: D_a = σ(0.5 / 1) and D_b = σ(0) with equal weights.
    assert edge_better[0] == pytest.approx(0.5 * (1 / (1 + np.exp(-0.5))) + 0.25)


def test_metric_weights_and_temperature_enter_the_prs() -> None:
    router = RouteT2IRouter(metric_weights={"a": 0.8}, temperature=2.0)
    router.targets = ("a", "b")
    router.scales = np.array([1.0, 1.0])
    assert router.prs_weights() == pytest.approx([0.8, 0.2])
    value = router._prs(np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))[0]
    assert value == pytest.approx(0.8 / (1 + np.exp(-0.5)) + 0.2 * 0.5)


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="top_k"):
        RouteT2IConfig(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        RouteT2IConfig(temperature=0.0)
    with pytest.raises(ValueError, match="neighbour_share"):
        RouteT2IConfig(neighbour_share=1.5)
    with pytest.raises(ValueError, match="neighbour_temperature"):
        RouteT2IConfig(neighbour_temperature=0.0)
    with pytest.raises(TypeError):
        RouteT2IRouter(no_such_setting=1)


def test_prompt_statistics_grow_with_the_prompt() -> None:
    stats = prompt_statistics(["a cat", "a cat and a dog and a house on a hill"])
    assert stats.shape == (2, 4)
    assert np.all(stats[1] > stats[0])


def test_it_learns_which_prompts_the_cloud_wins(fitted: RouteT2IRouter) -> None:
    held_out = _log()[-12:]
    scores = fitted.score([r.prompt for r in held_out])
    wins = np.array([r.cloud["alignment"] > r.edge["alignment"] for r in held_out])
    assert scores[wins].min() > scores[~wins].max()
    predictions = fitted.predict([r.prompt for r in held_out])
    for record, prediction in zip(held_out, predictions, strict=True):
        assert prediction.edge is not None and prediction.cloud is not None
        assert set(prediction.cloud.metrics) == {"quality", "alignment"}
        assert prediction.max_score_for_edge == 0.0
        gap = prediction.cloud["alignment"] - prediction.edge["alignment"]
        assert (gap > 0.5) == (record.cloud["alignment"] > record.edge["alignment"])


def test_calibration_sends_the_budget_share_of_training_prompts(encoder: SentenceEncoder) -> None:
    train = _log()[:-12]
    router = RouteT2IRouter(**SMALL, neighbour_share=0.0, encoder=encoder).fit(train, seed=0)
    scores = router.score([r.prompt for r in train])
    for rho in (0.2, 0.4):
        threshold = router.calibrated_threshold(rho)
        assert threshold is not None
        assert abs(float(np.mean(scores > threshold)) - rho) <= 2 / len(train)
    # The threshold is ½ minus the calibration's quantile (linear interpolation), computed without np.quantile.
    for rho in (-0.5, 0.0, 0.013, 0.3, 0.5, 0.999, 1.0, 1.5):
        expected = 0.5 - np.quantile(router.calibration, min(max(rho, 0.0), 1.0))
        assert router.calibrated_threshold(rho) == pytest.approx(expected, abs=1e-12)


def _distinct_log() -> list[LogRecord]:
    """Every prompt rated differently, so a prompt's own ratings are recognisable among its neighbours'."""
    rng = np.random.default_rng(7)
    records = []
    for i, (subject, place) in enumerate((s, p) for s in SUBJECTS for p in PLACES):
        edge = {"quality": float(rng.uniform(1, 5)), "alignment": float(rng.uniform(1, 5))}
        cloud = {"quality": float(rng.uniform(1, 5)), "alignment": float(rng.uniform(1, 5))}
        records.append(LogRecord(str(i), f"{subject} {place}", QualityVector(edge, "t"), QualityVector(cloud, "t")))
    return records


def test_neighbours_recall_what_the_most_similar_training_prompts_got(encoder: SentenceEncoder) -> None:
    """With the neighbours alone at a low temperature, a prompt seen in training is predicted as it was rated,
    and the explanation gives the neighbours' share of the gap."""
    log = _distinct_log()
    router = RouteT2IRouter(**SMALL, neighbour_share=1.0, neighbour_temperature=0.002, encoder=encoder).fit(log, seed=0)
    predictions = router.predict([r.prompt for r in log[:10]])
    for record, prediction in zip(log[:10], predictions, strict=True):
        assert prediction.edge is not None and prediction.cloud is not None
        for metric in ("quality", "alignment"):
            assert prediction.edge[metric] == pytest.approx(record.edge[metric], abs=1e-3)
            assert prediction.cloud[metric] == pytest.approx(record.cloud[metric], abs=1e-3)
            assert prediction.explanation is not None
            assert prediction.explanation["neighbours_gap"][metric] == pytest.approx(
                record.cloud[metric] - record.edge[metric], abs=1e-3
            )


def test_calibration_leaves_each_prompt_out_of_its_own_neighbours(encoder: SentenceEncoder) -> None:
    """The offline threshold is the PRS quantile a new prompt would see: a training prompt is calibrated on its
    neighbours' ratings, never on its own (which would make the calibration the training labels' quantiles)."""
    log = _distinct_log()
    share, temperature = 1.0, 0.05
    router = RouteT2IRouter(**SMALL, neighbour_share=share, neighbour_temperature=temperature, encoder=encoder)
    router.fit(log, seed=0)
    keys = router.encoder.encode([r.prompt for r in log]).astype(np.float64)
    edge = np.array([[r.edge[m] for m in router.targets] for r in log])
    cloud = np.array([[r.cloud[m] for m in router.targets] for r in log])
    similarity = keys @ keys.T
    np.fill_diagonal(similarity, -np.inf)
    weights = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    expected = np.sort(router._prs(weights @ edge, weights @ cloud))
    np.testing.assert_allclose(router.calibration, expected, atol=1e-4)
    # Scoring the training prompts themselves recalls their own ratings: a different distribution.
    own = np.sort(router._prs(edge, cloud))
    assert np.abs(router.calibration - own).max() > 0.05


def test_a_long_log_keeps_a_seeded_sample_of_its_prompts_as_neighbours(encoder: SentenceEncoder) -> None:
    log = _distinct_log()
    limited = RouteT2IRouter(**SMALL, neighbour_limit=10, encoder=encoder).fit(log, seed=0)
    again = RouteT2IRouter(**SMALL, neighbour_limit=10, encoder=encoder).fit(log, seed=0)
    assert limited.neighbour_keys.shape == (10, 384) and limited.version == again.version
    np.testing.assert_array_equal(limited.neighbour_keys, again.neighbour_keys)
    # The kept neighbours are training prompts with their own ratings.
    keys = limited.encoder.encode([r.prompt for r in log])
    rows = [int(np.argmax(keys @ key)) for key in limited.neighbour_keys]
    assert len(set(rows)) == 10
    edge = np.array([[log[i].edge[m] for m in limited.targets] for i in rows])
    np.testing.assert_allclose(limited.neighbour_values[..., 0] * limited.std + limited.mean, edge, atol=1e-4)
    assert np.isfinite(limited.calibration).all() and len(limited.calibration) == len(log)
    unlimited = RouteT2IRouter(**SMALL, encoder=encoder).fit(log, seed=0)
    assert len(unlimited.neighbour_keys) == len(log) and unlimited.version != limited.version
    with pytest.raises(ValueError, match="neighbour_limit"):
        RouteT2IConfig(neighbour_limit=0)


def test_explanations_name_words_of_the_prompt(fitted: RouteT2IRouter) -> None:
    prompt = 'a violin at night next to a sign that says "open 99"'
    (prediction,) = fitted.predict([prompt])
    assert prediction.explanation is not None
    by_metric = prediction.explanation["tokens_by_metric"]
    assert set(by_metric) == {"quality", "alignment"}
    for entries in by_metric.values():
        assert 0 < len(entries) <= 5
        assert all(entry["token"] in prompt for entry in entries)
    json.dumps(prediction.explanation)  # stored in a JSON column


def test_artifact_round_trip_and_tamper_detection(
    fitted: RouteT2IRouter, encoder: SentenceEncoder, tmp_path: Path
) -> None:
    directory = fitted.save(tmp_path / "artifact")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["version"] == fitted.version and manifest["version"].startswith("routet2i:")
    assert len(manifest["training"]["members"]) == SMALL["members"]
    with np.load(directory / "weights.npz") as weights:
        assert weights["neighbour_keys"].shape == (len(_log()) - 12, 384)
    loaded = load_router("routet2i", directory, encoder=encoder)
    prompts = [r.prompt for r in _log()[-12:]]
    np.testing.assert_allclose(loaded.score(prompts), fitted.score(prompts), atol=1e-6)
    assert loaded.version == fitted.version

    tampered = tmp_path / "tampered"
    shutil.copytree(directory, tampered)
    (tampered / "weights.npz").write_bytes(b"not the weights")
    with pytest.raises(RouterError, match="corrupt"):
        load_router("routet2i", tampered, encoder=encoder)
    with pytest.raises(RouterError, match="holds router"):
        load_router("knn", directory, encoder=encoder)


def test_an_artifact_written_before_the_neighbour_settings_loads_unchanged(
    encoder: SentenceEncoder, tmp_path: Path
) -> None:
    """Artifacts trained before a setting existed keep loading, with the same version and the same scores."""
    log = _log()[:40]
    router = RouteT2IRouter(**SMALL, neighbour_share=0.0, encoder=encoder).fit(log, seed=0)
    directory = router.save(tmp_path / "older")
    manifest = json.loads((directory / "manifest.json").read_text())
    for setting in ("neighbour_share", "neighbour_temperature", "neighbour_limit"):
        del manifest["config"][setting]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_router("routet2i", directory, encoder=encoder)
    assert loaded.version == router.version
    assert loaded.cfg.neighbour_share == 0.0
    prompts = [r.prompt for r in _log()[-12:]]
    np.testing.assert_allclose(loaded.score(prompts), router.score(prompts), atol=1e-6)


def test_fixed_seed_gives_identical_artifacts(encoder: SentenceEncoder) -> None:
    log = _log()[:40]
    first = RouteT2IRouter(**SMALL, encoder=encoder).fit(log, seed=3)
    second = RouteT2IRouter(**SMALL, encoder=encoder).fit(log, seed=3)
    assert first.version == second.version
    assert RouteT2IRouter(**SMALL, encoder=encoder).fit(log, seed=4).version != first.version


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("routet2i-no-multi-metric", "multi_metric"),
        ("routet2i-no-token-selection", "token_selection"),
        ("routet2i-no-dual-gate", "dual_gate"),
        ("routet2i-no-neighbours", "neighbour_share"),
    ],
)
def test_ablations_switch_off_their_component(name: str, setting: str, encoder: SentenceEncoder) -> None:
    router = create_router(name, encoder=encoder, **SMALL)
    assert not getattr(router.cfg, setting)
    router.fit(_log()[:60], seed=0)
    targets = ("composite",) if setting == "multi_metric" else ("quality", "alignment")
    assert router.targets == targets
    assert np.all(np.isfinite(router.score(["a cat on a beach"])))
    assert (len(router.neighbour_keys) > 0) == (setting != "neighbour_share")


def test_the_shipped_artifact_loads_and_routes(encoder: SentenceEncoder) -> None:
    router = load_router("routet2i", None, encoder=encoder)
    assert router.version.startswith("routet2i:")
    (prediction,) = router.predict(["two dogs playing chess in a library, oil painting"])
    assert prediction.predicted_dict() is not None
    assert prediction.explanation and prediction.explanation["tokens_by_metric"]
    assert router.calibrated_threshold(0.3) is not None


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"dual_gate": False},
        {"token_selection": False},
        {"sentence_width": 16, "top_k": 3},
        {"prompt_statistics": False},
    ],
)
def test_numpy_inference_is_the_torch_network(settings: dict[str, object]) -> None:
    """Decisions run the members' eval-mode forward pass in numpy, all members at once; it must be the trained
    torch module's, outputs and per-token pushes alike, padding included."""
    import torch

    cfg = RouteT2IConfig(**settings)  # type: ignore[arg-type]
    d, k, lengths = 24, 3, [11, 7, 3, 1]
    torch.manual_seed(0)
    nets = []
    for _ in range(3):
        net = build_network(cfg, d, k).eval()
        with torch.no_grad():  # the initial heads are nearly zero: make every part of the output count
            net.head_w.mul_(10.0)
            net.head_b.normal_()
        nets.append(net)
    router = RouteT2IRouter(cfg)
    router.states = [{name: v.detach().numpy().copy() for name, v in net.state_dict().items()} for net in nets]
    rng = np.random.default_rng(0)
    mask = np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]
    states = (rng.standard_normal((len(lengths), max(lengths), d)) * mask[..., None]).astype(np.float32)
    batch = Batch(
        states,
        mask,
        rng.standard_normal((len(lengths), d)).astype(np.float32),
        rng.standard_normal((len(lengths), 4)).astype(np.float32),
    )
    out, pushes = router._moe(batch)
    assert pushes is not None
    scores_only, no_pushes = router._moe(batch, explain=False)
    assert no_pushes is None
    np.testing.assert_array_equal(scores_only, out)
    expected_out, expected_pushes = [], []
    with torch.inference_mode():
        for net in nets:
            o, weights, gates = net(*batch.inputs())
            h = gates.shape[-1]
            direction = (net.head_w[:, :h, 1] - net.head_w[:, :h, 0]).numpy()
            expected_out.append(o.numpy())
            expected_pushes.append(np.einsum("bkl,bklh,kh->bkl", weights.numpy(), gates.numpy(), direction))
    assert np.abs(np.mean(expected_out, axis=0)).max() > 0.1
    np.testing.assert_allclose(out, np.mean(expected_out, axis=0), atol=2e-5)
    np.testing.assert_allclose(pushes, np.mean(expected_pushes, axis=0), atol=2e-5)
    assert (pushes[~np.broadcast_to(mask[:, None, :], pushes.shape)] == 0).all()


def test_scoring_runs_blas_on_one_thread_and_gives_the_threads_back(fitted: RouteT2IRouter) -> None:
    from threadpoolctl import ThreadpoolController, threadpool_limits

    def blas_threads() -> set[int]:  # numpy's own BLAS: the one that runs the mixture of experts' products
        libs = ThreadpoolController().info()
        return {lib["num_threads"] for lib in libs if lib["user_api"] == "blas" and "numpy" in lib["filepath"]}

    seen: list[set[int]] = []
    moe = fitted._moe

    def spy(batch, explain=True):  # type: ignore[no-untyped-def]
        seen.append(blas_threads())
        return moe(batch, explain)

    with threadpool_limits(limits=2, user_api="blas"):
        fitted._moe = spy  # type: ignore[method-assign]
        try:
            scores = fitted.score(["a red cube on a blue sphere", "a cat"])
        finally:
            del fitted._moe
        assert blas_threads() == {2}
    assert seen == [{1}]
    assert scores.shape == (2,)


def test_a_batchs_pieces_run_on_the_encoders_threads_and_score_as_on_one_thread(fitted: RouteT2IRouter) -> None:
    # After a batch's forward passes the router's own network runs over pieces of PIECE_ROWS prompts, side by
    # side on the encoder's threads. The pieces depend on the prompts alone, so one thread and two give the
    # same scores and explanations, bit for bit.
    prompts = [f"{s} {p}" + suffix for s in SUBJECTS for p in PLACES for suffix in ("", ' with a sign "x"')]
    assert len(prompts) > 2 * PIECE_ROWS
    forward = fitted._forward
    seen: list[str] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    shared = fitted._encoder
    try:
        fitted._encoder = SentenceEncoder(threads=1)
        alone_scores, alone = fitted.score(prompts), fitted.predict(prompts)
        fitted._encoder = SentenceEncoder(threads=2)
        fitted._forward = spy  # type: ignore[method-assign]
        side_scores, side = fitted.score(prompts), fitted.predict(prompts)
    finally:
        fitted._encoder = shared
        del fitted._forward
    pieces = -(-len(prompts) // PIECE_ROWS)
    assert len(seen) == 2 * pieces and all(name.startswith("routet2i-encoder") for name in seen)
    assert np.array_equal(alone_scores, side_scores)
    assert [p.score for p in alone] == [p.score for p in side] == side_scores.tolist()
    assert [p.explanation for p in alone] == [p.explanation for p in side]
    assert [p.edge for p in alone] == [p.edge for p in side]


def test_the_prior_picks_its_l2_strength_on_the_weighted_gaps() -> None:
    # Metric 0's gap is noise (best: the strongest L2), metric 1's is a clean linear signal (best: the weakest).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = np.zeros((200, 2, 2))
    y[:, 0, 1] = rng.normal(size=200)
    y[:, 1, 1] = x @ rng.normal(size=8)
    prompts = [f"prompt {i}" for i in range(200)]

    def slope(weights: np.ndarray) -> float:
        coef, _, _ = fit_prior(x, y, prompts, seed=0, weights=weights)
        return float(np.abs(coef[:, 1, 1] - coef[:, 1, 0]).sum())

    assert slope(np.array([0.0, 1.0])) > 5 * slope(np.array([1.0, 0.0]))


def _factor_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One prompt factor ``f = x·u`` raises the cloud's quality under heavy rating noise; eight auxiliary
    labels (other generators) see the same factor with little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150, 60))
    u = rng.normal(size=60)
    u /= np.linalg.norm(u)
    f = x @ u
    y = np.zeros((150, 1, 2))
    y[:, 0, 0] = rng.normal(size=150) * 2.0
    y[:, 0, 1] = f + rng.normal(size=150) * 2.0
    auxiliary = f[:, None] * rng.uniform(0.5, 1.5, size=8) + rng.normal(size=(150, 8)) * 0.3
    return x, y, auxiliary, u, [f"prompt {i}" for i in range(150)]


def test_auxiliary_labels_point_the_prior_at_their_shared_factor() -> None:
    x, y, auxiliary, u, prompts = _factor_problem()

    def alignment(coef: np.ndarray) -> float:
        gap = coef[:, 0, 1] - coef[:, 0, 0]
        return float(abs(gap @ u) / np.linalg.norm(gap))

    plain, _, plain_chosen = fit_prior(x, y, prompts, seed=0)
    helped, _, chosen = fit_prior(x, y, prompts, seed=0, auxiliary=auxiliary)
    assert plain_chosen["outputs"] == 2 and chosen["outputs"] == 10
    assert chosen["rank"] < chosen["outputs"]
    assert alignment(helped) > 0.9 and alignment(plain) < 0.7


def test_missing_auxiliary_labels_count_as_their_mean() -> None:
    x, y, auxiliary, _, prompts = _factor_problem(1)
    auxiliary[::3, 2] = np.nan
    auxiliary[:, 5] = np.nan  # never known: ignored
    coef, intercept, chosen = fit_prior(x, y, prompts, seed=0, auxiliary=auxiliary)
    assert np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))
    assert chosen["outputs"] == 2 + 7


def _with_auxiliary(records: list[LogRecord], seed: int) -> list[LogRecord]:
    rng = np.random.default_rng(seed)
    return [
        LogRecord(r.id, r.prompt, r.edge, r.cloud, auxiliary={"other:alignment": float(v), "other:quality": 1.0})
        for r, v in zip(records, rng.normal(size=len(records)), strict=True)
    ]


def test_auxiliary_labels_are_used_in_training_only(encoder: SentenceEncoder) -> None:
    log = _log()[:48]
    without = RouteT2IRouter(**SMALL, auxiliary=True, encoder=encoder).fit(log, seed=0)
    with_labels = RouteT2IRouter(**SMALL, auxiliary=True, encoder=encoder).fit(_with_auxiliary(log, 0), seed=0)
    other_labels = RouteT2IRouter(**SMALL, auxiliary=True, encoder=encoder).fit(_with_auxiliary(log, 1), seed=0)
    default = RouteT2IRouter(**SMALL, encoder=encoder).fit(_with_auxiliary(log, 0), seed=0)
    assert len({without.version, with_labels.version, other_labels.version}) == 3  # the labels are learnt from
    assert default.cfg.auxiliary is False  # off by default: the log's labels are ignored ...
    np.testing.assert_array_equal(default.priors[0][0], without.priors[0][0])  # ... as if there were none
    assert with_labels.training_report["members"][0]["prior"]["outputs"] == 4 + 2
    prompts = [r.prompt for r in _log()[48:60]]
    # Decisions read the prompt only: scoring records with or without labels gives the same scores.
    records = _log()[48:60]
    np.testing.assert_array_equal(
        with_labels.score_records(records), with_labels.score_records(_with_auxiliary(records, 5))
    )
    assert with_labels.score(prompts).shape == (12,)


def test_the_correction_share_minimises_the_validation_loss() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(size=(30, 2, 2))
    assert correction_share(target, target, 2.0) == pytest.approx(1.0)
    assert correction_share(2.0 * target, target, 2.0) == pytest.approx(0.5)
    assert correction_share(-target, target, 2.0) == 0.0  # a harmful correction is dropped, never reversed
    assert correction_share(np.zeros_like(target), target, 2.0) == 0.0
    noisy = target + rng.normal(size=target.shape)
    share = correction_share(noisy, target, 2.0)
    losses = {
        s: np.mean((s * noisy - target) ** 2)
        + 2.0 * np.mean((s * (noisy[..., 1] - noisy[..., 0]) - (target[..., 1] - target[..., 0])) ** 2)
        for s in (share - 0.05, share, share + 0.05)
    }
    assert min(losses, key=losses.__getitem__) == share


def test_members_record_their_correction_share(fitted: RouteT2IRouter, encoder: SentenceEncoder) -> None:
    assert "correction_share" not in fitted.training_report["members"][0]  # off by default
    log = _log()
    shrunk = RouteT2IRouter(**SMALL, shrink_correction=True, encoder=encoder).fit(log[: len(log) - 12], seed=0)
    shares = [m["correction_share"] for m in shrunk.training_report["members"]]
    assert all(0.0 <= s <= 1.0 for s in shares)
    # The toy log's signal is in a few words the prior's sentence embedding blurs: the network helps there.
    assert max(shares) > 0.0
    for state, original, share in zip(shrunk.states, fitted.states, shares, strict=True):
        np.testing.assert_allclose(state["head_b"], share * original["head_b"], rtol=1e-5, atol=1e-7)


def test_prior_pushes_split_the_priors_embedding_gap_over_the_tokens(fitted: RouteT2IRouter) -> None:
    prompts = ['a violin at night next to a sign that says "open 99"', "a cat"]
    tokens = fitted.encoder.encode_tokens(prompts)
    pushes = fitted._prior_pushes(pad_batch(tokens, np.zeros((len(tokens), 4))))
    d = tokens[0].sentence.shape[0]
    sentence = np.stack([t.sentence for t in tokens]).astype(np.float64)
    coef = np.mean([c for c, _ in fitted.priors], axis=0)[:d]
    expected = sentence @ ((coef[..., 1] - coef[..., 0]) / fitted.feature_std[:d, None])
    np.testing.assert_allclose(pushes.sum(axis=-1), expected, rtol=1e-4, atol=1e-6)
    assert np.all(pushes[1, :, len(tokens[1].tokens) :] == 0.0)  # padding moves nothing
