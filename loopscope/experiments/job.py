"""One study job: train a model, then measure it per split with the experiments layer; one row.

:func:`run_job` trains (resumably, in ``train_dir``), saves the model (``<work>/model``) and
hands it to :func:`analyse`, which for every split of ``job.analysis`` calls

- :func:`~loopscope.experiments.stability.stability` (one split, the job's iteration budget):
  sequence and token accuracy, converged / cycle / diverged fractions (the trajectory census),
  residual at the budget, and on the first ``n_dyn`` samples the spectral radius of the step's
  Jacobian at the end state, the largest Lyapunov exponent and the correct-basin fraction;
- :func:`~loopscope.experiments.halting.halting_study`: every exit criterion's mean steps and
  accuracy on the same budget;
- per-layer residuals of the core blocks' ``hook_resid_post`` at the last iteration, fixed-point
  (``rel_residual``) and cycle-aware (``period_residual``, smallest over periods 1 and 2: small
  with a large ``rel_residual`` = a period-2 cycle), by
  :func:`~loopscope.analysis.convergence.compute_arrays`;
- with ``analysis.verdict`` set, the evidence rows of :func:`~loopscope.experiments.verdict.
  verdict` (confident-wrong fraction, path independence, settling vs depth, ...) as
  ``verdict.<split>.<evidence>`` columns.

The row is flat: ``<split>.<metric>`` columns plus the job's config columns. A per-split trace
summary (``trace_summary.json``) goes next to the model. A measurement that fails is NaN in the
row with a note in ``<split>.dyn_note`` (never a crash); a job whose training fails raises, and
the sweep records the error.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.experiments.grid import Job

__all__ = ["run_job", "analyse", "config_columns", "VERDICT_DEFAULTS"]

_NAN = float("nan")
#: verdict settings of ``analysis.verdict = true`` (a table there overrides them)
VERDICT_DEFAULTS: dict[str, Any] = {
    "n": 64,
    "iter_factor": 3.0,
    "n_basin": 8,
    "n_probe": 0,
    "splits": ["id", "ood"],
}
_EVIDENCE = {  # verdict evidence -> column name
    "sequence accuracy": "seq_acc",
    "confident-wrong (settled and wrong)": "confident_wrong",
    "T_conv vs depth (Spearman)": "tconv_depth_spearman",
    "answer settling step vs depth (Spearman)": "settle_depth_spearman",
    "path independence AA (readout)": "path_independence_aa",
    "correct-basin fraction (noise inits)": "correct_basin",
    "probe onset vs depth (Spearman)": "probe_onset_spearman",
}


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
    """The split's budget: ``evals[split]`` (``n_iter`` or ``iter_factor``) or the job's factor,
    rounded as :func:`~loopscope.experiments.stability.stability` rounds it."""
    rule = job.analysis["evals"].get(split, {})
    if "n_iter" in rule:
        return int(rule["n_iter"])
    return max(2, round(float(rule.get("iter_factor", job.analysis["iter_factor"])) * length))


def _layer_residuals(tr: Any) -> dict[str, float]:
    """Median over samples, per captured hook, of the relative fixed-point residual at the last
    measured iteration and of the cycle-aware residual (periods 1-2) at the last state."""
    import torch

    from loopscope.analysis.convergence import compute_arrays

    out: dict[str, float] = {}
    for name in tr.keys():
        acts = tr[name]
        labels = tr.labels.get(tr._canonical(name)) or [(t, 0) for t in range(acts.shape[0])]
        last = {int(lab[0]): i for i, lab in enumerate(labels)}  # last firing per iteration
        its = sorted(last)
        if len(its) < 3:
            continue
        # the last three states are all the last residuals need (period <= 2)
        X = torch.stack([acts[last[t]] for t in its[-3:]]).double()  # [3, B, ...]
        X = X.reshape(X.shape[0], X.shape[1], 1, -1)
        arr = compute_arrays(X, p_max=2)
        short = name.replace(".hook_resid_post", "").replace("blocks.", "")
        out[f"layer.{short}.rel_residual"] = float(arr["rel_residual"][-2].nanmedian())
        out[f"layer.{short}.period_residual"] = float(arr["period_residual"][-1].nanmedian())
    return out


def _halting_columns(df: Any) -> dict[str, float]:
    """Mean steps and accuracy of every adaptive criterion (fixed depths: the budget's row)."""
    out: dict[str, float] = {}
    for r in df.itertuples():
        if r.criterion == "fixed":
            continue
        out[f"halt.{r.criterion}.mean_steps"] = float(r.mean_steps)
        out[f"halt.{r.criterion}.accuracy"] = float(r.accuracy)
    return out


def _split_columns(model: Any, task: Any, job: Job, split: str) -> tuple[dict[str, Any], dict]:
    """The row's columns for one split (unprefixed) and the split's trace summary."""
    from loopscope import unroll
    from loopscope.experiments.halting import halting_study
    from loopscope.experiments.stability import stability

    a = job.analysis
    n, seed = int(a["n"]), int(a["seed"])
    b = task.sample(n, split, seed=seed)
    T = _n_iter(job, split, b.length)
    factor = T / b.length  # stability / halting_study round factor x length back to T
    st = stability(
        model, task, splits=[split], n=n, iter_factor=factor, seed=seed, n_dyn=int(a["n_dyn"])
    )
    srow = st.table.iloc[0].to_dict()
    classes = {k[len("class_") :]: float(v) for k, v in srow.items() if k.startswith("class_")}
    row: dict[str, Any] = {
        "n_iter": int(srow["n_iter"]),
        "token_acc": float(srow["token_acc"]),
        "seq_acc": float(srow["seq_acc"]),
        "converged_fraction": float(srow["converged_fraction"]),
        "cycle_fraction": classes.get("cycle", 0.0),
        "diverged_fraction": float(srow["diverged_fraction"]),
        "residual_at_budget": float(srow["residual_at_budget"]),
        "t_conv_mean": float(srow["t_conv_mean"]),
    }
    for c in ("n_dyn", "rho_median", "rho_max", "lambda1_median", "correct_basin_fraction"):
        row[c] = srow.get(c, _NAN)
    row["basin_diverged_fraction"] = srow.get("basin_diverged_fraction", _NAN)
    row["dyn_note"] = srow.get("dyn_note", "")
    tr = unroll(model, b.tokens, T, seed=seed, capture="*hook_resid_post")
    row.update(_layer_residuals(tr))
    halt = halting_study(model, task, splits=[split], n=n, iter_factor=factor, seed=seed)
    halt_df = halt.to_frame()
    row.update(_halting_columns(halt_df))
    summary = {
        "split": split,
        "n": n,
        "n_iter": T,
        "stability": {k: v for k, v in srow.items() if not isinstance(v, float) or v == v},
        "classes": classes,
        "halting": halt_df.drop(columns=["model"], errors="ignore").to_dict(orient="records"),
    }
    return row, summary


def _slug(text: str) -> str:
    return _EVIDENCE.get(text) or re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def _verdict_columns(model: Any, task: Any, job: Job) -> dict[str, float]:
    """``verdict.<split>.<evidence>`` (and ``..._ci_low`` / ``_ci_high`` where a CI exists)."""
    from loopscope.experiments.verdict import verdict

    opts = job.analysis["verdict"]
    opts = dict(VERDICT_DEFAULTS, **(opts if isinstance(opts, dict) else {}))
    unknown = set(opts) - set(VERDICT_DEFAULTS)
    if unknown:
        raise LoopscopeError(f"unknown analysis.verdict setting(s) {sorted(unknown)}")
    splits = tuple(s for s in opts["splits"] if s in task.splits)
    v = verdict(
        model,
        task,
        n=int(opts["n"]),
        seed=int(job.analysis["seed"]),
        iter_factor=float(opts["iter_factor"]),
        splits=splits,
        n_basin=int(opts["n_basin"]),
        n_probe=int(opts["n_probe"]),
    )
    out: dict[str, float] = {}
    for r in v.to_frame().itertuples():
        col = f"verdict.{r.split}.{_slug(str(r.evidence))}"
        out[col] = float(r.value)
        if r.ci_low == r.ci_low:  # not NaN
            out[col + "_ci_low"], out[col + "_ci_high"] = float(r.ci_low), float(r.ci_high)
    return out


@did_you_mean
def analyse(model: Any, job: Job) -> tuple[dict[str, Any], list[dict]]:
    """Measure a trained ``model`` as ``job.analysis`` says: ``(columns, trace summaries)``.

    Columns are ``<split>.<metric>`` (see the module docstring) plus ``verdict.*`` when asked;
    the summaries are one JSON-able dict per split.

    Example:
        >>> cols, _ = analyse(zoo.load("s3_fprm"), job)  # doctest: +SKIP
    """
    from loopscope import tasks

    task = tasks.get(job.task, **job.task_params)
    cols: dict[str, Any] = {}
    summaries = []
    for split in job.analysis["splits"]:
        c, summ = _split_columns(model, task, job, split)
        cols.update({f"{split}.{k}": v for k, v in c.items()})
        summaries.append(summ)
    if job.analysis.get("verdict"):
        cols.update(_verdict_columns(model, task, job))
    return cols, summaries


def _zoo_model(job: Job) -> tuple[Any, list[dict]]:
    """The shipped model of ``job.recipe``, refused unless its card's training config is the
    job's (so the row measures exactly what training the job would have produced)."""
    from loopscope import zoo

    card = zoo.card(job.recipe)
    want = json.loads(json.dumps(job.train_config().to_dict()))
    have = json.loads(json.dumps(card.get("train_config", {})))
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        raise LoopscopeError(
            f"zoo model {job.recipe!r} was not trained with this job's config (differs in "
            f'{", ".join(diff)}): drop checkpoint = "zoo" to train it'
        )
    final = card.get("final_loss")
    return zoo.load(job.recipe), [{"loss": _NAN if final is None else final, "wall_s": _NAN}]


@did_you_mean
def run_job(
    job: Job, *, work_dir: str | Path = "runs/job", train_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train ``job`` (resuming a checkpoint in ``train_dir``, default ``work_dir/train``) and
    analyse it (:func:`analyse`); one flat row.

    Runs on one torch thread (restored afterwards), so the row is the same on a Ray worker and
    in-process: same job, same row (``wall_s`` aside). Writes ``work_dir/model`` (the trained
    model) and ``work_dir/trace_summary.json``.

    Example:
        >>> row = run_job(job, work_dir="runs/sweep/demo/jobs/" + job.key)  # doctest: +SKIP
    """
    import torch

    from loopscope.core.io import atomic_write_text
    from loopscope.models.checkpoint import save_model
    from loopscope.train import train

    work = Path(work_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        if job.checkpoint == "zoo":
            model, history = _zoo_model(job)
        else:
            tdir = Path(train_dir) if train_dir is not None else work / "train"
            model, history = train(job.train_config(), out_dir=tdir, progress=False)
        train_s = float(history[-1].get("wall_s", _NAN)) if history else _NAN
        model.eval()
        row: dict[str, Any] = {
            **config_columns(job),
            "status": "ok",
            "error": "",
            "train_key": job.train_key,
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "final_loss": float(history[-1]["loss"]) if history else _NAN,
        }
        t1 = time.perf_counter()
        cols, summaries = analyse(model, job)
        row.update(cols)
        save_model(model, work / "model", card={"job": job.to_dict(), "key": job.key})
        atomic_write_text(work / "trace_summary.json", json.dumps(summaries, indent=1, default=str))
        row["analysis_s"] = time.perf_counter() - t1
        row["train_s"] = train_s
    finally:
        torch.set_num_threads(threads)
    row["wall_s"] = time.perf_counter() - t0
    return row
