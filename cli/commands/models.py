"""``routet2i learn`` and ``routet2i models``: the learning loop, and the model registry an operator inspects,
promotes and rolls back."""

from __future__ import annotations

import getpass
import time
import uuid
from typing import Any

import click

from cli.commands.common import echo_json, load_settings


@click.command()
@click.option("--once", is_flag=True, help="One pass, then exit (default: a pass every --every seconds).")
@click.option(
    "--every", type=click.FloatRange(min=1.0), default=600.0, show_default=True, help="Seconds between two passes."
)
@click.option("--json", "as_json", is_flag=True, help="Print each pass's report as JSON.")
def learn(once: bool, every: float, as_json: bool) -> None:
    """Learn this deployment's own models: choose a first prior on the first labels, then train a challenger
    on the shadow-sampled labels every ROUTET2I_LEARN_RETRAIN_EVERY new ones, judge it against the champion on
    the most recent labels, and promote it if it wins. Route workers switch to a new champion without a
    restart."""
    from db.redis_state import connect
    from db.session import make_engine, make_session_factory
    from router.embeddings import SentenceEncoder
    from worker.learner import Learner

    settings = load_settings()
    learner = Learner(
        settings,
        make_session_factory(make_engine(settings.database_url)),
        connect(settings.state_redis_url),
        SentenceEncoder.from_settings(settings, keep_embeddings=True, threads=settings.torch_threads),
    )
    while True:
        report = learner.run_once()
        if as_json:
            echo_json(report.to_dict())
        else:
            promoted = " (promoted)" if report.promoted else ""
            click.echo(f"{report.labels} labels: {report.action}{promoted}: {report.reason}")
            click.echo(f"  shadow rate now {report.shadow_rate:.3f}")
        if once:
            return
        time.sleep(every)


@click.group()
def models() -> None:
    """The model registry: every router trained for this deployment, and its champion."""


def _sessions() -> Any:
    from db.session import make_engine, make_session_factory

    return make_session_factory(make_engine(load_settings().database_url))


def _model_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise click.BadParameter(f"{raw!r} is not a model id", param_hint="'MODEL_ID'") from None


def _describe(model: dict[str, Any]) -> str:
    verdict = (model.get("evaluation") or {}).get("reason", "")
    return (
        f"{model['id']}  {model['state']:<10} {model['kind']:<20} {model['version']:<28} "
        f"{model['labels']:>5} labels  {model['created_at'][:19]}  {verdict}"
    ).rstrip()


@models.command(name="list")
@click.option(
    "--slot", default=None, help="Only this deployment router's models, e.g. default/routet2i (default: all)."
)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def list_(slot: str | None, limit: int, as_json: bool) -> None:
    """Registered models, newest first."""
    from db.registry import list_models, model_summary

    with _sessions()() as session:
        rows = [model_summary(row) for row in list_models(session, slot=slot, limit=limit)]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(_describe(row))
    if not rows:
        click.echo("no registered models", err=True)


@models.command()
@click.argument("model_id")
@click.option("--json", "as_json", is_flag=True)
def show(model_id: str, as_json: bool) -> None:
    """One model with its evaluation."""
    from db.registry import get_model, model_summary

    with _sessions()() as session:
        row = get_model(session, _model_id(model_id))
        if row is None:
            raise click.BadParameter(f"no model with id {model_id}", param_hint="'MODEL_ID'")
        summary = model_summary(row)
    if as_json:
        echo_json(summary)
    else:
        for key, value in summary.items():
            click.echo(f"{key}: {value}")


@models.command()
@click.argument("model_id")
def promote(model_id: str) -> None:
    """Make MODEL_ID its router's champion (route workers switch to it within seconds)."""
    from db.registry import RegistryError
    from db.registry import promote as promote_model
    from db.session import transaction

    try:
        with transaction(_sessions()) as session:
            row = promote_model(session, _model_id(model_id), by=f"operator {getpass.getuser()}")
            click.echo(f"{row.id} is the champion of {row.slot!r}: {row.version}")
    except RegistryError as exc:
        raise click.BadParameter(str(exc), param_hint="'MODEL_ID'") from None


@models.command()
@click.option("--slot", default=None, help="The deployment router, e.g. default/routet2i (default: this deployment's).")
def rollback(slot: str | None) -> None:
    """Make the previous champion the champion again."""
    from db.registry import RegistryError
    from db.registry import rollback as roll_back
    from db.session import transaction

    name = slot or load_settings().model_slot
    try:
        with transaction(_sessions()) as session:
            row = roll_back(session, name, by=f"operator {getpass.getuser()}")
            click.echo(f"{row.id} is the champion of {row.slot!r} again: {row.version}")
    except RegistryError as exc:
        raise click.BadParameter(str(exc), param_hint="'--slot'") from None
