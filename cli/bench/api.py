"""API submission throughput and tail latency under gunicorn, against the same server answering ``/healthz``.

The API runs as in production (``routet2i api``: gunicorn, gthread workers) on the configured database and
broker; no worker consumes the jobs. The load comes from ``wrk`` when it is installed (a C load generator that
stays out of the way on a small machine), else from Python threads. The reference is the same server, same
load, on ``/healthz``: what the web stack alone can do, so the ratio is the cost of a submission (validation,
key check, rate limit, one database transaction, one broker publish).

The jobs the benchmark creates belong to a tenant of its own and are deleted afterwards, their queue
messages removed; still, point it at a scratch database and Redis database, not production.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import cast

import httpx
import redis
from sqlalchemy.orm import Session, sessionmaker

from cli.bench import Measurement
from cli.stack import StackError, check_redis, child_env, free_port
from core.settings import Settings
from db.session import make_engine, make_session_factory, transaction
from db.stats import percentile
from db.tenants import create_tenant, delete_tenant, issue_api_key
from worker.transport import job_ids_of

BODY = {"prompt": "a red bicycle leaning on a brick wall, morning light"}


def _wrk(
    url: str, *, seconds: float, connections: int, threads: int, body: dict | None, key: str
) -> tuple[float, float, int]:
    """Requests/s, p99 latency (s) and non-2xx count from one wrk run."""
    script = f'wrk.headers["Authorization"] = "Bearer {key}"\n' + (
        f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\nwrk.headers["Content-Type"] = "application/json"\n'
        if body
        else ""
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                handle.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        Path(handle.name).unlink(missing_ok=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, p99, int(bad.group(1)) if bad else 0


def _threads(url: str, *, seconds: float, connections: int, body: dict | None, key: str) -> tuple[float, float, int]:
    """The same measurement with Python threads (used when wrk is not installed)."""
    latencies: list[float] = []
    bad = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        nonlocal bad
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30.0) as http:
            while time.monotonic() < stop:
                started = time.perf_counter()
                response = http.post(url, json=body) if body else http.get(url)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    bad += response.status_code >= 300

    workers = [threading.Thread(target=client) for _ in range(connections)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    latencies.sort()
    return len(latencies) / (time.monotonic() - started), percentile(latencies, 0.99) or 0.0, bad


def run(
    settings: Settings,
    *,
    repeats: int,
    seconds: float = 10.0,
    connections: int = 32,
    api_workers: int = 4,
    api_threads: int = 4,
) -> list[Measurement]:
    """Submissions/s and p99 against /healthz on the same gunicorn server; medians over ``repeats`` runs."""
    from db.migrate import upgrade

    check_redis(settings.broker_url)
    upgrade(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        tenant = create_tenant(session, name=f"bench-api-{uuid.uuid4().hex[:8]}", rate_limit_per_minute=0)
        key = issue_api_key(session, tenant=tenant)
        tenant_id = tenant.id

    port = free_port()
    server = _start_api(settings, port, api_workers, api_threads)
    base = f"http://127.0.0.1:{port}"
    load = _wrk if shutil.which("wrk") else None
    try:
        _wait_ready(server, base)

        def measure(path: str, body: dict | None) -> tuple[float, float, int]:
            if load is not None:
                return load(base + path, seconds=seconds, connections=connections, threads=2, body=body, key=key)
            return _threads(base + path, seconds=seconds, connections=connections, body=body, key=key)

        measure("/v1/jobs", BODY)  # warm every gunicorn worker's connections
        submit, health = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine
            submit.append(measure("/v1/jobs", BODY))
            health.append(measure("/healthz", None))
    finally:
        server.terminate()
        server.wait(timeout=30)
        _clean(settings, sessions, tenant_id)

    if any(bad for _, _, bad in submit + health):
        raise StackError(f"refused requests during the benchmark: {[bad for _, _, bad in submit + health]}")
    tool = "wrk" if load is not None else "python"
    return [
        Measurement.against(
            f"api.submit.requests_per_s[{tool}]",
            statistics.median(r for r, _, _ in submit),
            "req/s",
            statistics.median(r for r, _, _ in health),
        ),
        Measurement.against(
            f"api.submit.p99[{tool}]",
            statistics.median(p for _, p, _ in submit) * 1000,
            "ms",
            statistics.median(p for _, p, _ in health) * 1000,
        ),
    ]


def _start_api(settings: Settings, port: int, workers: int, threads: int) -> subprocess.Popen[bytes]:
    """``routet2i api`` on ``port`` in a child process, logging warnings only."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port), "--workers", str(workers), "--threads", str(threads)],
        env=child_env(**{**settings.to_env(), "ROUTET2I_LOG_LEVEL": "WARNING"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(server: subprocess.Popen[bytes], base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise StackError("the API did not start")
        time.sleep(0.2)


def _clean(settings: Settings, sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> None:
    """Delete the benchmark's jobs and tenant, and its messages from the route queue."""
    with transaction(sessions) as session:
        ids = {str(job_id) for job_id in delete_tenant(session, tenant_id)}
    client = redis.Redis.from_url(settings.broker_url)
    for raw in cast(list[bytes], client.lrange("route", 0, -1)):
        if set(job_ids_of(raw)) & ids:
            client.lrem("route", 1, raw)  # type: ignore[arg-type]  # the stubs say str; bytes work
