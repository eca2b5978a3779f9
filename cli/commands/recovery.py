"""``routet2i reconcile`` and ``routet2i dlq``: recover lost jobs, inspect and replay dead letters."""

from __future__ import annotations

import time
import uuid

import click

from cli.commands.common import echo_json, load_settings


@click.command()
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option(
    "--interval",
    type=click.FloatRange(0.1),
    default=None,
    help="Seconds between passes (default: ROUTET2I_RECONCILE_INTERVAL_S).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each pass's report as JSON.")
def reconcile(once: bool, interval: float | None, as_json: bool) -> None:
    """Re-publish jobs whose queue message was lost; dead-letter jobs lost too often."""
    from db.redis_state import connect
    from db.session import make_engine, make_session_factory
    from worker.recovery import reconcile as run_pass
    from worker.transport import create_celery

    settings = load_settings()
    sessions = make_session_factory(make_engine(settings.database_url))
    app = create_celery(settings)
    client = connect(settings.broker_url)
    pause = interval or settings.reconcile_interval_s
    while True:
        report = run_pass(sessions, app, client, settings)
        if as_json:
            echo_json(report.to_dict())
        elif once or report.republished or report.dead_lettered or report.orphaned:
            click.echo(
                f"examined {report.examined}, republished {len(report.republished)}, "
                f"dead-lettered {len(report.dead_lettered)}, still queued {report.still_queued}, "
                f"published again from dead workers {len(report.orphaned)}"
            )
        if once:
            return
        time.sleep(pause)


@click.group()
def dlq() -> None:
    """Dead-lettered jobs: failed after exhausting retries or redeliveries, kept for replay."""


@dlq.command(name="list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_(limit: int, as_json: bool) -> None:
    """List dead-lettered jobs, newest first."""
    from db.jobs import list_dead_letters
    from db.session import make_engine, make_session_factory

    sessions = make_session_factory(make_engine(load_settings().database_url))
    with sessions() as session:
        rows = [
            {
                "id": str(j.id),
                "tier": j.tier,
                "dead_lettered_at": j.dead_lettered_at,
                "error": j.error,
                "prompt": j.prompt,
            }
            for j in list_dead_letters(session, limit=limit)
        ]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['id']}  {row['tier'] or '-':<5}  {row['dead_lettered_at']}  {row['error']}")
    click.echo(f"{len(rows)} dead-lettered job(s)", err=True)


@dlq.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--tier", default=None, help="Send to this tier (one of ROUTET2I_TIERS) instead of routing.")
def replay(job_ids: tuple[str, ...], tier: str | None) -> None:
    """Put dead-lettered JOB_IDS back into the pipeline."""
    from db.session import make_engine, make_session_factory
    from router.cost import reserved_usd
    from worker.recovery import replay_dead_letters
    from worker.transport import create_celery

    ids = []
    for raw in job_ids:
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            raise click.BadParameter(f"{raw!r} is not a job id", param_hint="'JOB_IDS'") from None
    settings = load_settings()
    if tier is not None and tier not in settings.tier_names:
        raise click.BadParameter(
            f"{tier!r} is not one of the tiers {', '.join(settings.tier_names)}", param_hint="'--tier'"
        )
    ledger = None
    if settings.cloud_spend_limit_usd is not None:
        from db.redis_state import SpendLedger, connect

        ledger = SpendLedger.for_settings(settings, connect(settings.state_redis_url))
    try:
        replayed = replay_dead_letters(
            make_session_factory(make_engine(settings.database_url)),
            create_celery(settings),
            ids,
            tier=tier,
            ledger=ledger,
            reserve_usd={t: reserved_usd(settings.tier(t)) for t in settings.tier_names[1:]},
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'JOB_IDS'") from None
    for job_id, task in replayed:
        click.echo(f"{job_id} -> {task}")
