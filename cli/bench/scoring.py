"""``routet2i bench scoring``: throughput of the image scorer against a bare image-encoder forward pass.

For each batch size it times, interleaved within every repeat:

* the reference: ``model.encode_image`` on an already preprocessed batch, the least any CLIP metric costs;
* ``scoring``: :meth:`ClipScorer.score` on PIL images with their prompts, i.e. everything a worker does per
  image (preprocessing, image forward pass, prompt forward pass, the metric and alignment arithmetic);
* ``scoring_no_prompt``: the same without prompts (contrastive metrics only, no text forward pass).

Each is reported in images per second with the reference's images per second and the ratio.
"""

from __future__ import annotations

import logging
from typing import Any

from cli.bench import BadParam, Measurement, interleaved_medians
from core.settings import Settings
from router.data import sample_prompts

log = logging.getLogger(__name__)


def _images(count: int, size: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def run(
    settings: Settings, *, repeats: int, batch_sizes: str = "1,16", image_size: int = 512, threads: int = 0
) -> list[Measurement]:
    """Time the scorer of ``settings.scorer`` at each batch size.

    Args:
        settings: the scorer's model, weights, device and dtype come from ``settings.scorer``.
        repeats: timed repeats per measurement (medians are reported).
        batch_sizes: comma-separated batch sizes.
        image_size: side of the random test images.
        threads: torch CPU threads; 0 keeps ``settings.torch_threads`` or torch's default.

    Returns:
        Two measurements per batch size, the scorer with and without prompts, each against the bare forward pass.
    """
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise BadParam("batch_sizes", f"comma-separated positive integers, got {batch_sizes!r}")

    import torch

    from worker.scoring import ClipScorer

    if threads or settings.torch_threads:
        torch.set_num_threads(threads or settings.torch_threads)  # type: ignore[arg-type]

    scorer = ClipScorer.from_settings(settings.scorer, batch_size=max(sizes))
    scorer.metric_embeddings(scorer.metric_set)  # cached once per model, as in a worker
    log.info("scoring benchmark", extra={"scorer": scorer.description, "torch_threads": torch.get_num_threads()})
    measurements: list[Measurement] = []
    for size in sizes:
        medians = _time_batch(scorer, size, image_size=image_size, repeats=repeats)
        reference = size / medians["reference"]
        for name in ("scoring", "scoring_no_prompt"):
            measurements.append(
                Measurement.against(f"{name}.batch{size}.images_per_s", size / medians[name], "images/s", reference)
            )
    return measurements


def _time_batch(scorer: Any, size: int, *, image_size: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of the bare forward pass and of the scorer, with and without prompts."""
    import torch

    images = _images(size, image_size, seed=size)
    prompts: list[str | None] = list(sample_prompts(size, seed=size))
    pixels = torch.stack([scorer.preprocess(image) for image in images]).to(scorer.device, scorer.dtype)

    def bare() -> None:
        with torch.inference_mode():
            scorer.model.encode_image(pixels)

    return interleaved_medians(
        {
            "reference": bare,
            "scoring": lambda: scorer.score(images, prompts),
            "scoring_no_prompt": lambda: scorer.score(images),
        },
        repeats=repeats,
    )
