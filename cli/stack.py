"""The whole stack as local child processes: the API under gunicorn and Celery workers per queue.

Used by ``routet2i demo``, ``routet2i loadtest`` and the pipeline benchmark, which all need a real running
system on one machine and must stop it cleanly afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    """The stack could not be started or a process died."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_redis(url: str) -> None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.RedisError as exc:
        raise StackError(
            f"Redis is not reachable at {url} ({exc}).\n"
            "Start one with: redis-server --daemonize yes --save '' --appendonly no\n"
            "or point ROUTET2I_BROKER_URL at yours."
        ) from exc


@dataclass
class Stack:
    """Child processes started by :func:`start_stack`."""

    api_url: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path = Path("var/logs")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise StackError(f"{name} exited with code {process.returncode}; its log ends:\n{tail}")

    def wait_ready(self, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.api_url}/readyz", headers=headers, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise StackError(f"the API was not ready after {READY_TIMEOUT_S:.0f}s")


def start_stack(
    env: dict[str, str],
    *,
    log_dir: Path,
    api_workers: int = 1,
    api_threads: int = 4,
    concurrency: dict[str, int] | None = None,
    pool: str = "prefork",
    pools: dict[str, str] | None = None,
) -> Stack:
    """Start the API, one worker process per queue of the settings in ``env`` (``ROUTET2I_TIERS``; with
    ``concurrency[queue]`` pool children, default 1, in a ``pools[queue]`` pool, default ``pool``) and the
    webhook dispatcher."""
    from core.settings import ROUTE_QUEUE, TIERS

    tiers = [t.strip() for t in env.get("ROUTET2I_TIERS", ",".join(TIERS)).split(",") if t.strip()]
    concurrency = {**dict.fromkeys((ROUTE_QUEUE, *tiers), 1), **(concurrency or {})}
    command = [sys.executable, "-m", "cli"]
    port = free_port()
    specs = {
        "api": [*command, "api", "--port", str(port), "--workers", str(api_workers), "--threads", str(api_threads)]
    }
    for queue, size in concurrency.items():
        specs[queue] = [
            *command,
            "worker",
            "--queue",
            queue,
            "--concurrency",
            str(size),
            "--pool",
            (pools or {}).get(queue, pool),
        ]
    specs["webhooks"] = [*command, "webhooks"]
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(api_url=f"http://127.0.0.1:{port}", log_dir=log_dir)
    for name, argv in specs.items():
        with (log_dir / f"{name}.log").open("wb") as log:
            stack.processes[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return stack


def child_env(**variables: str) -> dict[str, str]:
    """The current environment for child processes, offline, plus ``variables``."""
    return {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **variables}
