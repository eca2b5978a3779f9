"""What a simulated deployment (:mod:`router.simulation`) shows: PGR of the routed traffic over the stream, the
labels collected and what they cost, as a JSON document, a table and a plot.

PGR of a stretch of the stream is the gain the images the users received recovered over those prompts, as a
share of what all-cloud recovers per prompt over the whole log (per metric, then averaged over metrics): 0 is
all-edge, and all-cloud averages 1 (:func:`stretch_pgr`). Each figure is a mean over the seeds (orders of the log), with its
standard error over seeds; a difference between two policies is paired by seed (the same order of prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from router.log import LogRecord, metric_names
from router.pgr import aggregate_weights, quality_arrays

if TYPE_CHECKING:
    from router.simulation import Run, Simulation

REFERENCES = ("frozen", "random", "loop")
"""Policies every other one is compared with, paired by seed (``loop``: is a prior worth warm starting from)."""


def unit_gains(records: Sequence[LogRecord]) -> np.ndarray:
    """Each record's cloud-minus-edge gain, every metric divided by its total gain over the log and the metrics
    averaged (those with a total gain of zero left out): the gains sum to 1 over the log."""
    edge, cloud = quality_arrays(records, metric_names(records))
    result: np.ndarray = (cloud - edge) @ aggregate_weights(edge, cloud)
    return result


def stretch_pgr(unit: np.ndarray, indices: np.ndarray, cloud: np.ndarray) -> float:
    """PGR of the images delivered for the records ``indices`` (``cloud``: whether each got the cloud's): the gain
    they recovered over the gain all-cloud recovers per prompt on average over the whole log (``unit``:
    :func:`unit_gains`), times the stretch's length. Over the whole log it is the log's PGR; over a stretch, it
    is measured against the log's mean gain rather than the stretch's own total, which a few dozen prompts make
    too noisy to divide by (near zero on a stretch where the cloud barely helps)."""
    return float(unit[indices] @ cloud) * len(unit) / len(indices)


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None with one value)."""
    array = np.asarray(values, dtype=np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else None
    return float(array.mean()), se


def last_quarter_start(n: int) -> int:
    """First position of the stream's last quarter."""
    return (3 * n) // 4


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _highest_window_share(uses: np.ndarray, window: int) -> float:
    """The largest share of places the budget window counts as cloud (delivered cloud images, and shadow ones
    paid from ρ) in any ``window`` consecutive prompts, or in the stream so far while it is shorter than a
    window."""
    full: list[float] = []
    if len(uses) >= window:
        full = (np.convolve(uses.astype(np.float64), np.ones(window), "valid") / window).tolist()
    prefix = np.cumsum(uses) / np.arange(1, len(uses) + 1)
    return float(max([*full, *prefix[: window - 1]]))


def _labels_of_cloud_routed(runs: Sequence[Run]) -> float | None:
    """The share of the labels whose prompt the policy had sent to the cloud (its shadow image is the edge's, which
    uses no cloud budget): labels are not a random sample of the traffic when the window refuses edge shadows."""
    labels = sum(int(run.shadow.sum()) for run in runs)
    return sum(int((run.shadow & run.cloud).sum()) for run in runs) / labels if labels else None


def _curve(unit: np.ndarray, sim: Simulation, runs: Sequence[Run]) -> list[dict[str, Any]]:
    points = []
    for stretch in np.array_split(np.arange(len(sim.records)), sim.config.curve_points):
        pgr = [stretch_pgr(unit, run.order[stretch], run.cloud[stretch]) for run in runs]
        mean, se = mean_se(pgr)
        labels = float(np.mean([run.labels[stretch[-1]] for run in runs]))
        points.append({"prompts": int(stretch[-1]) + 1, "labels": round(labels, 3), "pgr": _r(mean), "se": _r(se)})
    return points


def _all_cloud(unit: np.ndarray, sim: Simulation) -> dict[str, Any]:
    """What all-cloud routing scores on the same stretches of the same orders: the gain each stretch offers."""
    runs = next(iter(sim.runs.values()))
    start = last_quarter_start(len(sim.records))
    everything = np.ones(len(sim.records), dtype=bool)
    mean, se = mean_se([stretch_pgr(unit, run.order[start:], everything[start:]) for run in runs])
    stretches = np.array_split(np.arange(len(sim.records)), sim.config.curve_points)
    curve = [
        {
            "prompts": int(stretch[-1]) + 1,
            "pgr": _r(float(np.mean([stretch_pgr(unit, run.order[stretch], everything[stretch]) for run in runs]))),
        }
        for stretch in stretches
    ]
    return {"pgr_last_quarter": _r(mean), "pgr_last_quarter_se": _r(se), "pgr_curve": curve}


def _policy(
    unit: np.ndarray, sim: Simulation, runs: Sequence[Run], last: dict[str, list[float]], name: str
) -> dict[str, Any]:
    start = last_quarter_start(len(sim.records))
    mean, se = mean_se(last[name])
    whole = mean_se([stretch_pgr(unit, run.order, run.cloud) for run in runs])
    paired = {}
    for reference in REFERENCES:
        if reference in last and reference != name:
            diff = mean_se([a - b for a, b in zip(last[name], last[reference], strict=True)])
            paired[reference] = {"difference": _r(diff[0]), "se": _r(diff[1])}
    labels = [int(run.labels[-1]) for run in runs]
    costs = [run.shadow_cost_usd for run in runs]
    return {
        "pgr_last_quarter": _r(mean),
        "pgr_last_quarter_se": _r(se),
        "pgr_last_quarter_per_seed": [_r(v) for v in last[name]],
        "pgr_last_quarter_prompts": len(sim.records) - start,
        "paired": paired,
        "pgr_stream": _r(whole[0]),
        "pgr_stream_se": _r(whole[1]),
        "pgr_curve": _curve(unit, sim, runs),
        "labels": round(float(np.mean(labels)), 3),
        "labels_per_seed": labels,
        "labels_of_cloud_routed": _r(_labels_of_cloud_routed(runs)),
        "shadow_cost_usd": _r(float(np.mean(costs))),
        "shadow_cost_usd_per_seed": [_r(c) for c in costs],
        "promotions": round(float(np.mean([run.promotions for run in runs])), 3),
        "promotions_per_seed": [run.promotions for run in runs],
        "cloud_share": _r(float(np.mean([run.cloud.mean() for run in runs]))),
        "cloud_use_share": _r(float(np.mean([run.uses_cloud.mean() for run in runs]))),
        "highest_window_share": _r(max(_highest_window_share(run.in_window, sim.window) for run in runs)),
        "events": [run.events for run in runs],
        "wall_s": round(sum(run.wall_s for run in runs), 3),
    }


def summarise(sim: Simulation) -> dict[str, Any]:
    """The simulation as a JSON document: per policy its PGR over the last quarter of the stream (mean, standard
    error and paired differences against ``frozen`` and ``random`` over seeds), its PGR curve, its labels and
    their cost, its promotions and verdicts; top-level ``labels`` and ``shadow_cost_usd`` are the ``loop``'s
    (else the first learning policy's), and ``all_cloud`` what all-cloud routing scores on the same stretches."""
    start = last_quarter_start(len(sim.records))
    unit = unit_gains(sim.records)
    last = {
        name: [stretch_pgr(unit, run.order[start:], run.cloud[start:]) for run in runs]
        for name, runs in sim.runs.items()
    }
    policies = {name: _policy(unit, sim, runs, last, name) for name, runs in sim.runs.items()}
    learner = next((p for p in ("loop", "loop-warm", "loop-pooled") if p in policies), None)
    config = asdict(sim.config)
    config["router_settings"] = dict(sim.config.router_settings)
    return {
        "log": sim.info,
        "prompts": len(sim.records),
        "budget": sim.config.budget,
        "seeds": sim.config.seeds,
        "window": sim.window,
        "settings": config,
        "labels": policies[learner]["labels"] if learner else 0,
        "shadow_cost_usd": policies[learner]["shadow_cost_usd"] if learner else 0.0,
        "policies": policies,
        "all_cloud": _all_cloud(unit, sim),
        "wall_s": round(sim.wall_s, 3),
    }


def _pm(value: float | None, se: float | None, sign: bool = False) -> str:
    if value is None:
        return "—"
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    return text if se is None else f"{text} ± {se:.3f}"


def format_table(doc: dict[str, Any], *, markdown: bool = False) -> str:
    """One row per policy: PGR over the last quarter ± s.e., paired differences, labels, their cost, promotions;
    and what all-cloud scores on the same last quarters."""
    header = ["policy", "PGR last quarter", *(f"− {r}" for r in REFERENCES), "PGR stream", "labels", "shadow $"]
    header.append("promotions")
    rows = []
    for name, p in doc["policies"].items():
        paired = p["paired"]
        rows.append(
            [
                name,
                _pm(p["pgr_last_quarter"], p["pgr_last_quarter_se"]),
                *(_pm(paired[r]["difference"], paired[r]["se"], sign=True) if r in paired else "—" for r in REFERENCES),
                _pm(p["pgr_stream"], p["pgr_stream_se"]),
                f"{p['labels']:g}",
                f"{p['shadow_cost_usd']:.3f}",
                f"{p['promotions']:g}",
            ]
        )
    reference = doc["all_cloud"]
    blank = ["—"] * (len(header) - 2)
    rows.append(["all-cloud (reference)", _pm(reference["pgr_last_quarter"], reference["pgr_last_quarter_se"]), *blank])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def plot_simulation(doc: dict[str, Any], path: Path, *, title: str | None = None) -> Path:
    """PGR of each stretch of the stream against the prompts seen (mean over seeds, ± one standard error), and
    the labels the learning policies collected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, p) in enumerate(doc["policies"].items()):
        x = [point["prompts"] for point in p["pgr_curve"]]
        y = np.array([point["pgr"] for point in p["pgr_curve"]], dtype=np.float64)
        se = np.array([point["se"] or 0.0 for point in p["pgr_curve"]], dtype=np.float64)
        style = ":" if name in ("random", "cv-reference") else "-"
        left.plot(x, y, style, marker="o", markersize=3, color=cycle[i % len(cycle)], label=name, linewidth=1.5)
        left.fill_between(x, y - se, y + se, color=cycle[i % len(cycle)], alpha=0.1)
        if p["labels"]:
            right.plot(x, [point["labels"] for point in p["pgr_curve"]], color=cycle[i % len(cycle)], label=name)
    reference = doc["all_cloud"]["pgr_curve"]
    left.plot([p["prompts"] for p in reference], [p["pgr"] for p in reference], "--", color="0.6", label="all-cloud")
    left.set_xlabel("prompts seen")
    left.set_ylabel("PGR of the stretch")
    left.set_title(f"routed traffic, budget {doc['budget']:g}", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="best")
    right.set_xlabel("prompts seen")
    right.set_ylabel("labels")
    right.set_title("labels collected (shadow samples)", fontsize=10)
    right.grid(alpha=0.3)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7, loc="best")
    fig.suptitle(title or f"{doc['prompts']} prompts, {doc['seeds']} orders", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
