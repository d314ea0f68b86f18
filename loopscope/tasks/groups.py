"""Group state tracking: parity (Z2), Z5, S3, A4, S5 from explicit Cayley tables.

Input ``[BOS, g_1 .. g_L]`` with ``g_i`` uniform group elements; the label at position ``i`` is the
running product ``s_i = g_i ∘ s_{i-1}``, ``s_0 = e`` (index 0). Splits: ``train`` / ``id`` with
``L ~ U[train_len]`` per batch (disjoint random streams), ``ood`` at twice the longest training
length, ``ood_len64``, ``ood_len128``.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["GroupTask", "cayley_table", "GROUPS"]


def _perm_parity(p: tuple[int, ...]) -> int:
    inv = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return inv % 2


def _elements(group: str) -> list:
    if group.startswith("z"):
        return list(range(int(group[1:])))
    n = int(group[1:])
    perms = list(itertools.permutations(range(n)))  # identity first (lexicographic)
    if group.startswith("a"):
        perms = [p for p in perms if _perm_parity(p) == 0]
    return perms


def cayley_table(group: str) -> np.ndarray:
    """``table[g, s] = index(g ∘ s)`` for ``group`` in z2, z5, s3, a4, s5 (identity = 0).

    For permutations ``(g∘s)(k) = g[s[k]]``; for Z_n, ``(a + b) mod n``.
    """
    els = _elements(group)
    idx = {e: i for i, e in enumerate(els)}
    n = len(els)
    T = np.zeros((n, n), dtype=np.int64)
    for i, g in enumerate(els):
        for j, s in enumerate(els):
            if isinstance(g, int):
                T[i, j] = (g + s) % n
            else:
                T[i, j] = idx[tuple(g[s[k]] for k in range(len(s)))]
    return T


GROUPS = {"parity": "z2", "z5": "z5", "s3": "s3", "a4": "a4", "s5": "s5"}


class GroupTask(Task):
    """Running product over a finite group (state tracking)."""

    causal = True
    grid = False

    def __init__(self, name: str = "s3", train_len: tuple[int, int] = (1, 16)) -> None:
        if name not in GROUPS:
            raise LoopscopeError(f"unknown group task {name!r}")
        lo, hi = int(train_len[0]), int(train_len[1])
        if not 1 <= lo <= hi:
            raise LoopscopeError(f"train_len must satisfy 1 <= lo <= hi, got {train_len!r}")
        self.name = name
        self.group = GROUPS[name]
        self.table = cayley_table(self.group)
        self.order = self.table.shape[0]
        self.bos = self.order
        self.vocab_size = self.order + 1
        self.n_classes = self.order
        self.train_len = (lo, hi)
        self.splits = ("train", "id", "ood", "ood_len64", "ood_len128")

    def length_of(self, split: str, rng: np.random.Generator) -> int:
        lo, hi = self.train_len
        if split in ("train", "id"):
            return int(rng.integers(lo, hi + 1))
        return {"ood": 2 * hi, "ood_len64": 64, "ood_len128": 128}[split]

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        L = self.length_of(split, rng)
        g = rng.integers(0, self.order, size=(n, L))
        s = np.zeros((n, L), dtype=np.int64)
        cur = np.zeros(n, dtype=np.int64)
        for i in range(L):
            cur = self.table[g[:, i], cur]
            s[:, i] = cur
        tokens = np.concatenate([np.full((n, 1), self.bos), g], axis=1)
        targets = np.concatenate([np.full((n, 1), -100), s], axis=1)
        state = np.concatenate([np.zeros((n, 1), dtype=np.int64), s], axis=1)
        pos = np.broadcast_to(np.arange(L + 1), (n, L + 1)).copy()
        return Batch(
            tokens=torch.from_numpy(tokens).long(),
            targets=torch.from_numpy(targets).long(),
            intermediates={
                "state": torch.from_numpy(state).long(),
                "position": torch.from_numpy(pos).long(),
            },
            meta={"length": L, "split": split, "depth": torch.from_numpy(pos).long()},
        )
