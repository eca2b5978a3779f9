"""The jobs API against real PostgreSQL and Redis: what is accepted, what is refused, and that refusals
leave no row and no queue message behind."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import func, select

from api.app import create_app
from core.settings import Settings
from db.models import Job, JobEvent
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key

pytestmark = pytest.mark.integration


@pytest.fixture()
def app(pg_settings: Settings, redis_client: redis.Redis):
    return create_app(pg_settings)


@pytest.fixture()
def key(pg_settings: Settings) -> str:
    return create_tenant_key(pg_settings)


@pytest.fixture()
def client(app, key):
    with app.test_client() as test_client:
        yield authorize(test_client, key)


def job_count(settings: Settings) -> int:
    with make_session_factory(make_engine(settings.database_url))() as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def route_queue_length(client_redis: redis.Redis) -> int:
    return int(client_redis.llen("route"))


def test_accepted_job_is_queued_with_its_parameters(client, redis_client) -> None:
    response = client.post(
        "/v1/jobs", json={"prompt": "  a cat  ", "seed": 3, "steps": 10, "width": 512, "height": 256}
    )
    assert response.status_code == 202
    job = client.get(response.get_json()["url"]).get_json()
    assert job["prompt"] == "a cat"  # surrounding whitespace is not part of the prompt
    assert (job["seed"], job["steps"], job["width"], job["height"]) == (3, 10, 512, 256)
    assert job["status"] == "queued" and job["tier"] is None and job["decision"] is None
    assert [e["status"] for e in job["events"]] == ["queued"]
    assert route_queue_length(redis_client) == 1


def test_seed_is_chosen_and_recorded_when_not_given(client) -> None:
    first = client.get(client.post("/v1/jobs", json={"prompt": "a dog"}).get_json()["url"]).get_json()
    second = client.get(client.post("/v1/jobs", json={"prompt": "a dog"}).get_json()["url"]).get_json()
    assert isinstance(first["seed"], int) and first["seed"] >= 0
    assert first["seed"] != second["seed"]


BAD_BODIES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a cat", "colour": "red"}, "colour"),
    ({"prompt": "a cat", "steps": 0}, "steps"),
    ({"prompt": "a cat", "steps": 151}, "steps"),
    ({"prompt": "a cat", "steps": "20"}, "steps"),
    ({"prompt": "a cat", "steps": 2.5}, "steps"),
    ({"prompt": "a cat", "steps": True}, "steps"),
    ({"prompt": "a cat", "width": 100}, "width"),
    ({"prompt": "a cat", "width": 56}, "width"),
    ({"prompt": "a cat", "height": 4096}, "height"),
    ({"prompt": "a cat", "seed": -1}, "seed"),
    ({"prompt": "a cat", "seed": 2**64}, "seed"),
    ({"prompt": "a cat", "idempotency_key": ""}, "idempotency_key"),
    ({"prompt": "a cat", "idempotency_key": "k" * 256}, "idempotency_key"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
def test_bad_bodies_are_refused_naming_the_field_and_create_nothing(
    client, pg_settings, redis_client, body, field
) -> None:
    before = job_count(pg_settings)
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["field"] == field
    assert field in error["message"]
    assert job_count(pg_settings) == before
    assert route_queue_length(redis_client) == 0


@pytest.mark.parametrize(
    ("data", "content_type"),
    [("not json", "application/json"), ('{"prompt": "a cat"', "application/json"), ("prompt=a cat", "text/plain")],
)
def test_non_json_bodies_are_refused(client, pg_settings, redis_client, data, content_type) -> None:
    before = job_count(pg_settings)
    response = client.post("/v1/jobs", data=data, content_type=content_type)
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == "body"
    assert job_count(pg_settings) == before
    assert route_queue_length(redis_client) == 0


def test_json_that_is_not_an_object_is_refused(client) -> None:
    response = client.post("/v1/jobs", json=["a cat"])
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == "body"


@pytest.mark.parametrize("job_id", ["not-a-uuid", "123", str(uuid.uuid4())])
def test_unknown_or_malformed_job_ids_are_404_naming_the_field(client, job_id) -> None:
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/image"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.get_json()["error"]["field"] == "job_id"


def test_image_of_an_unfinished_job_is_409(client) -> None:
    url = client.post("/v1/jobs", json={"prompt": "a cat"}).get_json()["url"]
    response = client.get(url + "/image")
    assert response.status_code == 409
    assert response.get_json()["error"]["job_status"] == "queued"


def test_idempotency_key_returns_the_same_job(client, pg_settings, redis_client) -> None:
    body = {"prompt": "a cat", "idempotency_key": "order-17"}
    first = client.post("/v1/jobs", json=body)
    second = client.post("/v1/jobs", json=body)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.get_json()["id"] == second.get_json()["id"]
    assert route_queue_length(redis_client) == 1

    header = client.post("/v1/jobs", json={"prompt": "a cat"}, headers={"Idempotency-Key": "order-17"})
    assert header.status_code == 200 and header.get_json()["id"] == first.get_json()["id"]


def test_idempotency_key_reused_for_another_request_is_409(client) -> None:
    client.post("/v1/jobs", json={"prompt": "a cat", "idempotency_key": "order-18"})
    response = client.post("/v1/jobs", json={"prompt": "a dog", "idempotency_key": "order-18"})
    assert response.status_code == 409
    assert response.get_json()["error"]["field"] == "idempotency_key"


def test_conflicting_idempotency_header_and_field_are_refused(client) -> None:
    response = client.post(
        "/v1/jobs", json={"prompt": "a cat", "idempotency_key": "a"}, headers={"Idempotency-Key": "b"}
    )
    assert response.status_code == 422
    assert response.get_json()["error"]["field"] == "idempotency_key"


def test_concurrent_submissions_with_one_key_make_one_job(app, key, pg_settings, redis_client) -> None:
    before = job_count(pg_settings)

    def submit(_: int) -> tuple[int, str]:
        with authorize(app.test_client(), key) as c:
            r = c.post("/v1/jobs", json={"prompt": "a race", "idempotency_key": "race-1"})
            return r.status_code, r.get_json()["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(submit, range(16)))
    assert {job_id for _, job_id in results} == {results[0][1]}
    assert sorted(code for code, _ in results).count(202) == 1
    assert job_count(pg_settings) == before + 1
    assert route_queue_length(redis_client) == 1


LIST_ERRORS = [
    ("/v1/jobs?status=done", "status"),
    ("/v1/jobs?tier=gpu", "tier"),
    ("/v1/jobs?limit=0", "limit"),
    ("/v1/jobs?limit=501", "limit"),
    ("/v1/jobs?limit=ten", "limit"),
    ("/v1/jobs?cursor=garbage", "cursor"),
    ("/v1/jobs?colour=red", "colour"),
    ("/v1/decisions?tier=gpu", "tier"),
    ("/v1/decisions?since=yesterday", "since"),
    ("/v1/decisions?cursor=%%%", "cursor"),
    ("/v1/decisions?router=%00", "router"),  # found by fuzzing: PostgreSQL refuses NUL in a string
    ("/v1/decisions?until=0001-01-01T00:00:00%2B00:01", "until"),  # found by fuzzing: before year 1 in UTC
    ("/v1/decisions?since=0.5", "since"),  # found by fuzzing: not read as a Unix timestamp
]


@pytest.mark.parametrize(("url", "field"), LIST_ERRORS)
def test_bad_listing_parameters_are_400_naming_the_field(client, url, field) -> None:
    response = client.get(url)
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == field


def test_listing_pages_through_every_job_once(client) -> None:
    ids = {client.post("/v1/jobs", json={"prompt": f"page {n}"}).get_json()["id"] for n in range(7)}
    seen: list[str] = []
    cursor = None
    while True:
        url = "/v1/jobs?limit=3&status=queued" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url).get_json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert ids <= set(seen)
    assert len(seen) == len(set(seen))


def test_broker_outage_fails_the_job_visibly_with_503(pg_settings, key) -> None:
    settings = pg_settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(settings)
    with authorize(app.test_client(), key) as client:
        response = client.post("/v1/jobs", json={"prompt": "a cat"})
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "broker_unavailable"
        assert response.headers["Retry-After"] == "5"
        failed = client.get("/v1/jobs?status=failed&limit=1").get_json()["items"][0]
        assert failed["prompt"] == "a cat" and "broker unavailable" in failed["error"]
        assert client.get("/readyz").status_code == 503


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}


def test_events_record_each_state(client, pg_settings) -> None:
    job_id = client.post("/v1/jobs", json={"prompt": "a cat"}).get_json()["id"]
    with make_session_factory(make_engine(pg_settings.database_url))() as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(job_id))).all()
    assert [e.status for e in events] == ["queued"]


# --- batch submission ------------------------------------------------------------------------------------


def route_queue_jobs(client_redis: redis.Redis) -> list[str]:
    """The job ids the route queue's messages carry, in queue order."""
    from worker.transport import job_ids_of

    return [job_id for raw in reversed(client_redis.lrange("route", 0, -1)) for job_id in job_ids_of(raw)]


