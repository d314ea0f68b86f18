"""The stability experiment: for a model and a task, per split, how often the loop settles and
whether settling means being right, plus the local dynamics at the end state.

Per split it unrolls ``iter_factor x length`` iterations and measures sequence accuracy, the
trajectory census (converged / cycle / slider / chaotic / diverged / max_iter fractions, via
:func:`loopscope.analysis.classify`), convergence metrics, and with ``dynamics=True`` on the
first ``n_dyn`` samples: the spectral radius of the step's Jacobian at the end state, the
largest Lyapunov exponent from the middle of the trajectory, and the correct-basin fraction.

Example::

    res = stability(zoo.load("s3_fprm"), tasks.get("s3"), splits=("id", "ood"), n=32)
    res.to_frame()[["split", "seq_acc", "rho_median"]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, result_meta
from loopscope.core.targets import labelled, sequence_correct, token_correct
from loopscope.core.trace import Trace
from loopscope.core.unroll import unroll
from loopscope.experiments.common import cap_iterations, check_budget, check_splits

__all__ = [
    "stability",
    "stability_dynamics",
    "stability_figures",
    "end_spectrum",
    "mid_lambda1",
    "causal_cap",
    "StabilityResult",
    "DYN_DENSE_MAX",
]

#: dense eigen-solve up to this state dimension, ARPACK above
DYN_DENSE_MAX = 2400


def causal_cap(loop: Loop, tokens: torch.Tensor, state: torch.Tensor) -> int | None:
    """Positions to keep for the dense eigen-solve of a causal model whose state ``[B, pos, d]``
    is too large for it (ARPACK is unreliable on those block-triangular, strongly non-normal
    Jacobians), or None (no cap: small enough, not causal, or not prefix-closed on this state).
    """
    if not getattr(getattr(loop, "cfg", None), "causal", False) or state.dim() != 3:
        return None
    if state[0].numel() <= DYN_DENSE_MAX or tokens.dim() != 2:
        return None
    P = max(1, DYN_DENSE_MAX // state.shape[2])
    if tokens.shape[1] != state.shape[1] or P >= state.shape[1]:
        return None
    try:  # the prefix's step must be the step's prefix, checked on this very state
        with torch.no_grad():
            full = loop.step(state, loop.encode(tokens), None)[:, :P]
            pre = loop.step(state[:, :P].contiguous(), loop.encode(tokens[:, :P]), None)
    except (LoopscopeError, RuntimeError, ValueError):
        return None
    tol = 1e-4 * float(full.abs().max().clamp_min(1.0))
    return P if (full - pre).abs().max().item() <= tol else None


class _Notes(list):
    """Notes of what could not be measured; ``attempt`` runs a measurement, noting a failure."""

    def attempt(self, what: str, fn: Any) -> Any:
        try:
            return fn()
        except (LoopscopeError, RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            self.append(f"{what} failed: {msg}")
            return None


def _healthy(trace: Trace, k: int) -> torch.Tensor:
    """Indices among the first ``k`` samples whose end state is finite and never diverged."""
    end = trace.final[:k]
    ok = torch.isfinite(end.reshape(k, -1)).all(1)
    if trace.diverged_at is not None:
        ok &= trace.diverged_at[:k] < 0
    return ok.nonzero().flatten()


def end_spectrum(
    loop: Loop, tokens: torch.Tensor, end: torch.Tensor, *, dense_max: int = DYN_DENSE_MAX,
    seed: int = 0,
) -> Any:  # fmt: skip
    """The 6 leading eigenvalues of the step's Jacobian at the end states ``end [B, ...]``
    (dense up to ``dense_max``, ARPACK above; no singular values): a ``Spectrum`` result."""
    from loopscope.analysis import spectrum

    return spectrum(loop, tokens, end, k=6, sigma=False, dense_max=dense_max, seed=seed)


def mid_lambda1(
    loop: Loop, tokens: torch.Tensor, mid: torch.Tensor, *, n_steps: int = 40, seed: int = 0
) -> Any:
    """The largest Lyapunov exponent from the states ``mid`` (QR method, ``n_steps`` after 10
    warm-up steps, no bootstrap): a ``LyapunovResult``; ``.exponents[:, 0]`` is lambda1."""
    from loopscope.analysis import lyapunov

    return lyapunov(
        loop, tokens, h0=mid, n_steps=n_steps, k=1, warmup=10, bootstrap=0, seed=seed,
        two_trajectory=False,
    )  # fmt: skip


def _rho(loop: Loop, tokens, end, keep, seed: int, notes: _Notes, eig_rows: list) -> dict:
    P = causal_cap(loop, tokens, end)
    if P is not None:
        notes.append(
            f"rho on the first {P} of {end.shape[1]} positions (causal: the prefix block's "
            "eigenvalues are a subset of the full Jacobian's, so a lower bound)"
        )
        tokens, end = tokens[:, :P], end[:, :P]
    sp = notes.attempt("rho", lambda: end_spectrum(loop, tokens, end, seed=seed))
    if sp is None:
        return {}
    rho = np.asarray(sp.rho, dtype=float)
    for i, lams in enumerate(sp.eigenvalues):
        eig_rows.extend(
            {"sample": int(keep[i]), "real": float(z.real), "imag": float(z.imag)}
            for z in np.asarray(lams)
        )
    return {
        "rho_median": float(np.median(rho)),
        "rho_max": float(rho.max()),
        "rho_method": sp.method,
    }


def _lambda1(loop: Loop, tokens, mid, seed: int, notes: _Notes) -> dict:
    ly = notes.attempt("lambda1", lambda: mid_lambda1(loop, tokens, mid, seed=seed))
    if ly is None:
        return {}
    lam = ly.exponents[:, 0].astype(float)
    if np.isnan(lam).any():
        notes.append(f"lambda1: {int(np.isnan(lam).sum())} diverged in the measurement")
    return {} if np.isnan(lam).all() else {"lambda1_median": float(np.nanmedian(lam))}


def _basin(loop: Loop, tokens, targets, n_iter: int, seed: int, notes: _Notes) -> dict:
    from loopscope.analysis import basins
    from loopscope.analysis.attractors import InitSeeds

    if loop.n_steps(loop.encode(tokens)) is not None:  # basins iterate one fixed map
        notes.append("basins: skipped (one input block per step: no fixed map to iterate)")
        return {}
    bs = notes.attempt(
        "basins",
        lambda: basins(
            loop, tokens, seeds=InitSeeds(n=16), n_iter=n_iter, targets=targets, seed=seed
        ),
    )
    if bs is None:
        return {}
    s = bs.seeds
    ss = bs.seed_states
    if ss.shape[0] > 1 and bool((ss == ss[:1]).all()):
        notes.append("deterministic init: the 16 init draws are identical")
    return {
        "correct_basin_fraction": float(s.groupby("sample")["correct"].mean().astype(float).mean()),
        "basin_diverged_fraction": float(s["diverged"].mean()),
    }


def stability_dynamics(
    loop: Loop, batch: Any, trace: Trace, *, n_dyn: int = 4, seed: int = 0
) -> tuple[dict[str, Any], list[dict]]:
    """The dynamics columns on the first ``n_dyn`` samples of ``batch`` and its ``trace``.

    Returns ``(row, eigenvalue_rows)``: ``row`` holds ``n_dyn``, ``rho_median`` / ``rho_max`` /
    ``rho_method`` (spectral radius of the step's Jacobian at the end state; dense up to
    :data:`DYN_DENSE_MAX`, ARPACK above; causal models above it: dense on a prefix, a lower
    bound, noted), ``lambda1_median`` (largest Lyapunov exponent, QR method, 40 steps from the
    middle of the trajectory), ``correct_basin_fraction`` / ``basin_diverged_fraction`` (16 draws
    of the model's init) and ``dyn_note``. A measurement that fails is NaN with a note, never a
    crash; diverged samples are excluded and noted. ``eigenvalue_rows`` are
    ``{sample, real, imag}`` of the leading eigenvalues.
    """
    nan = float("nan")
    k = min(n_dyn, trace.batch_size)
    row: dict[str, Any] = {
        "n_dyn": k, "rho_median": nan, "rho_max": nan, "rho_method": "", "lambda1_median": nan,
        "correct_basin_fraction": nan, "basin_diverged_fraction": nan,
    }  # fmt: skip
    notes, eig_rows = _Notes(), []
    keep = _healthy(trace, k)
    if len(keep) < k:
        notes.append(f"{k - len(keep)}/{k} diverged samples excluded")
    if len(keep) > 0:
        tokens, targets = batch.tokens[keep], batch.targets[keep]
        row.update(_rho(loop, tokens, trace.final[:k][keep], keep, seed, notes, eig_rows))
        row.update(_lambda1(loop, tokens, trace.states[trace.n_iter // 2][keep], seed, notes))
        row.update(_basin(loop, tokens, targets, trace.n_iter, seed, notes))
    row["dyn_note"] = "; ".join(notes)
    return row, eig_rows


@dataclass(kw_only=True, repr=False)
class StabilityResult(Result):
    """One row per split (``table``), plus the per-iteration residual curves, the per-sample
    final residual and correctness, and the leading eigenvalues at the end states."""

    table: pd.DataFrame
    curves: pd.DataFrame  # iteration, sample, rel_residual, split
    per_sample: pd.DataFrame  # sample, rel_residual, split, correct
    eigenvalues: pd.DataFrame = field(default_factory=pd.DataFrame)  # split, sample, real, imag

    def to_frame(self) -> pd.DataFrame:
        return self.table.copy()

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, r in self.table.iterrows():
            for c in ("seq_acc", "converged_fraction", "rho_median", "lambda1_median"):
                if c in r and pd.notna(r[c]):
                    out[f"{r['split']}/{c}"] = float(r[c])
        return out


def _split_row(loop: Loop, batch: Any, trace: Trace, name: str, split: str, n: int) -> tuple:
    from loopscope.analysis import classify, metrics

    mt = metrics(trace, p_max=4)
    cls = classify(trace, p_max=4)
    cls = cls.to_frame() if hasattr(cls, "to_frame") else cls
    pred = trace.logits[-1].argmax(-1)
    correct = sequence_correct(pred, batch.targets)
    tok_ok = token_correct(pred, batch.targets) & labelled(batch.targets)
    token_acc = float(tok_ok.sum() / labelled(batch.targets).sum().clamp_min(1))
    # the residual at t needs h_{t+1}: the last one measured is at T - 1
    mf = mt.to_frame()
    final = mf.loc[mf["iteration"] == trace.n_iter - 1, ["sample", "rel_residual"]]
    per_sample = final.assign(split=split, correct=correct.numpy()[final["sample"]])
    classes = cls["class"].astype(str).str.replace(r"\(\d+\)", "", regex=True)
    row = {
        "model": name, "split": split, "n": n, "n_iter": trace.n_iter,
        "seq_acc": correct.float().mean().item(), "token_acc": token_acc, **mt.summary(),
        **{f"class_{k}": v for k, v in classes.value_counts(normalize=True).to_dict().items()},
    }  # fmt: skip
    # per iteration: the period-2 residual ||h_t - h_(t-2)|| / ||h_t|| (small with a large 1-step
    # residual = a 2-cycle) and the token accuracy of the readout at h_t
    tok_t = token_correct(trace.logits.argmax(-1), batch.targets) & labelled(batch.targets)
    acc_t = (tok_t.sum(-1) / labelled(batch.targets).sum(-1).clamp_min(1)).double()  # [T+1, B]
    curve = mf[["iteration", "sample", "rel_residual"]].assign(
        rel_residual_p2=(mf["res_p2"] / mf["norm"].where(mf["norm"] > 0)).to_numpy(),
        token_acc=acc_t.numpy()[mf["iteration"].to_numpy(), mf["sample"].to_numpy()],
        split=split,
    )
    return row, curve, per_sample


@did_you_mean
def stability(
    loop: Loop,
    task: Any,
    *,
    splits: tuple[str, ...] | list[str] = ("id", "ood"),
    n: int = 64,
    iter_factor: float = 3.0,
    seed: int = 0,
    dynamics: bool = True,
    n_dyn: int = 4,
    model_name: str | None = None,
) -> StabilityResult:
    """The stability table of ``loop`` on ``task``: one row per split.

    Args:
        loop: a looped model with a readout (``decode=True`` must work).
        task: a loopscope task (``task.sample(n, split, seed=)`` giving tokens and -100-masked
            targets).
        splits: task splits to measure.
        n: examples per split.
        iter_factor: iterations = ``max(2, round(iter_factor x length))``.
        seed: sampling and measurement seed.
        dynamics: also measure rho, lambda1 and the correct-basin fraction
            (:func:`stability_dynamics`) on the first ``n_dyn`` samples.
        n_dyn: samples for the dynamics columns.
        model_name: the name written in the ``model`` column (default: the loop's zoo name).
    """
    check_budget(n=n, iter_factor=iter_factor, seed=seed)
    check_positive_int("n_dyn", n_dyn)
    splits = check_splits(task, splits)
    name = model_name or getattr(loop, "zoo_name", None) or type(loop).__name__
    rows, curves, per_sample, eigs = [], [], [], []
    for sp in splits:
        b = task.sample(n, sp, seed=seed)
        T = cap_iterations(loop, b.tokens, max(2, round(iter_factor * b.length)))
        tr = unroll(loop, b.tokens, T, seed=seed, decode=True)
        row, curve, ps = _split_row(loop, b, tr, name, sp, n)
        if dynamics:
            dyn, er = stability_dynamics(loop, b, tr, n_dyn=n_dyn, seed=seed)
            row.update(dyn)
            eigs.extend({"model": name, "split": sp, **r} for r in er)
        rows.append(row)
        curves.append(curve)
        per_sample.append(ps)
    settings = {"splits": list(splits), "n": n, "iter_factor": iter_factor, "dynamics": dynamics}
    return StabilityResult(
        table=pd.DataFrame(rows),
        curves=pd.concat(curves, ignore_index=True),
        per_sample=pd.concat(per_sample, ignore_index=True).assign(model=name),
        eigenvalues=pd.DataFrame(eigs),
        meta=result_meta(loop, seed=seed, model=name, settings={**settings, "n_dyn": n_dyn}),
    )


def stability_figures(result: StabilityResult) -> dict[str, Any]:
    """The stability figures by file stem: residual curves, accuracy vs residual, eigenvalues."""
    from loopscope import figures

    model = str(result.meta.get("model"))
    c = result.curves
    g = c.groupby(["split", "iteration"])
    agg = pd.DataFrame(
        {
            "median": g["rel_residual"].median(),
            "q25": g["rel_residual"].quantile(0.25),
            "q75": g["rel_residual"].quantile(0.75),
            "median_p2": g["rel_residual_p2"].median() if "rel_residual_p2" in c else np.nan,
            "accuracy": g["token_acc"].mean() if "token_acc" in c else np.nan,
        }
    ).reset_index()
    agg["model"] = model
    out = {"residual_curves": figures.convergence_curves(agg)}
    ps = result.per_sample.copy()
    ps["log10 final relative residual"] = np.log10(ps["rel_residual"].clip(lower=1e-16))
    out["accuracy_vs_residual"] = figures.scatter_xy(
        ps, "log10 final relative residual", "correct", "split", f"{model}: correct vs residual"
    )
    if len(result.eigenvalues):
        out["eigenvalues"] = figures.eigen_scatter(result.eigenvalues)
    return out
