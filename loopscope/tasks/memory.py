"""Working-memory tasks over blocks: PassKey retrieval and associative recall.

Both cut a sequence into ``n_blocks`` blocks of ``block_size`` tokens; the last block is the
query block and its last token asks the question. The answer is the label of that last
position (``targets [n, block_size]``, -100 elsewhere: the block models decode the query
block only). Everything else is filler drawn uniformly from ``n_filler`` tokens.

* ``passkey``: one block holds ``MARK key``; the query block ends in ``QUERY``; the answer is
  the key (``n_keys`` classes).
* ``assoc_recall``: ``n_pairs`` blocks each hold one ``key value`` pair (distinct keys); the
  query block ends in the key asked for; the answer is its value (``n_values`` classes).

Splits: ``train`` / ``id`` with ``n_blocks`` blocks (disjoint random streams), ``ood_2x``,
``ood_4x``, ``ood_16x`` with 2x, 4x, 16x as many context (filler) blocks. The written item sits
in a uniformly drawn context block, so ``intermediates["updates_since"]`` (memory updates
between writing it and the query) spans 1 .. n_context.

Example:
    >>> from loopscope import tasks
    >>> b = tasks.get("passkey").sample(3, split="ood_4x", seed=0)
    >>> b.tokens.shape, b.targets.shape, b.meta["n_context"]
    (torch.Size([3, 104]), torch.Size([3, 8]), 12)
"""

from __future__ import annotations

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["PassKeyTask", "AssocRecallTask", "BLOCK_SPLITS"]

#: split -> factor on the number of context blocks
BLOCK_SPLITS = {"train": 1, "id": 1, "ood_2x": 2, "ood_4x": 4, "ood_16x": 16}


def _positive(name: str, v: object, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise LoopscopeError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class _BlockTask(Task):
    """Shared layout: filler ids ``0 .. n_filler - 1``, then the task's symbols."""

    causal = True
    grid = False
    splits = tuple(BLOCK_SPLITS)

    def __init__(self, n_blocks: int, block_size: int, n_filler: int, min_blocks: int) -> None:
        self.n_blocks = _positive("n_blocks", n_blocks, min_blocks)
        self.block_size = _positive("block_size", block_size, 3)
        self.n_filler = _positive("n_filler", n_filler)

    def n_context(self, split: str) -> int:
        """Context blocks (all but the query block) of ``split``."""
        return (self.n_blocks - 1) * BLOCK_SPLITS[split]

    def _filler(self, n: int, n_ctx: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.n_filler, size=(n, n_ctx + 1, self.block_size))

    def _batch(self, tokens: np.ndarray, answer: np.ndarray, inter: dict, split: str) -> Batch:
        n, nb, b = tokens.shape
        targets = np.full((n, b), -100, dtype=np.int64)
        targets[:, -1] = answer
        return Batch(
            tokens=torch.from_numpy(tokens.reshape(n, nb * b)).long(),
            targets=torch.from_numpy(targets).long(),
            intermediates={k: torch.from_numpy(np.asarray(v)).long() for k, v in inter.items()},
            meta={"split": split, "n_blocks": nb, "n_context": nb - 1, "block_size": b},
        )


class PassKeyTask(_BlockTask):
    """A key hidden in filler, asked for at the end (see the module docstring)."""

    name = "passkey"

    def __init__(
        self, n_blocks: int = 4, block_size: int = 8, n_keys: int = 10, n_filler: int = 8
    ) -> None:
        super().__init__(n_blocks, block_size, n_filler, min_blocks=2)
        self.n_keys = _positive("n_keys", n_keys, 2)
        self.mark = n_filler + n_keys
        self.query = self.mark + 1
        self.vocab_size = self.query + 1
        self.n_classes = self.n_keys

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        n_ctx, b = self.n_context(split), self.block_size
        tok = self._filler(n, n_ctx, rng)
        key = rng.integers(0, self.n_keys, size=n)
        where = rng.integers(0, n_ctx, size=n)  # the key's block
        off = rng.integers(0, b - 1, size=n)  # MARK at off, key at off + 1
        rows = np.arange(n)
        tok[rows, where, off] = self.mark
        tok[rows, where, off + 1] = self.n_filler + key
        tok[:, -1, -1] = self.query
        inter = {"key": key, "key_block": where, "updates_since": n_ctx - where}
        return self._batch(tok, key, inter, split)


class AssocRecallTask(_BlockTask):
    """Key-value pairs in separate blocks; the query names a key, the answer is its value."""

    name = "assoc_recall"

    def __init__(
        self,
        n_blocks: int = 4,
        block_size: int = 8,
        n_pairs: int = 2,
        n_keys: int = 6,
        n_values: int = 6,
        n_filler: int = 8,
    ) -> None:
        super().__init__(n_blocks, block_size, n_filler, min_blocks=2)
        self.n_pairs = _positive("n_pairs", n_pairs)
        self.n_keys = _positive("n_keys", n_keys, 2)
        self.n_values = _positive("n_values", n_values, 2)
        if self.n_pairs > self.n_keys:
            raise LoopscopeError(f"n_pairs ({n_pairs}) must be <= n_keys ({n_keys})")
        if self.n_pairs > self.n_blocks - 1:
            raise LoopscopeError(
                f"n_pairs ({n_pairs}) needs as many context blocks (n_blocks - 1 = {n_blocks - 1})"
            )
        self.vocab_size = n_filler + self.n_keys + self.n_values
        self.n_classes = self.n_values

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        n_ctx, b, P = self.n_context(split), self.block_size, self.n_pairs
        tok = self._filler(n, n_ctx, rng)
        keys = np.stack([rng.permutation(self.n_keys)[:P] for _ in range(n)])
        vals = rng.integers(0, self.n_values, size=(n, P))
        blocks = np.stack([np.sort(rng.permutation(n_ctx)[:P]) for _ in range(n)])
        off = rng.integers(0, b - 1, size=(n, P))
        rows = np.arange(n)[:, None]
        tok[rows, blocks, off] = self.n_filler + keys
        tok[rows, blocks, off + 1] = self.n_filler + self.n_keys + vals
        ask = rng.integers(0, P, size=n)
        r = np.arange(n)
        tok[:, -1, -1] = self.n_filler + keys[r, ask]
        answer = vals[r, ask]
        inter = {
            "key": keys[r, ask],
            "value": answer,
            "key_block": blocks[r, ask],
            "updates_since": n_ctx - blocks[r, ask],
        }
        return self._batch(tok, answer, inter, split)