def test_a_batch_creates_every_job_in_order_in_one_message(client, redis_client) -> None:
    jobs = [{"prompt": f"a boat number {i}", "seed": i} for i in range(5)]
    response = client.post("/v1/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202
    items = response.get_json()["items"]
    assert [i["created"] for i in items] == [True] * 5 and len({i["id"] for i in items}) == 5
    fetched = [client.get(i["url"]).get_json() for i in items]
    assert [(j["prompt"], j["seed"], j["status"]) for j in fetched] == [
        (f"a boat number {i}", i, "queued") for i in range(5)
    ]
    assert all([e["status"] for e in j["events"]] == ["queued"] for j in fetched)
    assert route_queue_length(redis_client) == 1  # the router takes the jobs of one submission together
    assert route_queue_jobs(redis_client) == [i["id"] for i in items]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"jobs": []}, "jobs"),
        ({"jobs": [{"prompt": "a"}] * 101}, "jobs"),
        ({"jobs": [{"prompt": "a cat"}, {"prompt": ""}]}, "jobs.1.prompt"),
        ({"jobs": [{"prompt": "a cat"}, {"prompt": "a dog", "steps": 0}]}, "jobs.1.steps"),
        ({"jobs": [{"prompt": "a cat", "colour": "red"}]}, "jobs.0.colour"),
        ({"jobs": "a cat"}, "jobs"),
        ({"prompt": "a cat"}, "jobs"),
        (
            {"jobs": [{"prompt": "a", "idempotency_key": "k"}, {"prompt": "b", "idempotency_key": "k"}]},
            "jobs.1.idempotency_key",
        ),
    ],
)
def test_a_refused_batch_names_the_field_and_creates_nothing(client, redis_client, pg_settings, body, field) -> None:
    before = job_count(pg_settings)
    response = client.post("/v1/jobs/batch", json=body)
    assert response.status_code == 422, response.get_json()
    assert response.get_json()["error"]["field"] == field
    assert job_count(pg_settings) == before
    assert route_queue_length(redis_client) == 0


