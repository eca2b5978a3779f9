"""``routet2i data export`` on real PostgreSQL: labelled (shadow-sampled) jobs become a replay log."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import delete
from sqlalchemy.orm import Session

from cli.main import main
from db.jobs import create_job
from db.labels import iter_labelled_jobs
from db.models import Job
from db.session import make_engine, make_session_factory
from db.tenants import create_tenant
from router.log import read_log
from tests.support import record_image

pytestmark = pytest.mark.integration


def add_generation(session: Session, job: Job, tier: str, quality: dict | None, cost: float) -> None:
    record_image(
        session, job, tier=tier, role="primary" if tier == "edge" else "shadow", cost_usd=cost, quality=quality
    )


def vector(metric_set: str, **values: float) -> dict:
    return {"metric_set": metric_set, "values": values}


def populate(session: Session, tag: str) -> dict[str, Job]:
    """Jobs in every state a labelled-jobs query must tell apart."""
    jobs = {}
    tenant = create_tenant(session, name=f"export-{tag}-{uuid.uuid4().hex[:6]}")
    session.flush()
    for name in ("both", "edge_only", "unscored", "other_set", "both2"):
        jobs[name] = create_job(session, tenant_id=tenant.id, prompt=f"{tag} prompt {name}", seed=1)
    session.flush()
    add_generation(session, jobs["both"], "edge", vector("v1", sharpness=0.4, alignment=0.2), 0.009)
    add_generation(session, jobs["both"], "cloud", vector("v1", sharpness=0.7, alignment=0.3), 0.065)
    add_generation(session, jobs["edge_only"], "edge", vector("v1", sharpness=0.5, alignment=0.5), 0.009)
    add_generation(session, jobs["unscored"], "edge", vector("v1", sharpness=0.5, alignment=0.5), 0.009)
    add_generation(session, jobs["unscored"], "cloud", None, 0.065)
    add_generation(session, jobs["other_set"], "edge", vector("v0", sharpness=0.1, alignment=0.1), 0.009)
    add_generation(session, jobs["other_set"], "cloud", vector("v0", sharpness=0.2, alignment=0.1), 0.065)
    add_generation(session, jobs["both2"], "edge", vector("v1", sharpness=0.6, alignment=0.6), 0.009)
    add_generation(session, jobs["both2"], "cloud", vector("v1", sharpness=0.5, alignment=0.9), 0.065)
    session.flush()
    return jobs


def test_only_jobs_scored_on_both_tiers_are_labelled(db_session: Session) -> None:
    jobs = populate(db_session, "rollback")
    ours = {j.id for j in jobs.values()}
    labelled = [j for j in iter_labelled_jobs(db_session) if j.job_id in ours]
    assert {j.job_id for j in labelled} == {jobs["both"].id, jobs["other_set"].id, jobs["both2"].id}
    v1 = [j for j in iter_labelled_jobs(db_session, metric_set="v1") if j.job_id in ours]
    assert [j.job_id for j in v1] == [jobs["both"].id, jobs["both2"].id]  # oldest first
    first = v1[0]
    assert first.edge["values"] == {"sharpness": 0.4, "alignment": 0.2}
    assert (first.edge_usd, first.cloud_usd) == (0.009, 0.065)
    assert (first.edge_model, first.cloud_model) == ("edge-model", "cloud-model")


def test_export_command_writes_a_replay_log(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    tag = uuid.uuid4().hex[:8]
    with sessions() as session, session.begin():
        jobs = populate(session, tag)
    ids = [j.id for j in jobs.values()]
    try:
        monkeypatch.setenv("ROUTET2I_DATABASE_URL", pg_url)
        runner = CliRunner()
        out = tmp_path / "shadow.jsonl"
        result = runner.invoke(main, ["data", "export", "-o", str(out)])
        # Two metric sets in the database: the command asks which one, naming the option.
        assert result.exit_code == 2 and "'--metric-set'" in result.output and "v0, v1" in result.output

        result = runner.invoke(main, ["data", "export", "-o", str(out), "--metric-set", "v1"])
        assert result.exit_code == 0, result.output
        records = {r.prompt: r for r in read_log(out) if r.prompt.startswith(tag)}
        assert set(records) == {f"{tag} prompt both", f"{tag} prompt both2"}
        both = records[f"{tag} prompt both"]
        assert both.id == str(jobs["both"].id)
        assert dict(both.edge.values) == {"sharpness": 0.4, "alignment": 0.2}
        assert dict(both.cloud.values) == {"sharpness": 0.7, "alignment": 0.3}
        assert both.extra["cost"] == {"edge": 0.009, "cloud": 0.065}
        assert both.edge.metric_set == both.cloud.metric_set == "v1"

        # The exported log replays, with the billed costs.
        result = runner.invoke(main, ["replay", "--log", str(out), "--router", "all-cloud", "--budget", "0", "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        decided = {d["id"]: d["tier"] for d in doc["decisions"]}
        assert decided[str(jobs["both"].id)] == decided[str(jobs["both2"].id)] == "cloud"
        assert doc["cost_usd"]["routed"] == pytest.approx(0.065 * doc["prompts"])
    finally:
        with sessions() as session, session.begin():
            session.execute(delete(Job).where(Job.id.in_(ids)))
        engine.dispose()
