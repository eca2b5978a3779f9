"""The job's life cycle: every transition in the table works, every other one is refused, on real rows."""

from __future__ import annotations

import itertools
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.jobs import create_job, list_events
from db.lifecycle import TRANSITIONS, IllegalTransition, transition
from db.models import JobEvent, JobStatus, utcnow
from db.tenants import create_tenant
from db.webhooks import list_deliveries

PAIRS = list(itertools.product(JobStatus, JobStatus))


def new_job(session: Session, status: JobStatus, *, dead_lettered: bool = False):  # type: ignore[no-untyped-def]
    tenant = create_tenant(session, name=f"lc-{uuid.uuid4().hex[:8]}")
    session.flush()
    job = create_job(session, tenant_id=tenant.id, prompt="a lighthouse", seed=1)
    session.flush()
    job.status = status  # placed in the state under test directly: the table is what is tested
    if dead_lettered:
        job.dead_lettered_at = utcnow()
    session.flush()
    return job


def test_the_table_names_every_status_and_a_reason_for_each_move() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    for moves in TRANSITIONS.values():
        assert set(moves) <= set(JobStatus)
        assert all(isinstance(why, str) and why for why in moves.values())
    assert TRANSITIONS[JobStatus.SUCCEEDED] == {}  # a delivered job never changes again


@pytest.mark.parametrize(("before", "after"), [p for p in PAIRS if p[1] in TRANSITIONS[p[0]]], ids=str)
def test_every_legal_transition_works_and_is_recorded(db_session: Session, before: JobStatus, after: JobStatus) -> None:
    job = new_job(db_session, before, dead_lettered=before == JobStatus.FAILED)
    transition(db_session, job, after, detail={"why": "test"})
    db_session.flush()
    assert job.status == after
    last = list_events(db_session, job.id)[-1]
    assert (last.status, last.detail) == (after, {"why": "test"})
    if after.terminal:
        assert job.finished_at is not None
    if after == JobStatus.GENERATING:
        assert job.started_at is not None


@pytest.mark.parametrize(("before", "after"), [p for p in PAIRS if p[1] not in TRANSITIONS[p[0]]], ids=str)
def test_every_illegal_transition_is_refused_and_changes_nothing(
    db_session: Session, before: JobStatus, after: JobStatus
) -> None:
    job = new_job(db_session, before, dead_lettered=before == JobStatus.FAILED)
    events = len(list_events(db_session, job.id))
    with pytest.raises(IllegalTransition, match=f"from {before} to {after}"):
        transition(db_session, job, after)
    db_session.flush()
    assert job.status == before
    assert len(list_events(db_session, job.id)) == events


def test_a_job_that_failed_for_good_is_not_replayed(db_session: Session) -> None:
    """Only a dead-lettered job leaves ``failed`` (routet2i dlq replay); a plain failure is final."""
    job = new_job(db_session, JobStatus.FAILED)
    with pytest.raises(IllegalTransition, match="only a dead-lettered job is replayed"):
        transition(db_session, job, JobStatus.QUEUED)
    db_session.flush()
    assert job.status == JobStatus.FAILED
    queued = db_session.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.status == "queued"))
    assert len(queued.all()) == 1  # its submission's, nothing more


@pytest.mark.parametrize("status", [s for s in JobStatus if s.terminal])
def test_a_terminal_state_of_a_job_with_a_webhook_writes_its_delivery_in_the_same_transaction(
    db_session: Session, status: JobStatus
) -> None:
    job = new_job(db_session, JobStatus.GENERATING)
    job.webhook_url = "https://hooks.example/routet2i"
    transition(db_session, job, status)
    db_session.flush()
    (delivery,) = list_deliveries(db_session, job_id=job.id)
    assert (delivery.event, delivery.url, delivery.state, delivery.attempts) == (
        status,
        "https://hooks.example/routet2i",
        "pending",
        0,
    )


def test_an_unfinished_state_writes_no_delivery(db_session: Session) -> None:
    job = new_job(db_session, JobStatus.QUEUED)
    job.webhook_url = "https://hooks.example/routet2i"
    transition(db_session, job, JobStatus.ROUTING)
    db_session.flush()
    assert list_deliveries(db_session, job_id=job.id) == []
