"""Text tasks for tokenizer-based LMs: prompts with answers, ID / OOD splits, answer-span scoring.

Every example is ``prompt + answer`` written as space-separated words (digits one per word), so
any tokenizer reads it, the word-level stand-in of the tiny test models included:

* ``text_addition``: ``"3 4 + 5 8 ="`` -> ``"9 2"`` (``digits``-digit operands; OOD: +2 digits);
* ``text_multiplication``: ``"3 4 * 7 ="`` -> ``"2 3 8"`` (``digits`` x 1 digits; OOD: +1 digit);
* ``text_state_tracking``: cups game, ``"a b c : 0 2 , 1 2 ? 0 ="`` -> ``"c"`` (swap the items
  at two positions ``n_ops`` times, then name the item at a position; OOD: 2 x ``n_ops``);
* ``text_kv_recall``: ``"a 3 , b 7 , c 1 ? b ="`` -> ``"7"`` (``n_pairs`` pairs; OOD: 2 x).

``batch.tokens [n, pos]`` are the tokenized ``prompt + answer`` (left-padded with the pad token
to the batch's longest; there is no attention mask, so compare runs of one length), and
``batch.targets`` holds the next token at the positions that predict an answer token, -100
elsewhere. Teacher-forced sequence accuracy on those positions (``task.accuracy``) is exactly
greedy decoding of the answer span: all answer tokens are argmax given a correct prefix iff
greedy decoding writes the answer. ``train`` and ``id`` are disjoint (a hash of the prompt picks
the split); ``ood`` is longer.

Example:
    >>> from loopscope import tasks
    >>> from loopscope.models.hf import local_tokenizer
    >>> t = tasks.get("text_kv_recall", tokenizer=local_tokenizer(64))
    >>> b = t.sample(2, split="id", seed=0)
    >>> b.meta["prompts"][0].count(","), (b.targets != -100).sum(1).tolist()
    (3, [1, 1])
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.core.targets import IGNORE_INDEX
from loopscope.tasks.base import Batch, Task

__all__ = ["TextTask", "TEXT_TASKS"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _spaced(n: int) -> str:
    return " ".join(str(n))


def _addition(rng: np.random.Generator, size: int) -> tuple[str, str]:
    a, b = (int(rng.integers(10 ** (size - 1), 10**size)) for _ in range(2))
    return f"{_spaced(a)} + {_spaced(b)} =", _spaced(a + b)


def _multiplication(rng: np.random.Generator, size: int) -> tuple[str, str]:
    a = int(rng.integers(10 ** (size - 1), 10**size))
    b = int(rng.integers(2, 10))
    return f"{_spaced(a)} * {b} =", _spaced(a * b)


def _state_tracking(rng: np.random.Generator, size: int) -> tuple[str, str]:
    cups = list("abc")
    ops = []
    for _ in range(size):
        i, j = (int(x) for x in rng.choice(3, size=2, replace=False))
        cups[i], cups[j] = cups[j], cups[i]
        ops.append(f"{i} {j}")
    q = int(rng.integers(0, 3))
    return f"a b c : {' , '.join(ops)} ? {q} =", cups[q]


def _kv_recall(rng: np.random.Generator, size: int) -> tuple[str, str]:
    keys = rng.choice(len(_LETTERS), size=size, replace=False)
    vals = rng.integers(0, 10, size=size)
    pairs = " , ".join(f"{_LETTERS[k]} {v}" for k, v in zip(keys, vals, strict=True))
    q = int(rng.integers(0, size))
    return f"{pairs} ? {_LETTERS[keys[q]]} =", str(int(vals[q]))


#: name -> (generator, ID size, OOD size as a function of the ID size)
TEXT_TASKS = {
    "text_addition": (_addition, 2, lambda s: s + 2),
    "text_multiplication": (_multiplication, 2, lambda s: s + 1),
    "text_state_tracking": (_state_tracking, 4, lambda s: 2 * s),
    "text_kv_recall": (_kv_recall, 4, lambda s: 2 * s),
}


class TextTask(Task):
    """A text task of :data:`TEXT_TASKS` over ``tokenizer`` (an HF tokenizer).

    Args:
        name: one of :data:`TEXT_TASKS`.
        tokenizer: the model's tokenizer (``loop.tokenizer`` after ``load_hf``); required to sample.
        size: ID problem size (digits, swaps or pairs; default per task).
    """

    splits = ("train", "id", "ood")
    causal = True
    grid = False

    def __init__(self, name: str, tokenizer: Any = None, size: int | None = None) -> None:
        if name not in TEXT_TASKS:
            raise LoopscopeError(f"unknown text task {name!r}; text tasks: {', '.join(TEXT_TASKS)}")
        self.name = name
        self.tokenizer = tokenizer
        gen, default, ood = TEXT_TASKS[name]
        self._gen, self._ood = gen, ood
        self.size = default if size is None else int(size)
        if self.size < 1:
            raise LoopscopeError(f"size must be >= 1, got {size!r}")
        self.vocab_size = self.n_classes = len(tokenizer) if tokenizer is not None else 0

    def examples(self, n: int, split: str, rng: np.random.Generator) -> list[tuple[str, str]]:
        """``n`` ``(prompt, answer)`` pairs of ``split`` (train / id told apart by a hash)."""
        size = self._ood(self.size) if split == "ood" else self.size
        out: list[tuple[str, str]] = []
        for _ in range(200 * n):
            prompt, answer = self._gen(rng, size)
            bucket = hashlib.sha256(prompt.encode()).digest()[0] % 5  # 1 in 5 prompts is ID
            if split == "ood" or (bucket == 0) == (split == "id"):
                out.append((prompt, answer))
                if len(out) == n:
                    return out
        raise LoopscopeError(f"{self.name}: could not draw {n} distinct {split} examples")

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        tok = self.tokenizer
        if tok is None:
            raise LoopscopeError(
                f"text task {self.name!r} needs a tokenizer: tasks.get({self.name!r}, "
                "tokenizer=tok) (a loop from load_hf carries one as loop.tokenizer)"
            )
        pairs = self.examples(n, split, rng)
        rows, spans = [], []
        for prompt, answer in pairs:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            full = tok(f"{prompt} {answer}", add_special_tokens=False)["input_ids"]
            if full[: len(p)] != p or len(full) == len(p):
                raise LoopscopeError(
                    f"{self.name}: the tokenizer merges the answer into the prompt"
                )
            rows.append(full)
            spans.append(len(full) - len(p))
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        tokens = torch.full((n, width), pad, dtype=torch.long)
        targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, k) in enumerate(zip(rows, spans, strict=True)):
            tokens[i, width - len(row) :] = torch.tensor(row)
            # position j predicts token j + 1: the last k tokens are predicted from j = -k-1 .. -2
            targets[i, width - k - 1 : width - 1] = tokens[i, width - k :]
        meta = {
            "prompts": [p for p, _ in pairs],
            "answers": [a for _, a in pairs],
            "answer_tokens": spans,
            "size": self._ood(self.size) if split == "ood" else self.size,
        }
        return Batch(tokens, targets, meta=meta)
