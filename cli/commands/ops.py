"""``routet2i queues`` and ``routet2i flower``: watch the queues and the workers."""

from __future__ import annotations

import click

from cli.commands.common import echo_json, load_settings


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@click.command()
@click.option(
    "--timeout",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.05, 60),
    help="Seconds to wait for workers to answer.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the queues as JSON.")
def queues(timeout: float, as_json: bool) -> None:
    """Per queue: messages waiting in the broker, jobs waiting in the database, the oldest one's age, workers."""
    import redis
    import sqlalchemy.exc

    from db.session import make_engine, make_session_factory
    from worker.transport import broker_client, create_celery, queue_status

    settings = load_settings()
    app = create_celery(settings)
    engine = make_engine(settings.database_url)
    try:
        client = broker_client(app)
        with make_session_factory(engine)() as session:
            statuses = queue_status(app, client, session, timeout=timeout)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"broker unreachable at ROUTET2I_BROKER_URL: {exc}") from exc
    except sqlalchemy.exc.OperationalError as exc:
        raise click.ClickException(f"database unreachable at ROUTET2I_DATABASE_URL: {exc.orig}") from exc
    finally:
        engine.dispose()
        app.close()

    if as_json:
        echo_json({"queues": [s.to_dict() for s in statuses]})
        return
    click.echo(f"{'queue':<6} {'depth':>6} {'waiting':>8} {'oldest':>8}  workers")
    for s in statuses:
        workers = ", ".join(s.workers) if s.workers else "(none answered)"
        click.echo(f"{s.name:<6} {s.depth:>6} {s.waiting_jobs:>8} {_age(s.oldest_age_s):>8}  {workers}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 in a container; put authentication in front).",
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, address: str, flower_args: tuple[str, ...]) -> None:
    """Run Flower, Celery's web monitor, on this deployment's Celery app.

    Further Flower options pass through, e.g. ``routet2i flower -- --basic-auth=user:password``.
    """
    from worker.transport import create_celery

    settings = load_settings()
    app = create_celery(settings)
    app.start(argv=["flower", f"--port={port}", f"--address={address}", *flower_args])
