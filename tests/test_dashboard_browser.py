"""The dashboard in real headless Chromium, against the API under gunicorn, real workers and PostgreSQL.

Chromium is Debian's (``make browser`` installs it); playwright only drives it, it downloads nothing.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from core.settings import Settings
from db.decisions import record_decision
from db.images import ImageStore
from db.jobs import create_job
from db.lifecycle import transition
from db.models import JobStatus
from db.session import make_engine, make_session_factory, transaction
from db.tenants import create_tenant
from router.types import RoutingDecision
from tests.conftest import create_tenant_key
from tests.servers import ApiServer
from tests.support import WorkerPool, record_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = os.environ.get("ROUTET2I_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS_PROMPT = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> a red fox & "friends"'
WAIT_MS = 120_000
JOB_IMAGE = re.compile(r"/v1/jobs/([0-9a-f-]{36})/image")

PREDICTED = {
    "edge": {"metric_set": "routet2i-v1", "values": {"definition": 0.41, "detail": 0.38, "alignment": 0.66}},
    "cloud": {"metric_set": "routet2i-v1", "values": {"definition": 0.70, "detail": 0.64, "alignment": 0.69}},
}
EXPLANATION = {
    "tokens_by_metric": {
        "definition": [{"token": "castle", "push": 0.42}, {"token": "sunset", "push": -0.12}],
        "detail": [["detailed", 0.61], ["hill", 0.05]],
        "alignment": ["castle"],
    },
    "push": "predicted cloud-minus-edge gap the token moved",
    "neighbours_gap": {"definition": 0.125, "detail": -0.031, "alignment": 0.0},
}


def png(size: int = 64) -> bytes:
    image = Image.new("RGB", (size, size))
    image.putdata([(4 * x, 4 * y, 128) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


ESCALATION = {
    "metric": "alignment",
    "value": 0.0412,
    "threshold": 0.1723,
    "escalated": True,
    "reason": "alignment 0.0412 below the escalation threshold 0.1723",
}


def insert_audited_job(settings: Settings, *, escalated: bool = False) -> str:
    """A finished job whose decision carries predicted qualities and token explanations, via db/ functions;
    ``escalated``: decided for the edge, whose image scored so badly that the cloud generated it again."""
    engine = make_engine(settings.database_url)
    stored = ImageStore(settings.image_dir).put(png())
    routed = "edge" if escalated else "cloud"
    with transaction(make_session_factory(engine)) as session:
        tenant = create_tenant(session, name=f"audit-{uuid.uuid4().hex[:8]}")
        session.flush()
        job = create_job(session, tenant_id=tenant.id, prompt="a castle on a hill at sunset, highly detailed", seed=11)
        session.flush()
        transition(session, job, JobStatus.ROUTING)
        record_decision(
            session,
            job=job,
            decision=RoutingDecision(
                tier=routed,
                router_name="routet2i",
                router_version="artifact-test-1",
                score=0.31,
                threshold=0.45,
                budget=0.3,
                budget_state={"recent_decisions": 40, "cloud_fraction": 0.25},
                reason="predicted relative superiority 0.31 below alpha 0.45",
                inputs={"prompt_chars": 44},
                predicted=PREDICTED,
                explanation=EXPLANATION,
            ),
        )
        transition(session, job, JobStatus.QUEUED, detail={"stage": "routed", "tier": routed})
        tiers = [("edge", "replaced"), ("cloud", "primary")] if escalated else [("cloud", "primary")]
        for tier, role in tiers:
            transition(session, job, JobStatus.GENERATING, detail={"tier": tier})
            record_image(
                session,
                job,
                tier=tier,
                role=role,
                cost_usd=0.065 if tier == "cloud" else 0.009,
                backend="diffusers",
                model_id=f"offline:{tier}",
                seed=11,
                image_path=stored.path,
                image_sha256=stored.sha256,
                wall_s=0.5,
                gpu_s=0.5,
            )
            if role == "replaced":
                job.tier = "cloud"
                transition(
                    session,
                    job,
                    JobStatus.QUEUED,
                    detail={"tier": tier, "stage": "escalated", "escalation": ESCALATION},
                )
        transition(session, job, JobStatus.SUCCEEDED, detail={"tier": "cloud"})
        job_id = str(job.id)
    engine.dispose()
    return job_id


def write_plot(path: Path) -> None:
    """A real evaluation-style plot (quality against cloud fraction), drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [i / 10 for i in range(11)]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    ax.plot(fractions, [0.5 + 0.2 * f for f in fractions], label="random")
    ax.plot(fractions, [0.5 + 0.2 * f**0.5 for f in fractions], label="routet2i")
    ax.set_xlabel("cloud fraction")
    ax.set_ylabel("quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports")


@pytest.fixture(scope="module")
def api_server(pg_settings: Settings, stack: WorkerPool, reports_dir: Path, tmp_path_factory) -> Iterator[ApiServer]:
    server = ApiServer(
        pg_settings,
        log_path=tmp_path_factory.mktemp("api-logs") / "api.log",
        ROUTET2I_REPORTS_DIR=str(reports_dir),
        # Shown on the Spend card; this deployment's routers reserve nothing from it (they run without one).
        ROUTET2I_CLOUD_SPEND_LIMIT_USD="5",
        ROUTET2I_BUDGET_NAME=f"dashboard-{uuid.uuid4().hex[:6]}",
    )
    yield server
    server.stop()


