"""The ``loopscope`` command line.

Every command has ``--help`` with an example, shows a progress bar on long work, writes
machine-readable output (``--json`` or files) and turns bad input into a one-line error with exit
code 2 (no traceback; set ``LOOPSCOPE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from loopscope.cli.app import _fail, app, console, parse_inputs, resolve_model, zoo_app  # noqa: F401
from loopscope.core.errors import LoopscopeError


@zoo_app.callback()
def zoo_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON"),
) -> None:
    """List every zoo model with its ID/OOD accuracy.

    Example: loopscope zoo --json
    """
    if ctx.invoked_subcommand is not None:
        return
    from loopscope import zoo

    df = zoo.table()
    if as_json:
        typer.echo(df.to_json(orient="records", indent=1))
        return
    if df.empty:
        typer.echo("no zoo models shipped")
        return
    from rich.table import Table

    t = Table(title="loopscope zoo")
    for c in df.columns:
        t.add_column(str(c))
    for _, row in df.iterrows():
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.tolist()])
    Console().print(t)


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="recipe name (see `loopscope zoo recipes`)"),
    steps: int = typer.Option(None, help="override the recipe's step budget"),
    out: Path = typer.Option(None, help="write here instead of the package's zoo folder"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """(Re)train a zoo model from its recipe and write checkpoint + measured card.

    Example: loopscope zoo build s3_fprm
    """
    from loopscope.zoo.recipes import build

    card = build(name, steps=steps, out=out, progress=not quiet)
    typer.echo(json.dumps(card.get("accuracy", {}), indent=1))


@zoo_app.command("recipes")
def zoo_recipes() -> None:
    """List the recipes that `loopscope zoo build` knows."""
    from loopscope.zoo.recipes import RECIPES

    for n, r in RECIPES.items():
        typer.echo(f"{n}: task={r.train.task} preset={r.train.preset} steps={r.train.steps}")


@app.command()
def train(
    task: str = typer.Option(..., help="task name, e.g. s3, addition, maze_reach"),
    preset: str = typer.Option(..., help="model preset, e.g. fprm, universal, hrm"),
    out: Path = typer.Option(..., help="run directory (checkpoints, resumable)"),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(2e-3),
    seed: int = typer.Option(0),
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
    model, history = run_train(cfg, out_dir=out, progress=not quiet)
    save_model(
        model, out / "final", card={"train_config": cfg.to_dict(), "history_tail": history[-5:]}
    )
    typer.echo(
        json.dumps(
            {
                "out": str(out),
                "steps": cfg.steps,
                "final_loss": history[-1]["loss"] if history else None,
            }
        )
    )


@app.command()
def trace(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    out: Path = typer.Option(..., help="output path (writes OUT.safetensors + OUT.json)"),
    n_iter: int = typer.Option(16, "--n-iter", min=1, help="loop iterations"),
    inputs: str = typer.Option(None, help="token ids, rows separated by ';' (e.g. '6 1 2; 6 3 4')"),
    task: str = typer.Option(None, help="sample inputs from this task instead of --inputs"),
    split: str = typer.Option("id", help="task split"),
    n: int = typer.Option(8, min=1, help="number of task examples"),
    seed: int = typer.Option(0),
    capture: list[str] = typer.Option(None, help="hook names or globs to capture (repeatable)"),
) -> None:
    """Run a model and save every iteration as a Trace (safetensors + JSON).

    Example: loopscope trace s3_fprm --task s3 --n 8 --n-iter 32 --capture 'core.blocks.*.hook_resid_post' --out s3.trace
    """
    import loopscope as ls

    m = resolve_model(model)
    if (inputs is None) == (task is None):
        raise LoopscopeError("give exactly one of --inputs or --task")
    if task is not None:
        from loopscope import tasks

        tokens = tasks.get(task).sample(n, split=split, seed=seed).tokens
    else:
        tokens = parse_inputs(inputs)
    tr = ls.unroll(
        m,
        tokens,
        n_iter,
        capture=list(capture) if capture else None,
        seed=seed,
        decode=True,
        meta={"model": model, "task": task, "split": split if task else None, "seed": seed},
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
            }
        )
    )


def _model_and_task(model: str, task: str | None):
    """Load a model and its task (from the zoo card unless --task is given); check they match."""
    from loopscope import tasks, zoo

    m = resolve_model(model)
    if task is None:
        if model not in zoo.names():
            raise LoopscopeError("--task is required for a checkpoint directory")
        card = zoo.card(model)
        t = tasks.get(card["task"], **(card.get("task_params") or {}))
    else:
        t = tasks.get(task)
    vocab = getattr(getattr(m, "cfg", None), "vocab_size", None)
    if vocab is not None and vocab != t.vocab_size:
        raise LoopscopeError(
            f"model {model!r} (vocab {vocab}) does not match task {t.name!r} (vocab {t.vocab_size})"
        )
    return m, t


def _splits(text: str, task: Any) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    for s in out:
        if s not in task.splits:
            raise LoopscopeError(
                f"task {task.name!r} has no split {s!r}; splits: {', '.join(task.splits)}"
            )
    return out


@app.command()
def paper(
    out: Path = typer.Option(
        Path("paper_out"), help="output folder (figures, data tables, report)"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="use the shipped zoo and small samples (minutes on CPU)"
    ),
    seed: int = typer.Option(0),
    only: list[str] = typer.Option(None, help="only these figures (repeatable)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Regenerate the paper's figures and report from the zoo (resumable: reruns skip done figures).

    Example: loopscope paper --quick --out paper_out
    """
    from loopscope.paper import run_paper

    cmd = "loopscope paper" + (" --quick" if quick else "") + f" --out {out.name} --seed {seed}"
    recs = run_paper(
        out,
        quick=quick,
        seed=seed,
        only=list(only) if only else None,
        progress=not quiet,
        command=cmd,
    )
    typer.echo(
        json.dumps(
            {"out": str(out), "figures": [r.name for r in recs], "report": str(out / "report.md")}
        )
    )


