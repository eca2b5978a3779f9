"""Load-aware routing under a latency SLO against the load-blind router, on the real stack and one arrival trace.

The stack is the real one (gunicorn API, a route worker with the configured router, one worker pool per tier,
PostgreSQL, Redis) with ``null`` generators that sleep for each image: the edge a fixed ``--edge-service``
seconds on ``--edge-workers`` processes, the cloud ``--cloud-service`` seconds plus an exponential tail of mean
``--cloud-tail`` on ``--cloud-workers`` threads (an API: many requests in flight), so no CPU is burnt on
generation and the latencies are those of queues. Jobs replay a rated log's prompts (``--log``: a replay log, or
``genai-bench:EDGE:CLOUD`` / ``agiqa-3k:EDGE:CLOUD`` for the carried ratings) at the arrival times of the trace
(:mod:`cli.bench.traces`), so the quality each job got is the log's rating of the tier that served it.

The same trace and prompts run twice, each on a freshly started stack: load-blind (the router and its budget
alone), then load-aware (``ROUTET2I_LATENCY_SLO_S`` and ``ROUTET2I_BURST_BUDGET_USD_PER_PERIOD``). Each policy's
figures are reported with the load-blind one's as reference: SLO attainment (jobs done within the SLO; a failed
job misses it), latency percentiles, PGR of the routed quality, spend per image against the budget plus the
allowance, and how many jobs were spilled, degraded or late.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import func, select

from cli.bench import BadParam, Measurement
from cli.bench.traces import make_trace
from cli.load import LocalRun, local_run
from core.settings import Settings
from db.models import Decision, Job, JobStatus
from db.pagination import as_utc
from db.session import make_engine, make_session_factory
from db.stats import percentile
from router.log import LogRecord, metric_names, read_log
from router.pgr import quality_arrays
from router.replay import routed_pgr

POLICIES = ("load-blind", "load-aware")
SAMPLE_S = 1.0
DRAIN_TIMEOUT_S = 600.0
RETRIES = 3


@dataclass
class Phase:
    """What one policy's run produced."""

    latencies: dict[int, float | None] = field(default_factory=dict)
    """Per trace index, submission to done in seconds (None: failed or not done)."""
    tiers: dict[int, str] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)
    depths: list[tuple[float, dict[str, int]]] = field(default_factory=list)


def read_records(log: str) -> list[LogRecord]:
    """The log's records: a replay log's path, or ``DATA:EDGE:CLOUD`` for the carried ratings."""
    from router import datasets

    if log.count(":") == 2 and not Path(log).exists():
        data, edge, cloud = log.split(":")
        loaders = {"genai-bench": datasets.genai_bench, "agiqa-3k": datasets.agiqa_3k}
        if data not in loaders:
            raise BadParam("log", f"unknown data set {data!r}: genai-bench or agiqa-3k")
        try:
            return loaders[data](edge, cloud)
        except ValueError as exc:
            raise BadParam("log", str(exc)) from exc
    if not Path(log).is_file():
        raise BadParam("log", f"no such replay log: {log}")
    return read_log(Path(log))


def _stack_env(settings: Settings, policy: str, slo: float, allowance: float, budget: float) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "ROUTET2I_EDGE__MAX_BATCH": "1",
        "ROUTET2I_CLOUD__MAX_BATCH": "1",
        "ROUTET2I_CLOUD_BUDGET": str(budget),
        "ROUTET2I_HEARTBEAT_INTERVAL_S": "2",
        "ROUTET2I_SHADOW_RATE": "0",
        "ROUTET2I_ESCALATION_RATE": "0",
        "ROUTET2I_CLOUD_SPEND_PERIOD_S": str(31 * 86_400),
        "ROUTET2I_LATENCY_SLO_S": None,
        "ROUTET2I_BURST_BUDGET_USD_PER_PERIOD": None,
    }
    if policy == "load-aware":
        env["ROUTET2I_LATENCY_SLO_S"] = str(slo)
        env["ROUTET2I_BURST_BUDGET_USD_PER_PERIOD"] = str(allowance)
    return env


def _submit_trace(run: LocalRun, arrivals: list[float], prompts: list[str]) -> dict[str, int]:
    """Submit job ``i`` at ``arrivals[i]`` seconds from now; returns job id → trace index."""
    ids: dict[str, int] = {}
    lock = threading.Lock()
    local = threading.local()

    def one(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=run.stack.api_url, headers=run.headers, timeout=30.0)
        body = {"prompt": prompts[i], "seed": i, "idempotency_key": f"{run.tenant_id}-{i}"}
        for attempt in range(RETRIES):  # a kept-alive connection the server closed: the same job again, once
            try:
                response = local.http.post("/v1/jobs", json=body)
                break
            except httpx.TransportError:
                if attempt == RETRIES - 1:
                    raise
        if response.status_code not in (200, 202):
            raise RuntimeError(f"submission {i} refused: {response.status_code} {response.text[:200]}")
        with lock:
            ids[response.json()["id"]] = i

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = []
        for i, at in enumerate(arrivals):
            delay = started + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, i))
        for future in futures:
            future.result()
    return ids


