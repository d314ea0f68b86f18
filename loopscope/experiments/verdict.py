"""The verdict experiment: evidence rows of :mod:`loopscope.analysis.evidence` for one model on
one task's splits (the task-specific parts live here: sampling splits, depth metadata, the
group-task inductive bias, the multiplication training-pair memorization test).

Example:
    >>> from loopscope import zoo, tasks                       # doctest: +SKIP
    >>> v = verdict(zoo.load("addition_conv"), tasks.get("addition"))  # doctest: +SKIP
    >>> v.to_frame()[["evidence", "value", "reading"]]          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loopscope.analysis.attractors import path_independence
from loopscope.analysis.convergence import metrics
from loopscope.analysis.evidence import (
    Verdict,
    _bootstrap_mean,
    basin_row,
    confident_wrong,
    inductive_bias_row,
    probe_onset_row,
    spearman_row,
)
from loopscope.analysis.stats import wilson_ci
from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import result_meta
from loopscope.core.targets import labelled, sequence_correct
from loopscope.core.unroll import unroll
from loopscope.experiments.common import check_budget

__all__ = ["verdict"]


def _iters(batch: Any, factor: float) -> int:
    return max(2, int(round(factor * batch.length)))


def _row(
    evidence: str,
    split: str,
    value: float,
    n: int,
    reading: str,
    supports: str,
    ci: tuple[float, float] = (np.nan, np.nan),
) -> dict[str, Any]:
    return dict(
        evidence=evidence,
        split=split,
        value=value,
        ci_low=ci[0],
        ci_high=ci[1],
        n=n,
        reading=reading,
        supports=supports,
    )


def _check(model: Loop, task: Any, splits: tuple, n_basin: int, n_probe: int) -> None:
    for name, v in (("n_basin", n_basin), ("n_probe", n_probe)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LoopscopeError(f"{name} must be an integer >= 0, got {v!r}")
    for sp in splits:
        if sp not in task.splits:
            raise LoopscopeError(f"task {task.name!r} has no split {sp!r}")
    if (
        getattr(model, "cfg", None) is not None
        and getattr(model.cfg, "vocab_size", task.vocab_size) != task.vocab_size
    ):
        raise LoopscopeError(
            f"model vocabulary ({model.cfg.vocab_size}) does not match task {task.name!r} ({task.vocab_size})"
        )


def _accuracy_rows(
    rows: list, tr: Any, targets: torch.Tensor, sp: str, T: int, tol: float
) -> float:
    """Sequence accuracy (Wilson CI) and the confident-wrong fraction of one split."""
    seq_ok = sequence_correct(tr.logits[-1].argmax(-1), targets).numpy()
    k = int(seq_ok.sum())
    acc = k / len(seq_ok)
    reading = "solves it" if acc >= 0.9 else "partly" if acc >= 0.5 else "fails"
    supports = "algorithm" if acc >= 0.9 else "memorized/heuristic" if sp != "id" else "neutral"
    rows.append(
        _row(
            "sequence accuracy",
            sp,
            acc,
            len(seq_ok),
            f"{reading} at {T} iterations",
            supports,
            wilson_ci(k, len(seq_ok)),
        )
    )
    cw = confident_wrong(tr, targets, tol).summary()
    rows.append(
        _row(
            "confident-wrong (settled and wrong)",
            sp,
            cw["confident_wrong_fraction"],
            int(cw["n"]),
            f"{cw['settled_given_wrong']:.0%} of wrong answers are settled attractors"
            if cw["n_wrong"]
            else "no wrong answers",
            "memorized/heuristic"
            if cw["n_wrong"] and cw["settled_given_wrong"] > 0.5
            else "neutral",
        )
    )
    return acc


def _depth_rows(rows: list, tr: Any, batch: Any, sp: str, tol: float) -> None:
    """T_conv and the answer-settling step vs the task's per-token depth (Spearman)."""
    depth = batch.meta.get("depth")
    if not (isinstance(depth, torch.Tensor) and depth.dim() == 2):
        return
    mask = labelled(batch.targets)
    pred = tr.logits[-1].argmax(-1)
    mt = metrics(tr, p_max=2, per_token=True, tol=tol)
    tc = mt.t_conv.numpy().reshape(-1).astype(float)
    dp = depth.numpy().reshape(-1).astype(float)
    ok = (tc >= 0) & mask.numpy().reshape(-1)
    spearman_row(
        rows,
        "T_conv vs depth (Spearman)",
        sp,
        dp,
        tc,
        ok,
        "convergence time grows with depth",
        "convergence time independent of depth",
    )
    # output space: the iteration after which each token's answer never changes again
    am = tr.logits.argmax(-1)  # [T+1, B, P]
    T1 = am.shape[0]
    idx = torch.arange(T1).view(T1, 1, 1).expand_as(am)
    settle = torch.where(am != am[-1:], idx, torch.full_like(idx, -1)).amax(0) + 1  # [B, P]
    st = settle.numpy().reshape(-1).astype(float)
    okm = mask.numpy().reshape(-1) & (pred == batch.targets).numpy().reshape(-1)
    spearman_row(
        rows,
        "answer settling step vs depth (Spearman)",
        sp,
        dp,
        st,
        okm,
        "correct answers appear later for deeper tokens (step-by-step)",
        "answers appear regardless of depth (lookup-like)",
    )


