"""Task and Batch: the interface every generated task follows.

A task samples batches deterministically from ``(split, seed)``; splits never share examples.

Example:
    >>> from loopscope import tasks
    >>> b = tasks.get("s3").sample(4, split="id", seed=0)
    >>> b.tokens.shape[0], b.targets.shape == b.tokens.shape
    (4, True)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_seed, suggest

__all__ = ["Batch", "Task", "split_rng"]


@dataclass
class Batch:
    """A batch of examples.

    Attributes:
        tokens: ``[n, pos]`` long input ids.
        targets: ``[n, pos]`` long labels, ``-100`` where there is none.
        intermediates: ground-truth variables for probes, each ``[n, pos]`` (or ``[n, pos, ...]``).
        meta: per-batch facts (``length``, ``grid``, ``difficulty`` ...).
        graphs: one computation graph per example (networkx DiGraph) where defined.
    """

    tokens: Tensor
    targets: Tensor
    intermediates: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    graphs: list | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Problem length that iteration counts scale with: the grid side for grid tasks, the
        number of context blocks for block tasks (``meta["n_context"]``), else the number of
        tokens per example."""
        if "n_context" in self.meta:
            return int(self.meta["n_context"])
        return int(max(self.meta["grid"])) if "grid" in self.meta else int(self.tokens.shape[1])

    def to(self, device: Any) -> Batch:
        return Batch(
            self.tokens.to(device),
            self.targets.to(device),
            {k: v.to(device) for k, v in self.intermediates.items()},
            dict(self.meta),
            self.graphs,
        )


def split_rng(task: str, split: str, seed: int) -> np.random.Generator:
    """Independent random stream per (task, split, seed)."""
    h = hashlib.sha256(f"{task}|{split}|{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


class Task:
    """Base class: subclasses set ``name``, ``vocab_size``, ``n_classes``, ``splits``, ``causal``,
    ``grid`` and implement ``_sample(n, split, rng)``."""

    name: str = "task"
    vocab_size: int = 0
    n_classes: int = 0
    splits: tuple[str, ...] = ("train", "id", "ood")
    causal: bool = True
    grid: bool = False

    def sample(self, n: int, split: str = "train", seed: int = 0) -> Batch:
        """``n`` examples of ``split``; a pure function of ``(split, seed)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise LoopscopeError(f"n must be a positive integer, got {n!r}")
        if split not in self.splits:
            raise LoopscopeError(
                f"task {self.name!r} has no split {split!r}{suggest(split, self.splits)}; splits: {', '.join(self.splits)}"
            )
        check_seed(seed)
        return self._sample(n, split, split_rng(self.name, split, int(seed)))

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:  # pragma: no cover
        raise NotImplementedError

    def accuracy(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """Token and sequence accuracy of ``logits [n, pos, C]`` (positions with -100 ignored)."""
        pred = logits.argmax(-1)
        mask = batch.targets != -100
        correct = (pred == batch.targets) & mask
        return {
            "token_acc": float(correct.sum()) / max(1, int(mask.sum())),
            "seq_acc": float((correct | ~mask).all(dim=1).float().mean()),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab={self.vocab_size}, classes={self.n_classes})"
