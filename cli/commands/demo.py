"""``routet2i demo``: the whole system on embedded defaults, with real prompts."""

from __future__ import annotations

import click

from cli.commands.common import load_settings


@click.command()
@click.option(
    "--prompts",
    "n_prompts",
    default=50,
    show_default=True,
    type=click.IntRange(1, 1632),
    help="How many PartiPrompts to submit.",
)
@click.option("--seed", default=0, show_default=True, help="Which prompts are drawn.")
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(1),
    help="Seconds to wait for the jobs.",
)
@click.option("--log-dir", default="var/demo-logs", show_default=True, help="Where the children's logs go.")
def demo(n_prompts: int, seed: int, timeout: float, log_dir: str) -> None:
    """Start the API and one worker per queue, run real prompts through them, print a summary, stop."""
    from cli.demo import run_demo
    from cli.stack import StackError

    settings = load_settings()
    try:
        code = run_demo(settings, n_prompts=n_prompts, seed=seed, timeout=timeout, log_dir=log_dir)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)