@app.command()
def verdict(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    task: str = typer.Option(None, help="task (default: the zoo card's)"),
    n: int = typer.Option(128, min=2, help="examples per split"),
    seed: int = typer.Option(0),
    n_basin: int = typer.Option(
        8, min=0, help="Gaussian inits per sample for the correct-basin fraction (0 skips it)"
    ),
    n_probe: int = typer.Option(
        128, min=0, help="sequences for the probe onset vs depth (0 skips it)"
    ),
    out: Path = typer.Option(None, help="write the evidence table here (CSV)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON records"),
) -> None:
    """The evidence vector for "real algorithm" vs "memorized subgraphs / heuristics".

    Example: loopscope verdict addition_conv --n 64
    """
    from loopscope.analysis import verdict as run_verdict

    m, t = _model_and_task(model, task)
    df = run_verdict(m, t, n=n, seed=seed, n_basin=n_basin, n_probe=n_probe).to_frame()
    if out is not None:
        from loopscope.core.io import atomic_write_text

        atomic_write_text(out, df.to_csv(index=False))
    if as_json:
        typer.echo(df.to_json(orient="records", indent=1))
    else:
        typer.echo(df[["evidence", "split", "value", "reading", "supports"]].to_string(index=False))


# dense eigen-solve up to this state dimension, ARPACK above (as fig_spectra)
_DYN_DENSE_MAX = 2400


