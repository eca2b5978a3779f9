"""Tenants, API keys, isolation, rate limits and forced tiers, against real PostgreSQL and Redis."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from api.app import create_app
from core.settings import Settings
from tests.conftest import authorize, create_tenant_key

pytestmark = pytest.mark.integration


@pytest.fixture()
def app(pg_settings: Settings, redis_client):
    return create_app(pg_settings.model_copy(update={"auth_cache_s": 0.0}))


def client_for(app, key: str):  # type: ignore[no-untyped-def]
    return authorize(app.test_client(), key)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer rt2i_wrong"}],
)
def test_missing_or_wrong_key_is_401(app, headers) -> None:
    for method, path in (("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/decisions"), ("get", "/v1/stats")):
        response = getattr(app.test_client(), method)(path, headers=headers, json={"prompt": "a cat"})
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.get_json()["error"]["field"] == "Authorization"
    assert app.test_client().get("/healthz").status_code == 200  # probes need no key


def test_revoked_key_is_refused(app, pg_settings) -> None:
    key = create_tenant_key(pg_settings, name="revocable")
    assert client_for(app, key).get("/v1/jobs").status_code == 200
    env = {**os.environ, **pg_settings.to_env()}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "tenant", "revoke", "revocable"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "revoked 1 key(s)" in result.stdout
    assert client_for(app, key).get("/v1/jobs").status_code == 401


def test_tenants_cannot_see_each_others_jobs(app, pg_settings) -> None:
    alice = client_for(app, create_tenant_key(pg_settings))
    bob = client_for(app, create_tenant_key(pg_settings))
    admin = client_for(app, create_tenant_key(pg_settings, is_admin=True))

    job = alice.post("/v1/jobs", json={"prompt": "alice's secret"}).get_json()
    assert alice.get(job["url"]).status_code == 200
    for path in (job["url"], job["url"] + "/image"):
        response = bob.get(path)
        assert response.status_code == 404
        assert response.get_json()["error"]["message"] == f"no job with id {job['id']!r}"
    assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs?limit=500").get_json()["items"]}
    assert bob.get("/v1/stats").get_json()["jobs"]["total"] == 0
    assert bob.get("/v1/stats").get_json()["scope"] != "all tenants"

    assert admin.get(job["url"]).status_code == 200
    assert job["id"] in {j["id"] for j in admin.get("/v1/jobs?limit=500").get_json()["items"]}
    assert admin.get("/v1/stats").get_json()["scope"] == "all tenants"


def test_idempotency_keys_are_per_tenant(app, pg_settings) -> None:
    alice = client_for(app, create_tenant_key(pg_settings))
    bob = client_for(app, create_tenant_key(pg_settings))
    first = alice.post("/v1/jobs", json={"prompt": "a cat", "idempotency_key": "same"})
    second = bob.post("/v1/jobs", json={"prompt": "a cat", "idempotency_key": "same"})
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.get_json()["id"] != second.get_json()["id"]


def test_rate_limit_answers_429_with_retry_after(app, pg_settings) -> None:
    client = client_for(app, create_tenant_key(pg_settings, rate_limit_per_minute=60))
    codes = [client.post("/v1/jobs", json={"prompt": f"cat {i}"}).status_code for i in range(10)]
    assert codes[:6] == [202] * 6  # a burst of a tenth of the minute's quota
    assert 429 in codes[6:]
    refused = client.post("/v1/jobs", json={"prompt": "one more"})
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"]["code"] == "rate_limited"
    other = client_for(app, create_tenant_key(pg_settings, rate_limit_per_minute=60))
    assert other.post("/v1/jobs", json={"prompt": "a dog"}).status_code == 202  # limits are per tenant


def test_unlimited_tenant_is_not_limited(app, pg_settings) -> None:
    client = client_for(app, create_tenant_key(pg_settings, rate_limit_per_minute=0))
    assert {client.post("/v1/jobs", json={"prompt": f"cat {i}"}).status_code for i in range(80)} == {202}


def test_forcing_a_tier_needs_permission(app, pg_settings) -> None:
    plain = client_for(app, create_tenant_key(pg_settings))
    response = plain.post("/v1/jobs", json={"prompt": "a cat", "tier": "cloud"})
    assert response.status_code == 403 and response.get_json()["error"]["field"] == "tier"
    allowed = client_for(app, create_tenant_key(pg_settings, forced_tiers=("cloud",)))
    job = allowed.get(allowed.post("/v1/jobs", json={"prompt": "a cat", "tier": "cloud"}).get_json()["url"]).get_json()
    assert job["requested_tier"] == "cloud"
    assert allowed.post("/v1/jobs", json={"prompt": "a cat", "tier": "edge"}).status_code == 403
    assert allowed.post("/v1/jobs", json={"prompt": "a cat", "tier": "gpu"}).status_code == 422


def test_disabled_auth_acts_as_local_admin_and_warns(pg_settings, redis_client, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        app = create_app(pg_settings.model_copy(update={"auth": "disabled"}))
    assert any("AUTHENTICATION IS DISABLED" in r.getMessage() for r in caplog.records)
    client = app.test_client()
    assert client.post("/v1/jobs", json={"prompt": "no key"}).status_code == 202
    assert client.get("/v1/stats").get_json()["scope"] == "all tenants"


def test_tenant_cli_creates_lists_and_refuses_duplicates(pg_settings) -> None:
    env = {**os.environ, **pg_settings.to_env()}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "tenant", *args], env=env, capture_output=True, text=True)

    created = cli("create", "acme", "--cloud-budget", "0.2", "--rate-limit", "120", "--allow-tier", "edge", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["api_key"]
    assert key.startswith("rt2i_") and len(key) > 40
    listed = json.loads(cli("list", "--json").stdout)
    acme = next(t for t in listed if t["name"] == "acme")
    assert acme["cloud_budget"] == 0.2 and acme["rate_limit_per_minute"] == 120 and acme["forced_tiers"] == ["edge"]
    assert acme["keys"][0]["prefix"] == key[:12] and key not in created.stderr
    duplicate = cli("create", "acme")
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    bad = cli("create", "x", "--cloud-budget", "2")
    assert bad.returncode == 2 and "'--cloud-budget'" in bad.stderr
