"""Fallback and circuit breakers through the real stack: the cloud tier's image API is down (nothing listens
at its URL), then comes back."""

from __future__ import annotations

import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask, Response
from PIL import Image
from sqlalchemy import select
from werkzeug.serving import make_server

from core.settings import Settings
from db.breaker import CLOSED, OPEN, CircuitBreaker
from db.models import Decision, Generation, JobEvent
from db.session import make_engine, make_session_factory
from tests.conftest import make_settings
from tests.live_jobs import submit, wait_ended
from tests.support import PrivateRedis, WorkerPool, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COOLDOWN_S = 6.0
FAILURES = 3


class ComeBackApi:
    """A hosted image API that is down (nothing listens on its port) until :meth:`start`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/generate"
        self.calls = 0
        self.server: Any = None

    def start(self) -> None:
        app = Flask("image-api")

        @app.post("/generate")
        def generate() -> Response:
            self.calls += 1
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (0, 0, 255)).save(buffer, format="PNG")
            return Response(buffer.getvalue(), mimetype="image/png")

        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture(scope="module")
def api_down() -> Iterator[ComeBackApi]:
    api = ComeBackApi()
    yield api
    api.close()


@pytest.fixture(scope="module")
def stack(
    pg_url: str, api_down: ComeBackApi, tmp_path_factory: pytest.TempPathFactory, model_cache: Any
) -> Iterator[Settings]:
    """The stack on a Redis of its own: no other module's workers take its jobs."""
    broker = PrivateRedis(tmp_path_factory.mktemp("fallback-redis"))
    broker.start()
    settings = make_settings(
        database_url=pg_url,
        broker_url=broker.url,
        image_dir=tmp_path_factory.mktemp("fallback-images"),
        cache_dir=model_cache,
        edge={"backend": "null", "model": "null-edge", "width": 64, "height": 64},
        cloud={
            "backend": "http",
            "url": api_down.url,
            "model": "hosted-model",
            "width": 64,
            "height": 64,
            "max_retries": 0,
            "timeout_s": 5,
        },
        scorer={"enabled": False},
        router="prompt-complexity",
        cloud_budget=0.5,
        budget_window=20,
        budget_name="fallback",
        breaker_failures=FAILURES,
        breaker_cooldown_s=COOLDOWN_S,
    )
    pool = WorkerPool(settings, log_dir=tmp_path_factory.mktemp("fallback-logs"))
    try:
        pool.start_all()
        yield settings
    finally:
        pool.stop_all()
        broker.stop()


PROMPTS = [
    f"a {adjective} {thing} in the style of an old {style}, with {detail}"
    for adjective, thing, style, detail in [
        ("red", "lighthouse on a cliff", "woodcut", "seagulls and a storm rolling in over the sea"),
        ("quiet", "library at night", "oil painting", "a cat asleep on a stack of atlases"),
        ("busy", "harbour market", "photograph", "fishermen, crates of lemons and a blue tram"),
        ("tiny", "robot gardener", "watercolour", "tomato plants, a watering can and morning dew"),
        ("golden", "wheat field", "poster", "a red tractor and three crows on a fence"),
        ("snowy", "mountain village", "postcard", "smoke from chimneys and a horse-drawn sleigh"),
        ("neon", "noodle bar", "comic", "rain on the window and a chef flipping a wok"),
        ("ancient", "stone bridge", "etching", "ivy, a rowing boat and two herons"),
    ]
]


def test_a_dead_cloud_falls_back_to_the_edge_opens_its_breaker_and_closes_when_it_returns(
    stack: Settings, api_down: ComeBackApi
) -> None:
    settings = stack
    breaker = CircuitBreaker.for_settings(settings, redis_lib.Redis.from_url(settings.broker_url))
    sessions = make_session_factory(make_engine(settings.database_url))

    # 1. The cloud is down: jobs routed there fail on it and succeed on the edge; none fails. Once the breaker
    # has opened, routing sends no more jobs to the cloud.
    first = submit(settings, [f"{p} ({i})" for i in range(2) for p in PROMPTS])
    wait_ended(settings, first)
    assert breaker.states(["cloud"])["cloud"].state == OPEN
    first += submit(settings, [f"{p} (later)" for p in PROMPTS])
    jobs = wait_ended(settings, first)
    assert {job.status for job in jobs} == {"succeeded"}
    with sessions() as session:
        decisions = session.scalars(select(Decision).where(Decision.job_id.in_(first))).all()
        fell_back = [d for d in decisions if d.budget_state.get("fallbacks")]
        held_out = [d for d in decisions if "held out" in d.reason]
        events = session.scalars(select(JobEvent).where(JobEvent.job_id.in_(first), JobEvent.status == "queued")).all()
        made = {t for (t,) in session.execute(select(Generation.tier).where(Generation.job_id.in_(first)))}
    assert made == {"edge"}
    assert len(fell_back) >= FAILURES
    for decision in fell_back:
        assert decision.tier == "cloud"
        step = decision.budget_state["fallbacks"][0]
        assert (step["from"], step["to"]) == ("cloud", "edge")
        assert "image API unreachable" in step["reason"] or "circuit breaker is open" in step["reason"]
    assert sum(1 for e in events if (e.detail or {}).get("stage") == "fallback") == len(fell_back)
    assert len(held_out) == len(PROMPTS) and all(d.tier == "edge" for d in held_out)
    assert api_down.calls == 0

    # 2. The API comes back: after the cool-down a probe goes through, the breaker closes, routing resumes.
    api_down.start()
    wait_until(lambda: breaker.states(["cloud"])["cloud"].state != OPEN, timeout=COOLDOWN_S + 10, what="the cool-down")
    second: list[uuid.UUID] = []
    for round_ in range(10):
        second += submit(settings, [f"{p} (again {round_})" for p in PROMPTS])
        wait_ended(settings, second)
        if breaker.states(["cloud"])["cloud"].state == CLOSED:
            break
    jobs = wait_ended(settings, second)
    assert {job.status for job in jobs} == {"succeeded"}
    assert breaker.states(["cloud"])["cloud"].state == CLOSED
    third = submit(settings, [f"{p} (after)" for p in PROMPTS])
    assert {job.status for job in wait_ended(settings, third)} == {"succeeded"}
    with sessions() as session:
        on_cloud = session.scalars(
            select(Generation).where(Generation.job_id.in_(second + third), Generation.tier == "cloud")
        ).all()
    assert on_cloud and api_down.calls >= len(on_cloud)
