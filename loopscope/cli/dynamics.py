"""``loopscope stability``, ``halting`` and ``verdict``: the dynamics of a model on its task.

Each command loads the model and task, calls one experiment of :mod:`loopscope.experiments`
and writes its tables and figures.
"""

from __future__ import annotations

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
    prepare_out_file,
    split_list,
)
from loopscope.core.errors import LoopscopeError, check_number


def _iter_factor(value: float) -> float:
    return check_number("--iter-factor", value, low=0, strict=True)


@app.command()
def stability(
    model: str = typer.Argument(None, help=MODEL_ARG),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help=TASK_HELP),
    n: int = typer.Option(64, min=1),
    iter_factor: float = typer.Option(3.0, min=0.0, help="iterations = factor x length"),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("stability_out"), help="output folder (CSV + JSON + figure)"),
    dynamics: bool = typer.Option(
        True,
        "--dynamics/--no-dynamics",
        help="also measure rho of the Jacobian at the end state, the largest Lyapunov exponent "
        "and the correct-basin fraction on the first --n-dyn samples (slower)",
    ),
    n_dyn: int = typer.Option(4, "--n-dyn", min=1, help="samples for the --dynamics columns"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """Stability table per split: accuracy, converged / cycle / diverged fractions, T_conv, residual.

    With --dynamics (default), each row also has, on the first --n-dyn samples: rho_median /
    rho_max (spectral radius of the step's Jacobian at the end state; dense up to n = 2400,
    ARPACK above; causal models above it: dense on a prefix, a lower bound, noted),
    lambda1_median (largest Lyapunov exponent, QR method, 40 steps from the middle of the
    trajectory, nats per iteration), correct_basin_fraction (share of 16 draws of the model's
    init that end on the correct answer after the same iterations) and dyn_note (caps, excluded
    diverged samples, anything that could not be measured: NaN there, never a crash).

    Example: loopscope stability s3_fprm --split id,ood --out s3_stability

    Your own model: loopscope stability --loop my_model:make_loop --task my_model:MyTask

    An HF checkpoint larger than memory: loopscope stability ckpt/ --task text_addition
    --max-memory 2GiB --no-dynamics (offloaded weights: the Jacobian columns need them in memory)
    """
    from loopscope.experiments.stability import stability as run

    _iter_factor(iter_factor)
    with prepare_out(out):
        m, t = model_and_task(model, task, loop, device=device, dtype=dtype, max_memory=max_memory)
        res = run(
            m, t, splits=split_list(split), n=n, iter_factor=iter_factor, seed=seed,
            dynamics=dynamics, n_dyn=n_dyn, model_name=model_label(model, loop),
        )  # fmt: skip
        _write_stability(res, out)


def _write_stability(res, out: Path) -> None:
    from loopscope.core.io import atomic_savefig, atomic_write_text
    from loopscope.experiments.stability import stability_figures
    from loopscope.report import set_style

    table = res.to_frame()
    atomic_write_text(out / "stability.csv", table.to_csv(index=False))
    atomic_write_text(out / "stability.json", table.to_json(orient="records", indent=1))
    atomic_write_text(out / "per_sample.csv", res.per_sample.to_csv(index=False))
    if len(res.eigenvalues):
        atomic_write_text(out / "eigenvalues.csv", res.eigenvalues.to_csv(index=False))
    set_style()
    for stem, fig in stability_figures(res).items():
        atomic_savefig(fig, out / f"{stem}.png", dpi=120)
    typer.echo(table.to_string(index=False))


@app.command()
def halting(
    model: str = typer.Argument(None, help=MODEL_ARG),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help=TASK_HELP),
    n: int = typer.Option(128, min=1),
    iter_factor: float = typer.Option(3.0, min=0.0, help="budget = factor x length"),
    seed: int = typer.Option(0, min=0),
    out: Path = typer.Option(Path("halting_out"), help="output folder (CSV + figure)"),
) -> None:
    """Score every exit criterion offline on one recorded trace per split (accuracy vs iterations).

    Example: loopscope halting s3_act --split id,ood
    """
    from loopscope.core.io import atomic_savefig, atomic_write_text
    from loopscope.experiments.halting import halting_figure, halting_study
    from loopscope.report import set_style

    _iter_factor(iter_factor)
    with prepare_out(out):
        m, t = model_and_task(model, task, loop)
        res = halting_study(
            m, t, splits=split_list(split), n=n, iter_factor=iter_factor, seed=seed,
            model_name=model_label(model, loop),
        )  # fmt: skip
        df = res.to_frame()
        atomic_write_text(out / "halting.csv", df.to_csv(index=False))
        set_style()
        atomic_savefig(halting_figure(res), out / "halting_tradeoff.png", dpi=120)
    cols = ["split", "criterion", "threshold", "mean_steps", "accuracy", "compute_saved"]
    typer.echo(df[cols].to_string(index=False))


@app.command()
def verdict(
    model: str = typer.Argument(None, help=MODEL_ARG),
    loop: str = typer.Option(None, "--loop", help=LOOP_HELP),
    task: str = typer.Option(None, help=TASK_HELP),
    n: int = typer.Option(128, min=2, help="examples per split"),
    seed: int = typer.Option(0, min=0),
    n_basin: int = typer.Option(
        8, min=0, help="Gaussian inits per sample for the correct-basin fraction (0 skips it)"
    ),
    n_probe: int = typer.Option(
        128, min=0, help="sequences for the probe onset vs depth (0 skips it)"
    ),
    out: Path = typer.Option(None, help="write the evidence table here (CSV)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON records"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_memory: str = max_memory_option(),
) -> None:
    """The evidence vector for "real algorithm" vs "memorized subgraphs / heuristics".

    Example: loopscope verdict addition_conv --n 64
    """
    from loopscope.core.io import atomic_write_text
    from loopscope.experiments.verdict import verdict as run_verdict

    if out is not None:
        prepare_out_file(out)
    m, t = model_and_task(model, task, loop, device=device, dtype=dtype, max_memory=max_memory)
    try:
        df = run_verdict(m, t, n=n, seed=seed, n_basin=n_basin, n_probe=n_probe).to_frame()
    except LoopscopeError as e:
        if "offloaded" in str(e) and n_basin:
            raise LoopscopeError(f"{e}; or skip the basin evidence with --n-basin 0") from None
        raise
    if out is not None:
        atomic_write_text(out, df.to_csv(index=False))
    if as_json:
        typer.echo(df.to_json(orient="records", indent=1))
    else:
        typer.echo(df[["evidence", "split", "value", "reading", "supports"]].to_string(index=False))
