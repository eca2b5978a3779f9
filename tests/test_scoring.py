"""The scoring mathematics on embeddings (exact), and the open_clip scorer end to end (real ViT-B-32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.settings import ScorerSettings
from router.quality_metrics import ALIGNMENT, ROUTET2I_V1, Metric, MetricSet
from router.types import QualityVector
from worker.scoring import (
    ClipScorer,
    ImageReadError,
    ScorerError,
    clip_scores,
    contrastive_scores,
    decode_image,
)

TAU = 100.0


def embeddings(rows: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))


# -- the formula, on embeddings ---------------------------------------------------------------------------


def test_identical_texts_score_exactly_one_half() -> None:
    image = embeddings(8)
    text = embeddings(3, seed=1)
    scores = contrastive_scores(image, text, text.clone(), TAU)
    assert scores.shape == (8, 3)
    assert torch.equal(scores, torch.full((8, 3), 0.5))


def test_image_equal_to_positive_scores_above_half_and_equal_to_negative_below() -> None:
    positive, negative = embeddings(1, seed=1), embeddings(1, seed=2)
    at_positive = contrastive_scores(positive, positive, negative, TAU).item()
    at_negative = contrastive_scores(negative, positive, negative, TAU).item()
    assert at_positive > 0.5 > at_negative
    # symmetric: swapping which text the image equals mirrors the score around 0.5
    assert at_positive + at_negative == pytest.approx(1.0, abs=1e-6)


def test_score_is_the_two_way_softmax_of_the_clip_logits() -> None:
    image, positive, negative = embeddings(5), embeddings(4, seed=1), embeddings(4, seed=2)
    scores = contrastive_scores(image, positive, negative, TAU)
    normalise = torch.nn.functional.normalize
    i, p, n = normalise(image, dim=-1), normalise(positive, dim=-1), normalise(negative, dim=-1)
    logits = torch.stack([TAU * i @ p.T, TAU * i @ n.T], dim=-1)  # (images, metrics, 2)
    assert torch.allclose(scores, logits.softmax(dim=-1)[..., 0], atol=1e-6)
    # and it does not depend on the embeddings' norms
    assert torch.allclose(contrastive_scores(3 * image, 0.5 * positive, 7 * negative, TAU), scores, atol=1e-6)


def test_a_larger_logit_scale_pushes_scores_away_from_one_half() -> None:
    image, positive, negative = embeddings(6), embeddings(2, seed=1), embeddings(2, seed=2)
    soft = contrastive_scores(image, positive, negative, 10.0) - 0.5
    sharp = contrastive_scores(image, positive, negative, 100.0) - 0.5
    assert torch.all(sharp.abs() >= soft.abs())
    assert torch.all(torch.sign(sharp) == torch.sign(soft))


def test_clip_score_is_weighted_cosine_clamped_at_zero() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [4.0, 0.0]])
    scores = clip_scores(image, text, 2.5)
    assert scores.tolist() == pytest.approx([2.5 * math.cos(math.pi / 4), 0.0, 2.5])


def test_batched_arithmetic_matches_row_by_row() -> None:
    image, positive, negative = embeddings(16), embeddings(10, seed=1), embeddings(10, seed=2)
    batched = contrastive_scores(image, positive, negative, TAU)
    rows = torch.cat([contrastive_scores(image[i : i + 1], positive, negative, TAU) for i in range(16)])
    # A batched matrix product may sum in another order; float32 rounding of a cosine (~1e-7), multiplied by
    # tau = 100, moves a score by about 1e-6 at most.
    assert torch.allclose(batched, rows, atol=1e-5, rtol=0)


# -- images ---------------------------------------------------------------------------------------------------


def test_decode_refuses_bytes_that_are_not_an_image() -> None:
    with pytest.raises(ImageReadError, match="upload is not a readable image"):
        decode_image(b"not an image", source="upload")


# -- the scorer, with a real ViT-B-32 (random weights from the fixed seed) ----------------------------------


def random_images(count: int, size: int = 96, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    torch.set_num_threads(1)
    return ClipScorer(model="ViT-B-32", batch_size=4)


@pytest.mark.slow
def test_scores_every_metric_of_the_set_with_alignment_when_prompted(scorer: ClipScorer) -> None:
    images = random_images(3)
    vectors = scorer.score(images, ["a red bicycle", None, "a cat on a sofa"])
    assert all(isinstance(v, QualityVector) and v.metric_set == "routet2i@1" for v in vectors)
    assert vectors[0].metrics == ROUTET2I_V1.metric_names == vectors[2].metrics
    assert vectors[1].metrics == ROUTET2I_V1.metric_names[:-1]  # no prompt, no alignment
    for vector in vectors:
        assert all(0.0 < vector[m.name] < 1.0 for m in ROUTET2I_V1.metrics)
        assert 0.0 <= vector.values.get(ALIGNMENT, 0.0) <= ROUTET2I_V1.alignment_weight
    assert scorer.logit_scale == pytest.approx(1 / 0.07)  # open_clip's initial temperature


@pytest.mark.slow
def test_batch_gives_the_numbers_of_one_by_one_scoring(scorer: ClipScorer) -> None:
    images = random_images(6, seed=1)
    prompts = [f"photo number {i}" for i in range(6)]
    batched = scorer.score(images, prompts)  # batches of 4 and 2
    single = [scorer.score([image], [prompt])[0] for image, prompt in zip(images, prompts, strict=True)]
    for b, s in zip(batched, single, strict=True):
        assert b.metrics == s.metrics
        # Batched matrix products sum in another order: equal up to float32 rounding.
        assert max(abs(b[m] - s[m]) for m in b.metrics) < 1e-5


@pytest.mark.slow
def test_two_separately_built_scorers_give_identical_numbers(scorer: ClipScorer) -> None:
    images = random_images(2, seed=2)
    state = torch.random.get_rng_state()
    other = ClipScorer(model="ViT-B-32", batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the caller's RNG alone
    first = scorer.score(images, ["a lighthouse", "two dogs"])
    second = other.score(images, ["a lighthouse", "two dogs"])
    assert [v.values for v in first] == [v.values for v in second]


@pytest.mark.slow
def test_another_seed_builds_other_weights(scorer: ClipScorer) -> None:
    image = random_images(1, seed=3)
    other = ClipScorer(model="ViT-B-32", seed=1)
    assert scorer.score(image)[0].values != other.score(image)[0].values


@pytest.mark.slow
def test_the_embedding_of_a_metric_text_scores_as_the_formula_says(scorer: ClipScorer) -> None:
    """Feed the scorer's own text embeddings as image embeddings: the mathematics pinned on real model output."""
    positive, negative = scorer.metric_embeddings(ROUTET2I_V1)
    as_positive = scorer.score_embeddings(positive)  # image i equals metric i's positive text
    as_negative = scorer.score_embeddings(negative)
    for i, metric in enumerate(ROUTET2I_V1.metrics):
        assert as_positive[i][metric.name] > 0.5 > as_negative[i][metric.name]


