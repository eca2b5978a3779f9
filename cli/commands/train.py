"""``routet2i train``: fit a learned router on a replay log and write a versioned artifact."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.commands.common import echo_json, load_settings
from cli.commands.evaluate import _encoder, _k_tier_log, _read_log

if TYPE_CHECKING:
    from router.tierlog import TierLog


def _parse_settings(values: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--set'")
        try:
            parsed[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key.strip()] = raw
    return parsed


@click.command("train")
@click.option(
    "--log",
    "log_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replay log to learn from (both tiers' qualities per prompt).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Artifact directory to write (manifest.json and weights).",
)
@click.option(
    "--router",
    "router_name",
    default="routet2i",
    show_default=True,
    help="Learned router to train (routet2i, an ablation, or a learned baseline).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice of the fit.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Router setting, e.g. --set top_k=4 --set members=3 (values are JSON where they parse).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the artifact's manifest as JSON.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: when it is a terminal).")
def train(
    log_path: Path,
    out_dir: Path,
    router_name: str,
    seed: int,
    overrides: tuple[str, ...],
    as_json: bool,
    progress: bool | None,
) -> None:
    """Train a learned router on a replay log; early stopping on a validation split; writes DIR/manifest.json.

    The artifact records its content hash as the router version; every routing decision made with it stores
    that version. On a K-tier log (three or more tiers, or tiers not named edge and cloud) it trains a K-tier
    router (routet2i, ridge or knn), which a deployment with that many tiers routes with. See docs/router.md.
    """
    from router.base import RouterError, create_router, read_manifest, router_class

    tier_log = _k_tier_log(log_path)
    if tier_log is not None:
        _train_k_tiers(tier_log, out_dir, router_name, seed, _parse_settings(overrides), as_json)
        return

    try:
        cls = router_class(router_name)
    except RouterError as exc:
        raise click.BadParameter(str(exc), param_hint="'--router'") from exc
    if not cls.learned:
        raise click.BadParameter(
            f"router {router_name!r} learns nothing; it needs no training", param_hint="'--router'"
        )
    settings = _parse_settings(overrides)
    encoder = _encoder(load_settings())
    try:
        router = create_router(router_name, encoder=encoder, **settings)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--set'") from exc
    records = _read_log(log_path)

    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    members = int(getattr(getattr(router, "cfg", None), "members", 1))
    bar = tqdm(total=members, desc=f"training {router_name}", unit="member", file=sys.stderr, disable=not show)
    if hasattr(router, "on_member"):

        def advance(member: int, report: dict[str, Any]) -> None:
            bar.set_postfix(epochs=report["epochs"], valid_loss=report["valid_loss"])
            bar.update(1)

        router.on_member = advance
    started = time.perf_counter()
    try:
        router.fit(records, seed=seed)
    except RouterError as exc:
        raise click.BadParameter(str(exc), param_hint="'--log'") from exc
    finally:
        bar.close()
    router.save(out_dir)
    manifest = read_manifest(out_dir)
    if as_json:
        echo_json({**manifest, "path": str(out_dir), "train_s": round(time.perf_counter() - started, 3)})
        return
    click.echo(
        f"trained {router_name} on {len(records)} prompts in {time.perf_counter() - started:.1f} s\n"
        f"  version:  {manifest.get('version', router.version)}\n"
        f"  artifact: {out_dir}"
    )


def _train_k_tiers(
    log: TierLog, out_dir: Path, router_name: str, seed: int, settings: dict[str, Any], as_json: bool
) -> None:
    """``routet2i train`` on a K-tier log: a K-tier router, saved where a deployment's ROUTET2I_ROUTER_MODEL
    points (its tiers, cheapest first, are the deployment's, matched by position)."""
    from router.base import RouterError, read_manifest
    from router.multitier import available_tier_routers, create_tier_router

    if router_name not in available_tier_routers():
        raise click.BadParameter(
            f"a K-tier log trains a K-tier router: one of {', '.join(available_tier_routers())}",
            param_hint="'--router'",
        )
    try:
        router = create_tier_router(router_name, encoder=_encoder(load_settings()), **settings)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--set'") from exc
    started = time.perf_counter()
    try:
        router.fit(list(log.records), seed=seed)
    except RouterError as exc:
        raise click.BadParameter(str(exc), param_hint="'--log'") from exc
    router.save(out_dir)
    manifest = read_manifest(out_dir)
    elapsed = time.perf_counter() - started
    if as_json:
        echo_json({**manifest, "path": str(out_dir), "train_s": round(elapsed, 3)})
        return
    click.echo(
        f"trained {router_name} on {len(log.records)} prompts and {len(router.tiers)} tiers "
        f"({', '.join(router.tiers)}) in {elapsed:.1f} s\n"
        f"  version:  {router.version}\n"
        f"  artifact: {out_dir}"
    )
