"""Image quality with an open_clip model: RouteT2I's contrastive metrics and prompt alignment (CLIPScore).

For a metric with texts (m⁺, m⁻) and an image I, all three embedded by CLIP and L2-normalised::

    q(I) = σ(τ · (cos(I, m⁺) − cos(I, m⁻)))

with τ the model's logit scale (``exp(logit_scale)``: 100 for OpenAI's checkpoints, 1/0.07 ≈ 14.3 at
initialisation). This is the two-way softmax over the image's logits for m⁺ and m⁻, as in CLIP-IQA, so the
score lies in (0, 1), is exactly 0.5 when the two texts embed identically, and above 0.5 when the image is
closer to the positive text. A logit bias (SigLIP-style models) cancels in the difference.

Prompt alignment is CLIPScore (Hessel et al., 2021): ``w · max(cos(I, prompt), 0)`` with the metric set's
weight w (2.5 by default), so it lies in [0, w]. Prompts longer than the model's context (77 tokens for
CLIP) are truncated, as CLIPScore does.

The model is any open_clip architecture. With a pretrained tag or checkpoint file it loads those weights;
without, it is built from its configuration with random weights drawn from a fixed seed, so that every
process builds the same model and scores the same image identically. The loading code is the same either
way. torch and open_clip are imported only by this module.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
import torch.nn.functional as F

from router.quality_metrics import ALIGNMENT, MetricSet, resolve_metric_set
from router.types import QualityVector

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import ScorerSettings

log = logging.getLogger(__name__)

RANDOM_WEIGHT_SEED = 20251019
"""Seed of the random weights when no pretrained weights are given; fixed so every process agrees."""

_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ScorerError(Exception):
    """The scoring model cannot be built (unknown architecture, missing checkpoint, bad metric set)."""


class ImageReadError(ValueError):
    """Bytes or a file that are not a decodable image."""


class _OpenClipChatter(logging.Filter):
    """Drops open_clip's step-by-step loading messages, which it sends to the root logger at INFO.

    Warnings and errors pass, except the notice that weights are random when random weights were asked for.
    """

    def __init__(self, *, random_expected: bool) -> None:
        super().__init__()
        self.random_expected = random_expected

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (self.random_expected and "initialized randomly" in record.getMessage())


def contrastive_scores(
    image: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """RouteT2I's metric scores: σ(τ · (cos(image, positive) − cos(image, negative))).

    Args:
        image: image embeddings, ``(batch, dim)``; normalised here.
        positive: positive-text embeddings, ``(metrics, dim)``; normalised here.
        negative: negative-text embeddings, ``(metrics, dim)``, row i pairs with ``positive`` row i.
        logit_scale: τ, the model's ``exp(logit_scale)``.

    Returns:
        Scores in (0, 1), ``(batch, metrics)``.
    """
    image = F.normalize(image.float(), dim=-1)
    positive = F.normalize(positive.float(), dim=-1)
    negative = F.normalize(negative.float(), dim=-1)
    return torch.sigmoid(logit_scale * (image @ positive.T - image @ negative.T))


def clip_scores(image: torch.Tensor, text: torch.Tensor, weight: float) -> torch.Tensor:
    """CLIPScore of each image with its own text: ``weight · max(cos(image_i, text_i), 0)``.

    Args:
        image: image embeddings, ``(batch, dim)``; normalised here.
        text: text embeddings, ``(batch, dim)``, row i describing image i; normalised here.
        weight: w (2.5 in Hessel et al., 2021).

    Returns:
        Scores in [0, weight], ``(batch,)``.
    """
    cosine = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(dim=-1)
    return weight * cosine.clamp(min=0.0)


def decode_image(data: bytes, *, source: str = "image") -> Image:
    """Decode image bytes (any format PIL reads) to RGB.

    Raises:
        ImageReadError: naming ``source`` when the bytes are not an image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{source} is not a readable image (unknown format or corrupt data)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{source} is not a readable image: {exc}") from exc


