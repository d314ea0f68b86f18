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


def parse_max_memory(text: str | None) -> str | int | dict[Any, str | int] | None:
    """``--max-memory``: ``2GiB`` / ``500MB`` / bytes (every device), or per device
    ``cpu=2GiB,0=20GiB`` (GPU indices as numbers) -> what ``load_hf(max_memory=...)`` takes."""
    import re

    if text is None:
        return None
    size = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B|B)?", re.IGNORECASE)

    def one(v: str) -> str | int:
        v = v.strip()
        if not size.fullmatch(v):
            raise LoopscopeError(
                f"--max-memory: {v!r} is not a size (bytes, or like 500MB / 2GiB); "
                "per device: cpu=2GiB,0=20GiB"
            )
        return int(v) if v.isdigit() else v.replace(" ", "")

    if "=" not in text:
        return one(text)
    out: dict[Any, str | int] = {}
    for part in text.split(","):
        dev, eq, val = part.partition("=")
        dev = dev.strip()
        if not eq or not (dev.isdigit() or dev in ("cpu", "mps")):
            raise LoopscopeError(
                f"--max-memory: {part.strip()!r} must be DEVICE=SIZE with DEVICE cpu or a GPU "
                "index, e.g. cpu=2GiB,0=20GiB"
            )
        out[int(dev) if dev.isdigit() else dev] = one(val)
    return out


def check_device(device: str | None) -> str | None:
    """``--device``: a torch device this machine has (one line naming it otherwise)."""
    import torch

    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoopscopeError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if d.type == "cuda" and (
        not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()
    ):
        raise LoopscopeError(f"--device {device}: this machine has no such CUDA device")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise LoopscopeError(f"--device {device}: MPS is not available on this machine")
    return device


HF_DTYPES = ("float32", "float64", "bfloat16", "float16")


def resolve_model(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_memory: str | None = None,
):
    """A zoo name, a loopscope checkpoint directory or a local HF directory -> a loaded model.

    ``device`` / ``dtype`` / ``max_memory`` (the CLI's ``--device`` / ``--dtype`` /
    ``--max-memory``) place an HF checkpoint's weights (``max_memory``: accelerate's
    ``device_map='auto'`` within that budget, the rest offloaded to disk); checked before loading.
    """
    from loopscope import zoo
    from loopscope.models.checkpoint import load_model
    from loopscope.models.hf import is_hf_dir, load_hf

    device = check_device(device)
    if dtype is not None and dtype not in HF_DTYPES:
        raise LoopscopeError(f"--dtype must be one of {', '.join(HF_DTYPES)}, got {dtype!r}")
    budget = parse_max_memory(max_memory)
    p = Path(model)
    hf = p.exists() and is_hf_dir(p)
    given = [
        f for f, v in (("--device", device), ("--dtype", dtype), ("--max-memory", budget)) if v
    ]
    if given and not hf:
        raise LoopscopeError(
            f"{', '.join(given)} apply to an HF checkpoint directory; {model!r} is "
            f"{'a loopscope checkpoint' if p.exists() else 'a zoo model'} (run on CPU in float32)"
        )
    if budget is not None and device not in (None, "cpu"):
        raise LoopscopeError(
            "give --max-memory (placement by accelerate over every device) or --device, not both"
        )
    if hf:
        kw: dict[str, Any] = {"dtype": dtype}
        if budget is not None:
            kw["max_memory"] = budget
        elif device is not None:
            kw["device"] = device
        return load_hf(p, **kw)
    if p.exists():
        _cwd_importable()  # a checkpoint of your own Loop class imports its module
        return load_model(p)
    return zoo.load(model)


def placement(model: Any) -> dict[str, int] | None:
    """Where an accelerate-dispatched HF model's modules live: ``{"cpu": 3, "disk": 2}`` (None
    when the weights were loaded whole)."""
    from collections import Counter

    for obj in (getattr(model, "hf", None), getattr(getattr(model, "bridge", None), "original_model", None)):  # fmt: skip
        dm = getattr(obj, "hf_device_map", None)
        if dm:
            return dict(Counter(str(v) for v in dm.values()))
    return None


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


