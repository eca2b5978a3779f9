"""The ``routet2i`` command line. Each command group lives in its own module and registers here."""

from __future__ import annotations

import click

from cli.commands.bench import bench
from cli.commands.data import data
from cli.commands.db import db
from cli.commands.demo import demo
from cli.commands.evaluate import evaluate_command, replay
from cli.commands.jobs import cancel, deliveries, stats, status, submit
from cli.commands.load import loadtest
from cli.commands.models import learn, models
from cli.commands.ops import flower, queues
from cli.commands.recovery import dlq, reconcile
from cli.commands.score import score
from cli.commands.serve import api, webhooks, worker
from cli.commands.simulate import simulate
from cli.commands.tenants import tenant
from cli.commands.train import train
from core import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="routet2i")
def main() -> None:
    """RouteT2I: route text-to-image requests between an edge and a cloud model under a cloud budget."""


for command in (
    api,
    worker,
    webhooks,
    submit,
    status,
    cancel,
    deliveries,
    stats,
    queues,
    flower,
    db,
    demo,
    tenant,
    reconcile,
    dlq,
    loadtest,
    data,
    evaluate_command,
    replay,
    train,
    learn,
    models,
    score,
    simulate,
    bench,
):
    main.add_command(command)
