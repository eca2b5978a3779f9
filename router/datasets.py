"""Replay logs built from the real human ratings carried in ``router/data`` (see each folder's SOURCE.md).

GenAI-Bench: 527 prompts, six generators, three 1-5 alignment ratings per image; metric ``alignment`` is
their mean. AGIQA-3K: 300 prompts, ten generator configurations, mean opinion scores of perceptual
``quality`` and text-image ``alignment``.

Each record's ``auxiliary`` labels are the same metrics for the data set's *other* generators on that prompt
(``"<generator>:<metric>"``; absent where a generator did not render the prompt): training-only labels
from which a router can learn what makes a prompt hard, with many more ratings per prompt than the two tiers'.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict

from router.data import path
from router.log import LogRecord
from router.types import QualityVector

GENAI_BENCH_MODELS = ("SDXL_Turbo", "SDXL_2_1", "SDXL_Base", "DeepFloyd_I_XL_v1", "Midjourney_6", "DALLE_3")
AGIQA_CONFIGS = (
    "AttnGAN_normal",
    "glide_normal",
    "DALLE2_normal",
    "midjourney_normal",
    "midjourney_lowstep",
    "sd1.5_normal",
    "sd1.5_lowstep",
    "sd1.5_highcorr",
    "sd1.5_lowcorr",
    "xl2.2_normal",
)


class DatasetError(ValueError):
    """An importer was asked for something the data set does not have."""


def _check_choice(kind: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DatasetError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


def genai_bench(edge: str, cloud: str) -> list[LogRecord]:
    """One record per prompt with the mean human alignment rating of ``edge`` and ``cloud`` models."""
    _check_choice("edge model", edge, GENAI_BENCH_MODELS)
    _check_choice("cloud model", cloud, GENAI_BENCH_MODELS)
    data = json.loads(path("genai_bench_527", "genai_image.json").read_text(encoding="utf-8"))
    records = []
    for key in sorted(data):
        entry = data[key]
        ratings = entry["models"]
        records.append(
            LogRecord(
                id=f"genai-{entry['id']}",
                prompt=entry["prompt"].strip(),
                edge=QualityVector({"alignment": sum(ratings[edge]) / len(ratings[edge])}, metric_set="human"),
                cloud=QualityVector({"alignment": sum(ratings[cloud]) / len(ratings[cloud])}, metric_set="human"),
                extra={"source": "genai-bench-527", "edge_model": edge, "cloud_model": cloud},
                auxiliary={
                    f"{model}:alignment": sum(ratings[model]) / len(ratings[model])
                    for model in GENAI_BENCH_MODELS
                    if model not in (edge, cloud) and model in ratings
                },
            )
        )
    return records


def agiqa_3k(edge: str, cloud: str) -> list[LogRecord]:
    """One record per prompt that both configurations rendered, with MOS ``quality`` and ``alignment``."""
    _check_choice("edge configuration", edge, AGIQA_CONFIGS)
    _check_choice("cloud configuration", cloud, AGIQA_CONFIGS)
    by_prompt: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    with path("agiqa_3k", "data.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            config, index = row["name"].removesuffix(".jpg").rsplit("_", 1)
            by_prompt[index][config] = row
    records = []
    for index in sorted(by_prompt):
        rows = by_prompt[index]
        if edge not in rows or cloud not in rows:
            continue

        def vector(row: dict[str, str]) -> QualityVector:
            return QualityVector(
                {"quality": float(row["mos_quality"]), "alignment": float(row["mos_align"])}, metric_set="human"
            )

        records.append(
            LogRecord(
                id=f"agiqa-{index}",
                prompt=rows[edge]["prompt"].strip(),
                edge=vector(rows[edge]),
                cloud=vector(rows[cloud]),
                extra={"source": "agiqa-3k", "edge_model": edge, "cloud_model": cloud},
                auxiliary={
                    f"{config}:{metric}": value
                    for config in AGIQA_CONFIGS
                    if config not in (edge, cloud) and config in rows
                    for metric, value in vector(rows[config]).values.items()
                },
            )
        )
    return records
