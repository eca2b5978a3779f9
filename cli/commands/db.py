"""``routet2i db``: database migrations."""

from __future__ import annotations

import click

from cli.commands.common import echo_json, load_settings


@click.group()
def db() -> None:
    """Database schema management (Alembic)."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def upgrade(revision: str) -> None:
    """Create or migrate the database at ROUTET2I_DATABASE_URL."""
    from db.migrate import current_revision
    from db.migrate import upgrade as run_upgrade

    settings = load_settings()
    run_upgrade(settings.database_url, revision)
    click.echo(f"database at revision {current_revision(settings.database_url)}")


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print the revisions as JSON.")
def current(as_json: bool) -> None:
    """Print the database's schema revision and the newest one this code knows."""
    from db.migrate import current_revision, head_revision

    settings = load_settings()
    revision, head = current_revision(settings.database_url), head_revision()
    if as_json:
        echo_json({"current": revision, "head": head, "up_to_date": revision == head})
    else:
        click.echo(f"current: {revision}  head: {head}")
