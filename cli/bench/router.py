"""``routet2i bench router``: RouteT2I decision latency and batched throughput against a bare encoder pass.

* Latency: one prompt at a time on one CPU thread, the whole online decision (encoder forward pass, the
  mixture-of-experts ensemble, PRS, explanation and the budget decision on an in-memory window) against the
  bare MiniLM forward pass of the same prompt (tokenizer included) on the configured encoder backend. Every
  timed prompt is new to the encoder: its caches are cleared before each call, so nothing is served from
  memory. A third row times the torch fp32 forward pass of the same prompts, so the backend's own gain shows.
* Throughput: batches of prompts scored with all the threads given (``threads``), against the bare encoder
  forward pass of the same batches (tokenizer included; the encoder splits each into its own length-sorted
  batches and runs them side by side on the threads).

Prompts are PartiPrompts (carried with the package). The router is the configured artifact, by default the
shipped RouteT2I artifact.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.bench import BadParam, Measurement
from core.settings import Settings
from db.stats import percentile
from router.data import sample_prompts

if TYPE_CHECKING:
    from router.base import Router
    from router.embeddings import SentenceEncoder
    from router.policy import RoutingPolicy


def run(
    settings: Settings,
    *,
    repeats: int,
    router: str = "routet2i",
    model: str = "",
    prompts: int = 300,
    batch_size: int = 64,
    threads: int = 2,
) -> list[Measurement]:
    """Time single decisions and batched scoring.

    Args:
        settings: budget settings for the decision path.
        repeats: timed passes over the batched prompts (medians are reported).
        router: a router name (a learned one needs ``model`` or a shipped artifact).
        model: artifact directory ('' : the router's shipped default).
        prompts: distinct prompts timed one by one for the latency percentiles.
        batch_size: prompts per batch in the throughput runs.
        threads: torch threads of the throughput runs (latency always uses one).
    """
    import torch

    from router.base import RouterError, available_routers, load_router
    from router.budget import BudgetConfig, BudgetController, MemoryBudgetStore
    from router.data import partiprompts
    from router.embeddings import SentenceEncoder
    from router.policy import RoutingPolicy

    carried = len(partiprompts())
    if prompts > carried:
        raise BadParam("prompts", f"at most {carried} (the carried PartiPrompts), got {prompts}")
    if router not in available_routers():
        raise BadParam("router", f"unknown router {router!r}; available: {', '.join(available_routers())}")
    encoder = SentenceEncoder.from_settings(settings)
    try:
        routing = load_router(router, Path(model) if model else None, encoder=encoder)
    except RouterError as exc:
        raise BadParam("model" if model else "router", str(exc)) from exc
    window = settings.budget_window
    policy = RoutingPolicy(
        routing, BudgetController(BudgetConfig(rho=settings.cloud_budget, window=window), MemoryBudgetStore(window))
    )
    texts = sample_prompts(prompts, seed=1)
    reference = SentenceEncoder(settings.encoder_model, backend="torch")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        measurements = _latency(policy, encoder, reference, texts, settings.encoder_backend)
        torch.set_num_threads(threads)
        measurements.append(_throughput(routing, encoder, texts, batch_size, repeats))
    finally:
        torch.set_num_threads(previous)
    return measurements


def _bare(on: SentenceEncoder, batch: list[str]) -> Any:
    """The encoder's forward pass over ``batch`` without its caches (tokenizer included)."""
    return on.hidden_states(batch)


def _latency(
    policy: RoutingPolicy, encoder: SentenceEncoder, reference: SentenceEncoder, texts: list[str], backend: str
) -> list[Measurement]:
    """One decision at a time against the bare forward pass of the same prompt on ``encoder``, and that against
    ``reference`` (the torch backend), each prompt new to the encoder."""
    for text in texts[:10]:  # warm-up: lazy imports, allocator, first-call paths
        encoder.clear()
        policy.decide(text)
        _bare(encoder, [text])
        _bare(reference, [text])
    decide_ms: list[float] = []
    bare_ms: list[float] = []
    torch_ms: list[float] = []
    for text in texts:  # decision and bare pass alternate, so both meet the same machine state
        encoder.clear()
        started = time.perf_counter()
        policy.decide(text)
        decide_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        _bare(encoder, [text])
        bare_ms.append((time.perf_counter() - started) * 1000)
    for text in texts:  # apart: torch's weights would evict the backend's from the CPU caches
        started = time.perf_counter()
        _bare(reference, [text])
        torch_ms.append((time.perf_counter() - started) * 1000)
    p99, p99_ref = percentile(sorted(decide_ms), 0.99), percentile(sorted(bare_ms), 0.99)
    assert p99 is not None and p99_ref is not None
    return [
        Measurement.against("router.decision.p50_ms", statistics.median(decide_ms), "ms", statistics.median(bare_ms)),
        Measurement.against("router.decision.p99_ms", p99, "ms", p99_ref),
        Measurement.against(
            f"router.encoder.{backend}.p50_ms", statistics.median(bare_ms), "ms", statistics.median(torch_ms)
        ),
    ]


def _throughput(
    routing: Router, encoder: SentenceEncoder, texts: list[str], batch_size: int, repeats: int
) -> Measurement:
    """Prompts scored per second in batches of ``batch_size`` against the bare forward pass of the same batches."""
    ordered = sorted(texts, key=len)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    scored, encoded = [], []
    for _ in range(repeats):
        encoder.clear()
        started = time.perf_counter()
        for batch in batches:
            routing.score(batch)
        scored.append(len(texts) / (time.perf_counter() - started))
        started = time.perf_counter()
        for batch in batches:
            _bare(encoder, batch)
        encoded.append(len(texts) / (time.perf_counter() - started))
    return Measurement.against(
        f"router.batched{batch_size}.prompts_per_s", statistics.median(scored), "prompts/s", statistics.median(encoded)
    )
