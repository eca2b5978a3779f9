"""``routet2i submit``, ``status``, ``cancel``, ``deliveries`` and ``stats``: use the API from a terminal."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

import click
import httpx
from tqdm import tqdm

from cli.commands.common import echo_json, load_settings

TERMINAL = ("succeeded", "failed", "cancelled", "expired")


class ApiClientError(click.ClickException):
    """The API refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"API answered {status}: {message}")
        self.status = status
        self.reason = message


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
            raise ApiClientError(response.status_code, message)
        return response.json()

    def submit(self, body: dict[str, Any]) -> Any:
        return self._check(self.http.post("/v1/jobs", json=body))

    def job(self, job_id: str) -> Any:
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Any:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel"))

    def deliveries(self, job_id: str) -> Any:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/deliveries"))

    def stats(self) -> Any:
        return self._check(self.http.get("/v1/stats"))

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


@dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompts file and the line it came from (for error messages)."""

    line: int
    prompt: str


def read_prompts(handle: TextIO) -> list[PromptLine]:
    """Prompts of a file, one per line; blank lines and lines starting with ``#`` are skipped."""
    prompts = []
    for number, raw in enumerate(handle, start=1):
        text = raw.strip()
        if text and not text.startswith("#"):
            prompts.append(PromptLine(number, text))
    return prompts


def _submit_one(api: ApiClient, prompt: str, options: dict[str, Any], key: str | None) -> Any:
    body = {"prompt": prompt, **options, "idempotency_key": key}
    return api.submit({k: v for k, v in body.items() if v is not None})


def wait_all(api: ApiClient, ids: list[str], *, timeout: float, interval: float = 0.25) -> dict[str, Any]:
    """Poll every job until all are terminal; a progress bar counts the finished ones."""
    done: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    with tqdm(total=len(ids), desc="finished", unit="job", disable=None, leave=False) as bar:
        while len(done) < len(ids):
            for job_id in ids:
                if job_id in done:
                    continue
                job = api.job(job_id)
                if job["status"] in TERMINAL:
                    done[job_id] = job
                    bar.update(1)
            if len(done) < len(ids):
                if time.monotonic() > deadline:
                    raise click.ClickException(f"{len(ids) - len(done)} jobs still running after {timeout:.0f}s")
                time.sleep(interval)
    return done