def _path_row(model: Loop, tokens: torch.Tensor, sp: str, T: int, seed: int) -> dict[str, Any]:
    """Path independence: the same budget from the model's init and from noise inits."""
    pi = path_independence(model, tokens, inits=("default", "noise"), n_iter=T, seed=seed)
    aa = (
        pi.aa("noise", space="readout")
        if (pi.frame["space"] == "readout").any()
        else pi.aa("noise")
    )
    same = np.nanmean(aa) > 0.99
    return _row(
        "path independence AA (readout)",
        sp,
        float(np.nanmean(aa)),
        len(aa),
        "end state independent of the init" if same else "end state depends on the init",
        "algorithm" if same else "memorized/heuristic",
        _bootstrap_mean(aa, seed),
    )


@did_you_mean
def verdict(
    model: Loop,
    task: Any,
    *,
    n: int = 128,
    seed: int = 0,
    iter_factor: float = 4.0,
    splits: tuple[str, ...] = ("id", "ood"),
    tol: float = 1e-3,
    extra: list[dict[str, Any]] | None = None,
    n_basin: int = 8,
    n_probe: int = 128,
) -> Verdict:
    """Evidence vector for one model on one task.

    Rows, per split: sequence accuracy (Wilson CI), confident-wrong fraction, T_conv and
    answer-settling step vs the task's depth (Spearman, where the task gives a per-token depth),
    path independence (AA of the readout from the model's init vs noise), the correct-basin
    fraction (share of ``n_basin`` Gaussian inits per sample, at the entry scale of the model's
    init, whose decoded answer is right; bootstrap CI over samples), and the ID − OOD gap; probe
    onset vs depth where the task's depth is a function of the position (state tracking: depth =
    position): a ridge probe per (iteration, position) on ``n_probe`` sequences for the target,
    onset = first iteration with held-out accuracy >= 0.9, Spearman with depth; on
    state-tracking tasks the inductive bias (R-IB / D-IB, normalised; 50 white-noise datasets, a
    logistic head) of the end state at the last position against the true group element; for
    tasks with a training set of operand pairs (multiplication), correctness vs subgraph
    frequency: the logistic slope of digit correctness on log1p(df) with one dummy per digit, on
    train and held-out ID pairs. IIA and heuristic neurons come from :mod:`loopscope.probes` /
    :mod:`loopscope.circuits` through ``extra``.

    Args:
        model: a :class:`loopscope.Loop` over the task's tokens.
        task: a :mod:`loopscope.tasks` task.
        n: examples per split.
        seed: seed of the samples, the init and the bootstraps.
        iter_factor: iterations = factor x length (well past the training range, to see where
            the loop settles).
        splits: the task splits judged.
        tol: residual tolerance of "settled".
        extra: extra evidence rows appended as they are.
        n_basin: Gaussian inits per sample for the correct-basin fraction (0 skips it).
        n_probe: sequences for the probe onset and the inductive bias (0 skips both; the
            inductive bias needs >= 32).
    """
    splits = tuple(splits)
    check_budget(n=n, iter_factor=iter_factor, seed=seed, n_min=2)
    _check(model, task, splits, n_basin, n_probe)
    n, seed, factor, tol = int(n), int(seed), float(iter_factor), float(tol)
    rows: list[dict[str, Any]] = []
    acc: dict[str, float] = {}
    for sp in splits:
        batch = task.sample(n, sp, seed=seed)
        T = _iters(batch, factor)
        tr = unroll(model, batch.tokens, T, seed=seed, decode=True)
        acc[sp] = _accuracy_rows(rows, tr, batch.targets, sp, T, tol)
        _depth_rows(rows, tr, batch, sp, tol)
        rows.append(_path_row(model, batch.tokens, sp, T, seed))
        if n_basin:
            rows.append(basin_row(model, batch.tokens, batch.targets, T, n_basin, seed, sp))
        if n_probe:
            _state_rows(rows, model, task, sp, T, n_probe, seed)
    mem = _memorization_row(model, task, n, seed, factor)
    if mem is not None:
        rows.append(mem)
    if "id" in acc and "ood" in acc:
        gap = acc["id"] - acc["ood"]
        rows.append(
            _row(
                "ID - OOD accuracy gap",
                "id-ood",
                gap,
                n,
                "generalizes out of distribution"
                if gap < 0.1
                else "does not generalize out of distribution",
                "algorithm" if gap < 0.1 else "memorized/heuristic",
            )
        )
    rows.extend(extra or [])
    name = getattr(model, "zoo_name", type(model).__name__)
    meta = result_meta(model, seed=seed, model=name, settings={"n": n, "iter_factor": factor})
    return Verdict(rows=rows, meta={**meta, "model": name, "task": task.name, "seed": seed})


