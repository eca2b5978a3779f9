"""``routet2i eval`` and ``routet2i replay``: judge routers on replay logs before they spend real money."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.commands.common import echo_json, load_settings

if TYPE_CHECKING:
    from core.settings import Settings
    from router.embeddings import SentenceEncoder
    from router.log import LogRecord
    from router.results import Report
    from router.tierlog import TierLog


def _read_log(path: Path, param: str = "'--log'") -> list[LogRecord]:
    from router.log import LogFormatError, read_log

    try:
        return read_log(path)
    except LogFormatError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from exc
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{path}: not UTF-8 text ({exc.reason})", param_hint=param) from exc


def _router_names(value: str | None) -> list[str]:
    from router.base import available_routers, router_class

    if value is None:
        return [name for name in available_routers() if router_class(name).standalone]
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("give at least one router name", param_hint="'--routers'")
    if len(set(names)) != len(names):
        raise click.BadParameter("a router is named twice", param_hint="'--routers'")
    for name in names:
        try:
            router_class(name)
        except Exception as exc:  # RouterError for unknown names, ImportError for a broken plug-in
            raise click.BadParameter(str(exc), param_hint="'--routers'") from exc
    return names


def _encoder(settings: Settings) -> SentenceEncoder:
    """The sentence encoder every router of the command shares, its embeddings kept under the cache directory."""
    from router.embeddings import SentenceEncoder

    return SentenceEncoder.from_settings(settings, keep_embeddings=True, threads=settings.torch_threads)


def _run(
    records: list[LogRecord],
    names: list[str],
    folds: int,
    seeds: int,
    progress: bool,
    info: dict[str, Any],
    encoder: SentenceEncoder,
) -> Report:
    from router.evaluation import evaluate
    from router.splits import group_ids

    distinct = int(group_ids([r.prompt for r in records]).max()) + 1
    if folds > distinct:
        raise click.BadParameter(
            f"{folds} folds need at least {folds} distinct prompts; the log has {distinct}", param_hint="'--folds'"
        )
    return evaluate(records, names, folds=folds, seeds=seeds, progress=progress, info=info, encoder=encoder)


@click.command(name="eval")
@click.option("--log", "log_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Replay log.")
@click.option(
    "--suite",
    type=click.Choice(["standard"]),
    default=None,
    help="Instead of --log: build the suite's logs from the carried ratings and evaluate each.",
)
@click.option("--routers", default=None, help="Comma-separated router names (default: every registered router).")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True, help="Split seeds (0..N-1).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of the table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG plot.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --suite: directory for logs, JSON, plots and results.md (default var/eval).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when it is a terminal).")
def evaluate_command(
    log_path: Path | None,
    suite: str | None,
    routers: str | None,
    folds: int,
    seeds: int,
    as_json: bool,
    plot: Path | None,
    out_dir: Path | None,
    progress: bool | None,
) -> None:
    """Cross-validate routers on a replay log: PGR at every cloud budget, CPT, APGR, Pareto share.

    Folds split by prompt; learned routers are never scored on their own training prompts, and every router is
    scored on the same test folds. See docs/evaluation.md.

    A K-tier log (three or more tiers, or tiers not named edge and cloud) is evaluated among its tiers instead:
    each router's quality-cost curve as the budget per image sweeps the tiers' prices, its aqc and cost_to_best,
    and the paired aqc differences with the K-tier RouteT2I (docs/tiers.md).
    """
    if (log_path is None) == (suite is None):
        raise click.UsageError("give exactly one of --log FILE or --suite NAME")
    if suite is None and out_dir is not None:
        raise click.BadParameter("only used with --suite", param_hint="'--out'")
    if suite is not None and plot is not None:
        raise click.BadParameter("--suite writes one plot per log into --out", param_hint="'--plot'")
    tier_log = _k_tier_log(log_path) if log_path is not None else None
    if tier_log is not None:
        assert log_path is not None
        _evaluate_k_tiers(tier_log, log_path, routers, folds, seeds, as_json, plot, progress)
        return
    names = _router_names(routers)
    encoder = _encoder(load_settings())
    show = sys.stderr.isatty() if progress is None else progress
    if suite is not None:
        _run_suite(suite, names, folds, seeds, out_dir or Path("var/eval"), show, encoder)
        return
    assert log_path is not None
    records = _read_log(log_path)
    report = _run(records, names, folds, seeds, show, {"log": str(log_path)}, encoder)
    if plot is not None:
        from router.report import plot_report

        plot_report(report, plot, title=f"{log_path.name}: {report.folds}-fold CV x {len(report.seeds)} seeds")
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.table())
        timing = f"\n{report.wall_s:.1f}s wall, {report.cpu_s:.1f}s CPU"
        click.echo(f"{timing}; plot: {plot}" if plot else timing)


def _run_suite(
    name: str, routers: list[str], folds: int, seeds: int, out_dir: Path, progress: bool, encoder: SentenceEncoder
) -> None:
    from router.log import write_log
    from router.report import plot_report
    from router.suite import SUITES

    started = time.perf_counter()
    chosen = "" if routers == _router_names(None) else f" --routers {','.join(routers)}"
    sections = [
        f"Suite `{name}`: {folds} folds x {seeds} seeds, routers: {', '.join(routers)}.",
        f"Reproduce: `routet2i eval --suite {name}{chosen} --folds {folds} --seeds {seeds}`.",
    ]
    for entry in SUITES[name]:
        records = entry.build()
        log_file = out_dir / "logs" / f"{entry.slug}.jsonl"
        write_log(log_file, records)
        report = _run(
            records,
            routers,
            folds,
            seeds,
            progress,
            {"suite": name, "log": entry.title, "import": f"{entry.command} -o {log_file}"},
            encoder,
        )
        (out_dir / f"{entry.slug}.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        plot_report(report, out_dir / f"{entry.slug}.png", title=entry.title)
        timing = report.to_dict()["timing"]
        sections += [
            "",
            f"### {entry.title}",
            "",
            report.table(markdown=True),
            "",
            f"Evaluated in {report.wall_s:.1f} s wall, {report.cpu_s:.1f} s CPU "
            f"({timing['prompt_scores_per_s']} prompt scores/s of wall time).",
        ]
        click.echo(f"\n== {entry.title}\n{report.table()}\n({report.wall_s:.1f}s wall, {report.cpu_s:.1f}s CPU)")
    (out_dir / "results.md").write_text("\n".join(sections) + "\n")
    click.echo(f"\nwrote {out_dir}/results.md, one JSON and PNG per log ({time.perf_counter() - started:.1f}s)")


@click.command()
@click.option(
    "--log", "log_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Replay log."
)
@click.option("--router", "router_name", required=True, help="Router name.")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Trained router artifact directory.",
)
@click.option(
    "--train-log",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Fit the router on this log first (instead of --model).",
)
@click.option("--budget", required=True, type=click.FloatRange(0.0, 1.0), help="Cloud budget: share of prompts, 0..1.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of random choices.")
@click.option(
    "--online",
    is_flag=True,
    help="Decide in log order with the live budget controller (ROUTET2I_BUDGET_WINDOW, ROUTET2I_BUDGET_TOLERANCE) "
    "instead of sending the best floor(budget x prompts) scores.",
)
@click.option("--json", "as_json", is_flag=True, help="Print decisions and totals as JSON.")
def replay(
    log_path: Path,
    router_name: str,
    model_dir: Path | None,
    train_log: Path | None,
    budget: float,
    seed: int,
    online: bool,
    as_json: bool,
) -> None:
    """The decisions ROUTER would make on a log at a cloud budget, and the resulting quality and cost.

    Cost comes from each line's optional "cost" field, else from the tiers' prices in the settings.
    """
    from router.base import RouterError, create_router, load_router, router_class
    from router.budget import BudgetConfig
    from router.log import LogFormatError
    from router.replay import replay as run_replay

    try:
        cls = router_class(router_name)
    except RouterError as exc:
        raise click.BadParameter(str(exc), param_hint="'--router'") from exc
    if model_dir is not None and train_log is not None:
        raise click.BadParameter("give --model or --train-log, not both", param_hint="'--train-log'")
    settings = load_settings()
    encoder = _encoder(settings)
    records = _read_log(log_path)
    try:
        if model_dir is not None:
            router = load_router(router_name, model_dir, encoder=encoder)
        elif cls.learned and train_log is None:
            raise click.BadParameter(
                f"router {router_name!r} learns from data: give a trained artifact, or --train-log to fit one",
                param_hint="'--model'",
            )
        else:
            router = create_router(router_name, encoder=encoder)
            router.fit(_read_log(train_log, "'--train-log'") if train_log else records, seed=seed)
        result = run_replay(
            records,
            router,
            budget,
            prices={"edge": settings.edge.price_per_image, "cloud": settings.cloud.price_per_image},
            online=BudgetConfig(rho=budget, window=settings.budget_window, tolerance=settings.budget_tolerance)
            if online
            else None,
        )
    except RouterError as exc:
        raise click.ClickException(str(exc)) from exc
    except LogFormatError as exc:
        raise click.BadParameter(str(exc), param_hint="'--log'") from exc
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(_describe(result.to_dict()))


def _describe(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['router']} ({doc['version']}) at budget {doc['budget']:g}: "
        f"{doc['cloud']} of {doc['prompts']} prompts to the cloud ({doc['cloud_share']:.1%})",
    ]
    for metric, value in doc["quality"]["routed"].items():
        pgr = doc["pgr"][metric]
        lines.append(
            f"  {metric}: {value:.4f} (edge only {doc['quality']['edge_only'][metric]:.4f}, "
            f"cloud only {doc['quality']['cloud_only'][metric]:.4f}, PGR {'—' if pgr is None else f'{pgr:.3f}'})"
        )
    cost = doc["cost_usd"]
    lines.append(
        f"  cost: ${cost['routed']:.4f} (edge only ${cost['edge_only']:.4f}, cloud only ${cost['cloud_only']:.4f})"
    )
    lines.append(f"  Pareto no-worse: {doc['pareto_no_worse']:.1%} of prompts")
    if (online := doc["online"]) is not None:
        if online["lowest_window_share"] is None:
            windows = f"the log is shorter than one window of {online['window']}"
        else:
            windows = (
                f"cloud share of every {online['window']} consecutive decisions "
                f"{online['lowest_window_share']:.1%}–{online['highest_window_share']:.1%}"
            )
        lines.append(
            f"  online: {windows}; {online['cloud_by_minimum_share']} sent to the cloud by the window's minimum share"
        )
    return "\n".join(lines)


def _k_tier_log(path: Path) -> TierLog | None:
    """The log at ``path`` when it is a K-tier one (three or more tiers, or tiers not named edge and cloud); None
    for a two-tier log, or one neither reader accepts (the two-tier reader then says why)."""
    from router.log import LogFormatError
    from router.tierlog import read_tier_log

    try:
        log = read_tier_log(path)
    except (LogFormatError, UnicodeDecodeError):
        return None
    return None if log.is_two_tier() else log


def _evaluate_k_tiers(
    log: TierLog,
    path: Path,
    routers: str | None,
    folds: int,
    seeds: int,
    as_json: bool,
    plot: Path | None,
    progress: bool | None,
) -> None:
    """``routet2i eval --log`` on a K-tier log: the rows of :func:`router.tiereval.evaluate_tiers`."""
    from router.splits import group_ids
    from router.tiereval import DEFAULT_ROUTERS, available_rows, evaluate_tiers
    from router.tierreport import plot_tier_report, tier_table

    if log.prices is None:
        raise click.BadParameter(
            f"{path}: a K-tier log needs each line's 'cost' (price per image)", param_hint="'--log'"
        )
    names = list(DEFAULT_ROUTERS) if routers is None else [n.strip() for n in routers.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_rows()]
    if unknown or not names or len(set(names)) != len(names):
        raise click.BadParameter(
            f"K-tier routers are {', '.join(available_rows())} (each once); got {routers!r}", param_hint="'--routers'"
        )
    distinct = int(group_ids(log.prompts).max()) + 1
    if folds > distinct:
        raise click.BadParameter(
            f"{folds} folds need at least {folds} distinct prompts; the log has {distinct}", param_hint="'--folds'"
        )
    settings = load_settings()
    encoder = _encoder(settings) if any(n not in ("random-mixture", "oracle") for n in names) else None
    show = sys.stderr.isatty() if progress is None else progress
    report = evaluate_tiers(
        log, names, folds=folds, seeds=seeds, encoder=encoder, progress=show, info={"log": str(path)}
    )
    if plot is not None:
        plot_tier_report(report, plot, title=f"{path.name}: {folds}-fold CV x {seeds} seeds")
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(tier_table(report.to_dict()))
    timing = f"\n{report.wall_s:.1f}s wall, {report.cpu_s:.1f}s CPU"
    click.echo(f"{timing}; plot: {plot}" if plot else timing)
