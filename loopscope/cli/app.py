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


def _cwd_importable() -> None:
    """Your modules in the current folder import as with ``python -m`` (the console script
    does not put the current folder on ``sys.path`` by itself)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_object(spec: str, option: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (the current directory is importable, as
    for ``python -m``); a one-line error naming ``option`` otherwise."""
    import importlib

    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise LoopscopeError(
            f"{option} must be 'module:attribute' (e.g. my_model:make_loop), got {spec!r}"
        )
    mod_name, attr = spec.split(":")
    _cwd_importable()
    try:
        obj: Any = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise LoopscopeError(
            f"{option} {spec!r}: cannot import {mod_name!r} ({e}); run from the folder that holds "
            "it or put it on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            from loopscope.core.errors import suggest

            names = [n for n in dir(obj) if not n.startswith("_")]
            raise LoopscopeError(
                f"{option} {spec!r}: {mod_name} has no {part!r}{suggest(part, names)}"
            )
        obj = getattr(obj, part)
    return obj


def user_loop(spec: str):
    """``--loop module:factory``: the Loop the factory returns (or the Loop object named)."""
    from loopscope.core.loop import Loop

    obj = load_object(spec, "--loop")
    if not isinstance(obj, Loop) and callable(obj):
        obj = obj()
    if not isinstance(obj, Loop):
        raise LoopscopeError(
            f"--loop {spec!r} gave a {type(obj).__name__}, not a loopscope Loop: return one from "
            "the factory (ls.wrap(model, loop=...), ls.FnLoop(...) or a Loop subclass)"
        )
    return obj


def user_task(spec: str):
    """``--task module:MyTask``: a Task instance (a class or factory is called with no argument)."""
    obj = load_object(spec, "--task")
    if isinstance(obj, type) and callable(getattr(obj, "sample", None)):
        try:
            obj = obj()
        except TypeError as e:
            raise LoopscopeError(
                f"--task {spec!r}: cannot build it with no arguments ({e})"
            ) from None
    if not callable(getattr(obj, "sample", None)):
        raise LoopscopeError(
            f"--task {spec!r} gave a {type(obj).__name__} without sample(n, split, seed): "
            "subclass loopscope.tasks.base.Task"
        )
    return obj


def resolve_model(model: str):
    """A zoo name, a loopscope checkpoint directory or a local HF directory -> a loaded model."""
    from loopscope import zoo
    from loopscope.models.checkpoint import load_model
    from loopscope.models.hf import is_hf_dir, load_hf

    p = Path(model)
    if p.exists():
        _cwd_importable()  # a checkpoint of your own Loop class imports its module
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


def model_and_task(model: str | None, task: str | None, loop: str | None = None):
    """Load a model (a zoo name, a checkpoint directory, or ``--loop module:factory``) and its
    task (the zoo card's unless ``task`` is given; ``module:MyTask`` for your own); check they
    match."""
    from loopscope import zoo

    if (model is None) == (loop is None):
        raise LoopscopeError(
            "give a model (zoo name or checkpoint directory) or --loop module:factory, not both"
            if model is not None
            else "give a model (zoo name or checkpoint directory) or --loop module:factory"
        )
    m = user_loop(loop) if loop is not None else resolve_model(model)
    if task is None:
        if loop is not None or model not in zoo.names():
            where = "--loop" if loop is not None else "a checkpoint directory"
            raise LoopscopeError(f"--task is required with {where} (a task name or module:MyTask)")
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
    """The task ``name`` (or ``module:MyTask``); a text task gets the model's tokenizer."""
    from loopscope import tasks

    if ":" in name:
        return user_task(name)
    if name in tasks.text_names():
        return tasks.get(name, tokenizer=getattr(model, "tokenizer", None))
    return tasks.get(name)


def model_label(model: str | None, loop: str | None) -> str:
    """The name results carry: the model argument, or the ``--loop`` spec."""
    return model if model is not None else str(loop)


#: the options every model command shares (one definition, so --help reads the same everywhere)
MODEL_ARG = "zoo name or checkpoint directory (or give --loop)"
LOOP_HELP = "your own model: module:factory returning a Loop (e.g. my_model:make_loop); no MODEL"
TASK_HELP = "task name, or module:MyTask for your own (default: the zoo card's)"


def _version_callback(value: bool) -> None:
    if value:
        from loopscope import __version__

        typer.echo(f"loopscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="print the version"
    ),
) -> None:
    """Mechanistic interpretability of looped transformers: trace every loop iteration, measure
    fixed-point dynamics, probe and patch per iteration, make the paper's figures."""


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
