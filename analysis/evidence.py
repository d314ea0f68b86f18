"""The verdict: an evidence vector for "real algorithm" vs "memorized subgraphs / heuristics".

Never one bit. Each row is one piece of evidence with its value, a CI where there is sampling,
and a one-line reading (algorithm-tests.md §8). Also the dissociation the research cares about:
how often the loop converges *confidently* (small residual, locally stable) to a *wrong* answer,
ID vs OOD.

Example:
    >>> from loopscope import zoo, tasks                       # doctest: +SKIP
    >>> v = verdict(zoo.load("addition_conv"), tasks.get("addition"))  # doctest: +SKIP
    >>> v.to_frame()[["evidence", "value", "reading"]]          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from loopscope.analysis.attractors import GaussianSeeds, basins, path_independence, wilson_ci
from loopscope.analysis.convergence import metrics
from loopscope.core.errors import LoopscopeError, reject_unknown_kwargs
from loopscope.core.unroll import unroll

__all__ = ["verdict", "Verdict", "confident_wrong"]


@dataclass
class Verdict:
    """Evidence rows: ``evidence, split, value, ci_low, ci_high, n, reading, supports``."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        for k in ("model", "task", "seed"):
            if k in self.meta:
                df[k] = self.meta[k]
        return df

    @property
    def summary(self) -> str:
        """One line: how many rows support each reading."""
        s = pd.Series([r["supports"] for r in self.rows]).value_counts()
        return ", ".join(f"{k}: {v}" for k, v in s.items())


def _bootstrap_mean(x: np.ndarray, seed: int, n: int = 500) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n, len(x)), replace=True).mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _iters(batch: Any, factor: float) -> int:
    return max(2, int(round(factor * batch.length)))


def _spearman_row(
    rows: list,
    evidence: str,
    split: str,
    depth: np.ndarray,
    value: np.ndarray,
    keep: np.ndarray,
    yes: str,
    no: str,
    threshold: float = 0.3,
) -> bool:
    """Append a Spearman(depth, value) evidence row when there is enough variation to rank;
    returns whether it did."""
    if keep.sum() <= 10 or np.std(depth[keep]) == 0 or np.std(value[keep]) == 0:
        return False
    rho, _ = stats.spearmanr(depth[keep], value[keep])
    rows.append(
        dict(
            evidence=evidence,
            split=split,
            value=float(rho),
            ci_low=np.nan,
            ci_high=np.nan,
            n=int(keep.sum()),
            reading=yes if rho > threshold else no,
            supports="algorithm" if rho > threshold else "memorized/heuristic",
        )
    )
    return True


def confident_wrong(trace: Any, targets: torch.Tensor, tol: float = 1e-3) -> dict[str, float]:
    """Fractions of samples that are converged (final period-1 or period-2 relative residual
    < tol) and wrong, among all and among the wrong ones."""
    m = metrics(trace, p_max=2)
    s = m.summary_frame()
    rel2 = (
        m["res_p2"][-1] / trace.states[-1].flatten(1).double().norm(dim=1).clamp_min(1e-30)
    ).numpy()
    settled = (s["final_rel_residual"].to_numpy() < tol) | (rel2 < tol)
    pred = trace.decode().argmax(-1)
    mask = targets != -100
    wrong = (((pred != targets) & mask).any(dim=1)).numpy()
    n_wrong = int(wrong.sum())
    return {
        "settled_fraction": float(settled.mean()),
        "wrong_fraction": float(wrong.mean()),
        "confident_wrong_fraction": float((settled & wrong).mean()),
        "settled_given_wrong": float((settled & wrong).sum() / n_wrong)
        if n_wrong
        else float("nan"),
        "n": int(len(wrong)),
        "n_wrong": n_wrong,
    }


_OPTIONS = ("n", "seed", "iter_factor", "splits", "tol", "extra", "n_basin", "n_probe")


