"""Helpers for tests that run real processes: Celery workers started exactly as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.settings import Settings
from db.decisions import record_decision
from db.generations import record_generation
from db.jobs import create_job
from db.lifecycle import transition
from db.models import Job, JobStatus
from db.tenants import create_tenant
from router.types import RoutingDecision

READY_TIMEOUT_S = 120.0


class WorkerPool:
    """Celery worker processes started with ``routet2i worker``, one or more per queue."""

    def __init__(self, settings: Settings, *, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.env = {**os.environ, **settings.to_env(), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, queue: str, *, concurrency: int = 1, name: str | None = None, pool: str = "prefork") -> str:
        """Start a worker for ``queue``; returns its node name."""
        node = name or f"{queue}-{uuid.uuid4().hex[:6]}@test"
        log = (self.log_dir / f"{node}.log").open("wb")
        self.processes[node] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "worker",
                "--queue",
                queue,
                "--concurrency",
                str(concurrency),
                "--pool",
                pool,
                "--name",
                node,
                "--loglevel",
                "INFO",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return node

    def start_all(self, queues: tuple[str, ...] = ("route", "edge", "cloud")) -> None:
        """One worker per queue, returning once every worker answers (the usual stack of a test)."""
        for queue in queues:
            self.start(queue)
        self.wait_ready()

    def wait_ready(self, nodes: list[str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until every node answers a control ping (its consumer is connected)."""
        import redis

        from worker.transport import create_celery

        wanted = set(nodes or self.processes)
        app = create_celery(self.settings)
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            for node, process in self.processes.items():
                if node in wanted and process.poll() is not None:
                    raise RuntimeError(f"worker {node} exited with {process.returncode}:\n{self.log(node)[-3000:]}")
            try:
                for reply in app.control.ping(timeout=0.5) or []:
                    seen.update(reply)
            except (OSError, ConnectionError, redis.exceptions.ConnectionError):
                time.sleep(0.2)  # the broker itself is (re)starting
            if wanted <= seen:
                return
        raise TimeoutError(f"workers not ready after {timeout}s: {sorted(wanted - seen)}")

    def log(self, node: str) -> str:
        return (self.log_dir / f"{node}.log").read_text(errors="replace")

    def pids(self, node: str) -> list[int]:
        """The worker's main process and its pool children."""
        main = self.processes[node].pid
        children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
        return [main, *(int(c) for c in children)]

    def stop(self, node: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        process = self.processes.pop(node)
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def stop_all(self) -> None:
        for node in list(self.processes):
            self.stop(node)


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_for_job(client: Any, job_id: str, *, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/<id>`` through a Flask test client until the job is terminal."""

    def terminal() -> dict[str, Any] | None:
        body = client.get(f"/v1/jobs/{job_id}").get_json()
        return body if body["status"] in ("succeeded", "failed", "cancelled", "expired") else None

    result: dict[str, Any] = wait_until(terminal, timeout=timeout, what=f"job {job_id} to finish")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, so it can be restarted (losing everything, as without persistence)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers(lambda: redis.Redis(port=self.port).ping()), timeout=10, what="redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary folder), so it can be stopped and started."""

    BIN = Path("/usr/lib/postgresql")

    def __init__(self) -> None:
        import tempfile

        versions = sorted(self.BIN.iterdir()) if self.BIN.is_dir() else []
        if not versions:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.bin = versions[-1] / "bin"
        # Not under pytest's private tmp folder: the server runs as the postgres user, who must reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="routet2i-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.owner = owner
        if owner:
            subprocess.run(["chown", "-R", "postgres", str(self.directory)], check=True)
        subprocess.run(
            [
                *owner,
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "root",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://root@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [
                *self.owner,
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.directory / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self.owner, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
        )

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _answers(call: Callable[[], Any]) -> bool:
    try:
        call()
        return True
    except Exception:
        return False


def decided_for_the_edge(session: Session, prompt: str, *, seed: int) -> Job:
    """A job of a new tenant that the router sent to the edge (as an escalation or a shadow finds it)."""
    tenant = create_tenant(session, name=f"esc-{uuid.uuid4().hex[:8]}")
    session.flush()
    job = create_job(session, tenant_id=tenant.id, prompt=prompt, seed=seed)
    session.flush()
    transition(session, job, JobStatus.ROUTING)
    decision = RoutingDecision(
        tier="edge",
        router_name="prompt-complexity",
        router_version="1",
        score=0.0,
        threshold=None,
        budget=0.0,
        budget_state={},
        reason="cloud budget is zero",
        inputs={},
    )
    record_decision(session, job=job, decision=decision)
    return job


def record_image(
    session: Session, job: Job, *, tier: str, role: str, cost_usd: float, quality: dict | None = None, **fields: Any
) -> uuid.UUID:
    """Record one 64×64 image of ``job`` on ``tier`` (null backend, a fresh path) billed ``cost_usd``, as a
    worker would; ``fields`` override any other column of :class:`db.generations.NewGeneration`."""
    return record_generation(
        session,
        job=job,
        **{
            "tier": tier,
            "role": role,
            "backend": "null",
            "model_id": f"{tier}-model",
            "device": "cpu",
            "seed": job.seed,
            "steps": 2,
            "width": 64,
            "height": 64,
            "image_path": f"{uuid.uuid4().hex}.png",
            "image_sha256": uuid.uuid4().hex * 2,
            "wall_s": 0.1,
            "gpu_s": 0.1,
            "cost_usd": cost_usd,
            "quality": quality,
            **fields,
        },
    )
