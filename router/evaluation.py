"""Replay evaluation: every router compared at every cloud budget by k-fold cross-validation split by prompt.

Protocol (:func:`evaluate`):

1. For each seed, the log is split into ``folds`` folds by prompt (:func:`router.splits.split_folds`:
   identical prompt texts, up to whitespace and case, always share a fold).
2. For each fold, every router gets a fresh instance, is fitted on the other folds with seed
   ``1000·seed + fold`` (fixed routers ignore the records; ``random`` draws its scores from the seed), and
   scores the held-out fold. Learned routers are therefore never scored on their own training prompts, and
   all routers are scored on exactly the same test sets. The oracle reads the held-out fold's labels.
3. Each (router, seed, fold) routing is measured with :mod:`router.pgr` on its test fold alone (scores of
   models fitted on different folds are never ranked against each other).
4. Reported numbers are the mean and sample standard deviation over the ``folds × seeds`` runs.

Before any split, each router's :meth:`~router.base.Router.warm` is called once with every prompt of the log,
so shared per-prompt work (text embeddings) is done once, in large batches.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from router.base import Router, RouterError, create_router, router_class
from router.embeddings import SentenceEncoder
from router.log import LogRecord, metric_names
from router.pgr import CURVE_FRACTIONS, FRACTIONS, quality_arrays, routing_curves
from router.results import (
    BOUNDS,
    COMPARED,
    CPT_TARGETS,
    FIT_SEED_STRIDE,
    FOCUS,
    Comparison,
    Report,
    RouterSummary,
    RunResult,
    fkey,
    summarise,
)
from router.splits import group_ids, split_folds

__all__ = [
    "BOUNDS",
    "COMPARED",
    "CPT_TARGETS",
    "FIT_SEED_STRIDE",
    "FOCUS",
    "Comparison",
    "Report",
    "RouterFactory",
    "RouterSummary",
    "RunResult",
    "evaluate",
    "fkey",
    "measure",
]

RouterFactory = Callable[[], Router]


def measure(
    router: Router,
    scores: np.ndarray,
    records: Sequence[LogRecord],
    *,
    metrics: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Every value and curve of one routing of ``records`` by ``router``'s ``scores``."""
    edge, cloud = quality_arrays(records, metrics)
    curves = routing_curves(
        scores, edge, cloud, metrics=metrics, floor=router.edge_floor(), fixed_tier=router.fixed_tier
    )
    values: dict[str, float] = {"apgr": curves.apgr()}
    for target in CPT_TARGETS:
        values[f"cpt_{round(target * 100)}"] = curves.cpt(target)
    quality_fractions = (0.0, *fractions, 1.0)
    pgr_at = curves.at(curves.pgr, fractions)
    pareto_at = curves.at(curves.no_worse, fractions)
    share_at = curves.at(curves.share, fractions)
    metric_pgr_at = curves.at(curves.metric_pgr, fractions)
    no_worse_at = curves.at(curves.metric_no_worse, fractions)
    quality_at = curves.at(curves.quality, quality_fractions)
    metric_apgr = curves.metric_apgr()
    for j, f in enumerate(fractions):
        key = fkey(f)
        values[f"pgr@{key}"] = float(pgr_at[j])
        values[f"pareto@{key}"] = float(pareto_at[j])
        values[f"share@{key}"] = float(share_at[j])
    for i, metric in enumerate(metrics):
        values[f"{metric}:apgr"] = float(metric_apgr[i])
        for target in CPT_TARGETS:
            values[f"{metric}:cpt_{round(target * 100)}"] = curves.cpt(target, metric=i)
        for j, f in enumerate(fractions):
            values[f"{metric}:pgr@{fkey(f)}"] = float(metric_pgr_at[j, i])
            values[f"{metric}:no_worse@{fkey(f)}"] = float(no_worse_at[j, i])
        for j, f in enumerate(quality_fractions):
            values[f"{metric}:quality@{fkey(f)}"] = float(quality_at[j, i])
    curve_values = {"pgr": curves.at(curves.pgr, CURVE_FRACTIONS)}
    quality_curve = curves.at(curves.quality, CURVE_FRACTIONS)
    for i, metric in enumerate(metrics):
        curve_values[f"{metric}:quality"] = quality_curve[:, i]
    return values, curve_values


def _factories(
    routers: Sequence[str] | Mapping[str, RouterFactory], encoder: SentenceEncoder | None
) -> dict[str, RouterFactory]:
    """A factory per router: those of a mapping as given; for registry names, one that creates the router with
    ``encoder``, the same for every router, fold and seed (None: one built here, if a named router uses one)."""
    if isinstance(routers, Mapping):
        return dict(routers)
    classes = [router_class(name) for name in routers]  # unknown names fail here, before any work
    if encoder is None and any(cls.uses_encoder for cls in classes):
        encoder = SentenceEncoder()
    return {name: partial(create_router, name, encoder=encoder) for name in routers}


