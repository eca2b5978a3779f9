"""Human-readable views of a K-tier evaluation (:class:`router.tiereval.TierReport`): a table and a plot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.report import _render
from router.tierresults import FOCUS

if TYPE_CHECKING:
    from router.tierresults import TierReport


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def tier_table(doc: Mapping[str, Any], *, markdown: bool = False) -> str:
    """From a report's JSON document (:meth:`~router.tiereval.TierReport.to_dict`), one row per router: aqc (mean
    ± s.d. over runs), cost_to_best, the share of runs reaching the best tier, and the focus router's paired aqc
    difference with it (± standard error) and the runs in which it is at least as good."""
    paired = {c["router"]: c for c in doc["comparison"][FOCUS]}
    header = ["router", "aqc", "cost_to_best", "runs reaching best", f"{FOCUS} − router (± s.e.)", "runs ahead"]
    header.append("tier shares at the mid budget")
    rows = []
    for name, summary in doc["routers"].items():
        c = paired.get(name)
        rows.append(
            [
                name,
                f"{_fmt(summary['aqc'])}±{_fmt(summary['aqc_std'])}",
                _fmt(summary["cost_to_best"], 2),
                f"{summary['cost_to_best_reached']:.2f}",
                "—" if c is None else f"{_fmt(c['difference'])} ± {_fmt(c['se'])}",
                "—" if c is None else f"{c['runs_ahead']}/{c['runs']}",
                " / ".join(f"{v:.2f}" for v in summary["shares_at_mid_budget"].values()),
            ]
        )
    log = doc["log"]
    prices = ", ".join(f"{t} ${p:.4g}" for t, p in zip(log["tiers"], log["prices"], strict=True))
    middle = next(iter(doc["routers"].values()))["mid_budget"]
    title = (
        f"{log['records']} prompts, tiers (cheapest first) {prices}; best single tier {log['best_tier']}; "
        f"{doc['protocol']['folds']} folds x {len(doc['protocol']['seeds'])} seeds; mid budget ${middle:.4g} per image"
    )
    return "\n".join([f"*{title}*" if markdown else title, "", _render(header, rows, markdown)])


def plot_tier_report(report: TierReport, path: Path, *, title: str = "") -> Path:
    """Mean normalised quality against mean cost per image for every router; single tiers as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    prices = report.prices
    for name in report.runs:
        cost, quality = report.mean_curve(name)
        if name.startswith("tier:"):
            k = report.log.tiers.index(name.removeprefix("tier:"))
            ax.plot([prices[k]], [quality[-1]], "ks", markersize=6)
            ax.annotate(name.removeprefix("tier:"), (prices[k], quality[-1]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)  # fmt: skip
            continue
        style: dict[str, Any] = {"linewidth": 2.4 if name == FOCUS else 1.3}
        if name in ("oracle", "random-mixture"):
            style["linestyle"] = "--"
        ax.plot(cost, quality, label=name, **style)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("mean price per image (USD)")
    ax.set_ylabel("normalised quality (0: all cheapest tier, 1: best single tier)")
    ax.set_title(title or "quality-cost curves")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