def _causal_cap(m: Any, tokens: Any, state: Any) -> int | None:
    """Positions to keep for the dense eigen-solve of a causal model whose state ``[B, pos, d]``
    is too large for it (ARPACK is unreliable on those block-triangular, strongly non-normal
    Jacobians), or None (no cap: small enough, not causal, or not prefix-closed on this state)."""
    import torch

    if not getattr(getattr(m, "cfg", None), "causal", False) or state.dim() != 3:
        return None
    if state[0].numel() <= _DYN_DENSE_MAX or tokens.dim() != 2:
        return None
    P = max(1, _DYN_DENSE_MAX // state.shape[2])
    if tokens.shape[1] != state.shape[1] or P >= state.shape[1]:
        return None
    try:  # the prefix's step must be the step's prefix, checked on this very state
        with torch.no_grad():
            full = m.step(state, m.encode(tokens), None)[:, :P]
            pre = m.step(state[:, :P].contiguous(), m.encode(tokens[:, :P]), None)
    except (LoopscopeError, RuntimeError, ValueError):
        return None
    tol = 1e-4 * float(full.abs().max().clamp_min(1.0))
    return P if (full - pre).abs().max().item() <= tol else None


def _stability_dynamics(
    m: Any, b: Any, tr: Any, n_dyn: int, seed: int, eig_rows: list | None = None
) -> dict[str, Any]:
    """The --dynamics columns of ``stability`` on the first ``n_dyn`` samples of batch ``b``
    and its trace ``tr``: rho at the end state, lambda1 from the middle of the trajectory,
    correct-basin fraction from init draws. A measurement that fails is NaN with a note.
    The leading eigenvalues are appended to ``eig_rows`` (sample, real, imag) when given."""
    import numpy as np
    import torch

    from loopscope.analysis import basins, lyapunov, spectrum
    from loopscope.analysis.attractors import InitSeeds

    nan = float("nan")
    k = min(n_dyn, tr.batch_size)
    out: dict[str, Any] = {
        "n_dyn": k,
        "rho_median": nan,
        "rho_max": nan,
        "rho_method": "",
        "lambda1_median": nan,
        "correct_basin_fraction": nan,
        "basin_diverged_fraction": nan,
    }
    notes: list[str] = []
    end = tr.final[:k]
    ok = torch.isfinite(end.reshape(k, -1)).all(1)
    if tr.diverged_at is not None:
        ok &= tr.diverged_at[:k] < 0
    keep = ok.nonzero().flatten()
    if len(keep) < k:
        notes.append(f"{k - len(keep)}/{k} diverged samples excluded")
    if len(keep) == 0:
        out["dyn_note"] = "; ".join(notes)
        return out
    tokens, targets = b.tokens[keep], b.targets[keep]

    def attempt(what: str, fn: Any) -> Any:
        try:
            return fn()
        except (LoopscopeError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            notes.append(f"{what} failed: {msg}")
            return None

    tok_rho, end_rho = tokens, end[keep]
    P = _causal_cap(m, tok_rho, end_rho)
    if P is not None:
        notes.append(
            f"rho on the first {P} of {end_rho.shape[1]} positions (causal: the prefix block's "
            "eigenvalues are a subset of the full Jacobian's, so a lower bound)"
        )
        tok_rho, end_rho = tok_rho[:, :P], end_rho[:, :P]
    sp = attempt(
        "rho",
        lambda: spectrum(
            m, tok_rho, end_rho, k=6, sigma=False, dense_max=_DYN_DENSE_MAX, seed=seed
        ),
    )
    if sp is not None:
        rho = np.asarray(sp.rho, dtype=float)
        out.update(rho_median=float(np.median(rho)), rho_max=float(rho.max()), rho_method=sp.method)
        if eig_rows is not None:
            for i, lams in enumerate(sp.eigenvalues):
                eig_rows.extend(
                    {"sample": int(keep[i]), "real": float(z.real), "imag": float(z.imag)}
                    for z in np.asarray(lams)
                )
    mid = tr.states[tr.n_iter // 2][keep]
    ly = attempt(
        "lambda1",
        lambda: lyapunov(
            m,
            tokens,
            h0=mid,
            n_steps=40,
            k=1,
            warmup=10,
            bootstrap=0,
            seed=seed,
            two_trajectory=False,
        ),
    )
    if ly is not None:
        lam = ly.exponents[:, 0].astype(float)
        if np.isnan(lam).any():
            notes.append(f"lambda1: {int(np.isnan(lam).sum())} diverged in the measurement")
        if not np.isnan(lam).all():
            out["lambda1_median"] = float(np.nanmedian(lam))
    bs = attempt(
        "basins",
        lambda: basins(
            m, tokens, seeds=InitSeeds(n=16), n_iter=tr.n_iter, targets=targets, seed=seed
        ),
    )
    if bs is not None:
        s = bs.seeds
        out["correct_basin_fraction"] = float(
            s.groupby("sample")["correct"].mean().astype(float).mean()
        )
        out["basin_diverged_fraction"] = float(s["diverged"].mean())
        ss = bs.seed_states
        if ss.shape[0] > 1 and bool((ss == ss[:1]).all()):
            notes.append("deterministic init: the 16 init draws are identical")
    out["dyn_note"] = "; ".join(notes)
    return out


@app.command()
def stability(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help="task (default: the zoo card's)"),
    n: int = typer.Option(64, min=1),
    iter_factor: float = typer.Option(3.0, help="iterations = factor x length"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("stability_out"), help="output folder (CSV + JSON + figure)"),
    dynamics: bool = typer.Option(
        True,
        "--dynamics/--no-dynamics",
        help="also measure rho of the Jacobian at the end state, the largest Lyapunov exponent "
        "and the correct-basin fraction on the first --n-dyn samples (slower)",
    ),
    n_dyn: int = typer.Option(4, "--n-dyn", min=1, help="samples for the --dynamics columns"),
) -> None:
    """Stability table per split: accuracy, converged / cycle / diverged fractions, T_conv, residual.

    With --dynamics (default), each row also has, on the first --n-dyn samples: rho_median /
    rho_max (spectral radius of the step's Jacobian at the end state; dense up to n = 2400, ARPACK
    above; causal models above it: dense on a prefix, a lower bound, noted), lambda1_median (largest Lyapunov exponent, QR method, 40 steps from the middle of the
    trajectory, nats per iteration), correct_basin_fraction (share of 16 draws of the model's
    init that end on the correct answer after the same iterations) and dyn_note (caps, excluded
    diverged samples, anything that could not be measured: NaN there, never a crash).

    Example: loopscope stability s3_fprm --split id,ood --out s3_stability
    """
    import numpy as np
    import pandas as pd

    from loopscope import unroll
    from loopscope.analysis import classify, metrics
    from loopscope.core.io import atomic_savefig, atomic_write_text

    m, t = _model_and_task(model, task)
    rows, curves, per_sample, eigs = [], [], [], []
    for sp in _splits(split, t):
        b = t.sample(n, sp, seed=seed)
        L = b.length
        tr = unroll(m, b.tokens, max(2, round(iter_factor * L)), seed=seed, decode=True)
        mt = metrics(tr, p_max=4)
        summ = mt.summary()
        cls = classify(tr, p_max=4)
        mask = b.targets != -100
        correct = ((tr.logits[-1].argmax(-1) == b.targets) | ~mask).all(1)
        ok = correct.float().mean().item()
        # the residual at t needs h_{t+1}: the last one measured is at T - 1
        mf = mt.to_frame()
        final_res = mf.loc[mf["iteration"] == tr.n_iter - 1, ["sample", "rel_residual"]]
        per_sample.append(final_res.assign(split=sp, correct=correct.numpy()[final_res["sample"]]))
        counts = (
            cls["class"]
            .astype(str)
            .str.replace(r"\(\d+\)", "", regex=True)
            .value_counts(normalize=True)
            .to_dict()
        )
        rows.append(
            {
                "model": model,
                "split": sp,
                "n": n,
                "n_iter": tr.n_iter,
                "seq_acc": ok,
                **summ,
                **{f"class_{k}": v for k, v in counts.items()},
            }
        )
        if dynamics:
            er: list = []
            rows[-1].update(_stability_dynamics(m, b, tr, n_dyn, seed, er))
            eigs.extend({"model": model, "split": sp, **r} for r in er)
        f = mt.to_frame()[["iteration", "sample", "rel_residual"]].assign(split=sp)
        curves.append(f)
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stability.csv", table.to_csv(index=False))
    atomic_write_text(out / "stability.json", table.to_json(orient="records", indent=1))
    from loopscope import figures
    from loopscope.report import set_style

    set_style()
    cv = pd.concat(curves)
    g = cv.groupby(["split", "iteration"])["rel_residual"]
    agg = pd.DataFrame(
        {"median": g.median(), "q25": g.quantile(0.25), "q75": g.quantile(0.75)}
    ).reset_index()
    agg["model"], agg["median_p2"], agg["accuracy"] = model, float("nan"), float("nan")
    fig = figures.convergence_curves(agg.dropna(subset=["median"]))
    atomic_savefig(fig, out / "residual_curves.png", dpi=120)
    # accuracy vs residual: is a settled loop a correct one?
    ps = pd.concat(per_sample, ignore_index=True).assign(model=model)
    atomic_write_text(out / "per_sample.csv", ps.to_csv(index=False))
    ps["log10 final relative residual"] = np.log10(ps["rel_residual"].clip(lower=1e-16))
    fig = figures.scatter_xy(
        ps, "log10 final relative residual", "correct", "split", f"{model}: correct vs residual"
    )
    atomic_savefig(fig, out / "accuracy_vs_residual.png", dpi=120)
    if eigs:
        ev = pd.DataFrame(eigs)
        atomic_write_text(out / "eigenvalues.csv", ev.to_csv(index=False))
        atomic_savefig(figures.eigen_scatter(ev), out / "eigenvalues.png", dpi=120)
    typer.echo(table.to_string(index=False))


@app.command()
def halting(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help="task (default: the zoo card's)"),
    n: int = typer.Option(128, min=1),
    iter_factor: float = typer.Option(3.0, help="budget = factor x length"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("halting_out"), help="output folder (CSV + figure)"),
) -> None:
    """Score every exit criterion offline on one recorded trace per split (accuracy vs iterations).

    Example: loopscope halting s3_act --split id,ood
    """
    import pandas as pd

    from loopscope import figures, unroll
    from loopscope.analysis import halting as H
    from loopscope.core.io import atomic_write_text
    from loopscope.report import set_style

    m, t = _model_and_task(model, task)
    frames = []
    for sp in _splits(split, t):
        b = t.sample(n, sp, seed=seed)
        L = b.length
        tr = unroll(m, b.tokens, max(2, round(iter_factor * L)), seed=seed, decode=True)
        mask = b.targets != -100
        correct = ((tr.logits.argmax(-1) == b.targets) | ~mask).all(-1)
        opts = (
            {"q": m.q_head} if getattr(getattr(m, "cfg", None), "halting", "none") == "act" else {}
        )
        rep = H.evaluate(tr, None, correct=correct, **opts)
        frames.append(rep.to_frame().assign(split=sp, model=model))
    df = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "halting.csv", df.to_csv(index=False))
    set_style()
    gaps = df.groupby(["criterion", "split"], as_index=False)["saturation_gap"].mean()
    figures.halting_tradeoff(df, gaps).savefig(out / "halting_tradeoff.png", dpi=120)
    typer.echo(
        df[
            ["split", "criterion", "threshold", "mean_steps", "accuracy", "compute_saved"]
        ].to_string(index=False)
    )


