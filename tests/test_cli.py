"""The command line as an operator uses it: real processes, real API server, real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from core.settings import Settings
from tests.conftest import create_tenant_key
from tests.support import WorkerPool, wait_until


def routet2i(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_db_upgrade_creates_a_sqlite_database(tmp_path) -> None:
    env = {**os.environ, "ROUTET2I_DATABASE_URL": f"sqlite:///{tmp_path}/x/routet2i.db"}
    result = routet2i("db", "upgrade", env=env)
    assert result.returncode == 0, result.stderr
    assert "database at revision" in result.stdout
    assert (tmp_path / "x" / "routet2i.db").is_file()
    current = routet2i("db", "current", env=env)
    head = current.stdout.split("head: ")[1].strip()
    assert current.stdout.startswith(f"current: {head}")


def test_bad_arguments_name_the_argument() -> None:
    result = routet2i("worker", "--queue", "gpu", env=dict(os.environ))
    assert result.returncode == 2 and "'--queue'" in result.stderr
    result = routet2i("api", "--port", "70000", env=dict(os.environ))
    assert result.returncode == 2 and "'--port'" in result.stderr


@pytest.fixture(scope="module")
def api_server(pg_settings: Settings, stack: WorkerPool, tmp_path_factory) -> Iterator[str]:
    from cli.stack import free_port

    port = free_port()
    env = {**os.environ, **pg_settings.to_env()}
    log = (tmp_path_factory.mktemp("api") / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "api", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=60, what="the API to answer /readyz")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.slow
def test_submit_wait_and_status_through_gunicorn(api_server: str, pg_settings: Settings) -> None:
    env = {
        **os.environ,
        **pg_settings.to_env(),
        "ROUTET2I_API_URL": api_server,
        "ROUTET2I_API_KEY": create_tenant_key(pg_settings),
    }
    submitted = routet2i("submit", "a small boat on a calm lake", "--seed", "5", "--wait", "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded" and job["seed"] == 5

    shown = routet2i("status", job["id"], env=env)
    assert shown.returncode == 0
    assert f"job {job['id']}: succeeded on {job['tier']}" in shown.stdout
    assert "cost $" in shown.stdout

    refused = routet2i("submit", "   ", env=env)
    assert refused.returncode == 1
    assert "422" in refused.stderr and "prompt" in refused.stderr

    missing = routet2i("status", "00000000-0000-0000-0000-000000000000", "--api", api_server, env=env)
    assert missing.returncode == 1 and "404" in missing.stderr
