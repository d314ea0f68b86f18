"""``loopscope paper``: regenerate the paper's figures and report (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loopscope.cli.app import app, prepare_out
from loopscope.core.errors import LoopscopeError, suggest


@app.command()
def paper(
    out: Path = typer.Option(
        Path("paper_out"), help="output folder (figures, data tables, report)"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="use the shipped zoo and small samples (about a minute on 2 cores)"
    ),
    seed: int = typer.Option(0, min=0),
    only: list[str] = typer.Option(None, help="only these figures (repeatable)"),
    quiet: bool = typer.Option(False, help="no progress bar and no timing table"),
    jobs: int = typer.Option(
        None, min=1, help="worker processes (default: one per core, at most 4; 1: this process)"
    ),
) -> None:
    """Regenerate the paper's figures and report from the zoo (resumable: reruns skip done figures).

    Each figure's time is printed as it finishes and written to OUT/timings.json.

    Example: loopscope paper --quick --out paper_out
    """
    from loopscope import paper as paper_mod
    from loopscope.experiments.paper_figures import FIGURES

    for name in only or []:
        if name not in FIGURES:
            raise LoopscopeError(
                f"--only: unknown figure {name!r}{suggest(name, FIGURES)}; figures: "
                f"{', '.join(FIGURES)}"
            )
    cmd = "loopscope paper" + (" --quick" if quick else "") + f" --out {out.name} --seed {seed}"
    with prepare_out(out):
        recs = paper_mod.run_paper(
            out, quick=quick, seed=seed, only=list(only) if only else None, progress=not quiet,
            command=cmd, jobs=jobs,
        )  # fmt: skip
    timings = json.loads((out / "timings.json").read_text())
    report = {
        "out": str(out),
        "figures": [r.name for r in recs],
        "report": str(out / "report.md"),
        "seconds": timings["wall_s"],
        "figure_seconds": timings["figures_s"],
    }
    typer.echo(json.dumps(report))
