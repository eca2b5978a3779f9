"""The OpenAI Images API surface, driven by the official ``openai`` client against a real HTTP server,
and the ``openai`` cloud backend pointed at a second RouteT2I instance."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from werkzeug.serving import make_server

from api.app import create_app
from core.settings import Settings
from db.migrate import upgrade
from tests.conftest import create_tenant_key, make_settings
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
