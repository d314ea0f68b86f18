"""``loopscope sweep``: a study grid of train-then-analyse jobs (Ray, or sequential)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loopscope.cli.app import app, prepare_out


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="study TOML file (e.g. studies/architecture.toml)"),
    address: str = typer.Option(
        None, help="Ray cluster address to join (default: a local Ray with every CPU)"
    ),
    max_parallel: int = typer.Option(
        None, "--max-parallel", min=1, help="most jobs in flight (default: the CPUs)"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="the study's quick variant (its quick table: CI-sized)"
    ),
    out: Path = typer.Option(
        None, help="output folder (default: runs/sweep/STUDY, or STUDY-quick); rerun to resume"
    ),
    sequential: bool = typer.Option(
        False, "--sequential", help="run in-process one job at a time, even with Ray installed"
    ),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train and analyse every job of a study grid into one table (Parquet + CSV), resumably.

    Each job trains one model (task x preset x knobs x seed) and measures accuracy per split,
    converged / cycle fractions, rho(J) at the end state, lambda1, the correct-basin fraction,
    per-layer residuals and halting figures. Jobs run as Ray tasks (one torch thread each) when
    Ray is installed (the sweep extra: pip install -e ".\\[sweep]"), else sequentially. Rerunning
    skips the jobs already done; a failing job is recorded and the rest finish.

    Example: loopscope sweep studies/architecture.toml --quick
    """
    from loopscope.experiments import sweep as sweep_mod
    from loopscope.experiments.grid import load_study

    study = load_study(config, quick=quick)
    out = out or Path("runs") / "sweep" / (study.name + ("-quick" if quick else ""))
    with prepare_out(out):
        res = sweep_mod.run_sweep(
            study,
            out=out,
            backend="sequential" if sequential else "auto",
            address=address,
            max_parallel=max_parallel,
            progress=not quiet,
        )
    s = res.summary()
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "table": str(out / "results.parquet"),
                "backend": res.backend,
                **{k: (int(v) if k != "wall_s" else round(v, 1)) for k, v in s.items()},
            }
        )
    )
