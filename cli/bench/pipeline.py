"""Pipeline overhead: job latency and sustained throughput through the whole system, against a bare Celery
task round trip on the same broker.

The system under test is the real stack (gunicorn API, router worker, tier workers, the configured database)
with the zero-cost ``null`` generator and no image scoring, so every millisecond measured is the job
system's: validation, authentication, the database transactions, the routing decision with its shared
budget window, and two queue hops. The reference is what Celery and Redis alone cost for one hop.

Latency is taken from the database's own timestamps (submission to ``succeeded``) of jobs sent one at a
time, with its split into the stages of a job's ``timings`` (waiting for a router, routing, waiting for a
tier worker, generating), each against the same bare round trip; throughput from bursts of jobs sent by concurrent clients, one job per request and then several per
``POST /v1/jobs/batch``. On Linux the bursts are also accounted in
CPU time per job, per part of the stack (API, each worker pool, PostgreSQL, Redis, and this process as the
load generator), against the CPU time of one bare round trip: on a machine whose cores are all in use, that
sum is what sets the throughput.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import cast

import redis

from cli.bench import BadParam, Measurement, cpu
from cli.bench.echo import QUEUE, TASK, make_app
from cli.load import LocalRun, local_run
from cli.stack import StackError, check_redis, child_env
from core.settings import Settings
from db.session import make_engine, make_session_factory
from db.stats import percentile

ECHO_READY_TIMEOUT_S = 60.0
POLL_S = 0.01


class EchoWorker:
    """The reference: a solo Celery worker answering ``bench.echo`` through a Redis list."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.app = make_app(broker)
        self.redis = redis.Redis.from_url(broker)
        self.reply = f"routet2i:bench:echo:{uuid.uuid4().hex}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.bench.echo", broker], env=child_env(), stdout=subprocess.DEVNULL
        )

    def round_trip(self, timeout: float = 10.0) -> float:
        token = uuid.uuid4().hex
        started = time.perf_counter()
        self.app.send_task(TASK, args=[self.reply, token], queue=QUEUE)
        while True:  # a late answer to an earlier, timed-out call may come first: skip it
            answer = self.redis.brpop([self.reply], timeout=timeout)
            if answer is None:
                raise StackError("the echo worker did not answer")
            if cast(bytes, answer[1]).decode() == token:
                return time.perf_counter() - started

    def wait_ready(self) -> None:
        deadline = time.monotonic() + ECHO_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"the echo worker exited with {self.process.returncode}")
            try:
                self.round_trip(timeout=1.0)
                return
            except StackError:
                continue
        raise StackError("the echo worker was not ready in time")

    def burst(self, n: int) -> float:
        """Seconds for ``n`` tasks published at once to be answered."""
        started = time.perf_counter()
        for i in range(n):
            self.app.send_task(TASK, args=[self.reply, str(i)], queue=QUEUE)
        for _ in range(n):
            if self.redis.brpop([self.reply], timeout=30) is None:
                raise StackError("the echo worker stopped answering")
        return time.perf_counter() - started

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.redis.delete(self.reply, QUEUE)


STAGES = ("route_wait", "routing", "tier_wait", "generating")
"""A job's latency split as in its ``timings`` (:func:`api.schemas.timings`): submission to the start of
routing, routing, routed to the start of generation, generation to ``succeeded``."""


def _latencies(run: LocalRun, n: int) -> dict[str, list[float]]:
    """Send ``n`` jobs one at a time; per stage (and ``total``), each job's seconds from the database's
    timestamps."""
    import httpx

    from db.documents import timings
    from db.jobs import get_job, list_events

    engine = make_engine(run.settings.database_url)
    sessions = make_session_factory(engine)
    times: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "total")}
    with httpx.Client(base_url=run.stack.api_url, headers=run.headers, timeout=30.0) as http:
        for i in range(n):
            job_id = uuid.UUID(http.post("/v1/jobs", json={"prompt": f"a lighthouse at dusk, number {i}"}).json()["id"])
            deadline = time.monotonic() + 30.0
            while True:
                with sessions() as session:
                    polled = get_job(session, job_id)
                if polled is not None and polled.finished_at is not None:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"job {job_id} did not finish in 30 s")
                # The latency comes from the database's timestamps; polling slowly keeps this process from
                # taking the cores the job runs on.
                time.sleep(POLL_S)
            with sessions() as session:
                job = get_job(session, job_id)
                assert job is not None
                split = timings(job, list_events(session, job_id))
            for stage in times:
                seconds = getattr(split, f"{stage}_s")
                if seconds is None:
                    raise StackError(f"job {job_id} finished {job.status} without its {stage} timing")
                times[stage].append(seconds)
    engine.dispose()
    return times