def _sample_depths(run: LocalRun, phase: Phase, stop: threading.Event) -> None:
    """Every :data:`SAMPLE_S`, the tenant's jobs waiting or running per queue (``route``: not yet routed)."""
    engine = make_engine(run.settings.database_url)
    sessions = make_session_factory(engine)
    started = time.monotonic()
    try:
        while not stop.wait(SAMPLE_S):
            with sessions() as session:
                rows = session.execute(
                    select(Job.tier, func.count())
                    .where(Job.tenant_id == run.tenant_id, Job.status.in_(("queued", "routing", "generating")))
                    .group_by(Job.tier)
                ).all()
            phase.depths.append((time.monotonic() - started, {tier or "route": int(n) for tier, n in rows}))
    finally:
        engine.dispose()


def _collect(run: LocalRun, ids: dict[str, int], phase: Phase) -> None:
    engine = make_engine(run.settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(
                select(Job.id, Job.status, Job.tier, Job.created_at, Job.finished_at, Decision.budget_state)
                .outerjoin(Decision, Decision.job_id == Job.id)
                .where(Job.tenant_id == run.tenant_id)
            ).all()
    finally:
        engine.dispose()
    for job_id, status, tier, created, finished, state in rows:
        index = ids.get(str(job_id))
        if index is None:
            continue
        done = status == JobStatus.SUCCEEDED and finished is not None
        phase.latencies[index] = (as_utc(finished) - as_utc(created)).total_seconds() if done else None
        phase.tiers[index] = tier or ""
        action = ((state or {}).get("load") or {}).get("action", "blind")
        phase.actions[action] = phase.actions.get(action, 0) + 1


def run_phase(
    settings: Settings, policy: str, arrivals: list[float], prompts: list[str], options: dict[str, Any]
) -> Phase:
    """One policy on a fresh stack: the trace submitted, every job awaited, the results read back."""
    phase = Phase()
    edge = settings.edge.model_copy(update={"service_time_s": options["edge_service"]})
    cloud = settings.cloud.model_copy(
        update={"service_time_s": options["cloud_service"], "service_time_tail_s": options["cloud_tail"]}
    )
    env = _stack_env(settings, policy, options["slo"], options["allowance"], options["budget"])
    concurrency = {"route": 1, "edge": options["edge_workers"], "cloud": options["cloud_workers"]}
    with local_run(
        settings.model_copy(update={"edge": edge, "cloud": cloud}),
        concurrency=concurrency,
        pools={"cloud": "threads"},
        env_update=env,
        log_dir=Path("var/bench-slo-logs") / policy,
    ) as run:
        _warm_up(run)
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_depths, args=(run, phase, stop), daemon=True)
        sampler.start()
        ids = _submit_trace(run, arrivals, prompts)
        finished = run.wait_finished(len(arrivals) + 1, timeout=DRAIN_TIMEOUT_S)
        stop.set()
        sampler.join()
        if not finished:
            raise RuntimeError(f"{policy}: jobs still unfinished {DRAIN_TIMEOUT_S:.0f} s after the trace")
        _collect(run, ids, phase)
    return phase


def _warm_up(run: LocalRun) -> None:
    """One job through the stack before the trace (the workers' first message loads the router), and a pause
    for every worker's first heartbeat."""
    with httpx.Client(base_url=run.stack.api_url, headers=run.headers, timeout=30.0) as http:
        response = http.post("/v1/jobs", json={"prompt": "a warm-up prompt", "seed": 0})
        response.raise_for_status()
    run.wait_finished(1, timeout=120.0)
    time.sleep(3.0)


def _figures(
    phase: Phase, records: list[LogRecord], picks: np.ndarray, options: dict[str, Any], prices: dict[str, float]
) -> dict[str, float]:
    n = len(picks)
    latencies = [phase.latencies.get(i) for i in range(n)]
    done = sorted(v for v in latencies if v is not None)
    met = sum(1 for v in latencies if v is not None and v <= options["slo"])
    metrics = metric_names(records)
    edge_q, cloud_q = quality_arrays([records[k] for k in picks], metrics)
    cloud_mask = np.array([phase.tiers.get(i) == "cloud" for i in range(n)])
    pgr = routed_pgr(edge_q, cloud_q, cloud_mask, metrics)["aggregate"]
    spend = sum(prices.get(phase.tiers.get(i, ""), 0.0) for i in range(n))
    return {
        "slo_attainment": met / n,
        "p50_s": percentile(done, 0.5) or float("nan"),
        "p95_s": percentile(done, 0.95) or float("nan"),
        "p99_s": percentile(done, 0.99) or float("nan"),
        "pgr": float("nan") if pgr is None else pgr,
        "spend_per_image": spend / n,
        "spend_usd": spend,
        "cloud_share": float(cloud_mask.mean()),
        "spilled": float(phase.actions.get("spilled", 0)),
        "degraded": float(phase.actions.get("degraded", 0)),
        "late": float(phase.actions.get("late", 0)),
    }