@pytest.mark.slow
@pytest.mark.parametrize(
    "texts",
    [["a cat"], ["", "an astronaut riding a horse through a field of sunflowers at dusk"], ["word " * 100]],
)
def test_text_embeddings_equal_open_clips_full_context_pass(scorer: ClipScorer, texts: list[str]) -> None:
    """Encoding only up to the last end-of-text token gives open_clip's own ``encode_text`` result."""
    with torch.inference_mode():
        full = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer(texts)), dim=-1)
    assert torch.allclose(scorer.embed_texts(texts), full, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_metric_text_embeddings_are_computed_once(scorer: ClipScorer) -> None:
    first = scorer.metric_embeddings(ROUTET2I_V1)
    assert scorer.metric_embeddings(ROUTET2I_V1) is first
    assert first[0].shape == (10, 512) and first[1].shape == (10, 512)


@pytest.mark.slow
def test_identical_real_text_embeddings_score_exactly_one_half(scorer: ClipScorer) -> None:
    image = scorer.embed_images(random_images(3, seed=4))
    text = scorer.embed_texts(["A photo"])
    assert torch.equal(
        contrastive_scores(image, text, scorer.embed_texts(["A photo"]), scorer.logit_scale), torch.full((3, 1), 0.5)
    )


@pytest.mark.slow
def test_a_custom_set_scores_its_own_metrics(scorer: ClipScorer) -> None:
    custom = MetricSet(
        name="mine",
        version="3",
        metrics=(Metric("bright", "Bright photo", "Dark photo"), Metric("noise", "Clean photo", "Noisy photo")),
        alignment=True,
        alignment_weight=1.0,
    )
    vector = scorer.score(random_images(1, seed=4), ["a photo"], metric_set=custom)[0]
    assert vector.metric_set == "mine@3"
    assert vector.metrics == ("bright", "noise", "alignment")
    assert 0.0 <= vector["alignment"] <= 1.0


@pytest.mark.slow
def test_settings_choose_model_and_metric_set(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(
        '{"name": "tiny", "version": "1", "alignment": false, "metrics": '
        '[{"name": "sharpness", "positive": "Sharp photo", "negative": "Blurry photo"}]}'
    )
    built = ClipScorer.from_settings(ScorerSettings(model="ViT-B-32", metrics=str(path), batch_size=2))
    assert built.metric_set.id == "tiny@1" and built.batch_size == 2
    assert built.score(random_images(1), ["ignored: no alignment in this set"])[0].metrics == ("sharpness",)


@pytest.mark.slow
def test_local_checkpoint_weights_replace_the_random_ones(scorer: ClipScorer, tmp_path: Path) -> None:
    """A checkpoint file given as ``pretrained`` is what the model computes with, whatever the seed."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, str(checkpoint))
    loaded = ClipScorer(model="ViT-B-32", pretrained=str(checkpoint), seed=1)
    assert not loaded.random_weights and str(checkpoint) in loaded.description
    images = random_images(2, seed=6)
    assert [v.values for v in loaded.score(images, ["a kite", "a boat"])] == [
        v.values for v in scorer.score(images, ["a kite", "a boat"])
    ]


def test_unknown_architecture_is_a_scorer_error() -> None:
    with pytest.raises(ScorerError, match="cannot build open_clip model 'ViT-Z-99'"):
        ClipScorer(model="ViT-Z-99")


def test_missing_checkpoint_is_a_scorer_error(tmp_path: Path) -> None:
    with pytest.raises(ScorerError, match=r"absent\.pt"):
        ClipScorer(model="ViT-B-32", pretrained=str(tmp_path / "absent.pt"))


def test_bad_metric_set_setting_is_a_scorer_error() -> None:
    with pytest.raises(ScorerError, match="ROUTET2I_SCORER__METRICS"):
        ClipScorer.from_settings(ScorerSettings(metrics="no-such-set"))
