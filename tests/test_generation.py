"""Generation backends: the offline profiles are the real architectures, deterministic across processes."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from core.settings import EdgeSettings
from router.cost import image_cost_usd as cost_usd
from worker.generators import GenerationError, GenerationRequest, NullGenerator, check_png, create_generator
from worker.offline import build_pipeline, parameter_counts, profile_for

REQUEST = GenerationRequest(prompt="a lighthouse on a cliff", seed=11, steps=2, width=64, height=64)


def pixels(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.convert("RGB").tobytes()


@pytest.mark.slow
def test_offline_edge_is_deterministic_across_builds(model_cache) -> None:
    settings = EdgeSettings(model="offline:edge", steps=2, width=64, height=64)
    first = create_generator(settings, cache_dir=model_cache).generate(REQUEST)
    second = create_generator(settings, cache_dir=model_cache).generate(REQUEST)
    assert first.backend == "diffusers" and first.model_id == "offline:edge" and first.device == "cpu"
    assert pixels(first.png) == pixels(second.png)
    other_seed = create_generator(settings, cache_dir=model_cache).generate(
        GenerationRequest(prompt=REQUEST.prompt, seed=12, steps=2, width=64, height=64)
    )
    assert pixels(other_seed.png) != pixels(first.png)
    assert first.gpu_s > 0 and first.wall_s >= first.gpu_s


@pytest.mark.slow
def test_cloud_profile_is_larger_than_edge(model_cache) -> None:
    edge = parameter_counts(build_pipeline("offline:edge", cache_dir=model_cache, dtype=torch.float32, device="cpu"))
    cloud = parameter_counts(build_pipeline("offline:cloud", cache_dir=model_cache, dtype=torch.float32, device="cpu"))
    assert cloud["unet"] > 4 * edge["unet"]


@pytest.mark.slow
def test_sd15_profile_has_stable_diffusion_15s_exact_parameter_counts(model_cache) -> None:
    counts = parameter_counts(build_pipeline("offline:sd15", cache_dir=model_cache, dtype=torch.float32, device="cpu"))
    # The published SD 1.5 checkpoint: UNet 859,520,964; VAE 83,653,863; CLIP ViT-L/14 text encoder 123,060,480.
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_unknown_offline_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown offline profile 'huge'"):
        profile_for("offline:huge")


def test_null_generator_is_free_and_deterministic() -> None:
    generator = NullGenerator(EdgeSettings(backend="null", model="null"))
    result = generator.generate(REQUEST)
    assert result.gpu_s == 0.0 and result.backend == "null"
    assert pixels(result.png) == pixels(generator.generate(REQUEST).png)
    with Image.open(io.BytesIO(result.png)) as image:
        assert image.size == (64, 64)


def test_check_png_refuses_other_bytes() -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    with pytest.raises(GenerationError, match="JPEG"):
        check_png(jpeg.getvalue(), source="api")
    with pytest.raises(GenerationError, match="not an image"):
        check_png(b"hello", source="api")


def test_cost_is_price_per_image_plus_device_time() -> None:
    settings = EdgeSettings(price_per_image=0.01, price_per_gpu_second=0.002)
    assert cost_usd(settings, 2.5) == pytest.approx(0.015)