def test_a_batch_forcing_a_tier_it_may_not_is_refused_whole(client, redis_client, pg_settings) -> None:
    before = job_count(pg_settings)
    response = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": "a cat"}, {"prompt": "a dog", "tier": "cloud"}]})
    assert response.status_code == 403
    assert response.get_json()["error"]["field"] == "jobs.1.tier"
    assert job_count(pg_settings) == before and route_queue_length(redis_client) == 0


def test_a_batch_repeating_idempotency_keys_answers_the_earlier_jobs(client, redis_client) -> None:
    first = client.post("/v1/jobs", json={"prompt": "a red kite", "idempotency_key": "kite-1"}).get_json()
    response = client.post(
        "/v1/jobs/batch",
        json={
            "jobs": [
                {"prompt": "a red kite", "idempotency_key": "kite-1"},
                {"prompt": "a blue kite", "idempotency_key": "kite-2"},
            ]
        },
    )
    assert response.status_code == 202
    items = response.get_json()["items"]
    assert [(i["id"] == first["id"], i["created"]) for i in items] == [(True, False), (False, True)]
    again = client.post(
        "/v1/jobs/batch",
        json={
            "jobs": [
                {"prompt": "a red kite", "idempotency_key": "kite-1"},
                {"prompt": "a blue kite", "idempotency_key": "kite-2"},
            ]
        },
    )
    assert again.status_code == 200
    assert [i["id"] for i in again.get_json()["items"]] == [i["id"] for i in items]
    conflict = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": "a green kite", "idempotency_key": "kite-2"}]})
    assert conflict.status_code == 409 and conflict.get_json()["error"]["field"] == "jobs.0.idempotency_key"
    assert sorted(route_queue_jobs(redis_client)) == sorted({first["id"], items[1]["id"]})  # each new job once


