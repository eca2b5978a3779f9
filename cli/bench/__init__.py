"""Benchmarks: each measures something against a reference measured in the same run.

A benchmark is a function ``run(settings, *, repeats, **params) -> list[Measurement]`` in
``cli/bench/<name>.py``, registered here by name with the parameters it takes. ``routet2i bench NAME``
runs it; the registry imports the module only then, so listing benchmarks costs nothing.

Timings are medians over repeats. A measurement's ``ratio`` is its value divided by its reference's, so a
reader never has to compare numbers from different runs or machines.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.settings import Settings


@dataclass(frozen=True)
class Measurement:
    """One number a benchmark reports.

    Attributes:
        name: dotted name, e.g. ``scoring.batch16.images_per_s``.
        value: the measured value.
        unit: e.g. ``images/s``, ``ms``.
        reference: the reference's value in the same unit, measured in the same run (None: no reference).
        ratio: ``value / reference`` (None without a reference).
    """

    name: str
    value: float
    unit: str
    reference: float | None = None
    ratio: float | None = None

    @classmethod
    def against(cls, name: str, value: float, unit: str, reference: float) -> Measurement:
        """A measurement with its reference and the ratio between them."""
        return cls(name=name, value=value, unit=unit, reference=reference, ratio=value / reference)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "reference": self.reference,
            "ratio": self.ratio,
        }


class BadParam(ValueError):
    """A benchmark parameter's value refused by the benchmark itself, before it starts anything.

    Attributes:
        param: the parameter's name (``batch_sizes``; the command line shows ``--batch-sizes``).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    @property
    def option(self) -> str:
        return "--" + self.param.replace("_", "-")


@dataclass(frozen=True)
class Param:
    """A benchmark-specific option, offered on the command line as ``--NAME`` (underscores as dashes).

    Attributes:
        name: keyword argument of the benchmark's ``run``.
        default: default value; its type (int, float, str) is the option's type.
        help: one line for ``--help``.
        minimum: smallest value a number may take (``None``: any).
        choices: the values a string may take (empty: any).
    """

    name: str
    default: int | float | str
    help: str
    minimum: int | float | None = None
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark.

    Attributes:
        name: the command name (``routet2i bench NAME``).
        summary: one line for ``--help``.
        target: ``"module:function"`` of its ``run``.
        params: the options it takes besides ``repeats``.
        repeats: default number of timed repeats.
    """

    name: str
    summary: str
    target: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    repeats: int = 5

    def load(self) -> Callable[..., list[Measurement]]:
        module, _, function = self.target.partition(":")
        run: Callable[..., list[Measurement]] = getattr(importlib.import_module(module), function)
        return run

    def run(self, settings: Settings, *, repeats: int | None = None, **params: Any) -> list[Measurement]:
        return self.load()(settings, repeats=repeats or self.repeats, **params)


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark to the registry (names are unique)."""
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}") from None


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timing them in turn within every repeat.

    Interleaving puts a benchmark and its reference under the same machine load (other processes, thermal
    state), which matters on shared machines far more than the order within a round.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


register(
    Benchmark(
        name="scoring",
        summary="Images scored per second (CLIP metrics + alignment) against a bare encode_image forward pass.",
        target="cli.bench.scoring:run",
        params=(
            Param("batch_sizes", "1,16", "Comma-separated batch sizes."),
            Param(
                "image_size",
                512,
                "Side of the square test images, in pixels (resized to the model's input).",
                minimum=1,
            ),
            Param("threads", 0, "torch CPU threads (0: ROUTET2I_TORCH_THREADS, else torch's default).", minimum=0),
        ),
    )
)

register(
    Benchmark(
        name="pipeline",
        summary="Job latency and throughput API -> route -> tier -> database (zero-cost generator) against a bare "
        "Celery+Redis task round trip on the same broker.",
        target="cli.bench.pipeline:run",
        params=(
            Param("latency_jobs", 100, "Jobs sent one at a time for the latency percentiles.", minimum=1),
            Param("burst_jobs", 2000, "Jobs per throughput burst.", minimum=1),
            Param("clients", 16, "Concurrent HTTP clients in a burst.", minimum=1),
            Param("route_workers", 2, "Pool size of the route worker.", minimum=1),
            Param("tier_workers", 2, "Pool size of each tier worker.", minimum=1),
            Param("pool", "prefork", "Celery pool of the workers.", choices=("prefork", "solo", "threads")),
            Param(
                "batch_submissions",
                20,
                "Jobs per POST /v1/jobs/batch in the batched bursts (1: none; at most the API's batch limit).",
                minimum=1,
            ),
        ),
        repeats=3,
    )
)

