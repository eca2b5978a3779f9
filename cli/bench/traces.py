"""Arrival traces for the SLO benchmark: seconds from the start at which each job is submitted.

- ``poisson``: a Poisson process of ``rate`` jobs per second.
- ``bursty``: a Markov-modulated Poisson process with two states: calm at ``rate``, and bursts at ``burst_factor``
  times it; calm spells last :data:`CALM_S` seconds on average and bursts :data:`BURST_S`, both exponential. The
  trace starts calm.
- a file: one arrival offset in seconds per line (blank lines and ``#`` comments skipped), e.g. taken from a
  production log's submission times; the offsets are sorted and those past ``duration`` dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CALM_S = 20.0
BURST_S = 8.0


def poisson(rate: float, duration: float, rng: np.random.Generator) -> list[float]:
    arrivals: list[float] = []
    at = float(rng.exponential(1.0 / rate))
    while at < duration:
        arrivals.append(at)
        at += float(rng.exponential(1.0 / rate))
    return arrivals


def bursty(rate: float, duration: float, rng: np.random.Generator, *, burst_factor: float) -> list[float]:
    arrivals: list[float] = []
    start, burst = 0.0, False
    while start < duration:
        length = float(rng.exponential(BURST_S if burst else CALM_S))
        end = min(duration, start + length)
        arrivals += [start + a for a in poisson(rate * (burst_factor if burst else 1.0), end - start, rng)]
        start, burst = end, not burst
    return arrivals


def from_file(path: Path, duration: float) -> list[float]:
    offsets = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a number of seconds: {text!r}") from None
        if value < 0:
            raise ValueError(f"{path}:{number}: a negative offset: {value}")
        offsets.append(value)
    return sorted(v for v in offsets if v <= duration)


def make_trace(kind: str, *, rate: float, duration: float, burst_factor: float, seed: int) -> list[float]:
    """The arrivals of ``kind`` (``poisson``, ``bursty`` or a file's path)."""
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        return poisson(rate, duration, rng)
    if kind == "bursty":
        return bursty(rate, duration, rng, burst_factor=burst_factor)
    path = Path(kind)
    if not path.is_file():
        raise ValueError(f"--trace must be poisson, bursty or a file of arrival offsets; {kind!r} is none of them")
    return from_file(path, duration)
