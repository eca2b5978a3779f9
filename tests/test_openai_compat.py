"""The OpenAI Images API surface, driven by the official ``openai`` client against a real HTTP server,
and the ``openai`` cloud backend pointed at a second RouteT2I instance."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select, text
from werkzeug.serving import make_server

from api.app import create_app
from core.settings import Settings
from db.migrate import upgrade
from db.models import Job
from db.session import make_engine, make_session_factory
from db.tenants import tenant_for_key
from tests.conftest import create_tenant_key, make_settings
from tests.servers import ApiServer
from tests.support import PrivateRedis, WorkerPool, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The API for ``settings`` on a real HTTP server in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="module")
def base_url(pg_settings: Settings, stack: WorkerPool) -> Iterator[str]:
    with serve(pg_settings.model_copy(update={"images_wait_s": 120.0})) as url:
        yield url


@pytest.fixture(scope="module")
def key(pg_settings: Settings) -> str:
    return create_tenant_key(pg_settings, forced_tiers=("edge",), rate_limit_per_minute=0)


@pytest.fixture()
def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=180)


def test_b64_json_images_with_job_and_tier_headers(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a red lighthouse on a cliff", response_format="b64_json", size="64x64", n=2
    )
    result = raw.parse()
    assert len(result.data) == 2 and result.created > 0
    for item in result.data:
        assert decode(base64.b64decode(item.b64_json)).size == (64, 64)
    jobs = raw.headers["X-RouteT2I-Job"].split(",")
    tiers = raw.headers["X-RouteT2I-Tier"].split(",")
    assert len(set(jobs)) == 2 and set(tiers) <= {"edge", "cloud"}


def test_url_images_are_signed_and_expire(client: openai.OpenAI, base_url: str, key: str) -> None:
    raw = client.images.with_raw_response.generate(prompt="a blue boat", response_format="url", size="64x64")
    url = raw.parse().data[0].url
    assert url.startswith(base_url)
    fetched = httpx.get(url)  # no API key: the signature is the credential
    assert fetched.status_code == 200 and decode(fetched.content).size == (64, 64)
    tampered = httpx.get(url.replace("sig=", "sig=0"))
    assert tampered.status_code == 403 and tampered.json()["error"]["param"] == "sig"

    job_id = raw.headers["X-RouteT2I-Job"]
    job = httpx.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert job["status"] == "succeeded" and job["decision"]["router"]  # the same pipeline, audited the same way


def test_forced_edge_model_and_permission(client: openai.OpenAI, base_url: str, pg_settings: Settings) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a cat", model="edge", response_format="b64_json", size="64x64"
    )
    assert raw.headers["X-RouteT2I-Tier"] == "edge"
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.images.generate(prompt="a cat", model="cloud", size="64x64")
    assert info.value.status_code == 403 and info.value.param == "tier"


@pytest.mark.parametrize(
    ("arguments", "param", "fragment"),
    [
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "at least 1 character"),
        ({"prompt": "a cat", "size": "100x100"}, "size", "not a supported size"),
        ({"prompt": "a cat", "size": "big"}, "size", "Invalid value for 'size'"),
        ({"prompt": "a cat", "model": "dall-e-3"}, "model", "must be one of routet2i, edge, cloud"),
        ({"prompt": "a cat", "n": 11}, "n", "Invalid value for 'n'"),
        ({"prompt": "a cat", "response_format": "png"}, "response_format", "Invalid value"),
        ({"prompt": "a cat", "extra_body": {"colour": "red"}}, "colour", "Unrecognized request argument"),
    ],
)
def test_bad_requests_raise_the_clients_own_error_naming_the_field(
    client: openai.OpenAI, arguments, param, fragment
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**arguments)
    error = info.value
    assert error.status_code == 400 and error.param == param and error.type == "invalid_request_error"
    assert fragment in error.message


def test_wrong_key_is_an_authentication_error(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="rt2i_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.images.generate(prompt="a cat")
    assert info.value.code == "invalid_api_key"


@pytest.fixture()
def two_instances(pg_url: str, tmp_path_factory, model_cache) -> Iterator[dict[str, object]]:
    """Instance B serves its edge tier over the OpenAI API; instance A's cloud tier calls B."""
    base, name = pg_url.rsplit("/", 1)
    admin = create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    b_db = f"{name}_b"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{b_db}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{b_db}"'))
    upgrade(f"{base}/{b_db}")
    redis_a, redis_b = PrivateRedis(tmp_path_factory.mktemp("ra")), PrivateRedis(tmp_path_factory.mktemp("rb"))
    redis_a.start()
    redis_b.start()
    pools: list[WorkerPool] = []
    try:
        settings_b = make_settings(
            database_url=f"{base}/{b_db}",
            broker_url=redis_b.url,
            image_dir=tmp_path_factory.mktemp("img-b"),
            cache_dir=model_cache,
            edge={"model": "offline:edge", "steps": 2, "price_per_image": 0.004},
        )
        key_b = create_tenant_key(settings_b, name="instance-a", forced_tiers=("edge",))
        admin_b = create_tenant_key(settings_b, name="ops-b", is_admin=True)
        with serve(settings_b) as url_b:
            settings_a = make_settings(
                database_url=pg_url,
                broker_url=redis_a.url,
                image_dir=tmp_path_factory.mktemp("img-a"),
                cache_dir=model_cache,
                budget_name="instance-a",
                cloud={
                    "backend": "openai",
                    "url": f"{url_b}/v1",
                    "api_key": key_b,
                    "model": "edge",
                    "width": 64,
                    "height": 64,
                    "price_per_image": 0.05,
                    "timeout_s": 120,
                },
            )
            key_a = create_tenant_key(settings_a, forced_tiers=("cloud",))
            for settings, queues in ((settings_b, ("route", "edge")), (settings_a, ("route", "cloud"))):
                pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("workers"))
                pools.append(pool)
                for queue in queues:
                    pool.start(queue)
                pool.wait_ready()
            with serve(settings_a) as url_a:
                yield {"a": url_a, "b": url_b, "key_a": key_a, "admin_b": admin_b}
    finally:
        for pool in pools:
            pool.stop_all()
        redis_a.stop()
        redis_b.stop()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{b_db}" WITH (FORCE)'))
        admin.dispose()