def test_a_batch_counts_every_job_against_the_rate_limit(app, pg_settings, redis_client) -> None:
    key = create_tenant_key(pg_settings, rate_limit_per_minute=60)  # bursts of 6
    with app.test_client() as raw:
        client = authorize(raw, key)
        too_big = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": f"p{i}"} for i in range(7)]})
        assert too_big.status_code == 422 and too_big.get_json()["error"]["field"] == "jobs"
        assert "at most 6" in too_big.get_json()["error"]["message"]
        assert client.post("/v1/jobs/batch", json={"jobs": [{"prompt": f"p{i}"} for i in range(5)]}).status_code == 202
        refused = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": "p5"}, {"prompt": "p6"}]})
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        assert client.post("/v1/jobs", json={"prompt": "p7"}).status_code == 202  # the sixth of the burst
    assert len(route_queue_jobs(redis_client)) == 6


def test_concurrent_batches_with_the_same_keys_make_each_job_once(app, key, pg_settings, redis_client) -> None:
    before = job_count(pg_settings)
    jobs = [{"prompt": f"a race number {i}", "idempotency_key": f"batch-race-{i}"} for i in range(3)]

    def submit(_: int) -> tuple[int, list[str]]:
        with authorize(app.test_client(), key) as c:
            r = c.post("/v1/jobs/batch", json={"jobs": jobs})
            return r.status_code, [item["id"] for item in r.get_json()["items"]]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(submit, range(16)))
    assert {tuple(ids) for _, ids in results} == {tuple(results[0][1])}
    assert sorted(code for code, _ in results).count(202) == 1
    assert job_count(pg_settings) == before + 3
    assert sorted(route_queue_jobs(redis_client)) == sorted(results[0][1])


# --- idempotency against every field and before the rate limit ------------------------------------------


def test_a_key_replayed_with_another_tier_is_409(app, pg_settings, redis_client) -> None:
    client = authorize(app.test_client(), create_tenant_key(pg_settings, forced_tiers=("edge", "cloud")))
    first = client.post("/v1/jobs", json={"prompt": "a cat", "tier": "edge", "idempotency_key": "tiered-1"})
    assert first.status_code == 202
    for other in ({"tier": "cloud"}, {}):  # another tier, or the router's choice instead of a forced tier
        response = client.post("/v1/jobs", json={"prompt": "a cat", "idempotency_key": "tiered-1", **other})
        assert response.status_code == 409, other
        assert response.get_json()["error"]["field"] == "idempotency_key"
        assert response.get_json()["error"]["job_id"] == first.get_json()["id"]
    same = client.post("/v1/jobs", json={"prompt": "a cat", "tier": "edge", "idempotency_key": "tiered-1"})
    assert same.status_code == 200 and same.get_json()["id"] == first.get_json()["id"]
    batch = client.post("/v1/jobs/batch", json={"jobs": [{"prompt": "a cat", "idempotency_key": "tiered-1"}]})
    assert batch.status_code == 409 and batch.get_json()["error"]["field"] == "jobs.0.idempotency_key"
    assert route_queue_length(redis_client) == 1


