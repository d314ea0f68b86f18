"""``loopscope self-improve``: self-improvement rounds on addition (resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from loopscope.cli.app import app, prepare_out


@app.command("self-improve")
def self_improve(
    out: Path = typer.Option(
        None, help="output folder (default: runs/self_improve[-quick]); rerun to resume"
    ),
    quick: bool = typer.Option(False, "--quick", help="the CI setting (about a minute)"),
    rounds: int = typer.Option(None, min=0, help="override the setting's number of rounds"),
    models: int = typer.Option(None, min=1, help="seed models voting on the self-labels"),
    threshold: float = typer.Option(None, help="majority-vote threshold (share of the models)"),
    length_filter: str = typer.Option(None, help="true | valid | none"),
    noise: str = typer.Option(None, help="label noise: none | uniform | perturb"),
    noise_rate: float = typer.Option(None, help="share of kept labels corrupted"),
    seed: int = typer.Option(0, min=0),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Teach a looped addition model longer problems by rounds of self-labelling, filtering and
    retraining, and measure accuracy and fixed points per round and length.

    Writes table.csv (one row per round and length), summary.json and figures (PNG) to --out;
    each finished round is checkpointed there, so a rerun resumes after an interruption.

    Example: loopscope self-improve --quick --out runs/si
    """
    import dataclasses

    import matplotlib

    matplotlib.use("Agg")
    from loopscope.core.io import atomic_savefig, atomic_write_text
    from loopscope.experiments import self_improve as si
    from loopscope.experiments import self_improve_figures as figs
    from loopscope.experiments.self_improve import SelfImproveConfig

    cfg = SelfImproveConfig.quick() if quick else SelfImproveConfig.full()
    changes = dict(
        rounds=rounds, n_models=models, vote_threshold=threshold, length_filter=length_filter,
        noise=noise, noise_rate=noise_rate, seed=seed,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})
    out = out or Path("runs") / ("self_improve" + ("-quick" if quick else ""))
    with prepare_out(out):
        res = si.self_improve(cfg, run_dir=out / "checkpoints", progress=not quiet)
        atomic_write_text(out / "table.csv", res.to_frame().to_csv(index=False))
        summary = {**res.summary(), "frontier": res.frontier().to_dict(), "config": cfg.to_dict()}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        for name, fn in (
            ("accuracy", figs.accuracy_by_length),
            ("fixed_points", figs.fixed_points_by_round),
            ("labels", figs.labels_by_round),
            ("panels", figs.panels),
        ):
            atomic_savefig(fn(res), out / f"{name}.png", dpi=120)
    typer.echo(json.dumps({"out": str(out), **{k: v for k, v in summary.items() if k != "config"}}))
