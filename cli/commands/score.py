"""``routet2i score``: the quality metrics of image files, with the scorer the workers use."""

from __future__ import annotations

import json
from typing import Any

import click

from cli.commands.common import load_settings


@click.command()
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--prompt", default=None, help="The prompt the images were generated from (scores alignment).")
@click.option(
    "--metrics",
    "metrics_file",
    default=None,
    type=click.Path(dir_okay=False),
    help="A metric set (.json or .toml file) instead of ROUTET2I_SCORER__METRICS.",
)
@click.option("--batch-size", default=None, type=click.IntRange(1, 1024), help="Images per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image, one per line.")
def score(
    images: tuple[str, ...], prompt: str | None, metrics_file: str | None, batch_size: int | None, as_json: bool
) -> None:
    """Score IMAGE files on every metric of the metric set (and on alignment with --prompt).

    The model is ROUTET2I_SCORER__MODEL with ROUTET2I_SCORER__PRETRAINED weights; without pretrained
    weights it has fixed-seed random weights, and the numbers exercise the code but do not measure quality.
    """
    from router.quality_metrics import ALIGNMENT, MetricSetError, load_metric_set, resolve_metric_set
    from worker.scoring import ClipScorer, ImageReadError, ScorerError, load_image

    settings = load_settings()
    try:
        metric_set = load_metric_set(metrics_file) if metrics_file else resolve_metric_set(settings.scorer.metrics)
    except MetricSetError as exc:
        hint = "'--metrics'" if metrics_file else "ROUTET2I_SCORER__METRICS"
        raise click.BadParameter(str(exc), param_hint=hint) from exc
    try:
        loaded = [load_image(path) for path in images]
    except ImageReadError as exc:
        raise click.BadParameter(str(exc), param_hint="'IMAGE...'") from exc

    try:
        scorer = ClipScorer.from_settings(settings.scorer, metric_set=metric_set, batch_size=batch_size)
    except ScorerError as exc:
        raise click.ClickException(str(exc)) from exc
    if scorer.random_weights:
        click.echo(
            f"note: {scorer.model_name} has random weights (ROUTET2I_SCORER__PRETRAINED is unset): "
            "the scores are reproducible but say nothing about quality",
            err=True,
        )
    if metric_set.alignment and prompt is None:
        click.echo(f"note: no --prompt, so '{ALIGNMENT}' is not scored", err=True)

    vectors = scorer.score(loaded, None if prompt is None else [prompt] * len(loaded), metric_set=metric_set)
    for path, vector in zip(images, vectors, strict=True):
        record: dict[str, Any] = {
            "image": path,
            "metric_set": vector.metric_set,
            "model": scorer.model_name,
            "pretrained": scorer.pretrained,
            "values": dict(vector.values),
        }
        if as_json:
            click.echo(json.dumps(record))
        else:
            click.echo(f"{path}  ({vector.metric_set}, {scorer.description})")
            width = max(len(name) for name in vector.values)
            for name, value in vector.values.items():
                click.echo(f"  {name:<{width}}  {value:.4f}")
