"""The end-to-end demo: the whole stack on one machine, real prompts through it, a summary at the end.

Starts the API (gunicorn) and one Celery worker per queue as child processes, submits PartiPrompts over
HTTP, waits for every job to reach a terminal state, prints what happened, and stops the children.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis
from tqdm import tqdm

from cli.stack import Stack, StackError, check_redis, start_stack
from core.settings import Settings
from db.redis_state import RedisBudgetStore
from router.data import sample_prompts

DEMO_BUDGET = "demo"
DEMO_TENANT = "demo"


def run_jobs(stack: Stack, http: httpx.Client, prompts: list[str], *, timeout: float) -> list[dict[str, Any]]:
    """Submit every prompt, then poll until all jobs end. Returns the final job documents."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        accepted = list(pool.map(lambda p: http.post(f"{stack.api_url}/v1/jobs", json={"prompt": p}), prompts))
    for response in accepted:
        if response.status_code != 202:
            raise StackError(f"submission refused: {response.status_code} {response.text[:200]}")
    pending = {r.json()["id"] for r in accepted}
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with tqdm(total=len(pending), desc="jobs", unit="job", file=sys.stderr) as bar:
        while pending:
            if time.monotonic() > deadline:
                raise StackError(f"{len(pending)} jobs unfinished after {timeout:.0f}s")
            stack.check_alive()
            for job_id in list(pending):
                job = http.get(f"{stack.api_url}/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    done[job_id] = job
                    pending.discard(job_id)
                    bar.update(1)
            time.sleep(0.5)
    return list(done.values())


def summarize(jobs: list[dict[str, Any]], stats: dict[str, Any], settings: Settings) -> str:
    statuses = Counter(j["status"] for j in jobs)
    tiers = Counter(j["tier"] for j in jobs if j["status"] == "succeeded")
    routed = sum(tiers.values())
    cost = sum(j["result"]["cost_usd"] for j in jobs if j.get("result"))
    all_cloud = len(jobs) * settings.cloud.price_per_image
    latencies = sorted(j["timings"]["total_s"] for j in jobs if j["timings"]["total_s"] is not None)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] if latencies else float("nan")

    lines = [
        "",
        "RouteT2I demo summary",
        f"  jobs:            {len(jobs)} submitted, {statuses['succeeded']} succeeded, {statuses['failed']} failed",
        f"  routing:         {tiers['edge']} edge, {tiers['cloud']} cloud (router: {settings.router})",
        f"  cloud fraction:  {tiers['cloud'] / routed if routed else 0:.2f} against a budget of {settings.cloud_budget:.2f}",
        f"  cost:            ${cost:.4f} (all-cloud would be ${all_cloud:.4f}, saving {1 - cost / all_cloud if all_cloud else 0:.0%})",
        f"  latency:         p50 {pct(0.5):.2f}s  p90 {pct(0.9):.2f}s  p99 {pct(0.99):.2f}s  (submit to done)",
    ]
    for tier, metrics in sorted(stats.get("mean_quality", {}).items()):
        shown = ", ".join(f"{m} {v:.3f}" for m, v in sorted(metrics.items())[:4])
        lines.append(f"  quality ({tier}):  {shown}")
    failed = [j for j in jobs if j["status"] == "failed"]
    for job in failed[:5]:
        lines.append(f"  failed {job['id']}: {job['error']}")
    return "\n".join(lines)


def demo_key(settings: Settings) -> str:
    """A fresh API key of the ``demo`` tenant (created on first use)."""
    from db.session import make_engine, make_session_factory, transaction
    from db.tenants import create_tenant, get_tenant_by_name, issue_api_key

    with transaction(make_session_factory(make_engine(settings.database_url))) as session:
        tenant = get_tenant_by_name(session, DEMO_TENANT) or create_tenant(session, name=DEMO_TENANT)
        return issue_api_key(session, tenant=tenant)


def run_demo(settings: Settings, *, n_prompts: int, seed: int, timeout: float, log_dir: str) -> int:
    """Run the demo; returns a process exit code (0 when every job succeeded)."""
    from db.migrate import upgrade

    check_redis(settings.broker_url)
    upgrade(settings.database_url)
    # The demo keeps its own budget window, started empty, so earlier runs do not skew its routing.
    RedisBudgetStore(
        redis.Redis.from_url(settings.state_redis_url), window=settings.budget_window, name=DEMO_BUDGET
    ).reset()
    key = demo_key(settings)
    prompts = sample_prompts(n_prompts, seed=seed)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "ROUTET2I_BUDGET_NAME": DEMO_BUDGET,
        # two model workers share the CPU: one thread each instead of both spinning on every core
        "ROUTET2I_TORCH_THREADS": os.environ.get("ROUTET2I_TORCH_THREADS", "1"),
        "OMP_NUM_THREADS": "1",
    }
    print(f"starting API and workers (logs in {log_dir}/)", file=sys.stderr)
    stack = start_stack(env, log_dir=Path(log_dir))
    try:
        with httpx.Client(timeout=30.0, headers={"Authorization": f"Bearer {key}"}) as http:
            stack.wait_ready()
            started = time.monotonic()
            jobs = run_jobs(stack, http, prompts, timeout=timeout)
            elapsed = time.monotonic() - started
            stats = http.get(f"{stack.api_url}/v1/stats").json()
    finally:
        print("stopping API and workers", file=sys.stderr)
        stack.stop()
    print(summarize(jobs, stats, settings))
    print(f"  wall time:       {elapsed:.1f}s for {len(jobs)} jobs")
    return 0 if all(j["status"] == "succeeded" for j in jobs) else 1