def evaluate(
    records: Sequence[LogRecord],
    routers: Sequence[str] | Mapping[str, RouterFactory],
    *,
    folds: int = 5,
    seeds: int | Sequence[int] = 3,
    fractions: Sequence[float] = FRACTIONS,
    progress: bool = False,
    info: Mapping[str, Any] | None = None,
    blas_threads: int | None = 1,
    encoder: SentenceEncoder | None = None,
) -> Report:
    """Cross-validate routers on a replay log.

    Args:
        records: the log (from :func:`router.log.read_log`); every record has the same metrics.
        routers: registry names, or a mapping from a display name to a factory returning a fresh, unfitted
            router (one instance is made per run and once more for warm-up).
        folds: folds per seed (2 ≤ folds ≤ distinct prompts).
        seeds: number of split seeds (``3`` means seeds 0, 1, 2) or the seeds themselves.
        fractions: cloud fractions at which PGR, Pareto share and quality are reported.
        progress: show a progress bar on stderr.
        info: extra facts copied into the report (e.g. the log's path).
        blas_threads: BLAS threads while fitting and scoring (``None``: leave them alone). The learned routers
            solve many small problems (a few hundred rows), where several BLAS threads on a busy machine are
            many times slower than one.
        encoder: the sentence encoder of the named routers that embed prompts, shared by all of them in every fold
            and seed, so each prompt is encoded once (None: one on the packaged MiniLM, built here when such a
            router is named). A mapping's factories build their routers themselves.

    Returns:
        The report; equal inputs and seeds give equal numbers.

    Raises:
        RouterError: an unknown router name, or a router that fails to fit or score.
        ValueError: bad folds, seeds or an empty log.
    """
    if not records:
        raise ValueError("the log is empty")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seed_list:
        raise ValueError("seeds must name at least one seed")
    if any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError("fractions must lie within [0, 1]")
    factories = _factories(routers, encoder)
    if not factories:
        raise ValueError("no routers to evaluate")
    return _evaluate(
        records,
        factories,
        folds=folds,
        seeds=seed_list,
        fractions=fractions,
        progress=progress,
        info=info,
        blas_threads=blas_threads,
    )


def _evaluate(
    records: Sequence[LogRecord],
    factories: Mapping[str, RouterFactory],
    *,
    folds: int,
    seeds: tuple[int, ...],
    fractions: Sequence[float],
    progress: bool,
    info: Mapping[str, Any] | None,
    blas_threads: int | None,
) -> Report:
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    # Limits apply to the BLAS libraries loaded when they are set, and routers import theirs lazily (a first
    # fit loads scipy's), so they are set again around every call into a router.
    def limited() -> Any:
        return threadpool_limits(limits=blas_threads)

    metrics = metric_names(records)
    prompts = [r.prompt for r in records]
    n_prompts = int(group_ids(prompts).max()) + 1
    splits = {seed: split_folds(prompts, folds, seed) for seed in seeds}  # validates folds
    started, cpu_started = time.perf_counter(), time.process_time()
    total = len(factories) * (1 + folds * len(seeds))
    bar = tqdm(total=total, desc="evaluating", unit="run", file=sys.stderr, disable=not progress, leave=False)
    learned: dict[str, bool] = {}
    for name, factory in factories.items():
        bar.set_postfix_str(f"{name}: warm-up")
        router = factory()
        learned[name] = router.learned
        with limited():
            router.warm(prompts)
        bar.update(1)
    runs: dict[str, list[RunResult]] = {name: [] for name in factories}
    fit_s = dict.fromkeys(factories, 0.0)
    score_s = dict.fromkeys(factories, 0.0)
    for seed in seeds:
        assignment = splits[seed]
        for fold in range(folds):
            train = [records[int(i)] for i in np.flatnonzero(assignment != fold)]
            test = [records[int(i)] for i in np.flatnonzero(assignment == fold)]
            for name, factory in factories.items():
                bar.set_postfix_str(f"{name} seed {seed} fold {fold}")
                run, fit_seconds, score_seconds = _run(
                    name, factory(), train, test, seed, fold, limited, metrics, fractions
                )
                runs[name].append(run)
                fit_s[name] += fit_seconds
                score_s[name] += score_seconds
                bar.update(1)
    bar.close()
    wall = time.perf_counter() - started
    summaries = {name: summarise(name, learned[name], runs[name], fit_s[name], score_s[name]) for name in factories}
    return Report(
        metrics=tuple(metrics),
        n_records=len(records),
        n_prompts=n_prompts,
        folds=folds,
        seeds=seeds,
        fractions=tuple(fractions),
        routers=summaries,
        wall_s=wall,
        cpu_s=time.process_time() - cpu_started,
        info=dict(info or {}),
    )


def _run(
    name: str,
    router: Router,
    train: Sequence[LogRecord],
    test: Sequence[LogRecord],
    seed: int,
    fold: int,
    limited: Callable[[], Any],
    metrics: Sequence[str],
    fractions: Sequence[float],
) -> tuple[RunResult, float, float]:
    """``router`` fitted on ``train`` and measured on ``test``, and the seconds it spent fitting and scoring."""
    t0 = time.perf_counter()
    try:
        with limited():
            router.fit(train, seed=FIT_SEED_STRIDE * seed + fold)
        t1 = time.perf_counter()
        with limited():
            scores = np.asarray(router.score_records(test), dtype=np.float64)
    except RouterError:
        raise
    except Exception as exc:
        raise RouterError(f"router {name!r} failed on seed {seed} fold {fold}: {exc}") from exc
    t2 = time.perf_counter()
    if scores.shape != (len(test),) or not np.all(np.isfinite(scores)):
        raise RouterError(f"router {name!r} returned {scores.shape} scores for {len(test)} prompts, or non-finite ones")
    values, curves = measure(router, scores, test, metrics=metrics, fractions=fractions)
    return RunResult(name, seed, fold, len(test), values, curves), t1 - t0, t2 - t1