UNITS = {
    "slo_attainment": "share",
    "pgr": "share",
    "cloud_share": "share",
    "spend_per_image": "USD",
    "spend_usd": "USD",
}


def run(
    settings: Settings,
    *,
    repeats: int,
    log: str,
    trace: str,
    rate: float,
    duration: float,
    slo: float,
    burst_factor: float,
    budget: float,
    allowance: float,
    edge_workers: int,
    edge_service: float,
    cloud_workers: int,
    cloud_service: float,
    cloud_tail: float,
    seed: int,
    plot: str,
) -> list[Measurement]:
    """Both policies on the same trace (``repeats`` is not used: each policy runs once; a run is minutes)."""
    if budget > 1:
        raise BadParam("budget", f"a share of jobs, at most 1; got {budget}")
    records = read_records(log)
    if rate <= 0:  # the edge pool at 60% of its capacity with the budget's share of the traffic on the cloud
        rate = 0.6 * edge_workers / edge_service / (1.0 - budget) if budget < 1 else edge_workers / edge_service
    try:
        arrivals = make_trace(trace, rate=rate, duration=duration, burst_factor=burst_factor, seed=seed)
    except ValueError as exc:
        raise BadParam("trace", str(exc)) from exc
    if not arrivals:
        raise BadParam("trace", "the trace has no arrival within --duration")
    picks = np.random.default_rng(seed).integers(0, len(records), size=len(arrivals))
    prompts = [records[k].prompt for k in picks]
    prices = {t: settings.tier(t).price_per_image for t in settings.tier_names}
    budget_usd = prices["edge"] + budget * (prices["cloud"] - prices["edge"])
    if allowance < 0:  # a quarter of the trace's jobs more on the cloud, beside the budget
        allowance = 0.25 * len(arrivals) * (prices["cloud"] - prices["edge"])
    options = {
        "slo": slo,
        "allowance": allowance,
        "budget": budget,
        "edge_workers": edge_workers,
        "edge_service": edge_service,
        "cloud_workers": cloud_workers,
        "cloud_service": cloud_service,
        "cloud_tail": cloud_tail,
    }
    phases = {policy: run_phase(settings, policy, arrivals, prompts, options) for policy in POLICIES}
    figures = {policy: _figures(phases[policy], records, picks, options, prices) for policy in POLICIES}
    if plot:
        _plot(Path(plot), phases, arrivals, slo)
    measurements = [
        Measurement("trace.jobs", float(len(arrivals)), "jobs"),
        Measurement("trace.rate", len(arrivals) / duration, "jobs/s"),
        Measurement("budget.usd_per_image", budget_usd, "USD"),
        Measurement("budget.allowance_usd", allowance, "USD"),
        Measurement("budget.limit_per_image", budget_usd + allowance / len(arrivals), "USD"),
    ]
    blind = figures["load-blind"]
    for policy in POLICIES:
        for key, value in figures[policy].items():
            unit = UNITS.get(key, "s" if key.endswith("_s") else "jobs")
            if policy == "load-aware" and blind[key] not in (0.0,) and blind[key] == blind[key]:
                measurements.append(Measurement.against(f"{policy}.{key}", value, unit, blind[key]))
            else:
                measurements.append(Measurement(f"{policy}.{key}", value, unit))
    return measurements


def _plot(path: Path, phases: dict[str, Phase], arrivals: list[float], slo: float) -> None:
    """Queue depths over time per policy, with the arrival rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(phases), 1, figsize=(9, 3.2 * len(phases)), sharex=True)
    for ax, (policy, phase) in zip(np.atleast_1d(axes), phases.items(), strict=True):
        times = [t for t, _ in phase.depths]
        for queue in ("route", "edge", "cloud"):
            ax.plot(times, [d.get(queue, 0) for _, d in phase.depths], label=f"{queue} jobs")
        counts, edges = np.histogram(arrivals, bins=np.arange(0, max(arrivals) + 2, 2.0))
        ax.step(edges[:-1], counts / 2.0, where="post", color="grey", alpha=0.6, label="arrivals/s")
        missed = sum(1 for v in phase.latencies.values() if v is None or v > slo)
        ax.set_title(f"{policy}: {missed} of {len(phase.latencies)} jobs over the {slo:g} s SLO")
        ax.set_ylabel("jobs")
        ax.legend(loc="upper right", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("seconds since the trace started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
