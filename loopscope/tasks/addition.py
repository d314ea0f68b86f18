"""Carry addition as aligned digit pairs (state tracking over the carry monoid).

Operands ``a, b`` with ``n`` digits, least-significant first. Token ``i`` = ``10 a_i + b_i``
(100 symbols); one extra final position ``(0, 0)`` holds the carry-out. Label ``s_i = v_i mod 10``
with ``v_i = a_i + b_i + c_{i-1}``. Intermediates: ``carry`` (``c_i``, produced at ``i``),
``carry_in`` (``c_{i-1}``), ``chain`` (length of the carry chain reaching ``i``).
"""

from __future__ import annotations

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["AdditionTask", "parallel_carry_iterations", "add_digits"]


def add_digits(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Sequential carry addition of LSB-first digit arrays ``[n, L]``."""
    n, L = a.shape
    s = np.zeros((n, L), dtype=np.int64)
    c = np.zeros((n, L), dtype=np.int64)
    cin = np.zeros((n, L), dtype=np.int64)
    chain = np.zeros((n, L), dtype=np.int64)
    carry = np.zeros(n, dtype=np.int64)
    run = np.zeros(n, dtype=np.int64)
    for i in range(L):
        cin[:, i] = carry
        v = a[:, i] + b[:, i] + carry
        s[:, i] = v % 10
        carry = v // 10
        c[:, i] = carry
        # a chain starts where a carry is generated and continues while it propagates
        run = np.where(carry == 1, np.where(cin[:, i] == 1, run + 1, 1), 0)
        chain[:, i] = run
    return {"sum": s, "carry": c, "carry_in": cin, "chain": chain}


def parallel_carry_iterations(a_digits: list[int], b_digits: list[int]) -> int:
    """Iterations of the parallel carry ``c_{t+1}[i+1] = 1[a_i + b_i + c_t[i] >= 10]``, ``c_0 = 0``,
    until its fixed point (= the longest carry chain). Digits are LSB-first.

    >>> parallel_carry_iterations([9, 9, 9, 0], [1, 0, 0, 0])
    3
    """
    a, b = np.asarray(a_digits), np.asarray(b_digits)
    if a.shape != b.shape:
        raise LoopscopeError("operands must have the same number of digits")
    c = np.zeros(len(a) + 1, dtype=np.int64)
    t = 0
    while True:
        nxt = np.zeros_like(c)
        nxt[1:] = (a + b + c[:-1] >= 10).astype(np.int64)
        if np.array_equal(nxt, c):
            return t
        c, t = nxt, t + 1


class AdditionTask(Task):
    """Aligned-digit carry addition; OOD = more digits."""

    name = "addition"
    vocab_size = 100
    n_classes = 10
    causal = True
    grid = False

    def __init__(self, train_digits: tuple[int, int] = (1, 8)) -> None:
        lo, hi = int(train_digits[0]), int(train_digits[1])
        if not 1 <= lo <= hi:
            raise LoopscopeError(f"train_digits must satisfy 1 <= lo <= hi, got {train_digits!r}")
        self.train_digits = (lo, hi)
        self.splits = ("train", "id", "ood", "ood_32")

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        lo, hi = self.train_digits
        D = (
            int(rng.integers(lo, hi + 1))
            if split in ("train", "id")
            else {"ood": 2 * hi, "ood_32": 32}[split]
        )
        a = rng.integers(0, 10, size=(n, D))
        b = rng.integers(0, 10, size=(n, D))
        a = np.concatenate([a, np.zeros((n, 1), dtype=np.int64)], axis=1)
        b = np.concatenate([b, np.zeros((n, 1), dtype=np.int64)], axis=1)
        r = add_digits(a, b)
        tok = torch.from_numpy(10 * a + b).long()
        return Batch(
            tokens=tok,
            targets=torch.from_numpy(r["sum"]).long(),
            intermediates={
                k: torch.from_numpy(r[k]).long() for k in ("carry", "carry_in", "chain")
            },
            meta={
                "length": D + 1,
                "n_digits": D,
                "split": split,
                "depth": torch.from_numpy(
                    np.pad(r["chain"][:, :-1], ((0, 0), (1, 0)))
                ).long(),  # chain arriving at i
            },
        )
