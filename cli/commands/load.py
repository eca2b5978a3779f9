"""``routet2i loadtest``: thousands of jobs through a local stack, audited for lost or duplicated work."""

from __future__ import annotations

from pathlib import Path

import click

from cli.commands.common import echo_json, load_settings


@click.command()
@click.option("--jobs", type=click.IntRange(1, 1_000_000), default=5000, show_default=True)
@click.option("--clients", type=click.IntRange(1, 256), default=16, show_default=True, help="Concurrent HTTP clients.")
@click.option(
    "--route-workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Pool size of the route worker."
)
@click.option(
    "--tier-workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Pool size of each tier worker."
)
@click.option("--api-workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--timeout", type=click.FloatRange(1), default=900.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def loadtest(
    jobs: int, clients: int, route_workers: int, tier_workers: int, api_workers: int, timeout: float, as_json: bool
) -> None:
    """Start the stack with zero-cost generators, push JOBS jobs through it, and audit the database.

    Exits 1 when any job was lost or any decision, generation or cost entry was recorded twice.
    """
    from cli.load import run_load
    from cli.stack import StackError

    settings = load_settings()
    try:
        report = run_load(
            settings,
            jobs=jobs,
            clients=clients,
            api_workers=api_workers,
            concurrency={"route": route_workers, **dict.fromkeys(settings.tier_names, tier_workers)},
            timeout=timeout,
            log_dir=Path("var/load-logs"),
        )
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json(report.to_dict())
    else:
        for key, value in report.to_dict().items():
            click.echo(f"{key:>26}: {value}")
    raise SystemExit(0 if report.ok() else 1)
