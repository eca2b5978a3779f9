"""``routet2i data``: write replay logs from the carried human ratings or from the system's own labelled jobs."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.commands.common import load_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from router.log import LogRecord


@click.group()
def data() -> None:
    """Replay logs (JSON Lines, one prompt per line): import rated data sets, export labelled jobs."""


@data.group(name="import")
def import_() -> None:
    """Write a replay log from a carried human-rated data set (see router/data/*/SOURCE.md)."""


def _write(records: Iterable[LogRecord], output: Path) -> None:
    from router.log import write_log

    count = write_log(output, records)
    click.echo(f"wrote {count} prompts to {output}")


@import_.command(name="genai-bench")
@click.option("--edge", required=True, help="Edge model, e.g. SDXL_Turbo.")
@click.option("--cloud", required=True, help="Cloud model, e.g. DALLE_3.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Log file.")
def genai_bench(edge: str, cloud: str, output: Path) -> None:
    """GenAI-Bench (527 prompts): metric `alignment`, the mean of three 1-5 human ratings.

    Each line's `auxiliary` labels are the other four models' ratings of the prompt (training only).

    Models: SDXL_Turbo, SDXL_2_1, SDXL_Base, DeepFloyd_I_XL_v1, Midjourney_6, DALLE_3.
    """
    from router import datasets

    if edge == cloud:
        raise click.BadParameter("edge and cloud must be different models", param_hint="'--cloud'")
    try:
        records = datasets.genai_bench(edge, cloud)
    except datasets.DatasetError as exc:
        hint = "'--edge'" if edge not in datasets.GENAI_BENCH_MODELS else "'--cloud'"
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    _write(records, output)


@import_.command(name="agiqa-3k")
@click.option("--edge", required=True, help="Edge configuration, e.g. sd1.5_normal.")
@click.option("--cloud", required=True, help="Cloud configuration, e.g. xl2.2_normal.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Log file.")
def agiqa_3k(edge: str, cloud: str, output: Path) -> None:
    """AGIQA-3K (300 prompts): metrics `quality` and `alignment`, human mean opinion scores.

    Each line's `auxiliary` labels are the other configurations' scores of the prompt (training only).

    Configurations: AttnGAN_normal, glide_normal, DALLE2_normal, midjourney_normal, midjourney_lowstep,
    sd1.5_normal, sd1.5_lowstep, sd1.5_highcorr, sd1.5_lowcorr, xl2.2_normal.
    """
    from router import datasets

    if edge == cloud:
        raise click.BadParameter("edge and cloud must be different configurations", param_hint="'--cloud'")
    try:
        records = datasets.agiqa_3k(edge, cloud)
    except datasets.DatasetError as exc:
        hint = "'--edge'" if edge not in datasets.AGIQA_CONFIGS else "'--cloud'"
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    _write(records, output)


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
