"""How well the budget controller holds the cloud share of every window, and what it sends, under drifting traffic.

The shipped RouteT2I router scores every distinct PartiPrompt once; the controller (``router.budget``) then
decides each request of a stream of twice the prompt set, in batches of 1–19 as a router worker takes them,
for several orderings: shuffled (stationary traffic) and grouped by PartiPrompts category in a random order of
categories (traffic that drifts as clients come and go). Two configurations run side by side on the same
streams: the controller's defaults and the one it replaced (gain 4, threshold and feedback over the whole
window, no minimum share). For each it prints the lowest and highest cloud share over all full windows, how
many runs had a window outside ρ ± 3 points, and the value sent: the sum of the cloud-routed requests'
scores over the sum of the best ρ share of the stream's scores (1 would be the offline optimum with perfect
foresight).

Run from the repository root: ``python ops/eval/budget_study.py [--orderings N] [--window W]
[--config NAME:KEY=VALUE,...]``; each ``--config`` adds a row per cell with those ``BudgetConfig`` fields
changed from the defaults, e.g. ``--config gain2:gain=2 --config short:score_horizon=100,share_horizon=100
--window 500``.
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from router.base import load_router
from router.budget import BudgetConfig, BudgetController, BudgetRequest, MemoryBudgetStore
from router.data import partiprompts_with_categories

BAND = 0.03
WHOLE_FIELDS = {"score_horizon", "share_horizon"}
"""``BudgetConfig`` fields that count decisions (``--config`` reads every value as a number)."""


def stream(order: np.ndarray, scores: np.ndarray, config: BudgetConfig, floor: float, seed: int) -> np.ndarray:
    """Cloud (1) or edge (0) for each request of ``scores[order]``, decided in batches of 1–19."""
    controller = BudgetController(config, MemoryBudgetStore(config.window))
    rng = random.Random(seed)
    decisions: list[int] = []
    position = 0
    while position < len(order):
        batch = order[position : position + rng.randint(1, 19)]
        verdicts = controller.decide_many([BudgetRequest(float(scores[i]), floor=floor) for i in batch])
        decisions += [int(v.cloud) for v in verdicts]
        position += len(batch)
    return np.array(decisions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orderings", type=int, default=5, help="orderings of each kind per cell")
    parser.add_argument("--window", type=int, action="append", help="window sizes (default 100, 500, 1000)")
    parser.add_argument("--config", action="append", default=[], help="NAME:KEY=VALUE,... another configuration")
    args = parser.parse_args()
    extra: dict[str, dict[str, float]] = {}
    for spec in args.config:
        name, _, fields = spec.partition(":")
        try:
            extra[name] = {k: float(v) for k, v in (field.split("=") for field in fields.split(","))}
        except ValueError:
            parser.error(f"--config {spec!r}: expected NAME:KEY=VALUE,...")

    prompts, categories = (list(column) for column in zip(*partiprompts_with_categories(), strict=True))
    router = load_router("routet2i", None)
    scores = np.concatenate([router.score(prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
    floor = router.edge_floor()
    labels = np.array(categories)
    print(f"{len(prompts)} PartiPrompts scored by {router.version}; streams of {2 * len(prompts)} requests\n")
    print("| ρ | window | controller | ordering | lowest window | highest window | runs outside ±3 points | value |")
    print("|---|---|---|---|---|---|---|---|")
    for rho in (0.1, 0.3, 0.5):
        for window in args.window or (100, 500, 1000):
            configs = {
                "default": BudgetConfig(rho=rho, window=window),
                "before": BudgetConfig(
                    rho=rho, window=window, gain=4.0, tolerance=1.0, score_horizon=window, share_horizon=window - 1
                ),
            }
            for name, fields in extra.items():
                configs[name] = BudgetConfig(
                    rho=rho, window=window, **{k: int(v) if k in WHOLE_FIELDS else v for k, v in fields.items()}
                )
            for kind in ("shuffled", "by category"):
                orders = []
                for seed in range(args.orderings):
                    rng = np.random.default_rng(seed)
                    if kind == "shuffled":
                        once = rng.permutation(len(prompts))
                    else:
                        names = sorted(set(categories))
                        rng.shuffle(names)
                        once = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in names])
                    orders.append(np.tile(once, 2))
                for name, config in configs.items():
                    lows, highs, values, outside = [], [], [], 0
                    for seed, order in enumerate(orders):
                        cloud = stream(order, scores, config, floor, seed)
                        shares = np.convolve(cloud, np.ones(window), "valid") / window
                        lows.append(shares.min())
                        highs.append(shares.max())
                        outside += int(shares.min() < rho - BAND - 1e-9 or shares.max() > rho + BAND + 1e-9)
                        best = np.sort(scores[order])[::-1][: int(rho * len(order))].sum()
                        values.append(scores[order][cloud == 1].sum() / best)
                    print(
                        f"| {rho} | {window} | {name} | {kind} | {min(lows):.3f} | {max(highs):.3f} | "
                        f"{outside} of {len(orders)} | {np.mean(values):.4f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
