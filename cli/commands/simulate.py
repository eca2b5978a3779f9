"""``routet2i simulate``: a deployment and its learning loop simulated on a rated log (router/simulation.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.commands.common import echo_json, load_settings
from cli.commands.evaluate import _encoder, _read_log
from cli.commands.train import _parse_settings

if TYPE_CHECKING:
    from router.log import LogRecord
    from router.simulation import SimulationConfig


def _policies(value: str | None) -> list[str]:
    from router.simulation import POLICIES

    if value is None:
        return list(POLICIES)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if not names or unknown or len(set(names)) != len(names):
        problem = f"unknown policy {unknown[0]!r}" if unknown else "give distinct policy names"
        raise click.BadParameter(f"{problem}; choose among {', '.join(POLICIES)}", param_hint="'--policies'")
    return names


def _records(log_path: Path | None, data: str | None, edge: str | None, cloud: str | None) -> list[LogRecord]:
    from router import datasets

    if (log_path is None) == (data is None):
        raise click.UsageError("give exactly one of --log FILE or --data NAME")
    if log_path is not None:
        if edge or cloud:
            raise click.BadParameter("only used with --data", param_hint="'--edge'" if edge else "'--cloud'")
        return _read_log(log_path)
    if not edge or not cloud:
        raise click.BadParameter(
            f"--data {data} needs --edge and --cloud", param_hint="'--edge'" if not edge else "'--cloud'"
        )
    if edge == cloud:
        raise click.BadParameter("edge and cloud must be different models", param_hint="'--cloud'")
    build, choices = (
        (datasets.genai_bench, datasets.GENAI_BENCH_MODELS)
        if data == "genai-bench"
        else (datasets.agiqa_3k, datasets.AGIQA_CONFIGS)
    )
    try:
        return build(edge, cloud)
    except datasets.DatasetError as exc:
        raise click.BadParameter(str(exc), param_hint="'--edge'" if edge not in choices else "'--cloud'") from exc


def _router_settings(name: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """The challengers' router settings, checked by building one (a router that learns, with these settings)."""
    from router.base import RouterError, create_router, router_class

    try:
        cls = router_class(name)
    except RouterError as exc:
        raise click.BadParameter(str(exc), param_hint="'--router'") from exc
    if not cls.learned or not cls.standalone or cls.needs_labels:
        raise click.BadParameter(f"router {name!r} does not learn from labels", param_hint="'--router'")
    settings = _parse_settings(overrides)
    try:
        create_router(name, **settings)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--set'") from exc
    return settings


def _config(options: dict[str, Any], router_settings: dict[str, Any], prices: dict[str, float]) -> SimulationConfig:
    from router.learning import LoopConfig
    from router.simulation import SimulationConfig

    if options["shadow_min_rate"] > options["shadow_rate"]:
        raise click.BadParameter("must not exceed --shadow-rate", param_hint="'--shadow-min-rate'")
    return SimulationConfig(
        budget=options["budget"],
        seeds=options["seeds"],
        window=options["window"],
        retrain_every=options["retrain_every"],
        min_prior_labels=options["prior_labels"],
        shadow_rate=options["shadow_rate"],
        shadow_min_rate=options["shadow_min_rate"],
        settle_labels=options["settle_labels"],
        loop=LoopConfig(router=options["router"]),
        router_settings=router_settings,
        prices=prices,
        curve_points=options["curve_points"],
        swap=options["swap"],
        shadow_paid_from=options["shadow_paid_from"],
    )