def verdict(model: Any, task: Any, **options: Any) -> Verdict:
    """Evidence vector for one model on one task (see module docstring).

    Rows computed here, per split: sequence accuracy (Wilson CI), confident-wrong fraction,
    T_conv and answer-settling step vs the task's depth (Spearman, where the task gives a
    per-token depth), path independence (AA of the readout from the model's init vs noise), the
    correct-basin fraction (share of ``n_basin`` Gaussian inits per sample, at the entry scale of
    the model's init, whose decoded answer is right; bootstrap CI over samples), and the ID − OOD
    gap; probe onset vs depth where the task's depth is a function of the position (state
    tracking: depth = position): a ridge probe per (iteration, position) on ``n_probe`` sequences
    for the target, onset = first iteration with held-out accuracy >= 0.9, Spearman with depth;
    on state-tracking tasks the inductive bias (R-IB / D-IB, normalised; 50 white-noise datasets,
    a logistic head) of the end state at the last position against the true group element;
    for tasks with a training set of operand pairs (multiplication), correctness vs subgraph
    frequency: the logistic slope of digit correctness on log1p(df) with one dummy per digit, on
    train and held-out ID pairs. IIA and heuristic neurons come from
    :mod:`loopscope.probes` / :mod:`loopscope.circuits` through ``extra``.

    Options: ``n`` examples per split (128), ``seed`` (0), ``iter_factor`` (iterations = factor x
    length, 4: well past the training range, to see where the loop settles), ``splits``
    (("id", "ood")), ``tol`` (residual tolerance, 1e-3), ``n_basin`` (Gaussian inits per sample
    for the correct-basin fraction, 8; 0 skips it), ``n_probe`` (sequences for the probe onset
    and the inductive bias, 128; 0 skips both, the inductive bias needs >= 32), ``extra`` (a list
    of extra evidence rows).
    """
    reject_unknown_kwargs("verdict", options, _OPTIONS)
    n = int(options.get("n", 128))
    seed = int(options.get("seed", 0))
    factor = float(options.get("iter_factor", 4.0))
    tol = float(options.get("tol", 1e-3))
    splits = tuple(options.get("splits", ("id", "ood")))
    n_basin = options.get("n_basin", 8)
    n_probe = options.get("n_probe", 128)
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
    rows: list[dict[str, Any]] = []
    acc: dict[str, float] = {}
    cw: dict[str, dict] = {}
    for sp in splits:
        batch = task.sample(n, sp, seed=seed)
        T = _iters(batch, factor)
        tr = unroll(model, batch.tokens, T, seed=seed, decode=True)
        pred = tr.logits[-1].argmax(-1)
        mask = batch.targets != -100
        seq_ok = ((pred == batch.targets) | ~mask).all(1).numpy()
        k = int(seq_ok.sum())
        lo, hi = wilson_ci(k, len(seq_ok))
        acc[sp] = k / len(seq_ok)
        reading = "solves it" if acc[sp] >= 0.9 else "partly" if acc[sp] >= 0.5 else "fails"
        rows.append(
            dict(
                evidence="sequence accuracy",
                split=sp,
                value=acc[sp],
                ci_low=lo,
                ci_high=hi,
                n=len(seq_ok),
                reading=f"{reading} at {T} iterations",
                supports="algorithm"
                if acc[sp] >= 0.9
                else "memorized/heuristic"
                if sp != "id"
                else "neutral",
            )
        )
        cw[sp] = confident_wrong(tr, batch.targets, tol)
        rows.append(
            dict(
                evidence="confident-wrong (settled and wrong)",
                split=sp,
                value=cw[sp]["confident_wrong_fraction"],
                ci_low=np.nan,
                ci_high=np.nan,
                n=cw[sp]["n"],
                reading=f"{cw[sp]['settled_given_wrong']:.0%} of wrong answers are settled attractors"
                if cw[sp]["n_wrong"]
                else "no wrong answers",
                supports="memorized/heuristic"
                if cw[sp]["n_wrong"] and cw[sp]["settled_given_wrong"] > 0.5
                else "neutral",
            )
        )
        # convergence time vs problem depth (per token; depth = the task's computation depth)
        depth = batch.meta.get("depth")
        if isinstance(depth, torch.Tensor) and depth.dim() == 2:
            mt = metrics(tr, p_max=2, per_token=True, tol=tol)
            tc = mt.t_conv.numpy().reshape(-1).astype(float)
            dp = depth.numpy().reshape(-1).astype(float)
            ok = (tc >= 0) & mask.numpy().reshape(-1)
            _spearman_row(
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
            _spearman_row(
                rows,
                "answer settling step vs depth (Spearman)",
                sp,
                dp,
                st,
                okm,
                "correct answers appear later for deeper tokens (step-by-step)",
                "answers appear regardless of depth (lookup-like)",
            )
        # path independence: same budget from the model's init and from noise inits
        pi = path_independence(model, batch.tokens, inits=("default", "noise"), n_iter=T, seed=seed)
        aa = (
            pi.aa("noise", space="readout")
            if (pi.frame["space"] == "readout").any()
            else pi.aa("noise")
        )
        lo, hi = _bootstrap_mean(aa, seed)
        rows.append(
            dict(
                evidence="path independence AA (readout)",
                split=sp,
                value=float(np.nanmean(aa)),
                ci_low=lo,
                ci_high=hi,
                n=len(aa),
                reading="end state independent of the init"
                if np.nanmean(aa) > 0.99
                else "end state depends on the init",
                supports="algorithm" if np.nanmean(aa) > 0.99 else "memorized/heuristic",
            )
        )
        if n_basin:
            rows.append(_basin_row(model, batch, T, n_basin, seed, sp))
        if n_probe:
            _state_rows(rows, model, task, sp, T, n_probe, seed)
    mem = _memorization_row(model, task, n, seed, factor)
    if mem is not None:
        rows.append(mem)
    if "id" in acc and "ood" in acc:
        gap = acc["id"] - acc["ood"]
        rows.append(
            dict(
                evidence="ID - OOD accuracy gap",
                split="id-ood",
                value=gap,
                ci_low=np.nan,
                ci_high=np.nan,
                n=n,
                reading="generalizes out of distribution"
                if gap < 0.1
                else "does not generalize out of distribution",
                supports="algorithm" if gap < 0.1 else "memorized/heuristic",
            )
        )
    rows.extend(options.get("extra") or [])
    return Verdict(
        rows,
        {
            "model": getattr(model, "zoo_name", type(model).__name__),
            "task": task.name,
            "seed": seed,
        },
    )


def _init_std(model: Any, tokens: torch.Tensor, seed: int) -> float:
    """Entry std of the model's own init (the scale of "random" initial states), else 1."""
    with torch.no_grad():
        h0 = model.init_state(model.encode(tokens), torch.Generator().manual_seed(seed))
    if not isinstance(h0, torch.Tensor) or h0.numel() < 2:
        return 1.0
    std = float(h0.double().std())
    return std if std > 0 and np.isfinite(std) else 1.0


def _basin_row(model: Any, batch: Any, T: int, n_basin: int, seed: int, split: str) -> dict:
    """Correct-basin fraction: Gaussian inits at the init's entry scale, same budget."""
    res = basins(
        model,
        batch.tokens,
        seeds=GaussianSeeds(n=n_basin, std=_init_std(model, batch.tokens, seed)),
        n_iter=T,
        targets=batch.targets,
        seed=seed,
    )
    per_sample = res.seeds.groupby("sample")["correct"].mean().astype(float).to_numpy()
    frac = float(per_sample.mean())
    lo, hi = _bootstrap_mean(per_sample, seed)
    if frac >= 0.9:
        supports = "algorithm"
    elif frac < 0.5 and split != "id":
        supports = "memorized/heuristic"
    else:
        supports = "neutral"
    return dict(
        evidence="correct-basin fraction (noise inits)",
        split=split,
        value=frac,
        ci_low=lo,
        ci_high=hi,
        n=len(per_sample),
        reading=f"the correct answer attracts {frac:.0%} of random inits in {T} iterations",
        supports=supports,
    )


def _memorization_row(model: Any, task: Any, n: int, seed: int, factor: float) -> dict | None:
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
    rows: list, model: Any, task: Any, split: str, T: int, n_probe: int, seed: int
) -> None:
    """Rows read off the latent state of ``n_probe`` sequences (one unroll): probe onset vs
    depth, and the inductive bias of the end state on state-tracking tasks."""
    from loopscope.tasks.groups import GroupTask

    batch = task.sample(n_probe, split, seed=seed)
    depth = batch.meta.get("depth")
    mask = batch.targets != -100
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
        _probe_onset_row(rows, tr, batch, depth, mask, positions, split, seed)
    if ib_ok:
        _inductive_bias_row(rows, tr, batch, split, seed)


