"""Arrival traces of the SLO benchmark (cli/bench/traces.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cli.bench.traces import make_trace


def test_poisson_has_its_rate() -> None:
    arrivals = make_trace("poisson", rate=10.0, duration=200.0, burst_factor=1.0, seed=0)
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0 and arrivals[-1] < 200.0
    assert len(arrivals) / 200.0 == pytest.approx(10.0, rel=0.05)  # 2,000 expected, s.d. 45


def test_bursty_is_faster_than_its_calm_rate_and_uneven() -> None:
    arrivals = make_trace("bursty", rate=2.0, duration=2000.0, burst_factor=5.0, seed=0)
    assert arrivals == sorted(arrivals)
    # Calm spells of 20 s at 2/s, bursts of 8 s at 10/s: a long-run mean of (40 + 80) / 28 ≈ 4.3 jobs/s.
    assert len(arrivals) / 2000.0 == pytest.approx(120 / 28, rel=0.15)
    per_second = np.histogram(arrivals, bins=np.arange(0, 2001))[0]
    assert per_second.var() > 3 * per_second.mean()  # over-dispersed: a Poisson process has var == mean


def test_a_file_of_offsets(tmp_path: Path) -> None:
    path = tmp_path / "arrivals.txt"
    path.write_text("# from a production log\n0.5\n\n0.1\n3.0  # late\n99\n")
    assert make_trace(str(path), rate=0, duration=10.0, burst_factor=1.0, seed=0) == [0.1, 0.5, 3.0]
    path.write_text("0.5\nsoon\n")
    with pytest.raises(ValueError, match=r"arrivals\.txt:2: not a number"):
        make_trace(str(path), rate=0, duration=10.0, burst_factor=1.0, seed=0)
    with pytest.raises(ValueError, match="--trace must be"):
        make_trace("steady", rate=1.0, duration=10.0, burst_factor=1.0, seed=0)
