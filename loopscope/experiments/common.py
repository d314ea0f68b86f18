"""What every experiment checks before it starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopscope.core.errors import LoopscopeError, check_number, check_positive_int, check_seed

__all__ = ["check_splits", "check_budget", "cap_iterations"]


def check_budget(*, n: Any, iter_factor: Any, seed: Any, n_min: int = 1) -> None:
    """An experiment's sample count (``>= n_min``), iteration factor (``> 0``) and seed."""
    check_positive_int("n", n)
    if n < n_min:
        raise LoopscopeError(f"n must be at least {n_min}, got {n}")
    check_number("iter_factor", iter_factor, low=0, strict=True)
    check_seed(seed)


def check_splits(task: Any, splits: Sequence[str]) -> list[str]:
    """``splits`` as a list, each one a split of ``task`` (else a one-line error listing them)."""
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    if not splits:
        raise LoopscopeError("splits is empty: name at least one task split")
    for s in splits:
        if s not in task.splits:
            raise LoopscopeError(
                f"task {task.name!r} has no split {s!r}; splits: {', '.join(task.splits)}"
            )
    return list(splits)


def cap_iterations(loop: Any, tokens: Any, n_iter: int) -> int:
    """``n_iter``, capped at the steps a non-autonomous loop's input supplies (``Loop.n_steps``:
    one step per input block); unchanged for autonomous loops."""
    cap = loop.n_steps(loop.encode(tokens)) if hasattr(loop, "n_steps") else None
    return n_iter if cap is None else max(1, min(n_iter, cap))
