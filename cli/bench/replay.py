"""Replay and evaluation throughput, in prompts per second, against the router's bare scoring.

A replay routes every prompt of a log at a budget and computes quality, PGR and cost; a cross-validated
evaluation fits and scores the router on every fold. The reference is the router's own ``score`` over the same
prompts: the unavoidable cost, so the ratio is what the harness adds (or, for evaluation, what fitting adds).
The log is GenAI-Bench (SDXL-Turbo vs DALL-E 3, 527 prompts); embeddings are warmed first, as in real use.
"""

from __future__ import annotations

import time
from functools import partial

from cli.bench import BadParam, Measurement, interleaved_medians
from core.settings import Settings


def run(
    settings: Settings, *, repeats: int, routers: str = "longest-prompt-first,gap-regressor,routet2i", folds: int = 5
) -> list[Measurement]:
    from router.base import available_routers, create_router
    from router.datasets import genai_bench
    from router.embeddings import SentenceEncoder
    from router.evaluation import evaluate
    from router.replay import replay

    records = genai_bench("SDXL_Turbo", "DALLE_3")
    prompts = [r.prompt for r in records]
    prices = {"edge": settings.edge.price_per_image, "cloud": settings.cloud.price_per_image}
    names = [r.strip() for r in routers.split(",") if r.strip()]
    unknown = [name for name in names if name not in available_routers()]
    if unknown or not names:
        raise BadParam(
            "routers",
            f"unknown router {unknown[0]!r}; available: {', '.join(available_routers())}" if unknown else "no router",
        )
    encoder = SentenceEncoder()  # one for every router and fold: each prompt is encoded once
    measurements = []
    for name in names:
        router = create_router(name, encoder=encoder)
        router.warm(prompts)
        router.fit(records, seed=0)
        times = interleaved_medians(
            {
                "replay": partial(replay, records, router, 0.3, prices=prices),
                "score": partial(router.score_records, records),
            },
            repeats=repeats,
        )
        score_rate = len(records) / times["score"]
        measurements.append(
            Measurement.against(f"replay.{name}", len(records) / times["replay"], "prompts/s", score_rate)
        )
        started = time.perf_counter()
        evaluate(records, [name], folds=folds, seeds=1, encoder=encoder)
        scored = len(records)  # every prompt is scored once per seed, in its test fold
        measurements.append(
            Measurement.against(f"eval.{name}", scored / (time.perf_counter() - started), "prompts/s", score_rate)
        )
    return measurements