def test_an_exact_replay_is_answered_before_the_rate_limit(app, pg_settings, redis_client) -> None:
    client = authorize(app.test_client(), create_tenant_key(pg_settings, rate_limit_per_minute=60))  # bursts of 6
    jobs = [{"prompt": f"kite {i}", "idempotency_key": f"kite-{i}"} for i in range(5)]
    accepted = client.post("/v1/jobs/batch", json={"jobs": jobs})
    single = client.post("/v1/jobs", json={"prompt": "kite 5", "idempotency_key": "kite-5"})
    assert (accepted.status_code, single.status_code) == (202, 202)
    assert client.post("/v1/jobs", json={"prompt": "kite 6"}).status_code == 429  # the burst is spent

    again = client.post("/v1/jobs", json={"prompt": "kite 5", "idempotency_key": "kite-5"})
    assert again.status_code == 200 and again.get_json()["id"] == single.get_json()["id"]
    header = client.post("/v1/jobs", json={"prompt": "kite 5"}, headers={"Idempotency-Key": "kite-5"})
    assert header.status_code == 200 and header.get_json()["id"] == single.get_json()["id"]
    batch = client.post("/v1/jobs/batch", json={"jobs": [*jobs, {"prompt": "kite 5", "idempotency_key": "kite-5"}]})
    assert batch.status_code == 200
    assert [i["id"] for i in batch.get_json()["items"]] == [
        *(i["id"] for i in accepted.get_json()["items"]),
        single.get_json()["id"],
    ]
    # A batch with one new job still counts that job, and is refused whole.
    mixed = client.post("/v1/jobs/batch", json={"jobs": [jobs[0], {"prompt": "kite 7", "idempotency_key": "kite-7"}]})
    assert mixed.status_code == 429 and "Retry-After" in mixed.headers
    # A conflicting replay is still a conflict, not a rate-limit refusal.
    conflict = client.post("/v1/jobs", json={"prompt": "another kite", "idempotency_key": "kite-5"})
    assert conflict.status_code == 409
    assert len(route_queue_jobs(redis_client)) == 6


def test_a_key_replayed_with_another_deadline_or_webhook_is_409(app, pg_settings, redis_client) -> None:
    from db.session import transaction
    from db.tenants import create_tenant, issue_api_key, set_webhooks

    with transaction(make_session_factory(make_engine(pg_settings.database_url))) as session:
        tenant = create_tenant(session, name=f"hooks-{uuid.uuid4().hex[:8]}")
        set_webhooks(tenant, hosts=("hooks.example.com",))
        key = issue_api_key(session, tenant=tenant)
    client = authorize(app.test_client(), key)
    body = {
        "prompt": "a cat",
        "idempotency_key": "hooked-1",
        "deadline_s": 60,
        "webhook_url": "https://hooks.example.com/a",
    }
    first = client.post("/v1/jobs", json=body)
    assert first.status_code == 202, first.get_json()
    for change in ({"deadline_s": 120}, {"deadline_s": None}, {"webhook_url": "https://hooks.example.com/b"}):
        response = client.post("/v1/jobs", json={**body, **change})
        assert response.status_code == 409, change
    again = client.post("/v1/jobs", json=body)
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert route_queue_length(redis_client) == 1
