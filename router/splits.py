"""Splitting a log into folds by prompt, so that no prompt text is ever on both sides of a split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prompt_key(prompt: str) -> str:
    """What makes two prompts "the same prompt": equal text after collapsing whitespace and case."""
    return " ".join(prompt.split()).casefold()


def group_ids(prompts: Sequence[str]) -> np.ndarray:
    """One integer per prompt; prompts with the same :func:`prompt_key` share it (numbered by first occurrence)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(prompt_key(p), len(ids)) for p in prompts], dtype=np.int64)


def split_folds(prompts: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Assign every prompt to one of ``folds`` folds; identical prompt texts always land in the same fold.

    Groups of identical prompts are shuffled with ``seed`` and each goes to the fold holding the fewest
    prompts so far (the lowest-numbered on ties), so folds differ in size by at most the largest group.

    Args:
        prompts: the log's prompts, in log order.
        folds: number of folds, at least 2 and at most the number of distinct prompts.
        seed: the shuffle's seed.

    Returns:
        Fold index per prompt, shape ``(len(prompts),)``.
    """
    groups = group_ids(prompts)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if folds > n_groups:
        raise ValueError(f"folds ({folds}) cannot exceed the number of distinct prompts ({n_groups})")
    sizes = np.bincount(groups, minlength=n_groups)
    order = np.random.default_rng(seed).permutation(n_groups)
    load = np.zeros(folds, dtype=np.int64)
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for group in order:
        target = int(np.argmin(load))
        fold_of_group[group] = target
        load[target] += sizes[group]
    assignment: np.ndarray = fold_of_group[groups]
    return assignment


def inner_splits(prompts: Sequence[str], folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, validation indices) pairs for hyper-parameter search inside a training fold."""
    assignment = split_folds(prompts, min(folds, len(set(group_ids(prompts).tolist()))), seed)
    return [(np.flatnonzero(assignment != k), np.flatnonzero(assignment == k)) for k in range(assignment.max() + 1)]