def summarize(jobs: list[dict[str, Any]], rejected: int) -> dict[str, Any]:
    """Counts by status and tier, spend and latency of a batch of jobs."""
    by_status = Counter(j["status"] for j in jobs)
    by_tier = Counter(j["tier"] for j in jobs if j.get("tier"))
    spend = sum((j.get("result") or {}).get("cost_usd") or 0.0 for j in jobs)
    totals = sorted(j["timings"]["total_s"] for j in jobs if j.get("timings", {}).get("total_s") is not None)
    return {
        "submitted": len(jobs),
        "rejected": rejected,
        "by_status": dict(sorted(by_status.items())),
        "by_tier": dict(sorted(by_tier.items())),
        "spend_usd": round(spend, 6),
        "total_s_median": totals[len(totals) // 2] if totals else None,
        "total_s_max": totals[-1] if totals else None,
    }


def describe_summary(summary: dict[str, Any]) -> str:
    statuses = ", ".join(f"{n} {s}" for s, n in summary["by_status"].items()) or "none"
    tiers = ", ".join(f"{n} {t}" for t, n in summary["by_tier"].items()) or "none routed yet"
    lines = [
        f"submitted {summary['submitted']} jobs, {summary['rejected']} rejected",
        f"  status: {statuses}",
        f"  tiers: {tiers}",
        f"  spend: ${summary['spend_usd']:.4f}",
    ]
    if summary["total_s_median"] is not None:
        lines.append(f"  total time: median {summary['total_s_median']:.2f}s, max {summary['total_s_max']:.2f}s")
    return "\n".join(lines)


def submit_file(
    api: ApiClient,
    handle: TextIO,
    options: dict[str, Any],
    *,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Submit every prompt of ``handle``; report rejected lines by number; exit 1 if any was refused or failed."""
    prompts = read_prompts(handle)
    if not prompts:
        raise click.BadParameter("no prompts in the file (blank lines and # comments are skipped)", param_hint="--file")
    accepted: list[tuple[PromptLine, str]] = []
    rejected: list[dict[str, Any]] = []
    for item in tqdm(prompts, desc="submitting", unit="job", disable=None, leave=False):
        key = f"{idempotency_key}-{item.line}" if idempotency_key else None
        try:
            accepted.append((item, _submit_one(api, item.prompt, options, key)["id"]))
        except ApiClientError as exc:
            if exc.status >= 500:
                raise click.ClickException(
                    f"stopped at line {item.line} after {len(accepted)} submitted jobs: {exc.message}"
                ) from exc
            rejected.append({"line": item.line, "prompt": item.prompt, "error": exc.reason})
    ids = [job_id for _, job_id in accepted]
    finished = wait_all(api, ids, timeout=timeout) if wait else {}
    jobs = [finished.get(job_id) or api.job(job_id) for job_id in ids]
    summary = summarize(jobs, len(rejected))
    if as_json:
        lines = [{"line": item.line, **job} for (item, _), job in zip(accepted, jobs, strict=True)]
        echo_json({"summary": summary, "jobs": lines, "rejected": rejected})
    else:
        for entry in rejected:
            click.echo(f"line {entry['line']}: rejected: {entry['error']}", err=True)
        for (item, _), job in zip(accepted, jobs, strict=True):
            if job["status"] == "failed":
                click.echo(f"line {item.line}: job {job['id']} failed: {job['error']}", err=True)
        click.echo(describe_summary(summary))
    if rejected or (wait and summary["by_status"].get("failed")):
        raise SystemExit(1)


def _show(job: dict[str, Any], as_json: bool) -> None:
    """Print one job as JSON or as the human-readable summary."""
    if as_json:
        echo_json(job)
    else:
        click.echo(describe(job))


@click.command()
@click.argument("prompt", required=False)
@click.option(
    "--file",
    "prompts_file",
    type=click.File("r", encoding="utf-8"),
    default=None,
    help="Submit every line of this file as a job ('-' reads standard input; blank lines and # comments skipped).",
)
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the job (of every job with --file).")
@click.option("--steps", type=click.IntRange(1), default=None)
@click.option("--width", type=click.IntRange(1), default=None)
@click.option("--height", type=click.IntRange(1), default=None)
@click.option(
    "--idempotency-key",
    default=None,
    help="Resubmitting with the same key returns the same job (with --file: KEY-LINE per line).",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds after which a job that has not ended ends expired (never generated after).",
)
@click.option(
    "--webhook", default=None, help="URL each job's terminal state is posted to (a host the tenant may call)."
)
@click.option("--wait", is_flag=True, help="Wait until the jobs end.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(0), help="Seconds --wait waits.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the job (with --file: summary, jobs, rejected lines) as JSON."
)
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def submit(
    prompt: str | None,
    prompts_file: TextIO | None,
    seed: int | None,
    steps: int | None,
    width: int | None,
    height: int | None,
    idempotency_key: str | None,
    deadline: float | None,
    webhook: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
    api_url: str | None,
) -> None:
    """Submit PROMPT as a job, or every prompt of --file with a progress bar and a summary."""
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give either PROMPT or --file, not both and not neither")
    api = client(api_url)
    options = {
        "seed": seed,
        "steps": steps,
        "width": width,
        "height": height,
        "deadline_s": deadline,
        "webhook_url": webhook,
    }
    if prompts_file is not None:
        submit_file(
            api, prompts_file, options, idempotency_key=idempotency_key, wait=wait, timeout=timeout, as_json=as_json
        )
        return
    assert prompt is not None
    accepted = _submit_one(api, prompt, options, idempotency_key)
    job = api.wait(accepted["id"], timeout=timeout) if wait else api.job(accepted["id"])
    _show(job, as_json)
    if wait and job["status"] == "failed":
        raise SystemExit(1)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def status(job_id: str, as_json: bool, api_url: str | None) -> None:
    """Show a job's status, decision and result."""
    job = client(api_url).job(job_id)
    _show(job, as_json)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def cancel(job_id: str, as_json: bool, api_url: str | None) -> None:
    """Cancel a job that has not ended (a generating job's image is discarded when it is done)."""
    job = client(api_url).cancel(job_id)
    _show(job, as_json)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the deliveries as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def deliveries(job_id: str, as_json: bool, api_url: str | None) -> None:
    """List a job's webhook deliveries with every attempt."""
    items = client(api_url).deliveries(job_id)["items"]
    if as_json:
        echo_json(items)
        return
    for item in items:
        click.echo(f"{item['event']:<10} {item['state']:<9} {item['attempts']} attempt(s)  {item['url']}")
        for attempt in item["attempt_log"]:
            answer = attempt["status_code"] if attempt["status_code"] is not None else attempt["error"]
            click.echo(f"  #{attempt['attempt']} {attempt['at']}  {answer}  {attempt['duration_ms']:.0f} ms")
    if not items:
        click.echo("no webhook deliveries", err=True)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--api", "api_url", default=None, help="API base URL (default: ROUTET2I_API_URL).")
def stats(as_json: bool, api_url: str | None) -> None:
    """Show job counts, the cloud share against the budget, spend and latency."""
    data = client(api_url).stats()
    if as_json:
        echo_json(data)
        return
    routed, budget = data["routed"], data["budget"]
    latency = data["latency_s"]
    click.echo(f"jobs: {data['jobs']['total']}  " + " ".join(f"{k}={v}" for k, v in data["jobs"]["by_status"].items()))
    click.echo(
        f"routed: {routed['total']} (edge {routed['by_tier']['edge']}, cloud {routed['by_tier']['cloud']}); "
        f"cloud share {routed['cloud_fraction']:.1%} against a budget of {budget['cloud_fraction']:.1%}"
    )
    click.echo(f"spend: ${data['spend_usd']['total']:.4f}  GPU-seconds: {data['gpu_seconds']['total']:.1f}")
    if budget.get("spend_limit_usd") is not None:
        spent = budget.get("spent_this_period_usd")
        click.echo(
            f"cloud spend this period: {'unknown' if spent is None else f'${spent:.4f}'} "
            f"of a ${budget['spend_limit_usd']:.4f} limit per {budget['spend_period_s']} s"
        )
    if latency["count"]:
        click.echo(f"latency over {latency['count']} jobs: p50 {latency['p50']:.2f}s  p90 {latency['p90']:.2f}s")
