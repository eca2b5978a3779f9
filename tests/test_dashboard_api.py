"""The JSON endpoints behind the dashboard (time series, queues, evaluation plots) and the page's headers."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy.orm import Session

from api.app import create_app
from core.settings import Settings
from db.jobs import create_job
from db.migrate import upgrade
from db.models import CostEntry, Decision, Generation, JobStatus
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant, get_tenant_by_name, issue_api_key
from db.timeseries import aligned_window, timeseries
from tests.conftest import authorize, create_tenant_key

UNTIL = datetime(2031, 5, 17, 12, 34, 56, tzinfo=UTC)
"""Far from any other test's rows, so a window ending here holds only this module's rows."""


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    if request.param == "postgresql":
        yield request.getfixturevalue("db_session")
        return
    url = f"sqlite:///{tmp_path / 'series.db'}"
    upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as sqlite_session:
        yield sqlite_session
    engine.dispose()


def tenant_id(session: Session, name: str = "series") -> uuid.UUID:
    tenant = get_tenant_by_name(session, name)
    if tenant is None:
        tenant = create_tenant(session, name=name)
        session.flush()
    return tenant.id


def add_routed(
    session: Session,
    *,
    tier: str,
    at: datetime,
    usd: float,
    status: JobStatus = JobStatus.SUCCEEDED,
    tenant: str = "series",
) -> None:
    """A job submitted, decided, billed and finished at ``at``."""
    job = create_job(session, tenant_id=tenant_id(session, tenant), prompt="series", seed=1)
    job.created_at, job.tier, job.status, job.finished_at = at, tier, status, at
    session.add(
        Decision(
            job_id=job.id,
            router_name="t",
            router_version="1",
            inputs={},
            score=0.0,
            budget=0.3,
            budget_state={},
            tier=tier,
            reason="t",
            latency_ms=1.0,
            created_at=at,
        )
    )
    generation = Generation(
        id=uuid.uuid4(),
        job_id=job.id,
        tier=tier,
        role="primary",
        backend="null",
        model_id="m",
        device="cpu",
        seed=1,
        steps=1,
        width=64,
        height=64,
        image_path="x.png",
        image_sha256="0" * 64,
        wall_s=1.0,
        gpu_s=1.5,
    )
    session.add(generation)
    session.add(
        CostEntry(job_id=job.id, generation=generation, tier=tier, usd=Decimal(str(usd)), gpu_s=1.5, created_at=at)
    )
    session.flush()


def test_aligned_window_ends_with_the_bucket_holding_until() -> None:
    start, end = aligned_window(width_s=60, count=3, until=at_time(12, 34, 56))
    assert (start, end) == (at_time(12, 32, 0), at_time(12, 35, 0))


def at_time(h: int, m: int, s: int) -> datetime:
    return UNTIL.replace(hour=h, minute=m, second=s)


def test_timeseries_counts_routing_spend_and_outcomes_per_bucket(session: Session) -> None:
    spent_before = timeseries(session, width_s=60, count=3, until=UNTIL).spend_before_usd
    add_routed(session, tier="edge", at=at_time(12, 32, 0), usd=0.009)  # first instant of the first bucket
    add_routed(session, tier="cloud", at=at_time(12, 32, 59), usd=0.065)
    add_routed(session, tier="cloud", at=at_time(12, 34, 10), usd=0.065, status=JobStatus.FAILED)
    add_routed(session, tier="edge", at=at_time(12, 31, 59), usd=1.0)  # before the window: only in spend_before
    add_routed(session, tier="edge", at=at_time(12, 35, 0), usd=5.0)  # after it: nowhere

    series = timeseries(session, width_s=60, count=3, until=UNTIL)
    assert [b.start for b in series.buckets] == [at_time(12, 32, 0), at_time(12, 33, 0), at_time(12, 34, 0)]
    first, empty, last = series.buckets
    assert first.routed == {"edge": 1, "cloud": 1} and first.cloud_fraction == 0.5
    assert first.spend_usd == pytest.approx({"edge": 0.009, "cloud": 0.065})
    assert first.gpu_s == pytest.approx({"edge": 1.5, "cloud": 1.5})
    assert first.submitted == 2 and first.finished == {"succeeded": 2, "failed": 0, "cancelled": 0, "expired": 0}
    assert empty.routed == {"edge": 0, "cloud": 0} and empty.cloud_fraction is None and empty.submitted == 0
    assert last.routed == {"edge": 0, "cloud": 1} and last.cloud_fraction == 1.0
    assert last.finished == {"succeeded": 0, "failed": 1, "cancelled": 0, "expired": 0}
    assert series.spend_before_usd - spent_before == pytest.approx(1.0)


# --- through the API (SQLite, committed rows) ---------------------------------------------------------


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str) -> Settings:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    return Settings(database_url=url, broker_url=redis_url, reports_dir=tmp_path / "reports", cloud_budget=0.4)


@pytest.fixture()
def client(settings: Settings) -> FlaskClient:
    """A client with an admin key: it sees every tenant."""
    return authorize(create_app(settings).test_client(), create_tenant_key(settings, is_admin=True))


def test_timeseries_endpoint(client: FlaskClient, settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as s:
        add_routed(s, tier="cloud", at=at_time(12, 0, 1), usd=0.065)
        add_routed(s, tier="edge", at=at_time(11, 0, 0), usd=0.009)
    engine.dispose()
    body = client.get(
        f"/v1/stats/timeseries?bucket=hour&buckets=2&until={UNTIL.isoformat().replace('+', '%2B')}"
    ).get_json()
    assert body["bucket"] == "hour" and body["bucket_s"] == 3600
    assert body["budget"]["cloud_fraction"] == 0.4
    assert [i["start"] for i in body["items"]] == [at_time(11, 0, 0).isoformat(), at_time(12, 0, 0).isoformat()]
    assert [i["routed"] for i in body["items"]] == [{"edge": 1, "cloud": 0}, {"edge": 0, "cloud": 1}]
    assert [i["cloud_fraction"] for i in body["items"]] == [0.0, 1.0]
    assert body["items"][1]["spend_usd"] == {"edge": 0.0, "cloud": 0.065}
    assert body["spend_before_usd"] == 0.0
    assert body["scope"] == "all tenants"
    assert len(client.get("/v1/stats/timeseries").get_json()["items"]) == 60


def test_timeseries_of_a_tenant_counts_only_its_jobs_and_needs_a_key(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as s:
        add_routed(s, tier="cloud", at=at_time(12, 0, 1), usd=0.065, tenant="other")
        add_routed(s, tier="edge", at=at_time(12, 0, 2), usd=0.009, tenant="mine")
        mine = get_tenant_by_name(s, "mine")
        assert mine is not None
        key = issue_api_key(s, tenant=mine)
    engine.dispose()
    app = create_app(settings)
    query = f"/v1/stats/timeseries?bucket=hour&buckets=1&until={UNTIL.isoformat().replace('+', '%2B')}"
    assert app.test_client().get(query).status_code == 401
    body = authorize(app.test_client(), key).get(query).get_json()
    assert body["scope"] == "mine"
    assert body["items"][0]["routed"] == {"edge": 1, "cloud": 0}
    assert body["items"][0]["spend_usd"] == {"edge": 0.009, "cloud": 0.0}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("bucket=week", "bucket"),
        ("buckets=0", "buckets"),
        ("buckets=100000", "buckets"),
        ("until=yesterday", "until"),
        ("colour=red", "colour"),
    ],
)
def test_timeseries_refuses_bad_parameters_by_name(client: FlaskClient, query: str, field: str) -> None:
    response = client.get(f"/v1/stats/timeseries?{query}")
    assert response.status_code == 400
    assert response.get_json()["error"]["field"] == field


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reports_lists_and_serves_only_png_plots(client: FlaskClient, settings: Settings) -> None:
    assert client.get("/v1/reports").get_json() == {"items": []}  # no directory yet
    settings.reports_dir.mkdir()
    (settings.reports_dir / "pgr.png").write_bytes(png_bytes((255, 0, 0)))
    (settings.reports_dir / "notes.txt").write_text("not a plot")
    (settings.reports_dir / "nested").mkdir()
    (settings.reports_dir / "nested" / "inner.png").write_bytes(png_bytes((0, 0, 255)))

    items = client.get("/v1/reports").get_json()["items"]
    assert [i["name"] for i in items] == ["pgr.png"]
    assert items[0]["url"] == "/v1/reports/pgr.png"
    served = client.get("/v1/reports/pgr.png")
    assert served.status_code == 200 and served.mimetype == "image/png"
    assert served.data == (settings.reports_dir / "pgr.png").read_bytes()
    for name in ("notes.txt", "nested%2Finner.png", "..%2Fapi.db", "missing.png", ".hidden.png"):
        response = client.get(f"/v1/reports/{name}")
        assert response.status_code == 404, name
        assert response.get_json()["error"]["code"] == "not_found"


def test_queues_endpoint_reports_depth_and_backlog(client: FlaskClient) -> None:
    body = client.get("/v1/queues").get_json()
    assert [q["name"] for q in body["items"]] == ["route", "edge", "cloud"]
    assert body["workers_included"] is False
    assert all(q["workers"] == [] and q["depth"] >= 0 for q in body["items"])
    assert client.get("/v1/queues?workers=maybe").status_code == 400


def test_queues_and_reports_need_an_admin_key(settings: Settings) -> None:
    app = create_app(settings)
    tenant = authorize(app.test_client(), create_tenant_key(settings))
    settings.reports_dir.mkdir()
    (settings.reports_dir / "pgr.png").write_bytes(png_bytes((255, 0, 0)))
    for path in ("/v1/queues", "/v1/reports", "/v1/reports/pgr.png"):  # every tenant's figures and evaluation
        forbidden = tenant.get(path)
        assert forbidden.status_code == 403 and forbidden.get_json()["error"]["code"] == "forbidden", path
    assert app.test_client().get("/v1/reports").status_code == 401
    assert app.test_client().get("/v1/reports/pgr.png").status_code == 401
    assert app.test_client().get("/v1/queues").status_code == 401
    assert app.test_client().get("/dashboard").status_code == 200  # the page holds no data


def test_dashboard_page_and_assets_carry_a_strict_content_security_policy(client: FlaskClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "<script>" not in html and re.search(r"\son[a-z]+\s*=", html) is None  # no inline code
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    for asset in ("app.js", "charts.js", "app.css"):
        response = client.get(f"/dashboard/static/{asset}")
        assert response.status_code == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
    script = client.get("/dashboard/static/app.js").get_data(as_text=True)
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    assert "Content-Security-Policy" not in client.get("/v1/stats").headers
