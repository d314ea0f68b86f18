"""One study job: train a model, then measure its stability dynamics per split; one row back.

:func:`run_job` trains (resumably, in ``<work>/train``), saves the model (``<work>/model``), and
for every split of ``job.analysis`` records one trace at the evaluation budget and measures:
accuracy (token, sequence), converged / cycle / diverged fractions (:func:`~loopscope.analysis.
classify`), residual at the budget, spectral radius of the step's Jacobian at the end state,
largest Lyapunov exponent, correct-basin fraction (these three by
:func:`~loopscope.experiments.stability.stability_dynamics`), per-layer fixed-point and period-2 residuals
and halting figures. The row is flat: ``<split>.<metric>`` columns plus the job's config columns.
A per-split trace summary (``trace_summary.json``) and the halting table go next to the model.

A measurement that fails is NaN in the row with a note in ``<split>.dyn_note`` (never a crash);
a job whose training fails raises, and the sweep records the error.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from loopscope.core.errors import did_you_mean
from loopscope.experiments.grid import Job

__all__ = ["run_job", "config_columns"]

_NAN = float("nan")
_HALT_CRITERIA = {"residual": [1e-3], "kl": [1e-3], "argmax_stable": [5]}


def config_columns(job: Job) -> dict[str, Any]:
    """The job's identity columns: key, label, task, preset, recipe, seed and its grid axes."""
    cols: dict[str, Any] = {
        "key": job.key,
        "label": job.label,
        "task": job.task,
        "preset": job.preset,
        "recipe": job.recipe or "",
        "seed": int(job.seed),
    }
    for k, v in job.axes.items():
        if k not in cols:
            cols[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return cols


def _n_iter(job: Job, split: str, length: int) -> int:
    rule = job.analysis["evals"].get(split, {})
    if "n_iter" in rule:
        return int(rule["n_iter"])
    return max(2, math.ceil(float(rule.get("iter_factor", job.analysis["iter_factor"])) * length))


def _layer_residuals(tr: Any) -> dict[str, float]:
    """Median over samples of each captured hook's relative change at the last iteration, over
    one step (``r1``) and over two (``r2``: small with large ``r1`` = a period-2 cycle)."""
    out: dict[str, float] = {}
    for name in tr.keys():
        acts = tr[name]
        labels = tr.labels.get(tr._canonical(name)) or [(t, 0) for t in range(acts.shape[0])]
        last = {}
        for i, lab in enumerate(labels):  # the last firing of the hook in each iteration
            last[int(lab[0])] = i
        its = sorted(last)
        if len(its) < 3:
            continue
        x = [acts[last[t]].double().flatten(1) for t in its[-3:]]
        norm = x[2].norm(dim=1).clamp_min(1e-12)
        short = name.replace(".hook_resid_post", "").replace("blocks.", "")
        out[f"layer.{short}.r1"] = float(((x[2] - x[1]).norm(dim=1) / norm).nanmedian())
        out[f"layer.{short}.r2"] = float(((x[2] - x[0]).norm(dim=1) / norm).nanmedian())
    return out


def _halting(model: Any, tr: Any, correct: Any) -> tuple[dict[str, float], Any]:
    from loopscope.analysis import halting as H

    crit = dict(_HALT_CRITERIA)
    opts = {}
    if getattr(getattr(model, "cfg", None), "halting", "none") == "act":
        crit["q_head"] = [0.0]
        opts["q"] = model.q_head
    rep = H.evaluate(tr, crit, correct=correct, **opts)
    df = rep.to_frame()
    out = {}
    for r in df.itertuples():
        name = str(r.criterion).split("<")[0].split(">")[0].split("(")[0]
        out[f"halt.{name}.mean_steps"] = float(r.mean_steps)
        out[f"halt.{name}.accuracy"] = float(r.accuracy)
    return out, df


def _split_row(model: Any, task: Any, job: Job, split: str) -> tuple[dict[str, Any], dict]:
    """The row's columns for one split (unprefixed) and the split's trace summary."""
    from loopscope import unroll
    from loopscope.analysis import classify, metrics
    from loopscope.core.targets import labelled, sequence_correct, token_correct
    from loopscope.experiments.stability import stability_dynamics

    a = job.analysis
    b = task.sample(int(a["n"]), split, seed=int(a["seed"]))
    T = _n_iter(job, split, b.length)
    tr = unroll(model, b.tokens, T, seed=int(a["seed"]), decode=True, capture="*hook_resid_post")
    pred = tr.logits.argmax(-1)  # [T+1, B, pos]
    tok = token_correct(pred[-1], b.targets) & labelled(b.targets)
    summ = metrics(tr, p_max=4).summary()
    shares = {
        k[len("class[") : -1]: v
        for k, v in classify(tr, p_max=4).summary().items()
        if k.startswith("class[")
    }
    row: dict[str, Any] = {
        "n_iter": T,
        "token_acc": float(tok.sum() / labelled(b.targets).sum().clamp_min(1)),
        "seq_acc": float(sequence_correct(pred[-1], b.targets).double().mean()),
        "converged_fraction": summ["converged_fraction"],
        "cycle_fraction": float(shares.get("cycle", 0.0)),
        "diverged_fraction": summ["diverged_fraction"],
        "residual_at_budget": summ["residual_at_budget"],
        "t_conv_mean": summ["t_conv_mean"],
    }
    dyn, _ = stability_dynamics(model, b, tr, n_dyn=int(a["n_dyn"]), seed=int(a["seed"]))
    row.update(dyn)
    row.update(_layer_residuals(tr))
    halt, halt_df = _halting(model, tr, sequence_correct(pred, b.targets))
    row.update(halt)
    summary = {
        "split": split,
        "n": int(b.tokens.shape[0]),
        "n_iter": T,
        "metrics": summ,
        "classes": {str(k): float(v) for k, v in shares.items()},
        "halting": halt_df.to_dict(orient="records"),
    }
    return row, summary


@did_you_mean
def run_job(
    job: Job, *, work_dir: str | Path = "runs/job", train_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train ``job`` (resuming a checkpoint in ``train_dir``, default ``work_dir/train``) and
    analyse it; one flat row.

    Runs on one torch thread (restored afterwards), so the row is the same on a Ray worker and
    in-process: same job, same row (``wall_s`` aside). Writes ``work_dir/model`` (the trained
    model) and ``work_dir/trace_summary.json``.

    Example:
        >>> row = run_job(job, work_dir="runs/sweep/demo/jobs/" + job.key)  # doctest: +SKIP
    """
    import torch

    from loopscope import tasks
    from loopscope.core.io import atomic_write_text
    from loopscope.models.checkpoint import save_model
    from loopscope.train import train

    work = Path(work_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        cfg = job.train_config()
        tdir = Path(train_dir) if train_dir is not None else work / "train"
        model, history = train(cfg, out_dir=tdir, progress=False)
        task = tasks.get(cfg.task, **cfg.task_params)
        row: dict[str, Any] = {
            **config_columns(job),
            "status": "ok",
            "error": "",
            "train_key": job.train_key,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "final_loss": float(history[-1]["loss"]) if history else _NAN,
        }
        summaries = []
        for split in job.analysis["splits"]:
            cols, summ = _split_row(model, task, job, split)
            row.update({f"{split}.{k}": v for k, v in cols.items()})
            summaries.append(summ)
        save_model(model, work / "model", card={"job": job.to_dict(), "key": job.key})
        atomic_write_text(work / "trace_summary.json", json.dumps(summaries, indent=1, default=str))
    finally:
        torch.set_num_threads(threads)
    row["wall_s"] = time.perf_counter() - t0
    return row
