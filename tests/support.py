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

from routet2i.settings import Settings

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
                "routet2i.cli",
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

    def wait_ready(self, nodes: list[str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until every node answers a control ping (its consumer is connected)."""
        from worker.app import create_celery

        wanted = set(nodes or self.processes)
        app = create_celery(self.settings)
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            for node, process in self.processes.items():
                if node in wanted and process.poll() is not None:
                    raise RuntimeError(f"worker {node} exited with {process.returncode}:\n{self.log(node)[-3000:]}")
            for reply in app.control.ping(timeout=0.5) or []:
                seen.update(reply)
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
        return body if body["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = wait_until(terminal, timeout=timeout, what=f"job {job_id} to finish")
    return result
