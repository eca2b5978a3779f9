"""What a replay evaluation (:func:`router.evaluation.evaluate`) produces: each run's values, each router's
summary over its runs, the comparison of a router with the best baseline, and the report with its JSON document
(docs/evaluation.md describes its schema; :mod:`router.report` renders it as tables and plots).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.pgr import CURVE_FRACTIONS

CPT_TARGETS: tuple[float, ...] = (0.5, 0.8)
"""PGR levels whose cost (smallest cloud share reaching them) is reported as ``cpt_50`` and ``cpt_80``."""

FIT_SEED_STRIDE = 1000
"""Fit seed of fold ``f`` under seed ``s`` is ``FIT_SEED_STRIDE·s + f``."""


def fkey(fraction: float) -> str:
    """JSON key of a cloud fraction: ``0.5`` -> ``"0.5"``, ``0.05`` -> ``"0.05"``, ``0`` -> ``"0.0"``."""
    return str(round(float(fraction), 4))


@dataclass(frozen=True)
class RunResult:
    """One router on one test fold of one seed.

    Attributes:
        router: router name.
        seed: split seed.
        fold: test fold index.
        n_test: prompts in the test fold.
        values: every scalar measured, by key: ``apgr``, ``cpt_50``, ``cpt_80``, ``pgr@0.5``,
            ``pareto@0.5``, ``share@0.5`` and per metric ``<metric>:apgr``, ``<metric>:pgr@0.5``,
            ``<metric>:cpt_50``, ``<metric>:no_worse@0.5``, ``<metric>:quality@0.5`` (NaN: CPT never reached).
        curves: ``pgr`` and ``<metric>:quality`` read at :data:`router.pgr.CURVE_FRACTIONS`.
    """

    router: str
    seed: int
    fold: int
    n_test: int
    values: Mapping[str, float]
    curves: Mapping[str, np.ndarray]


@dataclass(frozen=True)
class RouterSummary:
    """Mean and standard deviation of every value over a router's runs.

    Attributes:
        name: router name.
        learned: whether it learns from the log.
        mean: mean per value key (NaN when any run is NaN, e.g. a CPT some fold never reaches).
        std: sample standard deviation per value key (0 with a single run).
        reached: per CPT key, the share of runs that reached it.
        curves: mean curves.
        runs: the individual runs.
        fit_s: seconds spent in ``fit`` over all runs.
        score_s: seconds spent scoring over all runs.
    """

    name: str
    learned: bool
    mean: Mapping[str, float]
    std: Mapping[str, float]
    reached: Mapping[str, float]
    curves: Mapping[str, np.ndarray]
    runs: tuple[RunResult, ...]
    fit_s: float
    score_s: float


BOUNDS = frozenset({"oracle", "all-edge", "all-cloud"})
"""Routers that bound the others rather than compete with them: never anyone's best baseline."""

FOCUS = ("routet2i",)
"""Routers that reports compare against the best baseline by default: the project's own."""

COMPARED = ("apgr", "pgr@0.3", "pgr@0.5")
"""The cells a router is compared on against the best baseline (those the fractions of a report include)."""


