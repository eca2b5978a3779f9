"""Public data sets carried with the project (each folder has a SOURCE.md with origin and license)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

ROOT = Path(__file__).parent


def path(*parts: str) -> Path:
    """Path of a carried data file, e.g. ``path("partiprompts", "PartiPrompts.tsv")``."""
    target = ROOT.joinpath(*parts)
    if not target.exists():
        raise FileNotFoundError(f"carried data file {target} is missing")
    return target


def partiprompts_with_categories() -> list[tuple[str, str]]:
    """The 1,632 PartiPrompts with their PartiPrompts category (``Animals``, ``Vehicles``, ...), in file order."""
    with path("partiprompts", "PartiPrompts.tsv").open(encoding="utf-8", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return [(row["Prompt"].strip(), row["Category"]) for row in rows if row["Prompt"].strip()]


def partiprompts() -> list[str]:
    """The 1,632 PartiPrompts, in file order."""
    return [prompt for prompt, _ in partiprompts_with_categories()]


def sample_prompts(n: int, *, seed: int = 0) -> list[str]:
    """``n`` distinct PartiPrompts drawn reproducibly."""
    prompts = partiprompts()
    if not 0 < n <= len(prompts):
        raise ValueError(f"n must be within 1..{len(prompts)}, got {n}")
    return random.Random(seed).sample(prompts, n)
