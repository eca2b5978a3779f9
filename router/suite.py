"""The standard evaluation suite: the replay logs every router is compared on in docs/evaluation.md.

Each log is built from the human ratings carried in ``router/data`` by the same importers as
``routet2i data import``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.datasets import agiqa_3k, genai_bench
from router.log import LogRecord


@dataclass(frozen=True)
class SuiteLog:
    """One log of a suite.

    Attributes:
        slug: file-name-safe identifier.
        title: what the log compares.
        build: returns the log's records.
        command: the ``routet2i data import`` command that writes the same log.
    """

    slug: str
    title: str
    build: Callable[[], list[LogRecord]]
    command: str


SUITES: dict[str, tuple[SuiteLog, ...]] = {
    "standard": (
        SuiteLog(
            "genai-bench_SDXL_Turbo-DALLE_3",
            "GenAI-Bench, SDXL_Turbo → DALLE_3 (alignment)",
            lambda: genai_bench("SDXL_Turbo", "DALLE_3"),
            "routet2i data import genai-bench --edge SDXL_Turbo --cloud DALLE_3",
        ),
        SuiteLog(
            "genai-bench_SDXL_2_1-Midjourney_6",
            "GenAI-Bench, SDXL_2_1 → Midjourney_6 (alignment)",
            lambda: genai_bench("SDXL_2_1", "Midjourney_6"),
            "routet2i data import genai-bench --edge SDXL_2_1 --cloud Midjourney_6",
        ),
        SuiteLog(
            "agiqa-3k_sd1.5_normal-xl2.2_normal",
            "AGIQA-3K, sd1.5_normal → xl2.2_normal (quality and alignment)",
            lambda: agiqa_3k("sd1.5_normal", "xl2.2_normal"),
            "routet2i data import agiqa-3k --edge sd1.5_normal --cloud xl2.2_normal",
        ),
    ),
}
"""Named suites; ``routet2i eval --suite NAME`` runs one."""
