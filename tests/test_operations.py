"""Operating the stack: queues per queue with several workers, JSON logs carrying the job id, Flower, the CLI.

These tests run their own broker (a private ``redis-server`` on a free port) so that the workers they start
are the only consumers: the session's shared workers never take their messages. The database is the
session's PostgreSQL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib

from core.settings import Settings
from db.jobs import create_job
from db.models import JobStatus
from db.tenants import create_tenant
from tests.conftest import create_tenant_key, make_settings
from tests.servers import ApiServer, Process, cli_env, wait_http
from tests.support import PrivateRedis, WorkerPool, free_port, wait_until
from worker.transport import create_celery, queue_depths, queue_status, redis_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUTE_NODE = "route-ops@test"
EDGE_NODES = ("edge-a@test", "edge-b@test")


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("private-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ops_settings(pg_url: str, private_redis: PrivateRedis, tmp_path_factory, model_cache: Path) -> Settings:
    # A zero cloud budget sends every job to the edge, the only tier these workers serve.
    return make_settings(
        database_url=pg_url,
        broker_url=private_redis.url,
        image_dir=tmp_path_factory.mktemp("ops-images"),
        cache_dir=model_cache,
        log_json=True,
        cloud_budget=0.0,
        budget_name="ops-test",
    )


@pytest.fixture(scope="module")
def ops_key(ops_settings: Settings) -> str:
    """An admin API key (the API requires keys, as in production)."""
    return create_tenant_key(ops_settings, is_admin=True)


@pytest.fixture(scope="module")
def ops_pool(ops_settings: Settings, tmp_path_factory) -> Iterator[WorkerPool]:
    """One route worker and two edge workers (two nodes on one queue), no cloud worker."""
    pool = WorkerPool(ops_settings, log_dir=tmp_path_factory.mktemp("ops-worker-logs"))
    pool.start("route", name=ROUTE_NODE)
    for node in EDGE_NODES:
        pool.start("edge", name=node)
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="module")
def ops_api(ops_settings: Settings, ops_pool: WorkerPool, tmp_path_factory) -> Iterator[ApiServer]:
    server = ApiServer(ops_settings, log_path=tmp_path_factory.mktemp("ops-api") / "api.log")
    yield server
    server.stop()


def routet2i(
    settings: Settings, *args: str, key: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``routet2i`` CLI in a child process configured by ``settings`` (with an API key if given)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        env=cli_env(settings, **({"ROUTET2I_API_KEY": key} if key else {})),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_job(api: ApiServer, key: str, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = httpx.get(f"{api.url}/v1/jobs/{job_id}", headers=bearer(key), timeout=10).json()
        return job if job["status"] in ("succeeded", "failed") else None

    return wait_until(done, timeout=timeout, what=f"job {job_id}")  # type: ignore[no-any-return]


# --- routet2i queues -----------------------------------------------------------------------------


def test_queues_lists_each_queue_with_the_workers_consuming_it(ops_settings: Settings, ops_pool: WorkerPool) -> None:
    result = routet2i(ops_settings, "queues", "--json")
    assert result.returncode == 0, result.stderr
    queues = {q["name"]: q for q in json.loads(result.stdout)["queues"]}
    assert list(queues) == ["route", "edge", "cloud"]
    assert queues["route"]["workers"] == [ROUTE_NODE]
    assert queues["edge"]["workers"] == sorted(EDGE_NODES)
    assert queues["cloud"]["workers"] == []

    text = routet2i(ops_settings, "queues")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["queue", "depth", "waiting", "oldest", "workers"]
    edge_line = next(line for line in lines if line.startswith("edge"))
    assert all(node in edge_line for node in EDGE_NODES)
    assert "(none answered)" in next(line for line in lines if line.startswith("cloud"))


def test_depth_counts_every_priority_list_as_kombu_does(ops_settings: Settings, ops_pool: WorkerPool) -> None:
    app = create_celery(ops_settings)
    client = redis_lib.Redis.from_url(ops_settings.broker_url)
    try:
        # Nobody consumes `cloud` here: the messages stay. Two of them go to a priority sub-list.
        for _ in range(3):
            app.send_task("cloud.generate", args=[str(uuid.uuid4())], queue="cloud")
        for _ in range(2):
            app.send_task("cloud.generate", args=[str(uuid.uuid4())], queue="cloud", priority=6)

        assert queue_depths(app, client)["cloud"] == 5
        assert client.llen("cloud") == 3  # the plain list KEDA's redis scaler reads
        with app.connection_for_write() as connection:
            _, kombu_count, _ = connection.default_channel.queue_declare(queue="cloud", passive=True)
        assert kombu_count == 5

        cli = json.loads(routet2i(ops_settings, "queues", "--json").stdout)
        assert {q["name"]: q["depth"] for q in cli["queues"]}["cloud"] == 5
    finally:
        client.delete(*redis_keys("cloud", app.conf.broker_transport_options))
        client.close()
        app.close()


def test_oldest_waiting_job_comes_from_the_database(db_session, ops_settings: Settings) -> None:
    long_ago = datetime(2001, 1, 1, tzinfo=UTC)
    tenant = create_tenant(db_session, name=f"backlog-{uuid.uuid4().hex[:8]}")
    db_session.flush()
    route_job = create_job(db_session, tenant_id=tenant.id, prompt="waiting to be routed", seed=1)
    route_job.created_at = long_ago
    edge_job = create_job(db_session, tenant_id=tenant.id, prompt="routed, waiting for an edge worker", seed=2)
    edge_job.created_at = long_ago
    edge_job.tier = "edge"
    edge_job.routed_at = long_ago + timedelta(minutes=30)
    db_session.flush()

    app = create_celery(ops_settings)
    client = redis_lib.Redis.from_url(ops_settings.broker_url)
    try:
        now = long_ago + timedelta(hours=1)
        statuses = {s.name: s for s in queue_status(app, client, db_session, now=now, timeout=None)}
    finally:
        client.close()
        app.close()
    assert statuses["route"].oldest_job_id == str(route_job.id)
    assert statuses["route"].oldest_age_s == pytest.approx(3600.0)
    assert statuses["edge"].oldest_job_id == str(edge_job.id)
    assert statuses["edge"].oldest_age_s == pytest.approx(1800.0)  # since routing, not submission
    assert statuses["route"].waiting_jobs >= 1 and statuses["edge"].waiting_jobs >= 1
    assert route_job.status == JobStatus.QUEUED


# --- logs ----------------------------------------------------------------------------------------


def test_api_and_worker_logs_are_json_lines_with_the_job_id(
    ops_api: ApiServer, ops_pool: WorkerPool, ops_key: str
) -> None:
    response = httpx.post(
        f"{ops_api.url}/v1/jobs", json={"prompt": "a lighthouse in fog", "seed": 3}, headers=bearer(ops_key), timeout=10
    )
    assert response.status_code == 202
    job_id = response.json()["id"]
    job = wait_job(ops_api, ops_key, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["tier"] == "edge"

    def api_record() -> dict[str, Any] | None:
        return next(
            (r for r in json_lines(ops_api.log()) if r.get("path") == "/v1/jobs" and r.get("method") == "POST"), None
        )

    submitted = wait_until(api_record, timeout=10, what="the API's access log record")
    assert submitted["status"] == 202 and submitted["job_id"] == job_id
    assert isinstance(submitted["duration_ms"], float) and submitted["duration_ms"] > 0
    assert submitted["logger"] == "routet2i.api.access" and submitted["level"] == "info"
    polled = [r for r in json_lines(ops_api.log()) if r.get("path") == f"/v1/jobs/{job_id}"]
    assert polled and all(r["job_id"] == job_id and r["status"] == 200 for r in polled)

    route_log = json_lines(ops_pool.log(ROUTE_NODE))
    route_records = [r for r in route_log if r.get("job_id") == job_id]
    assert any(r["msg"] == "routed" and r["tier"] == "edge" for r in route_records), route_records
    assert {r.get("task") for r in route_records} == {"router.route"}
    # Each batch the worker ran ends with a record of its size and run time, tagged with its task.
    finished = [r for r in route_log if r["msg"] == "batch finished"]
    assert finished and all(r["task"] == "router.route" and r["jobs"] >= 1 and r["runtime_s"] > 0 for r in finished)

    edge_records = [r for node in EDGE_NODES for r in json_lines(ops_pool.log(node)) if r.get("job_id") == job_id]
    assert any(r["msg"] == "generated" for r in edge_records), edge_records
    assert {r.get("task") for r in edge_records} == {"edge.generate"}


# --- Flower ----------------------------------------------------------------------------------------


def test_flower_runs_on_the_app_and_sees_its_workers(ops_settings: Settings, ops_pool: WorkerPool, tmp_path) -> None:
    port = free_port()
    flower = Process(
        [sys.executable, "-m", "cli", "flower", "--port", str(port)],
        env=cli_env(ops_settings),
        log_path=tmp_path / "flower.log",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthcheck", flower)
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "Flower" in page.text

        def online() -> set[str] | None:
            metrics = httpx.get(f"{base}/metrics", timeout=10).text
            nodes = {n for n in (ROUTE_NODE, *EDGE_NODES) if f'flower_worker_online{{worker="{n}"}} 1.0' in metrics}
            return nodes if len(nodes) == 3 else None

        assert wait_until(online, timeout=60, interval=1.0, what="Flower to see the workers") == {
            ROUTE_NODE,
            *EDGE_NODES,
        }
        workers_page = httpx.get(f"{base}/workers", timeout=10).text
        assert all(node in workers_page for node in (ROUTE_NODE, *EDGE_NODES))
    finally:
        flower.stop()


# --- routet2i submit --file, stats, db current ------------------------------------------------------------


def test_submit_file_submits_each_prompt_and_reports_rejected_lines(
    ops_settings: Settings, ops_api: ApiServer, ops_key: str, tmp_path: Path
) -> None:
    too_long = "x" * (ops_settings.max_prompt_chars + 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"# a batch of prompts\na red bicycle\n\n   \ntwo cats on a sofa\n{too_long}\n# the end\na lighthouse at night"
    )
    result = routet2i(
        ops_settings, "submit", "--file", str(prompts), "--wait", "--json", "--api", ops_api.url, key=ops_key
    )
    assert result.returncode == 1, result.stderr  # one line was refused
    report = json.loads(result.stdout)
    assert [j["line"] for j in report["jobs"]] == [2, 5, 8]
    assert [j["prompt"] for j in report["jobs"]] == ["a red bicycle", "two cats on a sofa", "a lighthouse at night"]
    assert all(j["status"] == "succeeded" for j in report["jobs"])
    assert report["rejected"] == [
        {"line": 6, "prompt": too_long, "error": report["rejected"][0]["error"]},
    ]
    assert "prompt" in report["rejected"][0]["error"]
    summary = report["summary"]
    assert summary["submitted"] == 3 and summary["rejected"] == 1
    assert summary["by_status"] == {"succeeded": 3} and summary["by_tier"] == {"edge": 3}
    assert summary["spend_usd"] == pytest.approx(3 * ops_settings.edge.price_per_image)


def test_submit_file_is_idempotent_with_a_key_and_prints_a_summary(
    ops_settings: Settings, ops_api: ApiServer, ops_key: str, tmp_path: Path
) -> None:
    prompts = tmp_path / "batch.txt"
    prompts.write_text("a blue whale\na green apple\n")
    key = f"batch-{uuid.uuid4().hex[:8]}"
    args = ["submit", "--file", str(prompts), "--idempotency-key", key, "--api", ops_api.url]
    first = routet2i(ops_settings, *args, "--json", key=ops_key)
    second = routet2i(ops_settings, *args, "--json", key=ops_key)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    first_ids = [j["id"] for j in json.loads(first.stdout)["jobs"]]
    assert first_ids == [j["id"] for j in json.loads(second.stdout)["jobs"]]
    assert len(set(first_ids)) == 2

    text = routet2i(ops_settings, *args, "--wait", key=ops_key)
    assert text.returncode == 0, text.stderr
    assert "submitted 2 jobs, 0 rejected" in text.stdout
    assert "status: 2 succeeded" in text.stdout


def test_submit_refuses_prompt_and_file_together_and_empty_files(
    ops_settings: Settings, ops_api: ApiServer, ops_key: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    both = routet2i(ops_settings, "submit", "a cat", "--file", str(empty), "--api", ops_api.url, key=ops_key)
    assert both.returncode == 2 and "either PROMPT or --file" in both.stderr
    neither = routet2i(ops_settings, "submit", "--api", ops_api.url, key=ops_key)
    assert neither.returncode == 2 and "either PROMPT or --file" in neither.stderr
    nothing = routet2i(ops_settings, "submit", "--file", str(empty), "--api", ops_api.url, key=ops_key)
    assert nothing.returncode == 2 and "--file" in nothing.stderr and "no prompts" in nothing.stderr
    single = routet2i(ops_settings, "submit", "a single prompt", "--wait", "--json", "--api", ops_api.url, key=ops_key)
    assert single.returncode == 0, single.stderr
    assert json.loads(single.stdout)["status"] == "succeeded"


def test_read_commands_print_json(ops_settings: Settings, ops_api: ApiServer, ops_key: str) -> None:
    # A tenant of its own whose one job has finished: its figures cannot move between the CLI's call and the
    # API's (an admin's figures would count the jobs other tests still have in flight).
    tenant_key = create_tenant_key(ops_settings)
    finished = httpx.post(
        f"{ops_api.url}/v1/jobs", json={"prompt": "a paper boat"}, headers=bearer(tenant_key), timeout=10
    ).json()["id"]
    assert wait_job(ops_api, tenant_key, finished)["status"] == "succeeded"
    stats = routet2i(ops_settings, "stats", "--json", "--api", ops_api.url, key=tenant_key)
    assert stats.returncode == 0, stats.stderr
    printed = json.loads(stats.stdout)["jobs"]
    assert printed["total"] == 1 and printed["by_status"]["succeeded"] == 1
    assert printed == httpx.get(f"{ops_api.url}/v1/stats", headers=bearer(tenant_key), timeout=10).json()["jobs"]
    text = routet2i(ops_settings, "stats", "--api", ops_api.url, key=ops_key)
    assert text.returncode == 0 and "against a budget of 0.0%" in text.stdout

    current = routet2i(ops_settings, "db", "current", "--json")
    assert current.returncode == 0, current.stderr
    revisions = json.loads(current.stdout)
    assert revisions["current"] == revisions["head"] and revisions["up_to_date"] is True

    job_id = httpx.post(
        f"{ops_api.url}/v1/jobs", json={"prompt": "a kite"}, headers=bearer(ops_key), timeout=10
    ).json()["id"]
    status = routet2i(ops_settings, "status", job_id, "--json", "--api", ops_api.url, key=ops_key)
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job_id
    assert wait_job(ops_api, ops_key, job_id)["status"] == "succeeded"