def _memorization_row(model: Loop, task: Any, n: int, seed: int, factor: float) -> dict | None:
    """Correctness vs subgraph frequency for tasks with a training set of operand pairs.

    Digit k of x·y is determined by (x mod 10^(k+1), y mod 10^(k+1)); df = training pairs that
    share them (:func:`loopscope.circuits.digit_df`). Train pairs and held-out ID pairs are pooled
    so that df varies within a digit (held-out pairs have df = 0 for the upper digits); the digit
    is a categorical control (accuracy need not be monotone in the digit position).
    """
    pairs = getattr(task, "pairs", None)
    nd_in = getattr(task, "nd", None)
    if not isinstance(pairs, dict) or "train" not in pairs or "id" not in pairs or nd_in is None:
        return None
    from loopscope.circuits import digit_df, logistic_slope

    tx, ty = pairs["train"] // 10**nd_in, pairs["train"] % 10**nd_in
    nd = 2 * nd_in
    ok_all, df_all = [], []
    for sp in ("train", "id"):
        batch = task.sample(n, sp, seed=seed)
        if "x" not in batch.meta or "y" not in batch.meta:
            return None
        tr = unroll(model, batch.tokens, _iters(batch, factor), seed=seed, decode=True)
        pred = tr.logits[-1].argmax(-1)[:, -nd:]
        ok_all.append((pred == batch.targets[:, -nd:]).numpy())
        x, y = batch.meta["x"].numpy(), batch.meta["y"].numpy()
        df_all.append(digit_df(x, y, nd, tx, ty))
    ok, dfm = np.concatenate(ok_all), np.concatenate(df_all)
    fit = logistic_slope(ok.ravel(), dfm.ravel(), None, op=np.tile(np.arange(nd), len(ok)))
    explained = bool(fit.ci_low > 0)  # False for NaN (every digit right, or every one wrong)
    if np.isnan(fit.slope):
        reading = f"every digit {'right' if ok.all() else 'wrong'}: df cannot explain correctness"
    elif explained:
        reading = "correct where training covered the computation (df explains correctness)"
    else:
        reading = "no detectable df effect within a digit"
    return dict(
        evidence="correctness vs subgraph frequency (slope on log1p df | digit)",
        split="train+id",
        value=fit.slope,
        ci_low=fit.ci_low,
        ci_high=fit.ci_high,
        n=int(ok.size),
        reading=reading,
        supports="memorized/heuristic" if explained else "neutral",
    )


def _state_rows(
    rows: list, model: Loop, task: Any, split: str, T: int, n_probe: int, seed: int
) -> None:
    """Rows read off the latent state of ``n_probe`` sequences (one unroll): probe onset vs
    depth, and the inductive bias of the end state on state-tracking tasks."""
    from loopscope.tasks.groups import GroupTask

    batch = task.sample(n_probe, split, seed=seed)
    depth = batch.meta.get("depth")
    mask = labelled(batch.targets)
    positions = [p for p in range(batch.targets.shape[1]) if bool(mask[:, p].any())]
    onset_ok = (
        isinstance(depth, torch.Tensor)
        and depth.shape == batch.targets.shape
        and bool(positions)
        # depth must be a function of the position, else a per-position onset cannot rank it
        and all(bool((depth[mask[:, p], p] == depth[mask[:, p], p][0]).all()) for p in positions)
    )
    ib_ok = isinstance(task, GroupTask) and bool(mask[:, -1].all()) and n_probe >= 32
    if not (onset_ok or ib_ok):
        return
    tr = unroll(model, batch.tokens, T, seed=seed)
    if onset_ok:
        probe_onset_row(rows, tr, batch.targets, depth, mask, positions, split, seed)
    if ib_ok:
        inductive_bias_row(rows, tr, batch.targets, split, seed)