@dataclass(frozen=True)
class Comparison:
    """One router against the best baseline on one value, paired over the runs (they share the test folds).

    Attributes:
        key: the value (``apgr``, ``pgr@0.5``...).
        mean: the router's mean over runs.
        best: the baseline with the highest mean on this value.
        best_mean: its mean.
        difference: mean over runs of the router's value minus the baseline's on the same fold.
        se: standard error of that mean (sample standard deviation over runs / √runs; NaN with one run).
        ahead: runs in which the router is at least the baseline's.
        runs: runs compared.
    """

    key: str
    mean: float
    best: str
    best_mean: float
    difference: float
    se: float
    ahead: int
    runs: int


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`evaluate`.

    Attributes:
        metrics: the log's metric names.
        n_records: records in the log.
        n_prompts: distinct prompts (what the folds split).
        folds: folds per seed.
        seeds: split seeds.
        fractions: cloud fractions PGR is reported at.
        routers: summaries, in the order the routers were given.
        wall_s: wall-clock seconds of the whole evaluation (warm-up included).
        cpu_s: CPU seconds this process spent on it (on a shared machine, wall time also counts waiting).
        info: free-form facts for the JSON document (log path, suite name...).
    """

    metrics: tuple[str, ...]
    n_records: int
    n_prompts: int
    folds: int
    seeds: tuple[int, ...]
    fractions: tuple[float, ...]
    routers: Mapping[str, RouterSummary]
    wall_s: float
    cpu_s: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self, compare: Sequence[str] = FOCUS) -> dict[str, Any]:
        """Every number as plain JSON (NaN becomes ``null``); see docs/evaluation.md for the schema.
        ``compare``: routers whose :meth:`compare` goes in, under ``comparison``."""
        comparisons = {name: self.compare(name) for name in compare}
        return {
            "routers": {name: _summary_dict(s, self.metrics, self.fractions) for name, s in self.routers.items()},
            "comparison": {
                name: [
                    {
                        "value": c.key,
                        "mean": _clean(c.mean),
                        "best_baseline": c.best,
                        "best_baseline_mean": _clean(c.best_mean),
                        "difference": _clean(c.difference),
                        "se": _clean(c.se),
                        "runs_ahead": c.ahead,
                        "runs": c.runs,
                    }
                    for c in found
                ]
                for name, found in comparisons.items()
                if found
            },
            "log": {"records": self.n_records, "prompts": self.n_prompts, "metrics": list(self.metrics)},
            "protocol": {
                "folds": self.folds,
                "seeds": list(self.seeds),
                "runs_per_router": self.folds * len(self.seeds),
                "split": "k-fold by prompt text (whitespace and case folded); all routers share the test folds",
                "fit_seed": f"{FIT_SEED_STRIDE} * seed + fold",
                "aggregate": "mean over metrics of per-metric PGR (= PGR of the gap-normalised composite metric)",
                "std": "sample standard deviation over folds x seeds runs",
                "ties": "tied scores are taken in random order, counted at their expectation",
            },
            "timing": {
                "wall_s": round(self.wall_s, 3),
                "cpu_s": round(self.cpu_s, 3),
                "prompt_scores_per_s": round(self.n_records * len(self.seeds) * len(self.routers) / self.wall_s, 1)
                if self.wall_s > 0
                else None,
                "routers": {
                    name: {"fit_s": round(s.fit_s, 3), "score_s": round(s.score_s, 3)}
                    for name, s in self.routers.items()
                },
            },
            **({"info": dict(self.info)} if self.info else {}),
        }

    def compare(self, router: str) -> list[Comparison]:
        """``router`` against the best baseline on each of :data:`COMPARED`; the baselines are every other router
        in the report except the :data:`BOUNDS` and the router's own variants (``<router>-...``, its ablations).
        Empty when the report lacks the router or any baseline."""
        baselines = [n for n in self.routers if n != router and n not in BOUNDS and not n.startswith(f"{router}-")]
        if router not in self.routers or not baselines:
            return []
        own = self.routers[router]
        result = []
        for key in COMPARED:
            if key not in own.mean:
                continue
            best = max(baselines, key=lambda n: self.routers[n].mean[key])
            theirs = self.routers[best]
            pairs = [(a.values[key], b.values[key]) for a, b in zip(own.runs, theirs.runs, strict=True)]
            assert all(a.seed == b.seed and a.fold == b.fold for a, b in zip(own.runs, theirs.runs, strict=True))
            differences = np.array([a - b for a, b in pairs])
            se = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else math.nan
            result.append(
                Comparison(
                    key=key,
                    mean=own.mean[key],
                    best=best,
                    best_mean=theirs.mean[key],
                    difference=float(differences.mean()),
                    se=se,
                    ahead=int(np.sum(differences >= 0)),
                    runs=len(differences),
                )
            )
        return result

    def table(self, *, markdown: bool = False, compare: Sequence[str] = FOCUS) -> str:
        """The aggregate numbers per router as a text (or Markdown) table, then each of ``compare`` against the
        best baseline, then per-metric detail."""
        from router.report import format_table

        return format_table(self, markdown=markdown, compare=compare)


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def _by_fraction(values: Mapping[str, float], prefix: str, fractions: Sequence[float]) -> dict[str, float | None]:
    return {fkey(f): _clean(values[f"{prefix}@{fkey(f)}"]) for f in fractions}


def _summary_dict(s: RouterSummary, metrics: Sequence[str], fractions: Sequence[float]) -> dict[str, Any]:
    mean, std = s.mean, s.std
    out: dict[str, Any] = {
        "learned": s.learned,
        "pgr": _by_fraction(mean, "pgr", fractions),
        "pgr_std": _by_fraction(std, "pgr", fractions),
        "apgr": _clean(mean["apgr"]),
        "apgr_std": _clean(std["apgr"]),
    }
    for target in CPT_TARGETS:
        key = f"cpt_{round(target * 100)}"
        out[key] = _clean(mean[key])
        out[f"{key}_std"] = _clean(std[key])
        out[f"{key}_reached"] = _clean(s.reached[key])
    out["pareto_no_worse"] = _by_fraction(mean, "pareto", fractions)
    out["pareto_no_worse_std"] = _by_fraction(std, "pareto", fractions)
    out["cloud_share"] = _by_fraction(mean, "share", fractions)
    quality_fractions = (0.0, *fractions, 1.0)
    out["metrics"] = {}
    for metric in metrics:
        detail: dict[str, Any] = {
            "pgr": _by_fraction(mean, f"{metric}:pgr", fractions),
            "pgr_std": _by_fraction(std, f"{metric}:pgr", fractions),
            "apgr": _clean(mean[f"{metric}:apgr"]),
            "apgr_std": _clean(std[f"{metric}:apgr"]),
        }
        for target in CPT_TARGETS:
            key = f"cpt_{round(target * 100)}"
            detail[key] = _clean(mean[f"{metric}:{key}"])
            detail[f"{key}_std"] = _clean(std[f"{metric}:{key}"])
        detail["no_worse"] = _by_fraction(mean, f"{metric}:no_worse", fractions)
        detail["quality"] = _by_fraction(mean, f"{metric}:quality", quality_fractions)
        detail["quality_std"] = _by_fraction(std, f"{metric}:quality", quality_fractions)
        out["metrics"][metric] = detail
    out["curve"] = {
        "fractions": list(CURVE_FRACTIONS),
        "pgr": [_clean(v) for v in s.curves["pgr"]],
        "quality": {m: [_clean(v) for v in s.curves[f"{m}:quality"]] for m in metrics},
    }
    out["runs"] = [
        {
            "seed": r.seed,
            "fold": r.fold,
            "n_test": r.n_test,
            "apgr": _clean(r.values["apgr"]),
            "cpt_50": _clean(r.values["cpt_50"]),
            "cpt_80": _clean(r.values["cpt_80"]),
            "pgr": _by_fraction(r.values, "pgr", fractions),
        }
        for r in s.runs
    ]
    return out


def summarise(name: str, learned: bool, runs: list[RunResult], fit_s: float, score_s: float) -> RouterSummary:
    """A router's summary over its ``runs`` (seconds spent fitting and scoring over all of them)."""
    keys = list(runs[0].values)
    table = np.array([[r.values[k] for k in keys] for r in runs], dtype=np.float64)
    mean = table.mean(axis=0)
    std = table.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(keys))
    reached = {k: float(np.isfinite(table[:, j]).mean()) for j, k in enumerate(keys) if "cpt_" in k}
    curves = {c: np.mean([r.curves[c] for r in runs], axis=0) for c in runs[0].curves}
    return RouterSummary(
        name=name,
        learned=learned,
        mean=dict(zip(keys, mean.tolist(), strict=True)),
        std=dict(zip(keys, std.tolist(), strict=True)),
        reached=reached,
        curves=curves,
        runs=tuple(runs),
        fit_s=fit_s,
        score_s=score_s,
    )
