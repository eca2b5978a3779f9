"""A load run: thousands of jobs through the real stack, then an audit of the database for lost or
duplicated work.

The generators are the zero-cost ``null`` backend and images are not scored, so what is measured is the job
system itself: the API, the broker, the router worker, the tier workers and the database. The audit counts, per job, decisions,
generations and cost entries; a job is lost if it never reached a terminal state.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from cli.stack import Stack, StackError, check_redis, child_env, start_stack
from core.settings import Settings
from db.models import JobStatus
from db.session import make_engine, make_session_factory, transaction
from db.stats import finished_jobs, percentile, tenant_audit
from db.tenants import create_tenant, issue_api_key
from router.data import partiprompts


@dataclass
class LoadReport:
    jobs: int
    accepted: int
    succeeded: int
    failed: int
    lost: int
    duplicate_decisions: int
    duplicate_generations: int
    duplicate_costs: int
    succeeded_without_image: int
    cloud_fraction: float
    submit_seconds: float
    submit_rate: float
    """Submissions per second accepted by the API."""
    drain_seconds: float
    """From the first submission until every job was terminal."""
    throughput: float
    """Jobs finished per second over the whole run."""
    latency_p50_s: float | None
    latency_p99_s: float | None

    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.accepted == self.jobs
            and self.duplicate_decisions == self.duplicate_generations == self.duplicate_costs == 0
            and self.succeeded_without_image == 0
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(settings: Settings, tenant_id: uuid.UUID) -> dict[str, Any]:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        result = tenant_audit(session, tenant_id)
    engine.dispose()
    return result


@dataclass
class LocalRun:
    """A local stack with zero-cost generators and a fresh unlimited tenant, ready for traffic."""

    settings: Settings
    stack: Stack
    tenant_id: uuid.UUID
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def submit(self, jobs: int, *, clients: int, progress: bool = False, first: int = 0, per_request: int = 1) -> int:
        """Submit ``jobs`` PartiPrompts from ``clients`` threads, ``per_request`` jobs per request (more than
        one: ``POST /v1/jobs/batch``); returns how many were accepted."""
        prompts = partiprompts()
        accepted = 0
        lock = threading.Lock()
        local = threading.local()
        bar = tqdm(total=jobs, desc="submitted", unit="job", file=sys.stderr, disable=not progress)

        def one(start: int) -> None:
            nonlocal accepted
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=self.stack.api_url, headers=self.headers, timeout=30.0)
            batch = [
                {"prompt": prompts[i % len(prompts)], "seed": i}
                for i in range(start, min(start + per_request, first + jobs))
            ]
            if per_request == 1:
                response = local.http.post("/v1/jobs", json=batch[0])
            else:
                response = local.http.post("/v1/jobs/batch", json={"jobs": batch})
            if response.status_code != 202:
                raise StackError(f"submission {start} refused: {response.status_code} {response.text[:200]}")
            with lock:
                accepted += len(batch)
                bar.update(len(batch))

        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(one, range(first, first + jobs, per_request)))
        bar.close()
        return accepted

    def finished(self) -> int:
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                return finished_jobs(session, self.tenant_id)
        finally:
            engine.dispose()

    def wait_finished(self, total: int, *, timeout: float, progress: bool = False, interval: float = 0.5) -> bool:
        """Wait until ``total`` of the tenant's jobs are terminal; False on timeout."""
        deadline = time.monotonic() + timeout
        with tqdm(total=total, desc="finished", unit="job", file=sys.stderr, disable=not progress) as bar:
            while True:
                self.stack.check_alive()
                done = self.finished()
                bar.update(done - bar.n)
                if done >= total:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(interval)


@contextmanager
def local_run(
    settings: Settings,
    *,
    concurrency: dict[str, int] | None = None,
    api_workers: int = 2,
    log_dir: Path = Path("var/load-logs"),
    pool: str = "prefork",
    pools: dict[str, str] | None = None,
    env_update: dict[str, str | None] | None = None,
) -> Iterator[LocalRun]:
    """Start the stack with zero-cost generators (``null`` backend, no image scoring), stop it afterwards.

    ``pools``: a pool per queue other than ``pool``; ``env_update``: variables to set in the stack's environment
    (None: to remove)."""
    from db.migrate import upgrade

    check_redis(settings.broker_url)
    upgrade(settings.database_url)
    with transaction(make_session_factory(make_engine(settings.database_url))) as session:
        tenant = create_tenant(session, name=f"load-{uuid.uuid4().hex[:8]}", rate_limit_per_minute=0)
        key = issue_api_key(session, tenant=tenant)
        tenant_id = tenant.id
    env = child_env(
        **{
            **settings.to_env(),
            "ROUTET2I_EDGE__BACKEND": "null",
            "ROUTET2I_CLOUD__BACKEND": "null",
            "ROUTET2I_SCORER__ENABLED": "false",
            "ROUTET2I_BUDGET_NAME": f"load-{tenant_id}",
            "ROUTET2I_LOG_LEVEL": "WARNING",
        }
    )
    for name, value in (env_update or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    stack = start_stack(
        env,
        log_dir=log_dir,
        api_workers=api_workers,
        concurrency=concurrency or {"route": 2, "edge": 2, "cloud": 1},
        pool=pool,
        pools=pools,
    )
    try:
        stack.wait_ready()
        yield LocalRun(settings=settings, stack=stack, tenant_id=tenant_id, key=key)
    finally:
        stack.stop()


def run_load(
    settings: Settings,
    *,
    jobs: int,
    clients: int = 16,
    concurrency: dict[str, int] | None = None,
    api_workers: int = 2,
    timeout: float = 900.0,
    log_dir: Path = Path("var/load-logs"),
    progress: bool = True,
) -> LoadReport:
    """Run ``jobs`` jobs through a freshly started local stack with zero-cost generators and audit them."""
    with local_run(settings, concurrency=concurrency, api_workers=api_workers, log_dir=log_dir) as run:
        started = time.monotonic()
        accepted = run.submit(jobs, clients=clients, progress=progress)
        submit_seconds = time.monotonic() - started
        run.wait_finished(jobs, timeout=timeout, progress=progress)
        drain_seconds = time.monotonic() - started
        tenant_id = run.tenant_id

    found = audit(settings, tenant_id)
    statuses = found["by_status"]
    succeeded = int(statuses.get(JobStatus.SUCCEEDED, 0))
    failed = int(statuses.get(JobStatus.FAILED, 0))
    latencies = found["latencies"]
    return LoadReport(
        jobs=jobs,
        accepted=accepted,
        succeeded=succeeded,
        failed=failed,
        lost=accepted - succeeded - failed,
        duplicate_decisions=found["duplicate_decisions"],
        duplicate_generations=found["duplicate_generations"],
        duplicate_costs=found["duplicate_costs"],
        succeeded_without_image=found["succeeded_without_image"],
        cloud_fraction=round(found["cloud_fraction"], 4),
        submit_seconds=round(submit_seconds, 3),
        submit_rate=round(accepted / submit_seconds, 1) if submit_seconds else 0.0,
        drain_seconds=round(drain_seconds, 3),
        throughput=round((succeeded + failed) / drain_seconds, 1) if drain_seconds else 0.0,
        latency_p50_s=percentile(latencies, 0.5),
        latency_p99_s=percentile(latencies, 0.99),
    )