@pytest.fixture()
def page(api_server: ApiServer) -> Iterator[tuple[object, list[str]]]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make browser` (apt-get install -y chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        tab.on(
            "console",
            lambda m: (
                problems.append(f"console {m.type}: {m.text} at {m.location.get('url', '')}")
                if m.type == "error"
                else None
            ),
        )
        tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        yield tab, problems
        browser.close()


def image_loaded(page, selector: str) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_function(
        "sel => { const img = document.querySelector(sel); return !!img && img.complete && img.naturalWidth > 0; }",
        arg=selector,
        timeout=WAIT_MS,
    )


def test_dashboard_submits_a_job_shows_its_image_decisions_charts_and_plots(
    page, api_server: ApiServer, pg_settings: Settings, reports_dir: Path, tmp_path: Path
) -> None:
    tab, problems = page
    audited = insert_audited_job(pg_settings)

    admin_key = create_tenant_key(pg_settings, is_admin=True)

    # Without a key the API refuses, and the page says what to do.
    tab.goto(f"{api_server.url}/dashboard")
    tab.wait_for_selector("body[data-loaded=true]", timeout=WAIT_MS)
    assert tab.title() == "RouteT2I dashboard"
    assert "enter an API key" in tab.inner_text("#status-line")
    problems.clear()  # the browser logs the refused requests (401) as console errors

    tab.fill("#api-key", admin_key)
    tab.press("#api-key", "Tab")
    tab.wait_for_selector("#summary .card", timeout=WAIT_MS)
    assert tab.locator("#summary .card").count() == 6
    spend_card = tab.locator("#summary .card", has_text="Spend").inner_text()
    assert "cloud this period $0.0000 of $5.0000" in spend_card, spend_card
    # The sections load concurrently: the queues and the reports list may arrive after the summary cards.
    tab.wait_for_selector("#queues tbody tr", timeout=WAIT_MS)
    tab.wait_for_selector("#reports > *", timeout=WAIT_MS)
    assert tab.locator("#queues tbody tr").count() == 3
    assert "No evaluation plots yet" in tab.inner_text("#reports")

    # The inserted decision: predicted qualities of both tiers and the tokens behind them.
    decision = tab.locator(f'#decisions article.decision[data-job-id="{audited}"]')
    decision.wait_for(timeout=WAIT_MS)
    rows = decision.locator("table.predicted tbody tr")
    assert rows.count() == 3
    definition = rows.filter(has_text="definition").inner_text()
    assert "0.410" in definition and "0.700" in definition and "+0.290" in definition
    assert decision.locator(".token.up", has_text="castle").count() >= 1
    assert decision.locator(".token.down", has_text="sunset").count() == 1
    assert decision.locator(".token", has_text="detailed").count() == 1
    neighbours = decision.locator(".explain-neighbours").inner_text()
    assert "definition +0.13" in neighbours and "detail -0.03" in neighbours, neighbours
    assert "a castle on a hill at sunset" in decision.inner_text()

    # An escalated job's detail says that its edge image was replaced, and why.
    escalated = insert_audited_job(pg_settings, escalated=True)
    tab.click("#refresh")
    tab.click(f'#jobs tr[data-job-id="{escalated}"]')
    note = tab.locator("#job-detail .escalation")
    note.wait_for(timeout=WAIT_MS)
    assert "edge image replaced by the cloud's: alignment 0.0412 below the escalation threshold 0.1723" in (
        note.inner_text()
    )
    assert tab.locator("#job-detail .badge.escalated").count() == 1

    # Submit through the page; the prompt is hostile markup and must come back as text.
    tab.fill("#prompt", XSS_PROMPT)
    tab.fill("#seed", "5")
    tab.click("#submit-button")
    tab.wait_for_selector("#submit-result.ok", timeout=WAIT_MS)
    job_id = tab.inner_text("#submit-result code")
    image_loaded(tab, f'#jobs tr[data-job-id="{job_id}"] img.thumb')
    row = tab.locator(f'#jobs tr[data-job-id="{job_id}"]')
    assert row.locator("td.prompt").inner_text() == XSS_PROMPT
    assert row.locator(".badge.succeeded").count() == 1
    assert tab.evaluate("window.__xss") is None
    assert tab.locator('img[src="x"]').count() == 0
    assert tab.locator("script").count() == 2

    # The submitted job's detail panel: its image and its routing decision.
    image_loaded(tab, "#job-detail img.full")
    detail = tab.inner_text("#job-detail")
    assert job_id in detail and "routet2i" in detail

    # Charts drawn from /v1/stats/timeseries.
    assert tab.locator("#chart-routed svg rect.bar").count() >= 1
    assert tab.locator("#chart-cloud-fraction svg path.series").count() >= 1
    assert tab.locator("#chart-spend svg path.series").count() == 3

    # An evaluation plot appears once the reports directory has one.
    write_plot(reports_dir / "eval-genai-bench.png")
    tab.click("#refresh")
    image_loaded(tab, "#reports img.plot-img")
    assert "eval-genai-bench.png" in tab.inner_text("#reports")

    shot = tmp_path / "dashboard.png"
    tab.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as picture:
        picture.load()
        assert picture.width == 1400 and picture.height >= 1000
        stat = ImageStat.Stat(picture.convert("L"))
        assert stat.stddev[0] > 10, "screenshot is blank"
        assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 100
    # The page lists every job of the session's database, and other test stacks keep their images in stores
    # that are gone by now: the page shows "image unavailable" for those, the browser logs their 410s. Only
    # this test's jobs are judged.
    ours = {audited, escalated, job_id}
    foreign = [p for p in problems if (m := JOB_IMAGE.search(p)) and m.group(1) not in ours and " 410 " in p]
    assert [p for p in problems if p not in foreign] == []