def model_and_task(
    model: str | None,
    task: str | None,
    loop: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    max_memory: str | None = None,
):
    """Load a model (a zoo name, a checkpoint directory, or ``--loop module:factory``) and its
    task (the zoo card's unless ``task`` is given; ``module:MyTask`` for your own); check they
    match. ``device`` / ``dtype`` / ``max_memory``: see :func:`resolve_model`."""
    from loopscope import zoo

    if (model is None) == (loop is None):
        raise LoopscopeError(
            "give a model (zoo name or checkpoint directory) or --loop module:factory, not both"
            if model is not None
            else "give a model (zoo name or checkpoint directory) or --loop module:factory"
        )
    if loop is not None and any(v is not None for v in (device, dtype, max_memory)):
        raise LoopscopeError(
            "--device, --dtype and --max-memory apply to an HF checkpoint, not --loop"
        )
    m = (
        user_loop(loop)
        if loop is not None
        else resolve_model(model, device=device, dtype=dtype, max_memory=max_memory)
    )
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
MODEL_ARG = "zoo name, loopscope checkpoint directory or local HF checkpoint directory (or --loop)"
DEVICE_HELP = (
    "HF checkpoint directory: torch device for the weights and the run (cpu, cuda, cuda:1, mps; "
    "default cpu)"
)
DTYPE_HELP = (
    "HF checkpoint directory: weight dtype, float32 | float64 | bfloat16 | float16 (default: the "
    "checkpoint's)"
)
MAX_MEMORY_HELP = (
    "HF checkpoint directory: memory budget per device, e.g. 2GiB (every device) or "
    "cpu=2GiB,0=20GiB; accelerate places the layers within it (device_map='auto') and offloads "
    "the rest to disk. Capture, patching, probes and the logit lens run on an offloaded model; "
    "Jacobian analyses (spectra, solvers, Lyapunov) refuse offloaded weights"
)


def device_option() -> Any:
    return typer.Option(None, "--device", help=DEVICE_HELP)


def dtype_option() -> Any:
    return typer.Option(None, "--dtype", help=DTYPE_HELP)


def max_memory_option() -> Any:
    return typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP)


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
    out = [s.strip() for s in text.split(",") if s.strip()]
    if not out:
        raise LoopscopeError(f"--split names no split, got {text!r} (e.g. --split id,ood)")
    return out


def _usage_error(e: Exception, argv: list[str] | None) -> None:
    """A bad command line (unknown option, a value out of range, a missing argument): one line
    naming the option, exit code 2 (Typer's boxed message spans several lines)."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
        sys.exit(2)
    fmt = getattr(e, "format_message", None)
    msg = " ".join((fmt() if callable(fmt) else str(e)).split())
    given = _given_value(getattr(getattr(e, "param", None), "opts", None), argv)
    if given is not None:
        msg = f"{msg}, got {given!r}"
    path = ctx.command_path.split(maxsplit=1)[1:] if ctx is not None else []
    where = f"loopscope {path[0]} --help" if path else "loopscope --help"
    console.print(f"[bold red]error:[/] {msg} (see {where})", highlight=False, soft_wrap=True)
    sys.exit(getattr(e, "exit_code", 2))


def _given_value(opts: Any, argv: list[str] | None) -> str | None:
    """The value the command line gave option ``opts`` (its last occurrence), if any."""
    args = list(sys.argv[1:] if argv is None else argv)
    found = None
    for i, a in enumerate(args):
        for o in opts or []:
            if a == o and i + 1 < len(args):
                found = args[i + 1]
            elif a.startswith(o + "="):
                found = a[len(o) + 1 :]
    return found


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the Typer app, turning loopscope errors into one-line messages."""
    from typer.exceptions import Abort, TyperException

    os.environ.setdefault("MPLBACKEND", "Agg")  # headless: the CLI only writes figure files
    debug = os.environ.get("LOOPSCOPE_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="loopscope", standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except SystemExit:
        raise
    except TyperException as e:  # Typer's command-line errors (its click exceptions)
        _usage_error(e, argv)
    except Abort:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
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


# -- outputs: checked before the work, one writer per folder ---------------------------------------
def prepare_out(folder: Path, option: str = "--out"):
    """Check that ``folder`` can be written (created if needed) before any work starts; returns
    its lock, to hold while writing: ``with prepare_out(out): ...`` (a second loopscope process
    on the same folder is refused; a lock left by a killed one is taken over)."""
    from loopscope.core.io import OutputLock, check_writable

    check_writable(folder, option)
    return OutputLock(folder, option=option)


def prepare_out_file(path: Path, option: str = "--out") -> None:
    """For a command writing the file(s) ``path[.*]``: check, before the work, that their folder
    can be written and that ``path`` itself is not a folder."""
    from loopscope.core.errors import OutputError
    from loopscope.core.io import check_writable

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name")
    check_writable(path.parent, f"{option} {path}: its folder")