def _inductive_bias_row(rows: list, tr: Any, batch: Any, split: str, seed: int) -> None:
    """R-IB / D-IB (Vafa et al.) of a linear head on the end state at the last position, against
    the true group element there: does the representation extrapolate white-noise labels by
    state?"""
    from loopscope.probes import inductive_bias_probe

    X = tr.states[-1][:, -1].reshape(len(batch.tokens), -1)
    states = batch.targets[:, -1]
    if not bool(torch.isfinite(X).all()) or states.unique().numel() < 2:
        return
    n_pool = len(X) - max(2, round(0.5 * len(X)))
    res = inductive_bias_probe(
        X.double(), states, n_datasets=50, n_train=min(100, n_pool), seed=seed
    )
    readings = {
        "R": (
            "inputs with the same state get the same extrapolation",
            "inputs with the same state are not grouped together",
        ),
        "D": (
            "inputs with different states are told apart",
            "inputs with different states are merged",
        ),
    }
    for kind, (yes, no) in readings.items():
        v, se = res.value(f"{kind}_norm"), res.stderr(f"{kind}_norm")
        if v > 0.8:
            supports, reading = "algorithm", yes
        elif v < 0.5:
            supports, reading = "memorized/heuristic", no
        else:
            supports, reading = "neutral", f"partly: {yes}"
        rows.append(
            dict(
                evidence=f"inductive bias {kind}-IB (normalised) at the end state",
                split=split,
                value=v,
                ci_low=v - 1.96 * se,
                ci_high=v + 1.96 * se,
                n=int(res.meta["n_datasets"]),
                reading=reading,
                supports=supports,
            )
        )