def run(
    settings: Settings,
    *,
    repeats: int,
    latency_jobs: int = 100,
    burst_jobs: int = 2000,
    clients: int = 16,
    route_workers: int = 2,
    tier_workers: int = 2,
    pool: str = "prefork",
    batch_submissions: int = 20,
) -> list[Measurement]:
    """Measure the pipeline and its reference; ``repeats`` bursts are timed for each (medians), once with one
    job per submission and once with ``batch_submissions`` jobs per ``POST /v1/jobs/batch``."""
    from api.schemas import MAX_BATCH_JOBS

    if batch_submissions > MAX_BATCH_JOBS:
        raise BadParam(
            "batch_submissions", f"at most {MAX_BATCH_JOBS} (the API's batch limit), got {batch_submissions}"
        )
    check_redis(settings.broker_url)
    bare, bare_rates, bare_cpu_ms = _reference(settings, repeats, latency_jobs, burst_jobs)
    concurrency = {"route": route_workers, "edge": tier_workers, "cloud": tier_workers}
    bursts: dict[int, tuple[list[float], dict[str, float]]] = {}
    with local_run(settings, concurrency=concurrency, log_dir=Path("var/bench-logs"), pool=pool) as local:
        for _ in range(5):  # warm every process's connections and caches
            local.submit(1, clients=1)
        local.wait_finished(5, timeout=60, interval=0.05)
        stages = _latencies(local, latency_jobs)
        for per_request in sorted({1, batch_submissions}):
            bursts[per_request] = _bursts(local, repeats, burst_jobs, clients, per_request)
    return _measurements(stages, bare, bare_rates, bare_cpu_ms, bursts)


def _reference(
    settings: Settings, repeats: int, latency_jobs: int, burst_jobs: int
) -> tuple[list[float], list[float], float]:
    """The bare Celery+Redis reference: round trips (sorted), bursts' rates, and its CPU per round trip (ms)."""
    track = cpu.available()
    bare_cpu_ms = 0.0
    echo = EchoWorker(settings.broker_url)
    try:
        echo.wait_ready()
        bare = sorted(echo.round_trip() for _ in range(latency_jobs))
        before, own = (cpu.snapshot(), cpu.own_cpu_s()) if track else ({}, 0.0)
        bare_rates = [burst_jobs / echo.burst(burst_jobs) for _ in range(repeats)]
        if track:
            after = cpu.snapshot()
            groups = cpu.tree(after, echo.process.pid) | cpu.named(after, _is_redis)
            bare_cpu = cpu.spent(before, after, groups) + cpu.own_cpu_s() - own
            bare_cpu_ms = bare_cpu * 1000 / (repeats * burst_jobs)
    finally:
        echo.stop()
    return bare, bare_rates, bare_cpu_ms


def _bursts(
    local: LocalRun, repeats: int, burst_jobs: int, clients: int, per_request: int
) -> tuple[list[float], dict[str, float]]:
    """``repeats`` bursts of ``burst_jobs`` jobs, ``per_request`` per request: their rates (jobs/s) and the CPU
    each process spent per job (ms), when the machine lets it be read."""
    track = cpu.available()
    done = local.finished()
    rates = []
    before, own = (cpu.snapshot(), cpu.own_cpu_s()) if track else ({}, 0.0)
    for _ in range(repeats):
        started = time.perf_counter()
        local.submit(burst_jobs, clients=clients, first=done, per_request=per_request)
        if not local.wait_finished(done + burst_jobs, timeout=600, interval=0.1):
            raise StackError("the burst did not finish in 10 minutes")
        rates.append(burst_jobs / (time.perf_counter() - started))
        done += burst_jobs
    per_job_ms: dict[str, float] = {}
    if track:
        after = cpu.snapshot()
        spent = {name: cpu.spent(before, after, cpu.tree(after, p.pid)) for name, p in local.stack.processes.items()}
        spent["postgres"] = cpu.spent(before, after, cpu.named(after, lambda name: name == "postgres"))
        spent["redis"] = cpu.spent(before, after, cpu.named(after, _is_redis))
        spent["load generator"] = cpu.own_cpu_s() - own
        per_job_ms = {name: seconds * 1000 / (repeats * burst_jobs) for name, seconds in spent.items()}
    return rates, per_job_ms


def _measurements(
    stages: dict[str, list[float]],
    bare: list[float],
    bare_rates: list[float],
    bare_cpu_ms: float,
    bursts: dict[int, tuple[list[float], dict[str, float]]],
) -> list[Measurement]:
    latencies = sorted(stages["total"])
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    bare50, bare99 = percentile(bare, 0.5), percentile(bare, 0.99)
    assert p50 is not None and p99 is not None and bare50 is not None and bare99 is not None
    measurements = [
        Measurement.against("pipeline.latency.p50", p50 * 1000, "ms", bare50 * 1000),
        Measurement.against("pipeline.latency.p99", p99 * 1000, "ms", bare99 * 1000),
    ]
    # Where the latency goes: each stage's median, against the same bare round trip.
    measurements += [
        Measurement.against(
            f"pipeline.latency.{stage}.p50", statistics.median(stages[stage]) * 1000, "ms", bare50 * 1000
        )
        for stage in STAGES
    ]
    for per_request, (rates, per_job_ms) in bursts.items():
        # Single submissions keep the names of the figures; batched ones say how many jobs a request carried.
        name = "pipeline" if per_request == 1 else f"pipeline.batch{per_request}"
        measurements.append(
            Measurement.against(f"{name}.throughput", statistics.median(rates), "jobs/s", statistics.median(bare_rates))
        )
        if per_job_ms:
            total = sum(per_job_ms.values())
            # The total against one bare round trip's CPU; each part against the total (its share).
            measurements.append(Measurement.against(f"{name}.cpu_per_job.total", total, "ms", bare_cpu_ms))
            measurements += [
                Measurement.against(f"{name}.cpu_per_job.{part.replace(' ', '_')}", value, "ms", total)
                for part, value in per_job_ms.items()
            ]
    return measurements


def _is_redis(name: str) -> bool:
    return name.startswith("redis-server")
