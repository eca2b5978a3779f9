"""``routet2i submit`` and ``routet2i status``: use the API from a terminal."""

from __future__ import annotations

import time
from typing import Any

import click
import httpx

from routet2i.cli.common import echo_json, load_settings

TERMINAL = ("succeeded", "failed")


class ApiClient:
    """A small client of the RouteT2I HTTP API."""

    def __init__(self, base_url: str, *, key: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = error["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise click.ClickException(f"API answered {response.status_code}: {message}")
        return response.json()

    def submit(self, body: dict[str, Any]) -> Any:
        return self._check(self.http.post("/v1/jobs", json=body))

    def job(self, job_id: str) -> Any:
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, *, timeout: float, interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise click.ClickException(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            time.sleep(interval)


def client(api_url: str | None) -> ApiClient:
    settings = load_settings()
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    return ApiClient(api_url or settings.api_url, key=key)


def describe(job: dict[str, Any]) -> str:
    lines = [f"job {job['id']}: {job['status']}" + (f" on {job['tier']}" if job.get("tier") else "")]
    if job.get("decision"):
        d = job["decision"]
        lines.append(f"  decision: {d['tier']} by {d['router']} ({d['reason']})")
    if job.get("result"):
        r = job["result"]
        lines.append(f"  image: {r['image_url']}  cost ${r['cost_usd']:.4f}  generated in {r['wall_s']:.2f}s")
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    if job.get("timings", {}).get("total_s") is not None:
        lines.append(f"  total: {job['timings']['total_s']:.2f}s")
    return "\n".join(lines)


@click.command()
@click.argument("prompt")
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--steps", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--height", type=click.IntRange(1), default=None)
@click.option("--idempotency-key", default=None)
@click.option("--wait", is_flag=True, help="Wait until the job succeeds or fails.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(0), help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def submit(
    prompt: str,
    seed: int | None,
    steps: int | None,
    width: int | None,
    height: int | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
    api_url: str | None,
) -> None:
    """Submit PROMPT as a job."""
    api = client(api_url)
    body = {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "width": width,
        "height": height,
        "idempotency_key": idempotency_key,
    }
    accepted = api.submit({k: v for k, v in body.items() if v is not None})
    job = api.wait(accepted["id"], timeout=timeout) if wait else api.job(accepted["id"])
    if as_json:
        echo_json(job)
    else:
        click.echo(describe(job))
    if wait and job["status"] == "failed":
        raise SystemExit(1)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def status(job_id: str, as_json: bool, api_url: str | None) -> None:
    """Show a job's status, decision and result."""
    job = client(api_url).job(job_id)
    if as_json:
        echo_json(job)
    else:
        click.echo(describe(job))
