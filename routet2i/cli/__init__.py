"""The ``routet2i`` command line. Each command group lives in its own module and registers here."""

from __future__ import annotations

import click

from routet2i import __version__
from routet2i.cli.bench import bench
from routet2i.cli.data import data
from routet2i.cli.db import db
from routet2i.cli.demo import demo
from routet2i.cli.evaluate import evaluate_command, replay
from routet2i.cli.jobs import stats, status, submit
from routet2i.cli.load import loadtest
from routet2i.cli.ops import flower, queues
from routet2i.cli.recovery import dlq, reconcile
from routet2i.cli.score import score
from routet2i.cli.serve import api, worker
from routet2i.cli.tenants import tenant
from routet2i.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="routet2i")
def main() -> None:
    """RouteT2I: route text-to-image requests between an edge and a cloud model under a cloud budget."""


for command in (
    api,
    worker,
    submit,
    status,
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
    score,
    bench,
):
    main.add_command(command)
