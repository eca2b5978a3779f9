"""The ``http`` generation backend against a real HTTP server, through real workers.

The server answers like a hosted image API: a PNG, a JSON ``b64_json``, a transient 503, or a 400 refusal.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from flask import Flask, Response, jsonify, request
from PIL import Image
from werkzeug.serving import make_server

from api.app import create_app
from core.settings import Settings
from tests.conftest import authorize, create_tenant_key, make_settings
from tests.support import WorkerPool, wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


class ImageApi:
    """A stand-in for a hosted image API, served by a real HTTP server on a free port."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.busy = True
        app = Flask("image-api")

        @app.post("/generate")
        def generate() -> Response:
            body = request.get_json()
            prompt = body["prompt"]
            self.calls[prompt] += 1
            self.auth.append(request.headers.get("Authorization"))
            if "refuse" in prompt:
                return Response("content policy violation", status=400)
            if "flaky" in prompt and self.calls[prompt] < 3:
                return Response("overloaded", status=503)
            if "busy" in prompt and self.busy:
                return Response("overloaded", status=503)
            if "json" in prompt:
                return jsonify({"b64_json": base64.b64encode(png((0, 0, 255), body["width"])).decode()})
            return Response(png((255, 0, 0), body["width"]), mimetype="image/png")

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/generate"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def image_api() -> Iterator[ImageApi]:
    api = ImageApi()
    yield api
    api.close()


@pytest.fixture(scope="module")
def http_settings(pg_url: str, redis_url: str, image_api: ImageApi, tmp_path_factory, model_cache) -> Settings:
    tier = {
        "backend": "http",
        "url": image_api.url,
        "api_key": "secret-key",
        "model": "hosted-model",
        "steps": 2,
        "width": 64,
        "height": 64,
        "max_retries": 3,
        "timeout_s": 10,
        "fallback": "none",  # both tiers call the same API: a job it fails here stays failed
    }
    return make_settings(
        database_url=pg_url,
        broker_url=redis_url,
        image_dir=tmp_path_factory.mktemp("http-images"),
        cache_dir=model_cache,
        edge={**tier, "price_per_image": 0.01},
        cloud={**tier, "price_per_image": 0.05},
    )


@pytest.fixture(scope="module")
def http_workers(http_settings: Settings, stack: WorkerPool, tmp_path_factory) -> Iterator[WorkerPool]:
    # The session's workers use the offline models; these use the HTTP API. Stop those so these get the jobs.
    stack.stop_all()
    pool = WorkerPool(http_settings, log_dir=tmp_path_factory.mktemp("http-worker-logs"))
    pool.start_all()
    yield pool
    pool.stop_all()
    stack.start_all()


@pytest.fixture(scope="module")
def client(http_settings: Settings, http_workers: WorkerPool):
    with create_app(http_settings).test_client() as test_client:
        yield authorize(test_client, create_tenant_key(http_settings))


def test_png_answer_is_stored_and_billed(client, image_api: ImageApi) -> None:
    job = wait_for_job(client, client.post("/v1/jobs", json={"prompt": "a red square"}).get_json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["backend"] == "http" and job["result"]["model_id"] == "hosted-model"
    assert job["result"]["cost_usd"] in (0.01, 0.05)
    image = client.get(job["result"]["image_url"])
    with Image.open(io.BytesIO(image.data)) as decoded:
        assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert "Bearer secret-key" in image_api.auth


def test_b64_json_answer_is_decoded(client) -> None:
    job = wait_for_job(client, client.post("/v1/jobs", json={"prompt": "json blue square"}).get_json()["id"])
    assert job["status"] == "succeeded", job["error"]
    with Image.open(io.BytesIO(client.get(job["result"]["image_url"]).data)) as decoded:
        assert decoded.getpixel((0, 0)) == (0, 0, 255)


def test_transient_errors_are_retried_until_success(client, image_api: ImageApi) -> None:
    job = wait_for_job(client, client.post("/v1/jobs", json={"prompt": "flaky green square"}).get_json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert image_api.calls["flaky green square"] == 3
    assert job["attempts"] == 3


def test_refusal_fails_the_job_with_the_reason(client, image_api: ImageApi) -> None:
    job = wait_for_job(client, client.post("/v1/jobs", json={"prompt": "please refuse this"}).get_json()["id"])
    assert job["status"] == "failed"
    assert "400" in job["error"] and "content policy violation" in job["error"]
    assert job["result"] is None
    assert image_api.calls["please refuse this"] == 1
    assert client.get(f"/v1/jobs/{job['id']}/image").status_code == 409


def test_exhausted_retries_dead_letter_the_job_and_replay_revives_it(
    client, image_api: ImageApi, http_settings
) -> None:
    import os
    import subprocess
    import sys

    job = wait_for_job(client, client.post("/v1/jobs", json={"prompt": "busy painter"}).get_json()["id"], timeout=120)
    assert job["status"] == "failed" and job["dead_lettered"]
    assert "503" in job["error"] and job["error"].startswith("dead-lettered")
    assert image_api.calls["busy painter"] == 1 + http_settings.edge.max_retries
    assert job["id"] in {j["id"] for j in client.get("/v1/jobs?dead_lettered=true").get_json()["items"]}

    image_api.busy = False
    replay = subprocess.run(
        [sys.executable, "-m", "cli", "dlq", "replay", job["id"]],
        env={**os.environ, **http_settings.to_env()},
        capture_output=True,
        text=True,
    )
    assert replay.returncode == 0, replay.stderr
    revived = wait_for_job(client, job["id"])
    assert revived["status"] == "succeeded" and not revived["dead_lettered"] and revived["error"] is None


def test_each_job_of_a_batch_gets_its_own_outcome(http_settings, http_workers: WorkerPool, image_api: ImageApi) -> None:
    from tests.support import wait_until

    forced = authorize(
        create_app(http_settings).test_client(), create_tenant_key(http_settings, forced_tiers=("edge",))
    )
    for node in [n for n in http_workers.processes if n.startswith(("route-", "edge-"))]:
        http_workers.stop(node)
    prompts = ["batch: a plain kite", "batch: a flaky kite", "batch: refuse this kite", "batch: json kite"]
    response = forced.post("/v1/jobs/batch", json={"jobs": [{"prompt": p, "tier": "edge"} for p in prompts]})
    ids = [item["id"] for item in response.get_json()["items"]]
    # Submitted together, the four are routed as one batch and reach the edge queue as one message, which the
    # edge worker runs as one batch.
    http_workers.wait_ready([http_workers.start("route")])
    wait_until(lambda: all(forced.get(f"/v1/jobs/{i}").get_json()["decision"] for i in ids), timeout=60, what="routing")
    http_workers.wait_ready([http_workers.start("edge")])
    jobs = [wait_for_job(forced, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert "content policy violation" in jobs[2]["error"]
    assert jobs[1]["attempts"] == 3 and image_api.calls["batch: a flaky kite"] == 3
    assert [j["attempts"] for j in (jobs[0], jobs[2], jobs[3])] == [1, 1, 1]
    assert [j["decision"]["inputs"]["batch"] for j in jobs] == [4, 4, 4, 4]
    first_attempts = [next(e for e in j["events"] if e["status"] == "generating") for j in jobs]
    assert [e["detail"]["batch"] for e in first_attempts] == [4, 4, 4, 4]
