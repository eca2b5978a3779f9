"""``routet2i data``: write replay logs from the carried human ratings or from the system's own labelled jobs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.commands.common import load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from router.log import LogRecord
    from router.tierlog import TierRecord


@click.group()
def data() -> None:
    """Replay logs (JSON Lines, one prompt per line): import rated data sets, export labelled jobs."""


@data.group(name="import")
def import_() -> None:
    """Write a replay log from a carried human-rated data set (see router/data/*/SOURCE.md)."""


def _write(records: Sequence[LogRecord] | Sequence[TierRecord], output: Path) -> None:
    """Write a two-tier or a K-tier log, whichever ``records`` are."""
    from router.log import write_log

    count = write_log(output, records)
    click.echo(f"wrote {count} prompts to {output}")


_TIERS_HELP = (
    "Instead of --edge/--cloud: two or more models, comma-separated, written as a K-tier log (tiers named after the "
    "models, cheapest first, each line priced from router/data/prices.json)."
)
_PRICE_HELP = "With --tiers: MODEL=USD overrides a model's price per image (repeatable)."


def _tier_options(command: click.decorators.FC) -> click.decorators.FC:
    """The options every importer has: two tiers (--edge/--cloud) or any number (--tiers, --price), and -o."""
    for option in reversed(
        (
            click.option("--edge", default=None, help="Edge model of a two-tier log."),
            click.option("--cloud", default=None, help="Cloud model of a two-tier log."),
            click.option("--tiers", default=None, help=_TIERS_HELP),
            click.option("--price", "price_overrides", multiple=True, metavar="MODEL=USD", help=_PRICE_HELP),
            click.option(
                "-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Log file."
            ),
        )
    ):
        command = option(command)
    return command


def _import(
    dataset: str, edge: str | None, cloud: str | None, tiers: str | None, price: tuple[str, ...]
) -> list[LogRecord] | list[TierRecord]:
    """The records of the import the options ask for: two-tier with --edge/--cloud, K-tier with --tiers.

    Raises:
        click.UsageError, click.BadParameter: a mix of the two forms, or an argument the data set refuses; the
            message names the argument.
    """
    from router import datasets, tierdata

    if tiers is not None:
        if edge is not None or cloud is not None:
            raise click.UsageError("give --tiers, or --edge and --cloud, not both")
        names = [name.strip() for name in tiers.split(",") if name.strip()]
        overrides = _price_overrides(price)
        try:
            tierdata.check_tiers(dataset, names)
        except datasets.DatasetError as exc:
            raise click.BadParameter(str(exc), param_hint="'--tiers'") from exc
        try:
            return tierdata.IMPORTERS[dataset](names, overrides)
        except datasets.DatasetError as exc:
            raise click.BadParameter(str(exc), param_hint="'--price'") from exc
    if edge is None or cloud is None:
        raise click.UsageError("give --edge and --cloud (a two-tier log), or --tiers (any number of tiers)")
    if price:
        raise click.BadParameter("only used with --tiers (a two-tier log carries no prices)", param_hint="'--price'")
    kind = "models" if dataset == "genai-bench" else "configurations"
    if edge == cloud:
        raise click.BadParameter(f"edge and cloud must be different {kind}", param_hint="'--cloud'")
    choices = tierdata.DATASETS[dataset]
    try:
        records = datasets.genai_bench(edge, cloud) if dataset == "genai-bench" else datasets.agiqa_3k(edge, cloud)
    except datasets.DatasetError as exc:
        raise click.BadParameter(str(exc), param_hint="'--edge'" if edge not in choices else "'--cloud'") from exc
    return records


def _price_overrides(values: tuple[str, ...]) -> dict[str, float]:
    """``MODEL=USD`` pairs as a mapping; a malformed one is a usage error naming --price."""
    overrides: dict[str, float] = {}
    for value in values:
        model, sep, usd = value.partition("=")
        try:
            overrides[model.strip()] = float(usd)
        except ValueError:
            sep = ""
        if not sep or not model.strip():
            raise click.BadParameter(f"{value!r} is not MODEL=USD (e.g. DALLE_3=0.04)", param_hint="'--price'")
    return overrides


@import_.command(name="genai-bench")
@_tier_options
def genai_bench(
    edge: str | None, cloud: str | None, tiers: str | None, price_overrides: tuple[str, ...], output: Path
) -> None:
    """GenAI-Bench (527 prompts): metric `alignment`, the mean of three 1-5 human ratings.

    Each line's `auxiliary` labels are the ratings of the models that are not its tiers (training only).

    Models: SDXL_Turbo, SDXL_2_1, SDXL_Base, DeepFloyd_I_XL_v1, Midjourney_6, DALLE_3.
    """
    _write(_import("genai-bench", edge, cloud, tiers, price_overrides), output)


@import_.command(name="agiqa-3k")
@_tier_options
def agiqa_3k(
    edge: str | None, cloud: str | None, tiers: str | None, price_overrides: tuple[str, ...], output: Path
) -> None:
    """AGIQA-3K (300 prompts): metrics `quality` and `alignment`, human mean opinion scores.

    Each line's `auxiliary` labels are the scores of the configurations that are not its tiers (training only);
    a K-tier log keeps the prompts every tier rendered.

    Configurations: AttnGAN_normal, glide_normal, DALLE2_normal, midjourney_normal, midjourney_lowstep,
    sd1.5_normal, sd1.5_lowstep, sd1.5_highcorr, sd1.5_lowcorr, xl2.2_normal.
    """
    _write(_import("agiqa-3k", edge, cloud, tiers, price_overrides), output)


def labelled_records(
    session: Session, *, metric_set: str | None, since: datetime | None, limit: int | None
) -> list[LogRecord]:
    """The database's labelled jobs as replay-log records.

    Raises:
        click.BadParameter: the jobs were scored with several metric sets and ``metric_set`` does not pick one.
    """
    from db.labels import MixedMetricSets, labelled_log_records

    try:
        return labelled_log_records(session, metric_set=metric_set, since=since, limit=limit)
    except MixedMetricSets as exc:
        raise click.BadParameter(str(exc), param_hint="'--metric-set'") from exc


@data.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Log file.")
@click.option("--metric-set", default=None, help="Only pairs scored with this metric set (needed when several).")
@click.option("--since", type=click.DateTime(), default=None, help="Only jobs created at or after this time (UTC).")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many prompts.")
def export(output: Path, metric_set: str | None, since: datetime | None, limit: int | None) -> None:
    """Write the jobs that were generated and scored on both tiers (shadow samples) as a replay log.

    Reads ROUTET2I_DATABASE_URL. Each line carries the job id, prompt, both tiers' quality vectors and, where
    both images were billed, their cost.
    """
    from datetime import UTC

    from db.session import make_engine, make_session_factory

    settings = load_settings()
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            records = labelled_records(session, metric_set=metric_set, since=since, limit=limit)
    finally:
        engine.dispose()
    if not records:
        raise click.ClickException("no job has scored generations on both tiers (enable shadow sampling)")
    _write(records, output)
