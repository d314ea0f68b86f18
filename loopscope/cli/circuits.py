"""``loopscope probe`` and ``loopscope patch``: what the state holds, and what carries the answer."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loopscope.cli.app import (
    LOOP_HELP,
    MODEL_ARG,
    TASK_HELP,
    app,
    device_option,
    dtype_option,
    max_memory_option,
    model_and_task,
    model_label,
    prepare_out,
    split_list,
)
from loopscope.core.errors import LoopscopeError


@app.command()
def probe(
    model: str = typer.Argument(None, help=MODEL_ARG),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    target: str = typer.Option(
        "state", help="task intermediate variable to probe (e.g. state, carry) or 'targets'"
    ),
    iterations: str = typer.Option("all", help="'all' or a number of iterations"),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help=TASK_HELP),
    site: str = typer.Option(
        "state", help="'state' (h_t) or a hook name, e.g. core.blocks.0.hook_resid_post"
    ),
    n: int = typer.Option(256, min=8),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("probe_out"), help="output folder (tidy CSV + figure)"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Fit linear probes for a task variable at every iteration and position (one batched solve each).

    Each split is one unroll and one batched ridge solve over every (iteration, position) probe
    (well under a second on the zoo models), so there is nothing worth checkpointing: the outputs
    (probes.csv, onset.csv, probes.png) are written atomically at the end, so an interrupted run
    leaves the previous complete files (or none), never half a file; rerun it to redo.

    Example: loopscope probe s3_fprm --target state --iterations all --split id,ood
    """
    from loopscope import figures
    from loopscope.core.io import atomic_savefig, atomic_write_text
    from loopscope.experiments.probing import probe_study
    from loopscope.report import set_style

    if iterations != "all" and not iterations.lstrip("-").isdigit():
        raise LoopscopeError(
            f"--iterations must be 'all' or a positive integer, got {iterations!r}"
        )
    T = None if iterations == "all" else int(iterations)
    if T is not None and T < 1:
        raise LoopscopeError(
            f"--iterations must be 'all' or a positive integer, got {iterations!r}"
        )
    with prepare_out(out):
        m, t = model_and_task(model, task, loop, device=device, dtype=dtype, max_memory=max_memory)
        res = probe_study(
            m, t, target=target, splits=split_list(split), iterations=T, site=site, n=n, seed=seed
        )
        df, on = res.to_frame(), res.onset
        atomic_write_text(out / "probes.csv", df.to_csv(index=False))
        atomic_write_text(out / "onset.csv", on.to_csv(index=False))
        set_style()
        atomic_savefig(figures.probe_wavefront(df, on), out / "probes.png", dpi=120)
    typer.echo(on.to_string(index=False))


@app.command()
def patch(
    model: str = typer.Argument(None, help=MODEL_ARG),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    task: str = typer.Option(None, help=TASK_HELP),
    iterations: str = typer.Option("all", help="'all' or comma-separated iterations"),
    site: str = typer.Option("hook_state", help="hook to patch"),
    position: int = typer.Option(1, help="input position whose token the corruption changes"),
    n: int = typer.Option(4, min=1),
    seed: int = typer.Option(0, min=0),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="patches per forward"),
    out: Path = typer.Option(
        Path("patch_out"),
        help="output folder (tidy CSV + heatmap; OUT/checkpoint: finished chunks)",
    ),
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="reuse the finished chunks in OUT/checkpoint of an interrupted run with the same "
        "settings (--no-resume deletes them first)",
    ),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Per-iteration denoising sweep over (iteration x position) with single-token corruptions.

    Resumable: every finished chunk of --batch-size patches is written atomically to
    OUT/checkpoint, so a killed run continues where it stopped when rerun with the same
    arguments (same rows, bit for bit); different settings on the same OUT are refused.

    Example: loopscope patch s3_fprm --iterations all --out s3_patch
    """
    from loopscope import figures
    from loopscope.core.errors import CheckpointError
    from loopscope.core.io import ChunkCheckpoint, atomic_savefig, atomic_write_text
    from loopscope.experiments.patching import patch_study
    from loopscope.report import set_style

    its = _patch_iterations(iterations)
    ck = out / "checkpoint"
    with prepare_out(out):
        m, t = model_and_task(model, task, loop, device=device, dtype=dtype, max_memory=max_memory)
        if not resume:
            ChunkCheckpoint.discard(ck)
        try:
            res = patch_study(
                m, t, iterations=its, site=site, position=position, n=n, seed=seed,
                batch_size=batch_size, checkpoint_dir=ck,
            )  # fmt: skip
        except CheckpointError as e:
            raise CheckpointError(f"{e} (or rerun with --no-resume)") from None
        df, info = res.to_frame(), res.checkpoint
        atomic_write_text(out / "patching.csv", df.to_csv(index=False))
        set_style()
        fig = figures.heatmap(
            df,
            "iteration",
            "position",
            "recovery",
            f"{model_label(model, loop)}: denoising recovery ({site})",
            center=0,
        )
        atomic_savefig(fig, out / "patching.png", dpi=120)
    summary = {
        "rows": len(df), "out": str(out), "mean_recovery": float(df["recovery"].mean()),
        "chunks": info["total"], "resumed": info["resumed"],
    }  # fmt: skip
    typer.echo(json.dumps(summary))


def _patch_iterations(text: str) -> str | list[int]:
    """``--iterations``: 'all' or comma-separated iterations >= 0 (range checked by the sweep)."""
    if text == "all":
        return "all"
    parts = [x.strip() for x in text.split(",")]
    if not parts or not all(x.isdigit() for x in parts):
        raise LoopscopeError(
            f"--iterations must be 'all' or comma-separated iterations >= 0, got {text!r}"
        )
    return [int(x) for x in parts]
