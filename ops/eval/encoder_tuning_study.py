"""Does fine-tuning the encoder's top layers make RouteT2I route better than the frozen encoder?

RouteT2I keeps MiniLM frozen (docs/router.md, "Frozen encoder"), a choice first made on cost. This study measures
what fine-tuning would change in PGR, on the same cross-validation splits as the shipped router, side by side in
one ``evaluate`` run:

- ``routet2i``: the shipped router (frozen encoder, its mixture of experts on cached token states);
- ``tuned-N``: the same router, each ensemble member training its own copy of MiniLM's top ``N`` transformer
  layers jointly with its mixture of experts (AdamW, ``--encoder-lr`` on the layers, the router's own rate on
  the rest; the same loss, validation split, early stopping and patience). The layers below stay frozen and
  their output is computed once per prompt, so an epoch costs the top layers' forward and backward pass only.
  The ridge prior, the neighbour blend and the PRS use the frozen sentence embedding, as in the shipped router.
- ``tuned-N-lr0`` (``--control``): the same code with the encoder's learning rate 0, which must reproduce
  ``routet2i`` (a check that the study's code is the shipped router but for the tuning).

Run from the repository root (one split seed on the 2-core development machine: 13 minutes per GenAI-Bench
log with ``--layers 1``, 19 minutes on AGIQA-3K with ``--layers 1 2``):

    python ops/eval/encoder_tuning_study.py [--layers 1 2] [--seeds 100] [--logs all] [--control]

Split seeds 100 and up are the development splits (docs/router.md); the reported suite uses seeds 0-2.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from router.embeddings import SentenceEncoder, TokenStates, prompt_hash
from router.evaluation import evaluate
from router.report import format_comparison, format_table
from router.routet2i import RouteT2IRouter, build_network, training
from router.routet2i.model import pad_batch
from router.routet2i.training import training_loss
from router.suite import SUITES


class LowerStates:
    """Token states after the encoder's first ``L - n`` layers (the input of its top ``n``), with the frozen
    encoder's sentence embedding: what a tuned router's network and prior read."""

    def __init__(self, base: SentenceEncoder, n: int) -> None:
        from transformers import AutoModel

        self.base = base
        self.model = AutoModel.from_pretrained(base.model_path, attn_implementation="eager").eval()
        self.n = n
        self.top = self.model.encoder.layer[len(self.model.encoder.layer) - n :]
        self._cache: dict[str, TokenStates] = {}

    def reserve(self, prompts: int) -> None:
        self.base.reserve(prompts)

    def encode_tokens(self, prompts: Sequence[str]) -> list[TokenStates]:
        missing = sorted({p for p in prompts if prompt_hash(p) not in self._cache}, key=len)
        tokenizer = self.base._load_tokenizer()
        finals = {prompt_hash(p): t for p, t in zip(prompts, self.base.encode_tokens(prompts), strict=True)}
        for start in range(0, len(missing), 32):
            batch = missing[start : start + 32]
            inputs = tokenizer(
                batch, padding=True, truncation=True, max_length=self.base.max_tokens, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self.model(**inputs, output_hidden_states=True).hidden_states
            lower = hidden[len(hidden) - 1 - self.n]
            for row, prompt in enumerate(batch):
                length = int(inputs["attention_mask"][row].sum())
                final = finals[prompt_hash(prompt)]
                assert len(final.tokens) == length, (prompt, len(final.tokens), length)
                self._cache[prompt_hash(prompt)] = TokenStates(
                    final.tokens, lower[row, :length].numpy().astype(np.float32), final.sentence
                )
        return [self._cache[prompt_hash(p)] for p in prompts]


def run_top(layers: Any, states: Any, mask: Any) -> Any:
    """The top layers over padded lower states; ``mask`` (B, L) bool."""
    additive = (~mask)[:, None, None, :].float() * torch.finfo(torch.float32).min
    for layer in layers:
        out = layer(states, attention_mask=additive)
        states = out[0] if isinstance(out, tuple) else out
    return states


BEST_EPOCHS: dict[str, list[int]] = {}
"""Each member's best epoch, by router name."""


