"""``routet2i api`` and ``routet2i worker``: the long-running processes."""

from __future__ import annotations

import os
import socket
from typing import Any

import click

from cli.commands.common import load_settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256), help="gunicorn worker processes.")
@click.option(
    "--threads",
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Threads per worker, besides the ROUTET2I_IMAGES_WAITERS threads of waiting image requests.",
)
def api(host: str, port: int, workers: int, threads: int) -> None:
    """Serve the HTTP API under gunicorn.

    Each worker process gets ``threads`` threads plus one per image request it may hold waiting for its images
    (``images_waiters``; more are answered 503), so waiting requests never take the threads other requests and
    the health probes need.
    """
    from gunicorn.app.base import BaseApplication

    settings = load_settings()
    pool = threads + settings.images_waiters

    class Server(BaseApplication):
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "threads": pool,
                "worker_class": "gthread",
                "accesslog": None,
                "graceful_timeout": 30,
                "timeout": 120,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from api.app import create_app

            return create_app(settings)

    click.echo(
        f"RouteT2I API on http://{host}:{port} ({workers} workers x {threads} threads "
        f"+ {settings.images_waiters} for waiting image requests)",
        err=True,
    )
    Server().run()


class QueueName(click.ParamType):
    """A queue of this deployment: ``route`` or one of ``ROUTET2I_TIERS`` (read when the option is parsed)."""

    name = "queue"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        queues = load_settings().queues
        if value not in queues:
            self.fail(f"{value!r} is not a queue of this deployment: {', '.join(queues)}", param, ctx)
        return str(value)


@click.command()
@click.option(
    "--queue", "-Q", required=True, type=QueueName(), help="Queue to consume: route, or one of ROUTET2I_TIERS."
)
@click.option("--concurrency", "-c", default=1, show_default=True, type=click.IntRange(1, 512), help="Pool size.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "solo", "threads"]))
@click.option(
    "--max-tasks-per-child",
    default=0,
    type=click.IntRange(0),
    help="Recycle a child after N tasks (0: never).",
)
@click.option("--name", default=None, help="Node name (default: QUEUE-PID@HOST).")
@click.option("--loglevel", default=None, help="Celery log level (default: ROUTET2I_LOG_LEVEL).")
def worker(
    queue: str, concurrency: int, pool: str, max_tasks_per_child: int, name: str | None, loglevel: str | None
) -> None:
    """Run a Celery worker for one queue. Start as many as you need, on as many machines."""
    from worker.tasks import prefetch_multiplier
    from worker.transport import create_celery

    settings = load_settings()
    if queue == settings.cheapest and settings.escalation_rate > 0:
        from router.quality_metrics import MetricSetError, resolve_metric_set

        try:
            metric_set = resolve_metric_set(settings.scorer.metrics)
        except MetricSetError as exc:
            raise click.UsageError(f"ROUTET2I_SCORER__METRICS: {exc}") from None
        if settings.escalation_metric not in metric_set.metric_names:
            raise click.UsageError(
                f"ROUTET2I_ESCALATION_METRIC={settings.escalation_metric!r} is not a metric of the scorer's set "
                f"{metric_set.id}: one of {', '.join(metric_set.metric_names)}"
            )
    app = create_celery(settings, with_tasks=True)
    app.conf.routet2i_warm_queues = [queue]
    argv = [
        "worker",
        f"--queues={queue}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--prefetch-multiplier={prefetch_multiplier(settings, queue)}",
        f"--hostname={name or f'{queue}-{os.getpid()}@{socket.gethostname()}'}",
        f"--loglevel={(loglevel or settings.log_level).upper()}",
        "--without-mingle",
        "--without-gossip",
    ]
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    app.worker_main(argv=argv)


@click.command()
@click.option(
    "--concurrency", "-c", default=8, show_default=True, type=click.IntRange(1, 256), help="Deliveries in flight."
)
def webhooks(concurrency: int) -> None:
    """Post jobs' terminal states to their webhooks, signed, retrying until each receiver takes its delivery.
    Run one or more beside the workers (rows are claimed, so several never post the same delivery)."""
    import signal

    from worker.webhooks import Dispatcher

    dispatcher = Dispatcher(load_settings(), concurrency=concurrency)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: dispatcher.stopping.set())
    click.echo(f"RouteT2I webhook dispatcher ({concurrency} in flight at most)", err=True)
    dispatcher.run()
    dispatcher.stop()