def test_cloud_tier_served_by_another_instance_is_accounted_on_both(two_instances) -> None:
    a, b = str(two_instances["a"]), str(two_instances["b"])
    headers_a = {"Authorization": f"Bearer {two_instances['key_a']}"}
    headers_b = {"Authorization": f"Bearer {two_instances['admin_b']}"}
    accepted = httpx.post(f"{a}/v1/jobs", json={"prompt": "a harbour at dawn", "tier": "cloud"}, headers=headers_a)
    assert accepted.status_code == 202

    def finished() -> dict | None:
        job = httpx.get(f"{a}{accepted.json()['url']}", headers=headers_a).json()
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_until(finished, timeout=300, what="the job routed to the other instance")
    assert job["status"] == "succeeded", job["error"]
    assert job["tier"] == "cloud"
    assert (job["result"]["backend"], job["result"]["model_id"]) == ("openai", "edge")
    assert job["result"]["cost_usd"] == pytest.approx(0.05)
    assert decode(httpx.get(f"{a}{job['result']['image_url']}", headers=headers_a).content).size == (64, 64)

    stats_b = httpx.get(f"{b}/v1/stats", headers=headers_b).json()
    assert stats_b["jobs"]["by_status"]["succeeded"] == 1
    assert stats_b["routed"]["by_tier"] == {"edge": 1, "cloud": 0}
    assert stats_b["spend_usd"]["total"] == pytest.approx(0.004)
    jobs_b = httpx.get(f"{b}/v1/jobs", headers=headers_b).json()["items"]
    assert [j["prompt"] for j in jobs_b] == ["a harbour at dawn"]
    assert jobs_b[0]["requested_tier"] == "edge"


# --- waiting requests and the server's threads ---------------------------------------------------------------

WAITING = 16


