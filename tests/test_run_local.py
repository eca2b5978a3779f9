"""``ops/run-local.sh`` runs the whole stack from ``ops/Procfile`` without containers, and stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from tests.conftest import make_settings
from tests.servers import Process, cli_env, wait_http
from tests.support import PrivateRedis, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 180.0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_local_serves_jobs_and_stops_every_process(tmp_path: Path, model_cache: Path) -> None:
    redis_server = PrivateRedis(tmp_path)
    redis_server.start()
    settings: Settings = make_settings(
        database_url=f"sqlite:///{tmp_path / 'local.db'}",  # the embedded default: the script migrates it
        broker_url=redis_server.url,
        image_dir=tmp_path / "images",
        cache_dir=model_cache,
        budget_name="run-local-test",
    )
    # `routet2i` on PATH, as after `pip install -e .`, running this checkout.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "routet2i"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli "$@"\n')
    shim.chmod(0o755)
    api_port, flower_port = free_port(), free_port()
    env = cli_env(
        settings,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=str(ROOT),
        API_PORT=str(api_port),
        FLOWER_PORT=str(flower_port),
        LOG_DIR=str(tmp_path / "logs"),
    )
    script = Process(["bash", str(ROOT / "ops" / "run-local.sh")], env=env, log_path=tmp_path / "run-local.log")
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_http(f"{api}/readyz", script, timeout=STARTUP_S)
        wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", script, timeout=STARTUP_S)
        # The operator's first step once the database exists: a tenant and its key.
        created = subprocess.run(
            [str(shim), "tenant", "create", "ops", "--admin", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        headers = {"Authorization": f"Bearer {json.loads(created.stdout)['api_key']}"}
        job_id = httpx.post(
            f"{api}/v1/jobs", json={"prompt": "a paper boat on a pond"}, headers=headers, timeout=10
        ).json()["id"]

        def finished() -> dict | None:
            job = httpx.get(f"{api}/v1/jobs/{job_id}", headers=headers, timeout=10).json()
            return job if job["status"] in ("succeeded", "failed") else None

        job = wait_until(finished, timeout=STARTUP_S, interval=0.5, what="the job")
        assert job["status"] == "succeeded", job["error"]
        metrics = httpx.get(f"{api}/metrics", headers=headers).text  # an admin's key (or the metrics token)
        assert f'routet2i_jobs{{status="succeeded",tier="{job["tier"]}"}} 1.0' in metrics
    finally:
        # SIGTERM to the script alone: it must stop its children itself.
        if script.popen.poll() is None:
            script.popen.send_signal(signal.SIGTERM)
        try:
            code = script.popen.wait(timeout=90)
        finally:
            deadline = time.monotonic() + 30
            while group_alive(script.popen.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            leftover = group_alive(script.popen.pid)
            if leftover:
                os.killpg(script.popen.pid, signal.SIGKILL)
            script.stop()
            redis_server.stop()
    assert code == 143, script.log()
    assert not leftover, "processes of the stack outlived the script"
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {"api.log", "route.log", "edge.log", "cloud.log", "webhooks.log", "learn.log", "flower.log"}
    assert "starting api:" in script.log()
