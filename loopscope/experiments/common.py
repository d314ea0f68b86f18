"""What every experiment checks before it starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loopscope.core.errors import LoopscopeError

__all__ = ["check_splits", "cap_iterations"]


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
