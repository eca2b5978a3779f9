"""The published OpenAPI document, and property-based fuzzing of the API against it (Schemathesis).

Every operation is called with generated valid and invalid inputs against the real PostgreSQL and Redis:
no response may be a 5xx (but the OpenAI-compatible endpoint's documented 504 when its images are not ready in
time), and every response must match the document (status code, content type, schema). Every route of the app
is in the document, or listed in ``api.openapi.UNDOCUMENTED`` with the reason.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import checks

from api.app import create_app
from api.openapi import UNDOCUMENTED, undocumented
from core.settings import Settings
from tests.conftest import create_tenant_key

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("ROUTET2I_FUZZ_EXAMPLES", "40"))
"""Examples per operation: enough to find real defects, small enough for CI (about a minute in all)."""

DERANDOMIZE = os.environ.get("ROUTET2I_FUZZ_RANDOM", "") != "1"
"""CI explores the same cases every run (reproducible); ROUTET2I_FUZZ_RANDOM=1 explores new ones."""


@pytest.fixture(scope="module")
def fuzz_app(pg_settings: Settings):
    # An admin without a rate limit: every schema-valid request should then be accepted (2xx or documented 4xx).
    key = create_tenant_key(pg_settings, is_admin=True, rate_limit_per_minute=0)
    # Small images and a short wait: generated jobs may reach real workers, and the OpenAI-compatible
    # endpoint would otherwise hold each example for the images.
    app = create_app(pg_settings.model_copy(update={"max_size": 128, "max_steps": 4, "images_wait_s": 0.5}))
    app.config["FUZZ_KEY"] = key
    return app


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)


def test_document_is_valid_openapi_31(fuzz_app) -> None:
    document = fuzz_app.test_client().get("/openapi.json").get_json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    post = document["paths"]["/v1/jobs"]["post"]
    schema = document["components"]["schemas"][
        post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    ]
    assert schema["additionalProperties"] is False
    prompt = schema["properties"]["prompt"]
    assert prompt["maxLength"] == 2000 and prompt["minLength"] == 1  # the deployment's limits, as validated
    assert {"401", "422", "429", "503"} <= set(post["responses"])


def test_every_route_is_documented_or_excluded_with_a_reason(fuzz_app) -> None:
    assert undocumented(fuzz_app) == []
    endpoints = {rule.endpoint: rule for rule in fuzz_app.url_map.iter_rules()}
    for endpoint, reason in UNDOCUMENTED.items():
        assert endpoint in endpoints and reason, endpoint  # no stale exclusion
        assert not hasattr(fuzz_app.view_functions[endpoint], "__openapi__"), f"{endpoint} is documented"
    paths = fuzz_app.test_client().get("/openapi.json").get_json()["paths"]
    for required in ("/v1/stats/timeseries", "/v1/queues", "/v1/reports", "/v1/reports/{name}", "/metrics"):
        assert "get" in paths[required], required
    assert {"expires", "sig"} <= {p["name"] for p in paths["/v1/images/{job_id}.png"]["get"]["parameters"]}


def test_the_route_check_finds_a_route_left_out(pg_settings: Settings) -> None:
    app = create_app(pg_settings)
    app.add_url_rule("/v1/forgotten", "forgotten", lambda: "")
    assert undocumented(app) == ["forgotten"]


schema = schemathesis.pytest.from_fixture("api_schema")


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
"""Schema-valid requests may still be refused with a documented 4xx (an opaque cursor that this API did not
issue, an idempotency key reused for another body), so "positive data acceptance" is not among the checks."""

IMAGES_NOT_READY = ("/v1/images/generations", 504)
"""The one 5xx an operation answers by design: like OpenAI's, the images endpoint answers 504 (documented)
when the images are not ready in time (in this test there may be no worker at all)."""


def not_a_server_error_but_images_not_ready(ctx, response, case) -> None:
    """``not_a_server_error``, less the OpenAI-compatible endpoint's documented 504 in OpenAI's shape."""
    if (case.operation.path, response.status_code) == IMAGES_NOT_READY:
        assert response.json()["error"]["code"] == "timeout", response.text
        return
    checks.not_a_server_error(ctx, response, case)


def negative_data_rejection_of_what_was_sent(ctx, response, case) -> None:
    """``negative_data_rejection``, less the cases whose violation never reached the API: a generated query
    parameter the client does not send (an empty list has no ``name=value`` to write) leaves a valid request,
    which the API rightly accepts."""
    sent = parse_qs(urlsplit(response.request.url).query, keep_blank_values=True)
    if any(name not in sent for name in case.query or {}):
        return
    checks.negative_data_rejection(ctx, response, case)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case, fuzz_app) -> None:
    checks_for = [c for c in CHECKS if c is not checks.not_a_server_error] + [
        not_a_server_error_but_images_not_ready,
        negative_data_rejection_of_what_was_sent,
    ]
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_app.config['FUZZ_KEY']}"}, checks=checks_for)
