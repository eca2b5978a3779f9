"""Real server processes for tests: the API under gunicorn, Flower, the no-container runner.

Each is started exactly as an operator would start it (``routet2i api``, ``routet2i flower``,
``ops/run-local.sh``) on a free loopback port, and stopped (with its process group) at the end.
:func:`serve_wsgi` serves a test's own WSGI app (a fake upstream API) from a thread instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings
from tests.support import free_port

READY_TIMEOUT_S = 60.0


class Process:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.popen.args} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``routet2i`` child process configured by ``settings``."""
    return {**os.environ, **settings.to_env(), "OMP_NUM_THREADS": "1", **extra}


def wait_http(url: str, process: Process, *, timeout: float = READY_TIMEOUT_S, ok: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            if httpx.get(url, timeout=2.0).status_code == ok:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer {ok} within {timeout}s:\n{process.log()[-3000:]}")


class ApiServer(Process):
    """``routet2i api`` (gunicorn) on a free port."""

    def __init__(self, settings: Settings, *, log_path: Path, workers: int = 2, **extra_env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "cli", "api", "--port", str(self.port), "--workers", str(workers)]
        super().__init__(argv, env=cli_env(settings, **extra_env), log_path=log_path)
        wait_http(f"{self.url}/readyz", self)


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """``app`` on a real threaded HTTP server on a free loopback port; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