def _probe_onset_row(
    rows: list,
    tr: Any,
    batch: Any,
    depth: torch.Tensor,
    mask: torch.Tensor,
    positions: list[int],
    split: str,
    seed: int,
) -> None:
    """Probe onset vs depth, when depth is a function of the position."""
    from loopscope.probes import onset, probe_trace

    try:
        _, df = probe_trace(tr, batch.targets, pooled=False, positions=positions, seed=seed)
    except LoopscopeError:
        return  # no position with enough labelled sequences of 2+ classes
    on = onset(df, threshold=0.9)
    dpos = {p: float(depth[mask[:, p], p][0]) for p in positions}
    d = on["position"].map(dpos).to_numpy(dtype=float)
    t_on = on["onset"].to_numpy(dtype=float)
    ok = t_on >= 0
    never = f"; {int((~ok).sum())} of {len(t_on)} positions never reach 0.9"
    if _spearman_row(
        rows,
        "probe onset vs depth (Spearman)",
        split,
        d,
        t_on,
        ok,
        "the state becomes linearly decodable depth by depth (a wavefront)",
        "decodable regardless of depth",
    ):
        rows[-1]["reading"] += never
    elif ok.sum() > 10 and np.std(d[ok]) > 0:  # one onset for every depth: nothing is sequential
        rows.append(
            dict(
                evidence="probe onset vs depth (Spearman)",
                split=split,
                value=float("nan"),
                ci_low=np.nan,
                ci_high=np.nan,
                n=int(ok.sum()),
                reading=f"decodable at iteration {int(t_on[ok][0])} at every depth (no wavefront)"
                + never,
                supports="memorized/heuristic",
            )
        )
