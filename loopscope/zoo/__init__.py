"""The model zoo: small trained looped models shipped in the repository.

Each entry is a directory ``loopscope/zoo/checkpoints/<name>/`` holding ``model.safetensors``,
``config.json`` and ``card.json`` (task, preset, size, seed, training command, steps, wall time,
ID/OOD accuracy per split, all measured by the toolkit). Loading needs no network.

Example:
    >>> from loopscope import zoo
    >>> names = zoo.names()                       # doctest: +SKIP
    >>> model = zoo.load("s3_fprm")               # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.core.errors import CheckpointError, LoopscopeError, suggest
from loopscope.core.io import read_json
from loopscope.models.checkpoint import load_model

__all__ = ["names", "load", "card", "task_of", "table", "cards_markdown", "checkpoint_dir", "ROOT"]

ROOT = Path(__file__).parent / "checkpoints"


def names() -> list[str]:
    """Names of every shipped zoo model (those with a checkpoint and a card)."""
    if not ROOT.exists():
        return []
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "card.json").exists() and (p / "model.safetensors").exists()
    )


def checkpoint_dir(name: str) -> Path:
    """Directory of zoo model ``name`` (clear error with suggestions if unknown)."""
    d = ROOT / name
    if not (d / "card.json").exists():
        raise LoopscopeError(
            f"unknown zoo model {name!r}{suggest(name, names())}; known: {', '.join(names()) or 'none'}"
        )
    return d


def card(name: str) -> dict[str, Any]:
    """The model card of ``name`` (a dict; a malformed card is a CheckpointError naming the
    file and the field)."""
    path = checkpoint_dir(name) / "card.json"
    return _checked_card(read_json(path), path)


def _checked_card(c: Any, path: Path) -> dict[str, Any]:
    """The fields the zoo reads, checked: ``accuracy`` is ``{split: {token_acc, seq_acc}}``,
    ``task`` a name, ``task_params`` a dict, the counts numbers."""

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{path}: field {field!r} {why}")

    if not isinstance(c, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(c).__name__}")
    if not isinstance(c.get("task"), str):
        raise bad("task", f"must be a task name, got {c.get('task')!r}")
    if not isinstance(c.get("task_params") or {}, dict):
        raise bad("task_params", f"must be a dict, got {type(c['task_params']).__name__}")
    acc = c.get("accuracy") or {}
    if not isinstance(acc, dict):
        raise bad("accuracy", f"must be {{split: {{token_acc, seq_acc}}}}, got {acc!r}")
    for split, res in acc.items():
        if not isinstance(res, dict) or not all(
            isinstance(res.get(k), (int, float)) and not isinstance(res.get(k), bool)
            for k in ("token_acc", "seq_acc")
        ):
            raise bad("accuracy", f"of split {split!r} must have numbers token_acc and seq_acc")
    for k in ("n_params", "steps", "seed", "wall_s"):
        v = c.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(k, f"must be a number, got {v!r}")
    return c


def task_of(name: str):
    """The task a zoo model was trained on, built from its card (``task`` + ``task_params``)."""
    from loopscope import tasks

    c = card(name)
    return tasks.get(c["task"], **(c.get("task_params") or {}))


def load(name: str, dtype: Any = None):
    """A ready Loop (eval mode) for zoo model ``name``, loaded offline from safetensors."""
    model = load_model(checkpoint_dir(name), dtype=dtype)
    model.zoo_name = name
    return model


def table() -> pd.DataFrame:
    """One row per zoo model: task, preset, params, steps, wall time, accuracy per split."""
    rows = []
    for n in names():
        c = card(n)
        row = {
            "name": n,
            "task": c.get("task"),
            "preset": c.get("preset"),
            "params": c.get("n_params"),
            "seed": c.get("seed"),
            "steps": c.get("steps"),
            "wall_s": c.get("wall_s"),
        }
        for split, res in (c.get("accuracy") or {}).items():
            row[f"{split}_token"] = res.get("token_acc")
            row[f"{split}_seq"] = res.get("seq_acc")
        rows.append(row)
    return pd.DataFrame(rows)


def cards_markdown() -> str:
    """Markdown table of every card (for the README)."""
    lines = [
        "| model | task | preset | params | steps | wall (s) | accuracy (token / seq) per split | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names():
        c = card(n)
        acc = "; ".join(
            f"{s}: {r['token_acc']:.3f} / {r['seq_acc']:.3f}"
            for s, r in (c.get("accuracy") or {}).items()
        )
        lines.append(
            f"| {n} | {c.get('task')} | {c.get('preset')} | {c.get('n_params')} | {c.get('steps')} | "
            f"{c.get('wall_s', 0):.0f} | {acc} | `{c.get('command')}` |"
        )
    return "\n".join(lines)
