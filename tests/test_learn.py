"""The model registry and the learning loop on a real PostgreSQL and Redis (no workers: labels written as a
worker writes them)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis as redis_lib
from sqlalchemy import delete

from api.app import create_app
from core.settings import Settings
from db.models import Job, RouterModel, utcnow
from db.redis_state import get_shadow_rate
from db.registry import (
    CHAMPION,
    NewModel,
    RegistryError,
    champion,
    list_models,
    pack,
    promote,
    register,
    rollback,
    unpack,
)
from db.session import make_engine, make_session_factory, transaction
from router.base import create_router
from router.embeddings import SentenceEncoder
from router.learning import shadow_rate
from tests.conftest import authorize, create_tenant_key
from tests.support import decided_for_the_edge, record_image
from worker.learner import Learner

pytestmark = pytest.mark.integration

SMALL = {"members": 1, "max_epochs": 20, "patience": 5}
"""A RouteT2I that trains in a second: the loop's logic is under test here, not the router's quality."""


@pytest.fixture()
def slot_settings(pg_settings: Settings, redis_client: redis_lib.Redis) -> Iterator[Settings]:
    """Settings of a deployment of the test's own (its budget name makes its registry slot), so models of other
    tests stay out of it."""
    settings = pg_settings.model_copy(
        update={"budget_name": f"learn-{uuid.uuid4().hex[:6]}", "shadow_rate": 0.5, "learn_retrain_every": 10}
    )
    yield settings
    engine = make_engine(pg_settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        session.execute(delete(RouterModel).where(RouterModel.slot == settings.model_slot))
        # The labels of its own metric set go too: a later export of the session's labels sees one set.
        session.execute(delete(Job).where(Job.id.in_(LABELLED)))
    engine.dispose()
    LABELLED.clear()


LABELLED: list[uuid.UUID] = []
"""Jobs the running test labelled."""


def rule_artifact(tmp_path: Path, name: str = "longest-prompt-first") -> NewModel:
    router = create_router(name)
    directory = router.save(tmp_path / name)
    return NewModel(
        slot="x", kind=router.name, version=router.version, encoder=None, directory=directory, source="test"
    )


# --- the registry ---------------------------------------------------------------------------------------


def test_one_champion_per_router_promote_and_rollback(db_session, tmp_path: Path) -> None:
    slot = f"slot-{uuid.uuid4().hex[:6]}"
    first = register(db_session, dataclasses.replace(rule_artifact(tmp_path), slot=slot))
    second = register(db_session, dataclasses.replace(rule_artifact(tmp_path, "noun-count"), slot=slot))
    promote(db_session, first.id, by="test")
    assert champion(db_session, slot).id == first.id
    promote(db_session, second.id, by="test")
    assert champion(db_session, slot).id == second.id
    assert (first.state, second.state) == ("retired", CHAMPION) and first.retired_at is not None
    assert rollback(db_session, slot, by="test").id == first.id
    assert champion(db_session, slot).id == first.id and second.state == "retired"
    assert [m.state for m in list_models(db_session, slot=slot)].count(CHAMPION) == 1
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback(db_session, f"other-{slot}", by="test")


def test_the_database_refuses_a_second_champion(db_session, tmp_path: Path) -> None:
    import sqlalchemy.exc

    slot = f"slot-{uuid.uuid4().hex[:6]}"
    one = register(db_session, dataclasses.replace(rule_artifact(tmp_path), slot=slot))
    two = register(db_session, dataclasses.replace(rule_artifact(tmp_path), slot=slot))
    one.state = CHAMPION
    db_session.flush()
    two.state = CHAMPION
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        db_session.flush()


def test_an_artifact_round_trips_byte_for_byte(tmp_path: Path) -> None:
    model = rule_artifact(tmp_path)
    packed = pack(model.directory)
    assert pack(model.directory) == packed  # same files, same bytes
    restored = unpack(packed, tmp_path / "restored")
    assert (restored / "manifest.json").read_bytes() == (model.directory / "manifest.json").read_bytes()


def test_the_registry_over_http_is_for_admins(slot_settings: Settings, tmp_path: Path) -> None:
    engine = make_engine(slot_settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        first = register(session, dataclasses.replace(rule_artifact(tmp_path), slot=slot_settings.model_slot)).id
        second = register(session, dataclasses.replace(rule_artifact(tmp_path), slot=slot_settings.model_slot)).id
    engine.dispose()
    app = create_app(slot_settings)
    tenant = authorize(app.test_client(), create_tenant_key(slot_settings))
    assert tenant.get("/v1/models").status_code == 403
    admin = authorize(app.test_client(), create_tenant_key(slot_settings, is_admin=True))
    assert admin.post(f"/v1/models/{first}/promote").get_json()["state"] == CHAMPION
    promoted = admin.post(f"/v1/models/{second}/promote").get_json()
    assert promoted["state"] == CHAMPION and promoted["promoted_by"].startswith("admin ")
    back = admin.post("/v1/models/rollback", query_string={"slot": slot_settings.model_slot})
    assert back.get_json()["id"] == str(first)
    listed = admin.get("/v1/models", query_string={"slot": slot_settings.model_slot}).get_json()["items"]
    assert {m["id"]: m["state"] for m in listed} == {str(first): CHAMPION, str(second): "retired"}
    assert admin.get(f"/v1/models/{uuid.uuid4()}").status_code == 404
    assert admin.post("/v1/models/rollback", query_string={"slot": "nothing/here"}).status_code == 409


# --- the loop -------------------------------------------------------------------------------------------

WORDS = ("a lighthouse", "a bicycle", "a fox", "a tram", "a violin", "a kite", "a cactus", "a harbour")


def prompt_of(i: int) -> str:
    """Prompts of 1 to 8 things; every third one beside a teapot, whatever its length."""
    teapot = ", beside a teapot" if i % 3 == 0 else ""
    return " and ".join(WORDS[: 1 + i % len(WORDS)]) + teapot + f", scene {i}"


def labelled(settings: Settings, metric_set: str, count: int, *, cloud_wins) -> None:  # type: ignore[no-untyped-def]
    """``count`` shadow-sampled jobs scored on both tiers, oldest first: the cloud's image is better where
    ``cloud_wins(prompt)`` says so. Scored with ``metric_set``, a set of the test's own, so the labels of other
    tests stay out of its loop."""
    engine = make_engine(settings.database_url)
    start = utcnow() - timedelta(hours=1)
    with transaction(make_session_factory(engine)) as session:
        for i in range(count):
            prompt = prompt_of(i)
            job = decided_for_the_edge(session, prompt, seed=i)
            job.created_at = start + timedelta(seconds=i)
            LABELLED.append(job.id)
            gain = 0.3 if cloud_wins(prompt) else -0.1
            for tier, value in (("edge", 0.5), ("cloud", 0.5 + gain)):
                quality = {"metric_set": metric_set, "values": {"alignment": value}}
                role = "primary" if tier == "edge" else "shadow"
                record_image(session, job, tier=tier, role=role, cost_usd=0.01, quality=quality)
    engine.dispose()


def learner(settings: Settings, model_cache: Path, metric_set: str, **config: object) -> Learner:
    encoder = SentenceEncoder(graph_dir=model_cache / "encoders")
    result = Learner(
        settings,
        make_session_factory(make_engine(settings.database_url)),
        redis_lib.Redis.from_url(settings.state_redis_url),
        encoder,
        router_settings=SMALL if config.get("router", "routet2i") == "routet2i" else {},
        metric_set=metric_set,
    )
    result.config = dataclasses.replace(result.config, **config)  # type: ignore[arg-type]
    return result


@pytest.mark.slow
def test_a_worse_challenger_is_not_promoted_and_its_verdict_is_recorded(slot_settings, model_cache) -> None:  # type: ignore[no-untyped-def]
    # The cloud wins on long prompts: the prompt rule (longest first) is the best prior, and nearly the oracle.
    metric_set = f"test-{uuid.uuid4().hex[:6]}"
    labelled(slot_settings, metric_set, 80, cloud_wins=lambda prompt: prompt.count(" and ") >= 4)
    loop = learner(slot_settings, model_cache, metric_set, router="random", warm_start=False)  # it guesses
    first = loop.run_once()
    assert first.action == "prior" and first.promoted
    assert first.priors["rule"] > first.priors.get("configured", 0.0)
    judged = loop.run_once()
    assert judged.action == "judged" and not judged.promoted
    assert judged.reason.startswith("worse beyond noise") or judged.reason.startswith("not ahead")
    engine = make_engine(slot_settings.database_url)
    with make_session_factory(engine)() as session:
        models = {m.state: m for m in list_models(session, slot=slot_settings.model_slot)}
        assert models[CHAMPION].kind == "longest-prompt-first"  # the prior still routes
        recorded = models["challenger"].evaluation
    engine.dispose()
    assert recorded is not None and recorded["promote"] is False and recorded["reason"] == judged.reason
    assert recorded["comparisons"]["pgr"]["difference"] < 0
    assert recorded["trained_on"] + recorded["held_out"] == 80
    # Too few new labels since: the next pass waits.
    assert loop.run_once().action == "waiting"


@pytest.mark.slow
def test_a_better_challenger_is_promoted_and_the_shadow_rate_follows(slot_settings, model_cache) -> None:  # type: ignore[no-untyped-def]
    # The cloud wins exactly where the prompt names a teapot, whatever its length: the rule cannot see it.
    metric_set = f"test-{uuid.uuid4().hex[:6]}"
    labelled(slot_settings, metric_set, 120, cloud_wins=lambda prompt: "teapot" in prompt)
    loop = learner(slot_settings, model_cache, metric_set, router="knn", warm_start=False)
    assert loop.run_once().action == "prior"
    newness_only = shadow_rate(120, max_rate=0.5, min_rate=0.02, settle_labels=1000)
    assert get_shadow_rate(loop.state, slot_settings.model_slot) == pytest.approx(newness_only)
    judged = loop.run_once()
    assert judged.action == "judged" and judged.promoted, judged.reason
    engine = make_engine(slot_settings.database_url)
    with make_session_factory(engine)() as session:
        assert champion(session, slot_settings.model_slot).kind == "knn"
    engine.dispose()
    # The route workers' next rate: the new champion's error on the held-out labels counts too.
    recent_error = 1.0 - judged.verdict["comparisons"]["pgr"]["challenger"]  # type: ignore[index]
    expected = shadow_rate(120, max_rate=0.5, min_rate=0.02, settle_labels=1000, recent_error=recent_error)
    assert get_shadow_rate(loop.state, slot_settings.model_slot) == pytest.approx(expected)