@click.command()
@click.option("--log", "log_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Replay log.")
@click.option("--data", type=click.Choice(["genai-bench", "agiqa-3k"]), default=None, help="Instead of --log.")
@click.option("--edge", default=None, help="With --data: the edge model (e.g. SDXL_Turbo, sd1.5_lowstep).")
@click.option("--cloud", default=None, help="With --data: the cloud model (e.g. DALLE_3, midjourney_normal).")
@click.option("--budget", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True, help="Cloud budget ρ.")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True, help="Orders: the log's, then shuffles.")
@click.option("--policies", default=None, help="Comma-separated policies (default: all).")
@click.option("--window", type=click.IntRange(1), default=None, help="Budget window [default: min(500, prompts)].")
@click.option(
    "--retrain-every", type=click.IntRange(1), default=25, show_default=True, help="New labels per challenger."
)
@click.option(
    "--prior-labels", type=click.IntRange(5), default=20, show_default=True, help="Labels the prior is chosen on."
)
@click.option(
    "--shadow-rate", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True, help="Largest shadow rate."
)
@click.option(
    "--shadow-min-rate", type=click.FloatRange(0.0, 1.0), default=0.02, show_default=True, help="Settled rate."
)
@click.option("--settle-labels", type=click.IntRange(1), default=200, show_default=True, help="Labels to settle at.")
@click.option("--router", default="routet2i", show_default=True, help="The challengers' (and cv-reference's) router.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Setting of that router (JSON values).")
@click.option(
    "--swap",
    type=click.Choice(["keep", "rescore"]),
    default="keep",
    show_default=True,
    help="At a new champion, keep the window's scores (as a route worker does) or rescore its prompts.",
)
@click.option(
    "--shadow-paid-from",
    type=click.Choice(["allowance", "window"]),
    default="allowance",
    show_default=True,
    help="Pay labels' cloud images beside ρ or from it, taking room in the window (ROUTET2I_SHADOW_PAID_FROM).",
)
@click.option("--curve-points", type=click.IntRange(1), default=8, show_default=True, help="Stretches of the curve.")
@click.option(
    "--prior-exclude",
    type=click.Choice(["genai-bench", "agiqa-3k"]),
    multiple=True,
    help="Leave this data set out of the pooled prior too (the log's own data sets always are).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of the table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the curves (PNG).")
@click.option("--progress/--no-progress", default=None, help="A line per run on stderr (default: when a terminal).")
def simulate(
    log_path: Path | None,
    data: str | None,
    edge: str | None,
    cloud: str | None,
    overrides: tuple[str, ...],
    prior_exclude: tuple[str, ...],
    policies: str | None,
    as_json: bool,
    plot: Path | None,
    progress: bool | None,
    **options: Any,
) -> None:
    """Simulate a deployment on a rated log: the shipped router, baselines and the learning loop, online.

    Prompts arrive in the log's order (seed 0) and shuffled (seeds 1..); each is routed against a live budget
    window, and the learning policies shadow-sample labels from it, train challengers and promote them. Reports
    the PGR of the routed traffic over the last quarter of the stream, its curve, the labels and their cost.
    See docs/router.md.
    """
    from router.priors import candidate_priors, datasets_of
    from router.simulation import needed_priors
    from router.simulation import simulate as run_simulation
    from router.simulation_report import format_table, plot_simulation, summarise

    names = _policies(policies)
    router_settings = _router_settings(options["router"], overrides)
    records = _records(log_path, data, edge, cloud)
    settings = load_settings()
    prices = {"edge": settings.edge.price_per_image, "cloud": settings.cloud.price_per_image}
    config = _config(options, router_settings, prices)
    encoder = _encoder(settings)
    exclude = datasets_of(records) | set(prior_exclude)
    pooled = "pooled" in needed_priors(names)
    show = sys.stderr.isatty() if progress is None else progress
    priors = candidate_priors(encoder, exclude=exclude, pooled=pooled)
    source = str(log_path) if log_path else f"--data {data} --edge {edge} --cloud {cloud}"
    try:
        result = run_simulation(
            records,
            priors,
            config,
            policies=names,
            encoder=encoder,
            info={"log": source, "pooled_prior_excludes": sorted(exclude)},
            progress=(lambda line: click.echo(line, err=True)) if show else None,
        )
    except ValueError as exc:  # a log the simulation cannot run on (too short, too few distinct prompts)
        raise click.BadParameter(str(exc), param_hint="'--log'" if log_path else "'--data'") from exc
    doc = summarise(result)
    if plot is not None:
        plot_simulation(doc, plot, title=f"{source}: {len(records)} prompts, {config.seeds} orders")
    if as_json:
        echo_json(doc)
        return
    click.echo(format_table(doc))
    quarter = next(iter(doc["policies"].values()))["pgr_last_quarter_prompts"]
    timing = f"\nlast quarter: the last {quarter} of {doc['prompts']} prompts; {doc['wall_s']:.1f} s"
    click.echo(timing + (f"; plot: {plot}" if plot else ""))
