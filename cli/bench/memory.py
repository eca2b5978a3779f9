"""Resident memory of each process of the stack with the offline models, against bare interpreters.

Starts the API (one gunicorn worker) and one worker per queue as ``make demo`` does, waits until every model
is loaded (a job has gone through each tier), and reads each process tree's resident set size from /proc
(main process plus pool children). References: an idle Python interpreter that imported Flask and SQLAlchemy
(for the API), torch and transformers (for the router worker, which runs the MiniLM encoder) or torch and
diffusers (for the tier workers), i.e. the floor one such process cannot go below.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.bench import Measurement
from cli.stack import StackError, check_redis, child_env, start_stack
from core.settings import Settings

BARE = {
    "web": "import flask, sqlalchemy, pydantic, celery",
    "router": "import torch, transformers, flask, sqlalchemy, pydantic, celery",
    "model": "import torch, diffusers, transformers, open_clip",
}


def tree_rss_mb(pid: int) -> float:
    """Resident set size of a process and its children, in MiB."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0
    for member in [pid, *(int(c) for c in children)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except FileNotFoundError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return total / 1024


def bare_rss_mb(imports: str) -> float:
    process = subprocess.Popen([sys.executable, "-c", f"{imports}\nimport time\ntime.sleep(300)"], env=child_env())
    try:
        time.sleep(1.0)
        deadline = time.monotonic() + 120
        last = -1.0
        while time.monotonic() < deadline:  # imports done when the size stops growing
            time.sleep(1.0)
            now = tree_rss_mb(process.pid)
            if abs(now - last) < 1.0:
                return now
            last = now
        return last
    finally:
        process.kill()
        process.wait()


def run(settings: Settings, *, repeats: int) -> list[Measurement]:
    from cli.demo import demo_key
    from db.migrate import upgrade

    check_redis(settings.broker_url)
    upgrade(settings.database_url)
    key = demo_key(settings)
    env = child_env(**{**settings.to_env(), "ROUTET2I_TORCH_THREADS": "1", "ROUTET2I_LOG_LEVEL": "WARNING"})
    stack = start_stack(env, log_dir=Path("var/bench-logs"))
    sizes: dict[str, float] = {}
    try:
        stack.wait_ready()
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=30) as http:
            for tier in ("edge", "cloud"):
                response = http.post("/v1/jobs", json={"prompt": "a small red boat", "tier": tier})
                if response.status_code == 403:  # the demo tenant may not force tiers: let the router pick
                    response = http.post("/v1/jobs", json={"prompt": "a small red boat"})
                job_id = response.json()["id"]
                deadline = time.monotonic() + 300
                while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed"):
                    stack.check_alive()
                    if time.monotonic() > deadline:
                        raise StackError("no job finished within 5 minutes")
                    time.sleep(0.5)
        for name, process in stack.processes.items():
            sizes[name] = max(tree_rss_mb(process.pid) for _ in range(repeats))
    finally:
        stack.stop()
    bare = {kind: bare_rss_mb(imports) for kind, imports in BARE.items()}
    kinds = {"api": "web", "route": "router"}
    return [
        Measurement.against(f"memory.{name}", size, "MiB", bare[kinds.get(name, "model")])
        for name, size in sizes.items()
    ]