def load_image(path: str | Path) -> Image:
    """Read an image file to RGB.

    Raises:
        ImageReadError: the file cannot be read or is not an image.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    return decode_image(data, source=str(path))


class ClipScorer:
    """An open_clip model scoring images against a metric set, in batches.

    Text embeddings of a metric set are computed on first use and cached for the life of the scorer (one
    model), so each image costs one image forward pass, plus one text forward pass for its prompt when
    the set includes alignment.
    """

    def __init__(
        self,
        *,
        model: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        metric_set: MetricSet | None = None,
        seed: int = RANDOM_WEIGHT_SEED,
    ) -> None:
        """Build the model.

        Args:
            model: open_clip architecture name, or ``local-dir:``/``hf-hub:`` source.
            pretrained: open_clip pretrained tag or checkpoint file; None builds random weights from ``seed``.
            device: torch device.
            dtype: ``float32``, ``float16`` or ``bfloat16`` (open_clip's mixed precision: layer norms stay fp32).
            batch_size: images per forward pass.
            metric_set: the set :meth:`score` uses unless told otherwise (default: the built-in set).
            seed: seed of the random weights.

        Raises:
            ScorerError: the model or its weights cannot be loaded.
        """
        if dtype not in _PRECISION:
            raise ScorerError(f"dtype must be one of {', '.join(_PRECISION)}, not {dtype!r}")
        self.model_name = model
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.dtype_name = dtype
        self.dtype = _DTYPE[dtype]
        self.batch_size = batch_size
        self.metric_set = metric_set or resolve_metric_set("routet2i")
        started = time.perf_counter()
        chatter = _OpenClipChatter(random_expected=pretrained is None)
        logging.getLogger().addFilter(chatter)
        try:
            self.model, self.preprocess = self._build(seed)
            self.tokenizer = open_clip.get_tokenizer(model)
        finally:
            logging.getLogger().removeFilter(chatter)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self._text_cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        log.info(
            "scorer loaded",
            extra={
                "model": model,
                "pretrained": pretrained or "random",
                "device": device,
                "dtype": dtype,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )

    @classmethod
    def from_settings(
        cls, settings: ScorerSettings, *, metric_set: MetricSet | None = None, batch_size: int | None = None
    ) -> ClipScorer:
        """The scorer ``ROUTET2I_SCORER__*`` describes.

        Args:
            settings: the scorer settings.
            metric_set: overrides ``settings.metrics``.
            batch_size: overrides ``settings.batch_size``.

        Raises:
            ScorerError: the metric set or the model cannot be loaded.
        """
        from router.quality_metrics import MetricSetError

        if metric_set is None:
            try:
                metric_set = resolve_metric_set(settings.metrics)
            except MetricSetError as exc:
                raise ScorerError(f"ROUTET2I_SCORER__METRICS: {exc}") from exc
        return cls(
            model=settings.model,
            pretrained=settings.pretrained,
            device=settings.device,
            dtype=settings.dtype,
            batch_size=batch_size or settings.batch_size,
            metric_set=metric_set,
        )

    def _build(self, seed: int) -> tuple[Any, Any]:
        # Any: open_clip's model classes expose their towers as dynamic attributes mypy cannot follow.
        # Seed only the construction, then restore the caller's generator: random weights depend on the seed
        # alone, and nothing else in the process sees its random stream changed.
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                self.model_name,
                pretrained=self.pretrained,
                precision=_PRECISION[self.dtype_name],
                device=self.device,
            )
        except Exception as exc:  # open_clip and torch.load raise many types for a bad name or file
            source = f"weights {self.pretrained!r}" if self.pretrained else "random weights"
            raise ScorerError(f"cannot build open_clip model {self.model_name!r} with {source}: {exc}") from exc
        finally:
            torch.random.set_rng_state(state)
        model.eval()
        return model, preprocess

    @property
    def random_weights(self) -> bool:
        """True when the model was built without pretrained weights (scores exercise code, not quality)."""
        return self.pretrained is None and not self.model_name.startswith(("local-dir:", "hf-hub:"))

    @property
    def description(self) -> str:
        weights = "random weights" if self.random_weights else (self.pretrained or "bundled weights")
        return f"{self.model_name} ({weights}, {self.device.type}, {self.dtype_name})"

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings, ``(len(texts), dim)``."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        if self._causal_text:
            return F.normalize(self._encode_causal_text(tokens).float(), dim=-1)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @property
    def _causal_text(self) -> bool:
        """Whether the text tower is OpenAI CLIP's: causal attention, read out at the end-of-text token."""
        model = self.model
        return (
            type(model) is open_clip.model.CLIP
            and model.text_pool_type == "argmax"
            and getattr(model, "attn_mask", None) is not None
        )

    def _encode_causal_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``CLIP.encode_text`` over the tokens up to the batch's last end-of-text token only.

        The tokenizer pads every text to the context length (77), but with causal attention no position
        sees a later one, and the embedding is read at the end-of-text token (the largest id, hence
        ``argmax``), so the padding after it cannot change the result. The pass's cost grows with the number
        of positions, and most prompts are far shorter than 77 tokens.
        """
        model = self.model
        length = int(tokens.argmax(dim=-1).max()) + 1
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image]) -> torch.Tensor:
        """L2-normalised float32 image embeddings, ``(len(images), dim)``."""
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images])
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def metric_embeddings(self, metric_set: MetricSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative text embeddings of ``metric_set``, computed once per scorer."""
        positives = tuple(m.positive for m in metric_set.metrics)
        negatives = tuple(m.negative for m in metric_set.metrics)
        key = positives + negatives
        if key not in self._text_cache:
            both = self.embed_texts(key) if key else torch.empty(0, 0)
            self._text_cache[key] = (both[: len(positives)], both[len(positives) :])
        return self._text_cache[key]

    def score_embeddings(
        self,
        image: torch.Tensor,
        prompt: torch.Tensor | None = None,
        *,
        metric_set: MetricSet | None = None,
    ) -> list[QualityVector]:
        """Quality vectors from already computed image (and prompt) embeddings.

        Args:
            image: ``(batch, dim)`` image embeddings.
            prompt: ``(batch, dim)`` embeddings of each image's prompt; None skips alignment.
            metric_set: defaults to the scorer's set.
        """
        metric_set = metric_set or self.metric_set
        columns: dict[str, list[float]] = {}
        if metric_set.metrics:
            positive, negative = self.metric_embeddings(metric_set)
            scores = contrastive_scores(image, positive, negative, self.logit_scale)
            for j, metric in enumerate(metric_set.metrics):
                columns[metric.name] = scores[:, j].tolist()
        if metric_set.alignment and prompt is not None:
            columns[ALIGNMENT] = clip_scores(image, prompt, metric_set.alignment_weight).tolist()
        return [
            QualityVector({name: values[i] for name, values in columns.items()}, metric_set=metric_set.id)
            for i in range(image.shape[0])
        ]

    def score(
        self,
        images: Sequence[Image],
        prompts: Sequence[str | None] | None = None,
        *,
        metric_set: MetricSet | None = None,
    ) -> list[QualityVector]:
        """Score images in batches of ``batch_size``.

        Args:
            images: PIL images (any mode; converted to RGB).
            prompts: the prompt of each image, for alignment; None (or a None entry) leaves ``alignment`` out
                of that image's vector.
            metric_set: defaults to the scorer's set.

        Returns:
            One quality vector per image, in order, tagged ``"<set>@<version>"``.
        """
        metric_set = metric_set or self.metric_set
        if prompts is not None and len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        vectors: list[QualityVector] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            image_embeddings = self.embed_images(batch)
            scored = self.score_embeddings(image_embeddings, metric_set=metric_set)
            batch_prompts = [] if prompts is None or not metric_set.alignment else prompts[start : start + len(batch)]
            prompted = [(i, prompt) for i, prompt in enumerate(batch_prompts) if prompt is not None]
            if prompted:
                rows = [i for i, _ in prompted]
                text = self.embed_texts([prompt for _, prompt in prompted])
                alignment = clip_scores(image_embeddings[rows], text, metric_set.alignment_weight).tolist()
                for i, value in zip(rows, alignment, strict=True):
                    scored[i] = QualityVector({**scored[i].values, ALIGNMENT: value}, metric_set=metric_set.id)
            vectors += scored
        return vectors
