"""How well a learned baseline's offline calibration predicts the cloud share of prompts it has not seen.

Each learned baseline (``router.learned``) keeps the out-of-fold scores of its inner cross-validation as its
calibration. For GenAI-Bench SDXL_Turbo → DALLE_3 and AGIQA-3K sd1.5_normal → xl2.2_normal, split into five
folds by prompt (seed 0), every router is trained on four folds; the threshold its calibration gives for ρ = 0.1,
0.3 and 0.5 is applied to the fifth fold's scores, and the cloud share that results is compared with ρ. The
same is done with thresholds from the training prompts' own (in-sample) scores. Printed per log and router: the
mean and largest absolute miss over the 15 (fold, ρ) cells, and the mean signed miss.

Then what the calibration does to a live router's cold start on prompts unlike its training log's: every router
is trained on AGIQA-3K and replayed online (the budget controller, ρ 0.3, windows of 500) on GenAI-Bench
SDXL_Turbo → DALLE_3, in log order and three shuffled orders, with and without its calibration. Printed per
order: aggregate PGR, cloud decisions among the first 20 prompts, and prompts sent by the window's minimum share.

Run from the repository root: ``python ops/eval/calibration_study.py``.
"""

from __future__ import annotations

import random

import numpy as np

from core.settings import Settings
from router.budget import BudgetConfig, sorted_quantile
from router.datasets import agiqa_3k, genai_bench
from router.embeddings import SentenceEncoder
from router.learned import CloudWinClassifierRouter, GapRegressorRouter, KNNRouter
from router.replay import replay
from router.splits import split_folds

FOLDS = 5
RHOS = (0.1, 0.3, 0.5)


def main() -> None:
    encoder = SentenceEncoder()  # one for every router and fold: each prompt is encoded once
    logs = {
        "genai-bench SDXL_Turbo->DALLE_3": genai_bench("SDXL_Turbo", "DALLE_3"),
        "agiqa-3k sd1.5_normal->xl2.2_normal": agiqa_3k("sd1.5_normal", "xl2.2_normal"),
    }
    print(f"{'log':38s} {'router':22s} {'out-of-fold: mean / max / signed':34s} in-sample: mean / max / signed")
    for name, log in logs.items():
        fold = split_folds([r.prompt for r in log], FOLDS, 0)
        for cls in (CloudWinClassifierRouter, GapRegressorRouter, KNNRouter):
            misses: dict[str, list[float]] = {"out-of-fold": [], "in-sample": []}
            for held in range(FOLDS):
                train = [r for r, f in zip(log, fold, strict=True) if f != held]
                unseen = [r.prompt for r, f in zip(log, fold, strict=True) if f == held]
                router = cls(encoder).fit(train, seed=0)
                scores = router.score(unseen)
                own = np.sort(router.score([r.prompt for r in train]))
                for rho in RHOS:
                    threshold = router.calibrated_threshold(rho)
                    assert threshold is not None
                    misses["out-of-fold"].append(float((scores > threshold).mean()) - rho)
                    misses["in-sample"].append(float((scores > sorted_quantile(own, 1.0 - rho)).mean()) - rho)
            cells = [f"{np.mean(np.abs(m)):.3f} / {np.max(np.abs(m)):.3f} / {np.mean(m):+.3f}" for m in misses.values()]
            print(f"{name:38s} {cls.name:22s} {cells[0]:34s} {cells[1]}")

    settings = Settings()
    prices = {"edge": settings.edge.price_per_image, "cloud": settings.cloud.price_per_image}
    live = logs["genai-bench SDXL_Turbo->DALLE_3"]
    orders = {"log order": live}
    for seed in (1, 2, 3):
        shuffled = list(live)
        random.Random(seed).shuffle(shuffled)
        orders[f"shuffle {seed}"] = shuffled
    print("\ntrained on AGIQA-3K, online on GenAI-Bench: PGR, cloud of the first 20, by minimum share")
    for cls in (CloudWinClassifierRouter, GapRegressorRouter, KNNRouter):
        router = cls(encoder).fit(logs["agiqa-3k sd1.5_normal->xl2.2_normal"], seed=0)
        calibration = router.params["calibration"]
        for order, records in orders.items():
            cells = []
            for kept in (True, False):
                router.params["calibration"] = calibration if kept else np.zeros(0)
                result = replay(records, router, 0.3, prices=prices, online=BudgetConfig(rho=0.3, window=500))
                first = sum(d.tier == "cloud" for d in result.decisions[:20])
                assert result.online is not None
                cells.append(f"{result.pgr['aggregate']:.3f} / {first} / {result.online['cloud_by_minimum_share']}")
            print(f"{cls.name:22s} {order:10s} with: {cells[0]:18s} without: {cells[1]}")


if __name__ == "__main__":
    main()
