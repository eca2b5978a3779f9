"""Jobs through a live stack, for the tests that run real workers on a Redis of their own: submitted as one batch
through the API, then awaited in the database until each ends."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from api.app import create_app
from core.settings import Settings
from db.models import Job
from db.session import make_engine, make_session_factory
from tests.conftest import authorize, create_tenant_key
from tests.support import wait_until


def submit(settings: Settings, jobs: list[str] | list[dict[str, Any]], **tenant: Any) -> list[uuid.UUID]:
    """Submit ``jobs`` (prompts, or job bodies) in one ``POST /v1/jobs/batch`` as a new tenant (``tenant``: its
    options); returns the job ids in order."""
    client = authorize(create_app(settings).test_client(), create_tenant_key(settings, **tenant))
    items = [{"prompt": job} if isinstance(job, str) else job for job in jobs]
    response = client.post("/v1/jobs/batch", json={"jobs": items})
    assert response.status_code == 202, response.get_json()
    return [uuid.UUID(item["id"]) for item in response.get_json()["items"]]


def wait_ended(settings: Settings, ids: list[uuid.UUID], *, timeout: float = 180.0) -> list[Job]:
    """The jobs ``ids`` once every one has succeeded or failed."""
    sessions = make_session_factory(make_engine(settings.database_url))

    def ended() -> list[Job] | None:
        with sessions() as session:
            jobs = session.scalars(select(Job).where(Job.id.in_(ids))).all()
        return list(jobs) if all(j.status in ("succeeded", "failed") for j in jobs) else None

    return wait_until(ended, timeout=timeout, interval=0.2, what="the jobs to end")