@app.command()
def probe(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    target: str = typer.Option(
        "state", help="task intermediate variable to probe (e.g. state, carry) or 'targets'"
    ),
    iterations: str = typer.Option("all", help="'all' or a number of iterations"),
    split: str = typer.Option("id,ood", help="comma-separated task splits"),
    task: str = typer.Option(None, help="task (default: the zoo card's)"),
    site: str = typer.Option(
        "state", help="'state' (h_t) or a hook name, e.g. core.blocks.0.hook_resid_post"
    ),
    n: int = typer.Option(256, min=8),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("probe_out"), help="output folder (tidy CSV + figure)"),
) -> None:
    """Fit linear probes for a task variable at every iteration and position (one batched solve each).

    Each split is one unroll and one batched ridge solve over every (iteration, position) probe
    (well under a second on the zoo models), so there is nothing worth checkpointing: the outputs
    (probes.csv, onset.csv, probes.png) are written atomically at the end, so an interrupted run
    leaves the previous complete files (or none), never half a file; rerun it to redo.

    Example: loopscope probe s3_fprm --target state --iterations all --split id,ood
    """
    import pandas as pd

    from loopscope import figures, unroll
    from loopscope.core.io import atomic_savefig, atomic_write_text
    from loopscope.probes import onset, probe_trace
    from loopscope.report import set_style

    m, t = _model_and_task(model, task)
    frames, onsets = [], []
    for sp in _splits(split, t):
        b = t.sample(n, sp, seed=seed)
        if target == "targets":
            y = b.targets
        elif target in b.intermediates:
            y = b.intermediates[target].clone()
            y[b.targets == -100] = -100
        else:
            raise LoopscopeError(
                f"task {t.name!r} has no variable {target!r}; variables: targets, {', '.join(b.intermediates)}"
            )
        L = b.length
        T = 2 * L if iterations == "all" else int(iterations)
        if T < 1:
            raise LoopscopeError(
                f"--iterations must be 'all' or a positive integer, got {iterations!r}"
            )
        tr = unroll(m, b.tokens, T, seed=seed, capture=None if site == "state" else [site])
        _, df = probe_trace(tr, y, site=site, pooled=False, seed=seed)
        df["split"] = sp
        frames.append(df)
        on = onset(df)
        on["split"] = sp
        onsets.append(on)
    df, on = pd.concat(frames, ignore_index=True), pd.concat(onsets, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probes.csv", df.to_csv(index=False))
    atomic_write_text(out / "onset.csv", on.to_csv(index=False))
    set_style()
    atomic_savefig(figures.probe_wavefront(df, on), out / "probes.png", dpi=120)
    typer.echo(on.to_string(index=False))


@app.command()
def patch(
    model: str = typer.Argument(..., help="zoo name or checkpoint directory"),
    task: str = typer.Option(None, help="task (default: the zoo card's)"),
    iterations: str = typer.Option("all", help="'all' or comma-separated iterations"),
    site: str = typer.Option("hook_state", help="hook to patch"),
    position: int = typer.Option(1, help="input position whose token the corruption changes"),
    n: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
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
) -> None:
    """Per-iteration denoising sweep over (iteration x position) with single-token corruptions.

    Resumable: every finished chunk of --batch-size patches is written atomically to
    OUT/checkpoint, so a killed run continues where it stopped when rerun with the same
    arguments (same rows, bit for bit); different settings on the same OUT are refused.

    Example: loopscope patch s3_fprm --iterations all --out s3_patch
    """
    import torch

    from loopscope import figures
    from loopscope.circuits import patch_sweep
    from loopscope.core.errors import CheckpointError
    from loopscope.core.io import ChunkCheckpoint, atomic_savefig, atomic_write_text
    from loopscope.report import set_style

    m, t = _model_and_task(model, task)
    b = t.sample(n, "id", seed=seed)
    if not 0 <= position < b.tokens.shape[1]:
        raise LoopscopeError(f"--position {position} out of range 0..{b.tokens.shape[1] - 1}")
    clean = b.tokens
    corrupt = clean.clone()
    corrupt[:, position] = (corrupt[:, position] + 1) % t.vocab_size
    L = b.length
    T = 2 * L
    its = "all" if iterations == "all" else [int(x) for x in iterations.split(",")]
    ans = b.targets.clone()
    ans[ans == -100] = 0

    def metric(lg: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        lp = lg.log_softmax(-1).gather(-1, ans[i].unsqueeze(-1))[..., 0]
        return (lp * (b.targets[i] != -100)).sum(-1)

    ck = out / "checkpoint"
    if not resume:
        ChunkCheckpoint.discard(ck)
    try:
        df = patch_sweep(
            m, clean, corrupt, [site], its, metric, n_iter=T, seed=seed, batch_size=batch_size,
            checkpoint_dir=ck,
        )  # fmt: skip
    except CheckpointError as e:
        raise CheckpointError(f"{e} (or rerun with --no-resume)") from None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "patching.csv", df.to_csv(index=False))
    set_style()
    fig = figures.heatmap(
        df, "iteration", "position", "recovery", f"{model}: denoising recovery ({site})", center=0
    )
    atomic_savefig(fig, out / "patching.png", dpi=120)
    info = df.attrs["checkpoint"]
    typer.echo(
        json.dumps(
            {
                "rows": len(df),
                "out": str(out),
                "mean_recovery": float(df["recovery"].mean()),
                "chunks": info["total"],
                "resumed": info["resumed"],
            }
        )
    )
