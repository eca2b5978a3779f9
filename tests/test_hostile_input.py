"""Hostile requests against the real API (PostgreSQL, Redis): each is refused with a 4xx that names what was
wrong, never answered with a 5xx, and creates nothing.

Each case here was a 500 (or a body read whole into memory) before it was handled.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import uuid
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import func, select

from api.app import create_app
from api.openai_compat import KEY_FILE, SIGNING_LABEL, signing_key
from core.settings import Settings
from db.models import Job
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key

pytestmark = pytest.mark.integration

DEEP = 100_000


@pytest.fixture()
def app(pg_settings: Settings, redis_client: redis.Redis):
    return create_app(pg_settings)


@pytest.fixture()
def client(app, pg_settings: Settings):
    with app.test_client() as test_client:
        yield authorize(test_client, create_tenant_key(pg_settings, rate_limit_per_minute=0))


def job_count(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return session.scalar(select(func.count()).select_from(Job)) or 0
    finally:
        engine.dispose()


# --- request size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/jobs", {"prompt": "x" * 5_000_000}),
        ("/v1/jobs/batch", {"jobs": [{"prompt": "x" * 50_000}] * 100}),
    ],
)
def test_a_body_over_the_limit_is_413_naming_the_body(client, pg_settings, path, body) -> None:
    before = job_count(pg_settings)
    response = client.post(path, json=body)
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert (error["code"], error["field"]) == ("request_too_large", "body")
    assert str(pg_settings.max_request_bytes) in error["message"]
    assert job_count(pg_settings) == before


def test_the_openai_endpoint_answers_413_in_openais_shape(client, pg_settings) -> None:
    response = client.post("/v1/images/generations", json={"prompt": "x" * 5_000_000})
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert "request body" in error["message"]


def test_the_default_limit_holds_the_largest_batch_a_client_may_send(client, pg_settings) -> None:
    # Every character outside the BMP, as json.dumps writes it by default: a 12-byte escape pair each.
    job = {
        "prompt": "😀" * pg_settings.max_prompt_chars,
        "idempotency_key": "😀" * 255,
        "seed": 2**63 - 1,
        "steps": 150,
        "width": 2048,
        "height": 2048,
        "tier": "cloud",
    }
    jobs = [job | {"idempotency_key": f"{i:03d}" + "😀" * 252} for i in range(100)]
    jobs[-1] = jobs[-1] | {"steps": 0}  # refused once read and parsed: nothing is created
    data = json.dumps({"jobs": jobs})
    assert len(data) <= Settings().max_request_bytes == pg_settings.max_request_bytes
    response = client.post("/v1/jobs/batch", data=data, content_type="application/json")
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "jobs.99.steps"


# --- nesting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/batch"])
@pytest.mark.parametrize(
    "data", ["[" * DEEP + "]" * DEEP, '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}", '{"a":' * DEEP + "1" + "}" * DEEP]
)
def test_json_nested_too_deeply_is_400_naming_the_body(client, pg_settings, path, data) -> None:
    before = job_count(pg_settings)
    response = client.post(path, data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "body"
    assert job_count(pg_settings) == before


def test_json_nested_too_deeply_is_openais_400_on_its_endpoint(client) -> None:
    data = '{"prompt": ' + "[" * DEEP + "]" * DEEP + "}"
    response = client.post("/v1/images/generations", data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "invalid_request_error"


# --- dates, numbers and signatures in query strings ---------------------------------------------------------


@pytest.mark.parametrize(
    "until",
    [
        "9999-12-31T00:00:00Z",
        "9999-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00%2B00:01",
        "1969-12-31T23:59:59Z",
    ],
)
@pytest.mark.parametrize("bucket", ["minute", "day"])
def test_timeseries_until_beyond_the_bucket_arithmetic_is_400_naming_until(client, until, bucket) -> None:
    response = client.get(f"/v1/stats/timeseries?bucket={bucket}&buckets=1440&until={until}")
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "until"


@pytest.mark.parametrize("until", ["9998-12-31T23:59:59Z", "1970-01-01T00:00:00Z"])
def test_timeseries_until_at_the_edges_is_answered(client, until) -> None:
    response = client.get(f"/v1/stats/timeseries?bucket=day&buckets=1440&until={until}")
    assert response.status_code == 200 and len(response.get_json()["items"]) == 1440


SIG = "0" * 64


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (f"expires=%C2%B2&sig={SIG}", "expires"),  # '²': str.isdigit() says yes, int() says no
        (f"expires=%EF%BC%91&sig={SIG}", "expires"),  # a full-width digit one
        (f"expires={'9' * 5000}&sig={SIG}", "expires"),  # more digits than int() converts
        (f"sig={SIG}", "expires"),
        ("expires=1&sig=%C3%A9", "sig"),  # non-ASCII: hmac.compare_digest refuses to compare it
        ("expires=1&sig=abc", "sig"),
        ("expires=1", "sig"),
        (f"expires=1&sig={SIG}", "sig"),  # well formed, wrong
    ],
)
def test_malformed_signed_image_urls_are_403_naming_the_parameter(app, query, param) -> None:
    response = app.test_client().get(f"/v1/images/00000000-0000-0000-0000-000000000000.png?{query}")
    assert response.status_code == 403
    assert response.get_json()["error"]["param"] == param


def test_a_nul_in_the_idempotency_key_header_is_422(client, pg_settings) -> None:
    before = job_count(pg_settings)
    response = client.post("/v1/jobs", json={"prompt": "a cat"}, headers={"Idempotency-Key": "a\x00b"})
    assert response.status_code == 422 and response.get_json()["error"]["field"] == "idempotency_key"
    assert job_count(pg_settings) == before


# --- the URL-signing key ------------------------------------------------------------------------------------


def test_the_signing_key_is_derived_from_the_secret_and_never_stored_in_redis(
    pg_settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = create_app(
        pg_settings.model_copy(update={"secret_key": SecretStr("deployment-secret"), "cache_dir": tmp_path})
    )
    with app.app_context():
        key = signing_key()
    assert key == hmac.new(b"deployment-secret", SIGNING_LABEL, hashlib.sha256).digest()
    assert not (tmp_path / KEY_FILE).exists()
    assert all(key not in (redis_client.get(name) or b"") for name in redis_client.keys("*"))
    assert not redis_client.keys("*signing*")


def test_without_a_secret_the_key_is_one_private_file_every_process_reads(
    pg_settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = pg_settings.model_copy(update={"cache_dir": tmp_path / "shared"})
    keys = []
    for _ in range(2):  # two API processes sharing the folder
        app = create_app(settings)
        with app.app_context():
            keys.append(signing_key())
    assert keys[0] == keys[1] and len(keys[0]) == 32
    path = tmp_path / "shared" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]  # no draft left behind
    assert not redis_client.keys("*signing*")


def test_url_images_are_refused_before_any_job_when_no_key_can_be_kept(pg_settings: Settings, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    app = create_app(pg_settings.model_copy(update={"cache_dir": blocker / "cache"}))
    client = authorize(app.test_client(), create_tenant_key(pg_settings, rate_limit_per_minute=0))
    before = job_count(pg_settings)
    response = client.post("/v1/images/generations", json={"prompt": "a cat", "response_format": "url"})
    assert response.status_code == 503
    assert "ROUTET2I_SECRET_KEY" in response.get_json()["error"]["message"]
    assert job_count(pg_settings) == before


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/decisions"])
def test_a_cursor_whose_time_overflows_is_400_naming_the_cursor(client, path) -> None:
    # 0001-01-01T00:00:00+00:01 is before the first representable instant once shifted to UTC.
    cursor = base64.urlsafe_b64encode(f"0001-01-01T00:00:00+00:01|{uuid.uuid4()}".encode()).decode().rstrip("=")
    response = client.get(path, query_string={"cursor": cursor})
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "cursor"
