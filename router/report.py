"""Human-readable views of an evaluation :class:`~router.results.Report`: tables and a plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from router.pgr import CURVE_FRACTIONS

if TYPE_CHECKING:
    from router.results import Report


def _num(value: float, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}f}±{std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def format_comparison(report: Report, router: str, *, markdown: bool = False) -> str:
    """``router`` against the best baseline on APGR, PGR@30% and PGR@50%, paired over the runs ('' when the
    report has no such comparison)."""
    found = report.compare(router)
    if not found:
        return ""
    header = ["value", router, "best baseline", "difference ± s.e.", "runs at least as good"]
    rows = [
        [
            "APGR" if c.key == "apgr" else f"PGR@{round(float(c.key.split('@')[1]) * 100)}%",
            _num(c.mean, 3),
            f"{c.best} {_num(c.best_mean, 3)}",
            f"{c.difference:+.3f} ± {_num(c.se, 3)}",
            f"{c.ahead}/{c.runs}",
        ]
        for c in found
    ]
    level = sum(c.mean >= c.best_mean for c in found)
    title = (
        f"{router} against the best baseline of each value (paired over the runs, which share their test folds): "
        f"at least the baseline's on {level} of {len(found)}"
    )
    return "\n".join([title if not markdown else f"*{title}*", "", _render(header, rows, markdown)])


def format_table(report: Report, *, markdown: bool = False, compare: Sequence[str] = ()) -> str:
    """Aggregate table (APGR, PGR at every reported fraction, CPT(50%), CPT(80%), Pareto no-worse at 50%),
    then each router of ``compare`` against the best baseline, then, for multi-metric logs, a per-metric
    table."""
    from router.results import fkey

    fractions = report.fractions
    header = ["router", "APGR", *(f"PGR@{round(f * 100)}%" for f in fractions), "CPT(50%)", "CPT(80%)"]
    pareto_key = "pareto@0.5" if 0.5 in fractions else None
    if pareto_key:
        header.append("no-worse@50%")
    rows = []
    for name, s in report.routers.items():
        row = [name, _pm(s.mean["apgr"], s.std["apgr"])]
        row += [_num(s.mean[f"pgr@{fkey(f)}"]) for f in fractions]
        row += [_num(s.mean["cpt_50"]), _num(s.mean["cpt_80"])]
        if pareto_key:
            row.append(_num(s.mean[pareto_key]))
        rows.append(row)
    title = (
        f"{report.n_records} prompts, metrics: {', '.join(report.metrics)}; "
        f"{report.folds} folds x {len(report.seeds)} seeds; mean (± std for APGR) over runs"
    )
    parts = [title if not markdown else f"*{title}*", "", _render(header, rows, markdown)]
    for name in compare:
        comparison = format_comparison(report, name, markdown=markdown)
        if comparison:
            parts += ["", comparison]
    if len(report.metrics) > 1:
        mid = [f for f in (0.3, 0.5) if f in fractions]
        m_header = ["router", "metric", "APGR", *(f"PGR@{round(f * 100)}%" for f in mid), "CPT(50%)"]
        m_rows = []
        for name, s in report.routers.items():
            for metric in report.metrics:
                m_rows.append(
                    [
                        name,
                        metric,
                        _pm(s.mean[f"{metric}:apgr"], s.std[f"{metric}:apgr"]),
                        *(_num(s.mean[f"{metric}:pgr@{fkey(f)}"]) for f in mid),
                        _num(s.mean[f"{metric}:cpt_50"]),
                    ]
                )
        parts += ["", "per metric:" if not markdown else "*per metric:*", "", _render(m_header, m_rows, markdown)]
    return "\n".join(parts)


def plot_report(report: Report, path: Path, *, title: str | None = None) -> Path:
    """Quality against cloud fraction for every router (one panel per metric) and the aggregate PGR curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*report.metrics, "aggregate PGR"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    x = list(CURVE_FRACTIONS)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (name, s) in enumerate(report.routers.items()):
            y = s.curves["pgr"] if panel == "aggregate PGR" else s.curves[f"{panel}:quality"]
            style = {"linestyle": "--"} if name in ("oracle", "all-edge", "all-cloud") else {}
            if name == "random":
                style = {"linestyle": ":"}
            ax.plot(x, y, label=name, color=cycle[i % len(cycle)], linewidth=1.6, **style)
        ax.set_xlabel("cloud fraction (budget)")
        ax.set_ylabel("PGR" if panel == "aggregate PGR" else f"mean {panel}")
        ax.set_title(panel if panel == "aggregate PGR" else f"quality: {panel}")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(
        title or f"{report.n_records} prompts, {report.folds}-fold CV x {len(report.seeds)} seeds", fontsize=11
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
