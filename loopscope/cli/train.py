"""``loopscope train`` and ``loopscope trace``: make a model, record its iterations."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loopscope.cli.app import (
    LOOP_HELP,
    MODEL_ARG,
    app,
    device_option,
    dtype_option,
    max_memory_option,
    model_label,
    parse_inputs,
    placement,
    prepare_out,
    prepare_out_file,
    resolve_model,
    user_loop,
)
from loopscope.core.errors import LoopscopeError


@app.command()
def train(
    task: str = typer.Option(..., help="task name, e.g. s3, addition, maze_reach"),
    preset: str = typer.Option(..., help="model preset, e.g. fprm, universal, hrm"),
    out: Path = typer.Option(..., help="run directory (checkpoints, resumable)"),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0, min=0),
    config: Path = typer.Option(None, help="JSON TrainConfig (overrides the other options)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a looped model on a generated task; resumes from OUT if interrupted.

    Example: loopscope train --task s3 --preset fprm --out runs/s3 --steps 500
    """
    from loopscope.models.checkpoint import save_model
    from loopscope.train import TrainConfig
    from loopscope.train import train as run_train

    if config is not None:
        from loopscope.core.io import read_json

        cfg = TrainConfig.from_dict(read_json(config))
    else:
        cfg = TrainConfig(
            task=task, preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed
        )
    _check_train_config(cfg)
    with prepare_out(out):
        model, history = run_train(cfg, out_dir=out, progress=not quiet)
        card = {"train_config": cfg.to_dict(), "history_tail": history[-5:]}
        save_model(model, out / "final", card=card)
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "steps": cfg.steps,
                "final_loss": history[-1]["loss"] if history else None,
            }
        )
    )


def _check_train_config(cfg) -> None:
    """The task and the preset exist (one line naming them), before anything is written."""
    from loopscope import models, tasks

    task = tasks.get(cfg.task, **cfg.task_params)
    models.preset(cfg.preset, vocab_size=task.vocab_size, n_classes=task.n_classes)


@app.command()
def trace(
    model: str = typer.Argument(None, help=MODEL_ARG),
    out: Path = typer.Option(..., help="output path (writes OUT.safetensors + OUT.json)"),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    n_iter: int = typer.Option(16, "--n-iter", min=1, help="loop iterations"),
    inputs: str = typer.Option(None, help="token ids, rows separated by ';' (e.g. '6 1 2; 6 3 4')"),
    task: str = typer.Option(
        None, help="sample inputs from this task (a name or module:MyTask) instead of --inputs"
    ),
    split: str = typer.Option("id", help="task split"),
    n: int = typer.Option(8, min=1, help="number of task examples"),
    seed: int = typer.Option(0, min=0),
    capture: list[str] = typer.Option(None, help="hook names or globs to capture (repeatable)"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Run a model and save every iteration as a Trace (safetensors + JSON).

    Example: loopscope trace s3_fprm --task s3 --n 8 --n-iter 32 --capture 'core.blocks.*.hook_resid_post' --out s3.trace

    An HF checkpoint split over CPU and disk: loopscope trace ckpt/ --task text_addition
    --max-memory 2GiB --capture core.hook_resid_post --out t (the JSON line says where the
    layers went)
    """
    import loopscope as ls

    if (model is None) == (loop is None):
        raise LoopscopeError(
            "give a model (zoo name or checkpoint directory) or --loop, not both"
            if model is not None
            else "give a model (zoo name or checkpoint directory) or --loop module:factory"
        )
    if (inputs is None) == (task is None):
        raise LoopscopeError("give exactly one of --inputs or --task")
    prepare_out_file(out)
    if loop is not None:
        if any(v is not None for v in (device, dtype, max_memory)):
            raise LoopscopeError("--device, --dtype and --max-memory apply to an HF checkpoint")
        m = user_loop(loop)
    else:
        m = resolve_model(model, device=device, dtype=dtype, max_memory=max_memory)
    if task is not None:
        from loopscope.cli.app import get_task

        tokens = get_task(task, m).sample(n, split=split, seed=seed).tokens
    else:
        tokens = parse_inputs(inputs)
    tr = ls.unroll(
        m,
        tokens,
        n_iter,
        capture=list(capture) if capture else None,
        seed=seed,
        decode=True,
        meta={
            "model": model_label(model, loop),
            "task": task,
            "split": split if task else None,
            "seed": seed,
        },
    )
    path = tr.save(out)
    typer.echo(
        json.dumps(
            {
                "trace": str(path),
                "n_iter": tr.n_iter,
                "batch": tr.batch_size,
                "hooks": tr.keys(),
                "status": tr.status,
                **({"placement": placement(m)} if placement(m) else {}),
            }
        )
    )