def tuned(lower: LowerStates, encoder_lr: float, name: str) -> type[RouteT2IRouter]:
    class Tuned(RouteT2IRouter):
        def __init__(self, **settings: Any) -> None:
            super().__init__(encoder=lower, **settings)  # type: ignore[arg-type]
            self.layer_states: list[dict[str, Any]] = []
            self._modules: list[tuple[Any, Any]] | None = None

        def fit(self, records: Any, *, seed: int = 0) -> RouteT2IRouter:
            self.layer_states, self._modules = [], None
            return training.fit(self, records, seed=seed, member=self._train_member)

        def _train_member(self, cfg, n_targets, tokens, stats, y, train, valid, seed):  # type: ignore[no-untyped-def]
            net = build_network(cfg, tokens[0].states.shape[1], n_targets)
            layers = copy.deepcopy(lower.top)
            groups = [{"params": list(net.parameters()), "lr": cfg.lr}]
            if encoder_lr > 0:
                groups.append({"params": list(layers.parameters()), "lr": encoder_lr})
            else:
                layers.requires_grad_(False)
            optimiser = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
            target = torch.from_numpy(y.astype(np.float32))
            valid_batch = pad_batch([tokens[i] for i in valid], stats[valid])
            rng = np.random.default_rng(seed)

            def forward(batch: Any) -> Any:
                states, mask, sentence, st = batch.inputs()
                return net(run_top(layers, states, mask), mask, sentence, st)[0]

            best, best_epoch, best_state, best_layers = float("inf"), 0, None, None
            for epoch in range(cfg.max_epochs):
                net.train()
                layers.train(encoder_lr > 0)
                order = rng.permutation(train)
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    batch = pad_batch([tokens[i] for i in idx], stats[idx])
                    loss = training_loss(forward(batch), target[idx], cfg.gap_weight)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                net.eval()
                layers.eval()
                with torch.inference_mode():
                    valid_loss = float(training_loss(forward(valid_batch), target[valid], cfg.gap_weight))
                if valid_loss < best - 1e-6:
                    best, best_epoch = valid_loss, epoch
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    best_layers = copy.deepcopy(layers.state_dict())
                elif epoch - best_epoch >= cfg.patience:
                    break
            assert best_state is not None
            self.layer_states.append(best_layers)
            BEST_EPOCHS.setdefault(self.name, []).append(best_epoch + 1)
            print(f"  {self.name}: member stopped after {epoch + 1} epochs, best {best_epoch + 1}", file=sys.stderr)
            report = {"best_epoch": best_epoch + 1, "epochs": epoch + 1, "valid_loss": round(best, 6)}
            return {k: v.numpy() for k, v in best_state.items()}, report

        def _moe(self, batch: Any, explain: bool = True) -> tuple[np.ndarray, None]:
            if self._modules is None:
                self._modules = []
                for state, layer_state in zip(self.states, self.layer_states, strict=True):
                    net = build_network(self.cfg, lower.model.config.hidden_size, len(self.targets))
                    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                    layers = copy.deepcopy(lower.top)
                    layers.load_state_dict(layer_state)
                    self._modules.append((net.eval(), layers.eval()))
            outs = []
            with torch.inference_mode():
                states, mask, sentence, st = batch.inputs()
                for net, layers in self._modules:
                    outs.append(net(run_top(layers, states, mask), mask, sentence, st)[0].numpy())
            return np.mean(outs, axis=0), None

    Tuned.name = name
    return Tuned


def paired(report: Any, router: str, reference: str) -> str:
    """``router`` minus ``reference`` on APGR and PGR@30%/50%, paired over the runs (same test folds)."""
    parts = []
    for key in ("apgr", "pgr@0.3", "pgr@0.5"):
        diff = np.array(
            [
                a.values[key] - b.values[key]
                for a, b in zip(report.routers[router].runs, report.routers[reference].runs, strict=True)
            ]
        )
        parts.append(
            f"{key} {diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f} ({np.sum(diff >= 0)}/{len(diff)} runs ≥)"
        )
    return f"{router} − {reference}: " + ", ".join(parts)


def check_layers(lower: LowerStates, prompts: Sequence[str]) -> float:
    """Largest difference between the frozen top layers over the lower states and the shipped encoder's states."""
    worst = 0.0
    for item, final in zip(lower.encode_tokens(prompts), lower.base.encode_tokens(prompts), strict=True):
        mask = torch.ones(1, len(item.tokens), dtype=torch.bool)
        with torch.inference_mode():
            states = run_top(lower.top, torch.from_numpy(item.states)[None], mask)[0].numpy()
        worst = max(worst, float(np.abs(states - final.states).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1], help="top layers to tune (one study each)")
    parser.add_argument("--encoder-lr", type=float, default=2e-5, help="AdamW learning rate of the tuned layers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100], help="split seeds (5 folds each)")
    parser.add_argument("--logs", nargs="+", default=["all"], help="suite log slugs, or all")
    parser.add_argument("--control", action="store_true", help="also run the tuned code with learning rate 0")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = Path(os.environ.get("ROUTET2I_CACHE_DIR", "var/cache")) / "embeddings"
    base = SentenceEncoder(cache_dir=cache, backend="torch")
    logs = [log for log in SUITES["standard"] if "all" in args.logs or log.slug in args.logs]
    if not logs:
        parser.error(f"--logs: none of {args.logs} is a standard suite log")
    for log in logs:
        records = log.build()
        routers: dict[str, Any] = {"routet2i": partial(RouteT2IRouter, encoder=base)}
        for n in args.layers:
            lower = LowerStates(base, n)
            print(
                f"{log.slug}: top {n} layer(s) over the lower states differ from the encoder's by at most "
                f"{check_layers(lower, [r.prompt for r in records[:64]]):.2e}"
            )
            routers[f"tuned-{n}"] = tuned(lower, args.encoder_lr, f"tuned-{n}")
            if args.control:
                routers[f"tuned-{n}-lr0"] = tuned(lower, 0.0, f"tuned-{n}-lr0")
        start = time.perf_counter()
        report = evaluate(records, routers, folds=5, seeds=args.seeds)
        print(f"\n## {log.title} (split seeds {args.seeds}, {time.perf_counter() - start:.0f} s)\n")
        print(format_table(report, markdown=True))
        print()
        for name in routers:
            if name != "routet2i":
                print(paired(report, name, "routet2i"))
                epochs = BEST_EPOCHS.pop(name, [])
                print(f"{name}: members' best epochs {np.percentile(epochs, [25, 50, 75]).tolist()} (quartiles)")
        print(format_comparison(report, "routet2i", markdown=True))


if __name__ == "__main__":
    main()
