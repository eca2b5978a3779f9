"""``routet2i bench NAME``: run a registered benchmark and print its measurements.

One subcommand per entry of :data:`cli.bench.BENCHMARKS`, with ``--repeats``, ``--json`` and the
benchmark's own parameters as options.
"""

from __future__ import annotations

import json
from typing import Any

import click

from cli.bench import BENCHMARKS, BadParam, Benchmark, Measurement, Param
from cli.commands.common import load_settings


def format_table(measurements: list[Measurement]) -> str:
    """Measurements as aligned text: name, value, unit, reference, ratio."""
    width = max((len(m.name) for m in measurements), default=4)
    lines = [f"{'name':<{width}}  {'value':>12}  {'unit':<10}  {'reference':>12}  {'ratio':>7}"]
    for m in measurements:
        reference = "" if m.reference is None else f"{m.reference:12.4g}"
        ratio = "" if m.ratio is None else f"{m.ratio:7.3f}"
        lines.append(f"{m.name:<{width}}  {m.value:12.4g}  {m.unit:<10}  {reference:>12}  {ratio:>7}")
    return "\n".join(lines)


def _command(benchmark: Benchmark) -> click.Command:
    def callback(repeats: int, as_json: bool, **params: Any) -> None:
        settings = load_settings()
        try:
            measurements = benchmark.run(settings, repeats=repeats, **params)
        except BadParam as exc:
            raise click.BadParameter(str(exc), param_hint=f"'{exc.option}'") from exc
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        if as_json:
            click.echo(json.dumps([m.to_dict() for m in measurements], indent=2))
        else:
            click.echo(format_table(measurements))

    options: list[click.Parameter] = [
        click.Option(
            ["--repeats"],
            default=benchmark.repeats,
            show_default=True,
            type=click.IntRange(1, 10_000),
            help="Timed repeats; medians are reported.",
        ),
        click.Option(["--json", "as_json"], is_flag=True, help="Print a JSON list of measurements."),
    ]
    for param in benchmark.params:
        options.append(
            click.Option(
                [f"--{param.name.replace('_', '-')}", param.name],
                default=param.default,
                show_default=True,
                type=_option_type(param),
                help=param.help,
            )
        )
    return click.Command(benchmark.name, callback=callback, params=options, help=benchmark.summary)


def _option_type(param: Param) -> click.ParamType | type:
    """The click type of a benchmark parameter: its default's type, within its bounds or choices."""
    if param.choices:
        return click.Choice(param.choices)
    if param.minimum is not None and isinstance(param.default, int):
        return click.IntRange(min=int(param.minimum))
    if param.minimum is not None and isinstance(param.default, float):
        return click.FloatRange(min=param.minimum)
    return type(param.default)


@click.group()
def bench() -> None:
    """Benchmarks, each timed against a reference measured in the same run (medians, ratios)."""


for _benchmark in BENCHMARKS.values():
    bench.add_command(_command(_benchmark))
