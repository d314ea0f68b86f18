"""The ``loopscope`` Typer app, its error handling, and the helpers every command shares.

Command modules (``loopscope/cli/<name>.py``) decorate functions with ``@app.command()``;
``loopscope/cli/__init__.py`` imports them so they register.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from loopscope.core.errors import LoopscopeError

app = typer.Typer(
    name="loopscope",
    help="Mechanistic interpretability of looped transformers: trace every loop iteration, "
    "measure fixed-point dynamics, probe and patch per iteration, make the paper's figures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(
    help="The shipped model zoo.", no_args_is_help=False, invoke_without_command=True
)
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolve_model(model: str):
    """A zoo name, a loopscope checkpoint directory or a local HF directory -> a loaded model."""
    from loopscope import zoo
    from loopscope.models.checkpoint import load_model
    from loopscope.models.hf import is_hf_dir, load_hf

    p = Path(model)
    if p.exists():
        return load_hf(p) if is_hf_dir(p) else load_model(p)
    return zoo.load(model)


def parse_inputs(text: str):
    """'1 2 3; 4 5 6' -> LongTensor [2, 3] (rows separated by ';')."""
    import torch

    rows = [r.split() for r in text.split(";") if r.strip()]
    if not rows:
        raise LoopscopeError("--inputs is empty")
    try:
        vals = [[int(x) for x in r] for r in rows]
    except ValueError:
        raise LoopscopeError(
            f"--inputs must be integers separated by spaces (rows by ';'), got {text!r}"
        ) from None
    if len({len(r) for r in vals}) != 1:
        raise LoopscopeError("--inputs rows must all have the same length")
    return torch.tensor(vals, dtype=torch.long)


def model_and_task(model: str, task: str | None):
    """Load a model and its task (from the zoo card unless ``task`` is given); check they match."""
    from loopscope import zoo

    m = resolve_model(model)
    if task is None:
        if model not in zoo.names():
            raise LoopscopeError("--task is required for a checkpoint directory")
        t = zoo.task_of(model)
    else:
        t = get_task(task, m)
    vocab = getattr(getattr(m, "cfg", None), "vocab_size", None)
    if vocab is not None and vocab != t.vocab_size:
        raise LoopscopeError(
            f"model {model!r} (vocab {vocab}) does not match task {t.name!r} (vocab {t.vocab_size})"
        )
    return m, t


def get_task(name: str, model: Any = None):
    """The task ``name``; a text task gets the model's tokenizer (``model.tokenizer``)."""
    from loopscope import tasks

    if name in tasks.text_names():
        return tasks.get(name, tokenizer=getattr(model, "tokenizer", None))
    return tasks.get(name)


def split_list(text: str) -> list[str]:
    """``"id, ood"`` -> ``["id", "ood"]`` (the experiments check them against the task)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the Typer app, turning loopscope errors into one-line messages."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # headless: the CLI only writes figure files
    debug = os.environ.get("LOOPSCOPE_DEBUG") == "1"
    try:
        return app(args=argv, standalone_mode=True)
    except SystemExit:
        raise
    except LoopscopeError as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
        if debug:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # last resort: never show a traceback to the user
        if debug:
            raise
        console.print(
            f"[bold red]error:[/] {type(e).__name__}: {e} (set LOOPSCOPE_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
