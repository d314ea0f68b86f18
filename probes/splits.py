"""Example-level train/test splits for probes: single split, k-fold, explicit, or "all".

Tokens of one example (one ``group``) always land on the same side of a split, so a probe never
sees one token of a sequence in training and its neighbour at test time.

Example:
    >>> folds = make_folds(10, folds=5, seed=0)
    >>> len(folds), sorted(torch.cat([te for _, te in folds]).tolist()) == list(range(10))
    (5, True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError

__all__ = ["make_folds", "as_groups"]


def as_groups(groups: Any, n: int) -> np.ndarray:
    """``groups`` as an ``[n]`` integer array of group ids (``None`` = every row its own group)."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
    if g.shape != (n,):
        raise LoopscopeError(f"groups must have shape [{n}] (one id per example), got {g.shape}")
    _, inv = np.unique(g, return_inverse=True)
    return inv.reshape(n)


def _explicit(split: Any, n: int) -> list[tuple[Tensor, Tensor]]:
    if isinstance(split, tuple) and len(split) == 2:
        tr, te = (torch.as_tensor(np.asarray(s), dtype=torch.long).reshape(-1) for s in split)
    else:
        m = torch.as_tensor(np.asarray(split.cpu() if isinstance(split, Tensor) else split))
        if m.dtype != torch.bool or m.shape != (n,):
            raise LoopscopeError(
                f"split must be 'random', 'all', a (train_idx, test_idx) pair or a bool train mask "
                f"of shape [{n}], got {type(split).__name__}"
            )
        tr, te = torch.nonzero(m).flatten(), torch.nonzero(~m).flatten()
    for name, idx in (("train", tr), ("test", te)):
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise LoopscopeError(f"split {name} indices must lie in 0..{n - 1}")
    if len(np.intersect1d(tr.numpy(), te.numpy())):
        raise LoopscopeError("split train and test indices overlap")
    if tr.numel() == 0:
        raise LoopscopeError("split has no training rows")
    return [(tr, te)]


def make_folds(
    n: int,
    *,
    groups: Any = None,
    folds: int | None = None,
    test_frac: float = 0.25,
    split: Any = "random",
    seed: int = 0,
) -> list[tuple[Tensor, Tensor]]:
    """Train/test row indices for each fold.

    Args:
        n: number of examples (rows).
        groups: ``[n]`` example ids; one group is entirely train or entirely test.
        folds: k for k-fold cross-validation over shuffled groups (overrides ``split``).
        test_frac: held-out fraction of groups for the single random split.
        split: ``"random"`` (one seeded split), ``"all"`` (train on everything, no test rows),
            a ``(train_idx, test_idx)`` pair, or a bool train mask ``[n]``.
        seed: shuffling seed (``numpy.random.default_rng``).

    Returns:
        list of ``(train_idx, test_idx)`` long tensors, one per fold.
    """
    g = as_groups(groups, n)
    n_groups = int(g.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    if folds is not None:
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise LoopscopeError(f"folds must be an integer >= 2, got {folds!r}")
        if folds > n_groups:
            raise LoopscopeError(f"folds={folds} exceeds the number of groups ({n_groups})")
        fold_of_group = np.empty(n_groups, dtype=np.int64)
        fold_of_group[rng.permutation(n_groups)] = np.arange(n_groups) % folds
        fold_of_row = fold_of_group[g]
        return [
            (
                torch.as_tensor(np.nonzero(fold_of_row != k)[0]),
                torch.as_tensor(np.nonzero(fold_of_row == k)[0]),
            )
            for k in range(folds)
        ]
    if isinstance(split, str):
        if split == "all":
            return [(torch.arange(n), torch.zeros(0, dtype=torch.long))]
        if split != "random":
            raise LoopscopeError(f"split must be 'random' or 'all', got {split!r}")
        if not 0.0 < test_frac < 1.0:
            raise LoopscopeError(f"test_frac must lie in (0, 1), got {test_frac!r}")
        if n_groups < 2:
            raise LoopscopeError(f"a random split needs at least 2 groups, got {n_groups}")
        n_test = min(n_groups - 1, max(1, int(round(test_frac * n_groups))))
        is_test_group = np.zeros(n_groups, dtype=bool)
        is_test_group[rng.permutation(n_groups)[:n_test]] = True
        is_test = is_test_group[g]
        return [(torch.as_tensor(np.nonzero(~is_test)[0]), torch.as_tensor(np.nonzero(is_test)[0]))]
    return _explicit(split, n)