@pytest.fixture(scope="module")
def idle_broker(tmp_path_factory) -> Iterator[PrivateRedis]:
    """A broker no worker consumes: jobs submitted through it stay queued, and their requests wait."""
    server = PrivateRedis(tmp_path_factory.mktemp("idle-broker"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def idle_settings(pg_settings: Settings, idle_broker: PrivateRedis) -> Settings:
    return pg_settings.model_copy(update={"broker_url": idle_broker.url, "images_wait_s": 10.0})


@pytest.fixture(scope="module")
def gunicorn_api(idle_settings: Settings, tmp_path_factory) -> Iterator[ApiServer]:
    """``routet2i api`` as an operator starts it, with its default workers and threads."""
    server = ApiServer(idle_settings, log_path=tmp_path_factory.mktemp("api") / "api.log")
    yield server
    server.stop()


def jobs_of(settings: Settings, key: str) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            tenant = tenant_for_key(session, key)
            assert tenant is not None
            return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.id)) or 0
    finally:
        engine.dispose()


def test_waiting_image_requests_leave_the_health_probes_their_threads(
    gunicorn_api: ApiServer, idle_settings: Settings
) -> None:
    key = create_tenant_key(idle_settings, rate_limit_per_minute=0)

    def ask(i: int) -> httpx.Response:
        body = {"prompt": f"a lighthouse that never comes {i}", "size": "64x64", "response_format": "b64_json"}
        url = f"{gunicorn_api.url}/v1/images/generations"
        return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    with ThreadPoolExecutor(WAITING) as pool:
        answers = [pool.submit(ask, i) for i in range(WAITING)]
        deadline = time.monotonic() + 5
        while jobs_of(idle_settings, key) < WAITING and time.monotonic() < deadline:
            time.sleep(0.1)
        probes = []
        for path in ("/healthz", "/readyz") * 5:
            started = time.perf_counter()
            status = httpx.get(f"{gunicorn_api.url}{path}", timeout=30).status_code
            probes.append((path, status, round(time.perf_counter() - started, 3)))
        in_flight, waiting = jobs_of(idle_settings, key), sum(not a.done() for a in answers)
        results = [a.result() for a in answers]
    assert all(status == 200 and seconds < 1.0 for _, status, seconds in probes), probes
    assert (in_flight, waiting) == (WAITING, WAITING)  # each request had submitted its job and still waited
    assert [r.status_code for r in results] == [504] * WAITING
    assert {r.json()["error"]["code"] for r in results} == {"timeout"}


def test_a_streamed_body_over_the_limit_is_413(gunicorn_api: ApiServer, idle_settings: Settings) -> None:
    key = create_tenant_key(idle_settings)
    chunks = (b" " * 65536 for _ in range(idle_settings.max_request_bytes // 65536 + 16))  # no Content-Length
    response = httpx.post(
        f"{gunicorn_api.url}/v1/jobs",
        content=chunks,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"


def test_a_process_holding_its_most_waiting_requests_answers_503(idle_settings: Settings) -> None:
    settings = idle_settings.model_copy(update={"images_wait_s": 3.0, "images_waiters": 1})
    key = create_tenant_key(settings, rate_limit_per_minute=0)
    with serve(settings) as url, ThreadPoolExecutor(1) as pool:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
        first = pool.submit(client.images.generate, prompt="the first waits", size="64x64")
        wait_until(lambda: jobs_of(settings, key) == 1, timeout=10, what="the first request's job")
        with pytest.raises(openai.InternalServerError) as busy:
            client.images.generate(prompt="the second finds no slot", size="64x64")
        assert busy.value.status_code == 503 and busy.value.response.headers["Retry-After"] == "5"
        assert busy.value.code == "service_unavailable"
        assert jobs_of(settings, key) == 1  # refused before it submitted anything
        with pytest.raises(openai.APIStatusError) as timeout:
            first.result()
        assert timeout.value.status_code == 504


@pytest.mark.parametrize(
    ("status", "error", "answer"),
    [
        ("cancelled", None, 409),
        ("expired", "expired: its deadline passed at 2026-12-08T03:00:00+00:00", 504),
        ("failed", "image API refused the request (400): content filter", 400),
        ("failed", "image API unreachable: connection refused", 500),
    ],
)
def test_a_job_that_ended_without_an_image_answers_why(status: str, error: str | None, answer: int) -> None:
    """Only a generation that failed on the server's side is a 5xx; a refused prompt is the client's 400."""
    from api.openai_compat import ended_without_image
    from db.models import Job

    exc = ended_without_image(Job(status=status, error=error))
    assert exc.status == answer
    if answer == 400:
        assert exc.field == "prompt" and "content filter" in exc.message
