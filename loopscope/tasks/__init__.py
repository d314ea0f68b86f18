"""Offline, seeded task generators with ID and OOD splits and ground-truth intermediates.

>>> from loopscope import tasks
>>> sorted(tasks.names())[:3]
['a4', 'addition', 'maze_path']
"""

from __future__ import annotations

from typing import Any

from loopscope.core.errors import LoopscopeError, suggest
from loopscope.tasks.addition import AdditionTask, parallel_carry_iterations
from loopscope.tasks.base import Batch, Task
from loopscope.tasks.groups import GroupTask, cayley_table
from loopscope.tasks.maze import MazePathTask, MazeReachTask
from loopscope.tasks.memory import AssocRecallTask, PassKeyTask
from loopscope.tasks.multiplication import MultiplicationTask, evaluate_graph, multiplication_graph
from loopscope.tasks.sudoku import Sudoku4Task, Sudoku6Task
from loopscope.tasks.text import TEXT_TASKS, TextTask

__all__ = [
    "get",
    "names",
    "text_names",
    "Task",
    "Batch",
    "GroupTask",
    "AdditionTask",
    "MazeReachTask",
    "MazePathTask",
    "MultiplicationTask",
    "Sudoku4Task",
    "Sudoku6Task",
    "PassKeyTask",
    "AssocRecallTask",
    "TextTask",
    "cayley_table",
    "parallel_carry_iterations",
    "multiplication_graph",
    "evaluate_graph",
]

_REGISTRY = {
    "parity": lambda **kw: GroupTask("parity", **kw),
    "z5": lambda **kw: GroupTask("z5", **kw),
    "s3": lambda **kw: GroupTask("s3", **kw),
    "a4": lambda **kw: GroupTask("a4", **kw),
    "s5": lambda **kw: GroupTask("s5", **kw),
    "addition": AdditionTask,
    "multiplication": MultiplicationTask,
    "sudoku4": Sudoku4Task,
    "sudoku6": Sudoku6Task,
    "maze_reach": MazeReachTask,
    "maze_path": MazePathTask,
    "passkey": PassKeyTask,
    "assoc_recall": AssocRecallTask,
}


def names() -> list[str]:
    """Every registered task name."""
    return list(_REGISTRY)


def text_names() -> list[str]:
    """The text tasks (they need ``tokenizer=``; not in :func:`names`, which need none)."""
    return list(TEXT_TASKS)


def get(name: str, **params: Any) -> Task:
    """The task ``name`` with ``params`` (unknown names/params raise a clear error)."""
    if name in TEXT_TASKS:
        try:
            return TextTask(name, **params)
        except TypeError as e:
            raise LoopscopeError(f"bad parameters for task {name!r}: {e}") from None
    if name not in _REGISTRY:
        raise LoopscopeError(
            f"unknown task {name!r}{suggest(name, [*_REGISTRY, *TEXT_TASKS])}; tasks: "
            f"{', '.join([*_REGISTRY, *TEXT_TASKS])}"
        )
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise LoopscopeError(f"bad parameters for task {name!r}: {e}") from None