register(
    Benchmark(
        name="api",
        summary="Job submissions per second and p99 latency under gunicorn on the configured database, against "
        "/healthz on the same server.",
        target="cli.bench.api:run",
        params=(
            Param("seconds", 10.0, "Length of each load run.", minimum=1.0),
            Param("connections", 32, "Concurrent connections.", minimum=1),
            Param("api_workers", 4, "gunicorn worker processes.", minimum=1),
            Param("api_threads", 4, "Threads per gunicorn worker.", minimum=1),
        ),
        repeats=3,
    )
)

register(
    Benchmark(
        name="router",
        summary="RouteT2I decision latency (one prompt, one thread) and batched throughput against a bare "
        "encoder forward pass.",
        target="cli.bench.router:run",
        params=(
            Param("router", "routet2i", "Router name."),
            Param("model", "", "Artifact directory ('': the router's shipped default)."),
            Param(
                "prompts",
                300,
                "Distinct prompts timed one by one (latency) and in batches (throughput; at most the carried "
                "PartiPrompts).",
                minimum=1,
            ),
            Param("batch_size", 64, "Prompts per batch in the throughput runs.", minimum=1),
            Param("threads", 2, "torch threads of the throughput runs (latency uses one).", minimum=1),
        ),
    )
)

register(
    Benchmark(
        name="replay",
        summary="Replay and cross-validated evaluation throughput (prompts/s) against the router's bare scoring.",
        target="cli.bench.replay:run",
        params=(
            Param("routers", "longest-prompt-first,gap-regressor,routet2i", "Comma-separated router names."),
            Param("folds", 5, "Folds of the timed evaluation (one seed).", minimum=2),
        ),
    )
)

register(
    Benchmark(
        name="memory",
        summary="Resident memory of the API, router and tier workers with the offline models, against bare "
        "interpreters with the same libraries imported.",
        target="cli.bench.memory:run",
        repeats=3,
    )
)

register(
    Benchmark(
        name="slo",
        summary="Load-aware routing under a latency SLO against the load-blind router, on the real stack replaying a "
        "rated log's prompts on an arrival trace (null generators that sleep).",
        target="cli.bench.slo:run",
        params=(
            Param("log", "genai-bench:SDXL_Turbo:DALLE_3", "Replay log, or DATA:EDGE:CLOUD of the carried ratings."),
            Param("trace", "bursty", "poisson, bursty, or a file of arrival offsets (seconds, one per line)."),
            Param(
                "rate", 0.0, "Mean calm arrival rate, jobs/s (0: the edge pool at 60% of its capacity).", minimum=0.0
            ),
            Param("duration", 120.0, "Length of the trace, seconds.", minimum=1.0),
            Param("slo", 10.0, "Latency SLO, submission to done, seconds.", minimum=0.1),
            Param("burst_factor", 5.0, "bursty: the rate in a burst, times the calm rate.", minimum=1.0),
            Param("budget", 0.3, "ρ: the routing budget's share of jobs on the cloud.", minimum=0.0),
            Param("allowance", -1.0, "Burst allowance, USD (negative: a quarter of the trace's jobs' cloud premium)."),
            Param("edge_workers", 2, "Edge worker processes.", minimum=1),
            Param("edge_service", 0.4, "Edge seconds per image.", minimum=0.0),
            Param("cloud_workers", 48, "Cloud worker threads (requests in flight).", minimum=1),
            Param("cloud_service", 3.0, "Cloud seconds per image, before its tail.", minimum=0.0),
            Param("cloud_tail", 1.0, "Mean of the cloud's exponential tail, seconds.", minimum=0.0),
            Param("seed", 0, "Seed of the trace and of the prompts drawn from the log.", minimum=0),
            Param("plot", "", "Write the queue depths over time to this PNG."),
        ),
        repeats=1,
    )
)
