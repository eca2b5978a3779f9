"""Real Stable Diffusion architectures built from their configurations, with random weights.

No model hub is needed: the UNet, VAE and CLIP text encoder are the same diffusers/transformers classes a
checkpoint would load into, initialised from a fixed seed so every worker builds identical weights. The
images are noise-like, but every code path, tensor shape and cost (per parameter and step) is the real one.

Profiles:
    ``edge``  ~3 M-parameter UNet, small CLIP text encoder: the fast tier for demos and tests.
    ``cloud`` ~20 M-parameter UNet, wider text encoder: several times slower than ``edge`` on a CPU.
    ``sd15``  Stable Diffusion 1.5's full architecture (860 M UNet, CLIP ViT-L/14 text encoder).
    ``sdxl``  SDXL base's full architecture (2.6 B UNet, two text encoders): for GPU cost profiling.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_TOKENS = 77
WEIGHT_SEED = 20251019
"""Seed of the random weights; fixed so that every process builds the same model."""


@dataclass(frozen=True)
class Profile:
    name: str
    unet: dict[str, Any]
    vae_channels: tuple[int, ...]
    text: dict[str, Any]
    text_2: dict[str, Any] | None = None
    """Second text encoder (SDXL only)."""
    vae_scaling: float = 0.18215


_SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}

PROFILES: dict[str, Profile] = {
    "edge": Profile(
        name="edge",
        unet={
            "block_out_channels": (32, 64, 128),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 16,
        },
        vae_channels=(32, 32, 64, 64),
        text={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "cloud": Profile(
        name="cloud",
        unet={
            "block_out_channels": (64, 128, 256),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 128,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae_channels=(32, 64, 64, 64),
        text={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
    ),
    "sd15": Profile(
        name="sd15",
        unet={
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "sample_size": 64,
        },
        vae_channels=(128, 256, 512, 512),
        text={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
    ),
    "sdxl": Profile(
        name="sdxl",
        unet={
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
        },
        vae_channels=(128, 256, 512, 512),
        text={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        text_2={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "projection_dim": 1280,
        },
        vae_scaling=0.13025,
    ),
}

PREFIX = "offline:"


def is_offline(model: str) -> bool:
    return model.startswith(PREFIX)


def profile_for(model: str) -> Profile:
    name = model.removeprefix(PREFIX)
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown offline profile {name!r}; available: {', '.join(PROFILES)}") from None


def clip_tokenizer(cache_dir: Path) -> CLIPTokenizer:
    """CLIP's BPE tokenizer, written from the vocabulary open_clip ships (no download).

    transformers' ``CLIPTokenizer(vocab_file=..., merges_file=...)`` builds a near-empty vocabulary in recent
    releases, so the files are written once and loaded with ``from_pretrained``.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = cache_dir / "clip-tokenizer"
    if not (directory / "merges.txt").is_file():
        with gzip.open(default_bpe()) as handle:
            merges = handle.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(merge.split()) for merge in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".clip-tokenizer-"))
        (staging / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        try:
            os.rename(staging, directory)
        except OSError:  # another process won the race; its copy is identical
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=CLIP_MAX_TOKENS)


def _text_config(spec: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_TOKENS,
        projection_dim=spec.get("projection_dim", spec["hidden_size"]),
        hidden_act="gelu",
        **{k: v for k, v in spec.items() if k != "projection_dim"},
    )


def _vae(profile: Profile) -> AutoencoderKL:
    n = len(profile.vae_channels)
    groups = min(32, profile.vae_channels[0])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=profile.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        layers_per_block=2 if profile.vae_channels[0] >= 128 else 1,
        norm_num_groups=groups,
        scaling_factor=profile.vae_scaling,
    )


def build_pipeline(model: str, *, cache_dir: Path, dtype: torch.dtype, device: str) -> Any:
    """Build the pipeline of an ``offline:<profile>`` model with deterministic random weights."""
    profile = profile_for(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(WEIGHT_SEED)
    try:
        tokenizer = clip_tokenizer(cache_dir)
        scheduler = EulerDiscreteScheduler(**_SD_SCHEDULER)
        vae = _vae(profile)
        pipe: Any
        if profile.text_2 is None:
            text_encoder = CLIPTextModel(_text_config(profile.text))
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, **profile.unet)
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            text_encoder = CLIPTextModel(_text_config(profile.text))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(profile.text_2))
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, **profile.unet)
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
            )
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe: DiffusionPipeline) -> dict[str, int]:
    """Parameters per component, for logs and benchmarks."""
    counts = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts
