"""``routet2i tenant``: tenants and their API keys."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from cli.commands.common import echo_json, load_settings


def _sessions() -> sessionmaker[Session]:
    from db.session import make_engine, make_session_factory

    return make_session_factory(make_engine(load_settings().database_url))


@click.group()
def tenant() -> None:
    """Create tenants, issue and revoke their API keys."""


@tenant.command()
@click.argument("name")
@click.option("--admin", is_flag=True, help="May see every tenant's jobs and decisions.")
@click.option("--cloud-budget", type=click.FloatRange(0, 1), default=None, help="The tenant's own ρ.")
@click.option("--rate-limit", type=click.IntRange(0), default=None, help="Submissions per minute (0: unlimited).")
@click.option(
    "--allow-tier", "allow_tiers", multiple=True, help="A tier it may force (one of ROUTET2I_TIERS; repeatable)."
)
@click.option("--json", "as_json", is_flag=True)
def create(
    name: str,
    admin: bool,
    cloud_budget: float | None,
    rate_limit: int | None,
    allow_tiers: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create tenant NAME and print its first API key (shown once, stored only as a hash)."""
    import sqlalchemy.exc

    from db.session import transaction
    from db.tenants import create_tenant, issue_api_key

    if not 1 <= len(name) <= 64:
        raise click.BadParameter("must be 1 to 64 characters", param_hint="'NAME'")
    tiers = load_settings().tier_names
    for allowed in allow_tiers:
        if allowed not in tiers:
            raise click.BadParameter(
                f"{allowed!r} is not one of the tiers {', '.join(tiers)}", param_hint="'--allow-tier'"
            )
    try:
        with transaction(_sessions()) as session:
            row = create_tenant(
                session,
                name=name,
                is_admin=admin,
                cloud_budget=cloud_budget,
                rate_limit_per_minute=rate_limit,
                forced_tiers=allow_tiers,
            )
            key = issue_api_key(session, tenant=row)
    except sqlalchemy.exc.IntegrityError:
        raise click.BadParameter(f"a tenant named {name!r} already exists", param_hint="'NAME'") from None
    if as_json:
        echo_json({"tenant": name, "id": str(row.id), "api_key": key})
    else:
        click.echo(f"tenant {name} ({row.id})\napi key: {key}")


@tenant.command()
@click.argument("name")
def key(name: str) -> None:
    """Issue another API key for tenant NAME."""
    from db.session import transaction
    from db.tenants import get_tenant_by_name, issue_api_key

    with transaction(_sessions()) as session:
        row = get_tenant_by_name(session, name)
        if row is None:
            raise click.BadParameter(f"no tenant named {name!r}", param_hint="'NAME'")
        click.echo(issue_api_key(session, tenant=row))


@tenant.command()
@click.argument("name")
@click.option("--prefix", default=None, help="Revoke only the key starting with this (see `tenant list`).")
def revoke(name: str, prefix: str | None) -> None:
    """Revoke tenant NAME's API keys."""
    from db.session import transaction
    from db.tenants import get_tenant_by_name, revoke_keys

    with transaction(_sessions()) as session:
        row = get_tenant_by_name(session, name)
        if row is None:
            raise click.BadParameter(f"no tenant named {name!r}", param_hint="'NAME'")
        click.echo(f"revoked {revoke_keys(session, tenant=row, prefix=prefix)} key(s)")


@tenant.command()
@click.argument("name")
@click.option(
    "--allow-host",
    "hosts",
    multiple=True,
    help="A host (host or host:port) its jobs' webhooks may call; repeat for several; none: no webhooks.",
)
@click.option("--rotate-secret", is_flag=True, help="Issue a new webhook secret (the old one stops signing).")
@click.option("--json", "as_json", is_flag=True)
def webhooks(name: str, hosts: tuple[str, ...], rotate_secret: bool, as_json: bool) -> None:
    """Set the hosts tenant NAME's webhooks may call; print its webhook secret when it is new (shown once)."""
    from db.session import transaction
    from db.tenants import get_tenant_by_name, set_webhooks

    for host in hosts:
        if not host.strip() or "/" in host or "@" in host:
            raise click.BadParameter(f"{host!r} is not a host or host:port", param_hint="'--allow-host'")
    with transaction(_sessions()) as session:
        row = get_tenant_by_name(session, name)
        if row is None:
            raise click.BadParameter(f"no tenant named {name!r}", param_hint="'NAME'")
        secret = set_webhooks(row, hosts=hosts, rotate_secret=rotate_secret)
        allowed = sorted(row.allowed_webhook_hosts)
    if as_json:
        echo_json({"tenant": name, "webhook_hosts": allowed, "webhook_secret": secret})
        return
    click.echo(f"tenant {name}: webhooks to {', '.join(allowed) or 'no host'}")
    if secret is not None:
        click.echo(f"webhook secret: {secret}")


@tenant.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def list_(as_json: bool) -> None:
    """List tenants with their settings and keys."""
    from db.tenants import list_keys, list_tenants

    with _sessions()() as session:
        rows: list[dict[str, Any]] = [
            {
                "name": t.name,
                "id": str(t.id),
                "admin": t.is_admin,
                "cloud_budget": t.cloud_budget,
                "rate_limit_per_minute": t.rate_limit_per_minute,
                "forced_tiers": [x for x in t.forced_tiers.split(",") if x],
                "keys": [
                    {"prefix": k.prefix, "revoked": k.revoked_at is not None} for k in list_keys(session, tenant=t)
                ],
            }
            for t in list_tenants(session)
        ]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        active = sum(not k["revoked"] for k in row["keys"])
        click.echo(
            f"{row['name']:<24} admin={row['admin']!s:<5} budget={row['cloud_budget']} "
            f"rate={row['rate_limit_per_minute']} tiers={','.join(row['forced_tiers']) or '-'} keys={active} active"
        )
