"""Across iterations: transfer matrix, onset iteration (and its regression on graph depth), logit lens.

* ``transfer_matrix(res, X, y)``: accuracy of the probe fitted at site t (with its own
  standardisation) scored on the held-out rows at site t' — a block from the convergence point on
  means a fixed-point code; a diagonal band means a rotating / sliding code.
* ``onset(frame)``: t*(v) = min{t : acc_t >= theta and sel_t >= sigma}, per variable/position.
* ``onset_regression(onsets, depth)``: onset against computation-graph depth (scipy linregress).
* ``logit_lens(trace, targets)``: decode every state ``h_t`` with the loop's own readout.

Example:
    >>> import pandas as pd
    >>> df = pd.DataFrame({"position": [0, 0, 0, 1, 1, 1], "iteration": [1, 2, 3] * 2,
    ...                    "test_acc": [0.5, 0.95, 0.97, 0.5, 0.6, 0.99]})
    >>> onset(df, threshold=0.9).to_frame()["onset"].tolist()
    [2, 3]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.result import Result, float_summary
from loopscope.core.trace import Trace
from loopscope.probes import solvers
from loopscope.probes.fit import ProbeResult

__all__ = [
    "transfer_matrix",
    "TransferResult",
    "onset",
    "OnsetResult",
    "onset_regression",
    "OnsetRegression",
    "logit_lens",
    "LensResult",
]


@dataclass(kw_only=True, repr=False)
class TransferResult(Result):
    """``acc[t, t']``: probe fitted at site t scored at site t' on held-out rows.

    Indexing the result indexes ``acc`` (``res[i, j]``, ``np.asarray(res)``).
    """

    acc: np.ndarray
    site_labels: list[dict[str, Any]] = field(default_factory=list)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.acc if dtype is None else self.acc.astype(dtype)

    def __getitem__(self, index: Any) -> Any:
        return self.acc[index]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.acc.shape

    def to_frame(self) -> pd.DataFrame:
        """One row per (train site, test site): train_*, test_* label columns and acc."""
        S = self.acc.shape[0]
        labs = self.site_labels or [{"site": s} for s in range(S)]
        rows = []
        for i in range(S):
            for j in range(S):
                r = {f"train_{k}": v for k, v in labs[i].items()}
                r.update({f"test_{k}": v for k, v in labs[j].items()})
                r["acc"] = float(self.acc[i, j])
                rows.append(r)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Mean accuracy on the diagonal (own site) and off it (transferred)."""
        S = self.acc.shape[0]
        off = ~np.eye(S, dtype=bool)
        return float_summary(
            {
                "n_sites": S,
                "mean_diagonal_acc": float(np.mean(np.diag(self.acc))),
                "mean_offdiagonal_acc": float(self.acc[off].mean()) if S > 1 else None,
            }
        )


@did_you_mean
def transfer_matrix(res: ProbeResult, X: Any, y: Any, fold: int = 0) -> TransferResult:
    """Cross-site transfer of fitted probes on the held-out rows of ``fold``.

    Args:
        res: the fit (``S`` sites) from :func:`fit_probes` on the same ``X`` and ``y``.
        X: ``[S, N, d]`` activations; y: ``[N]`` or ``[S, N]`` labels (-100 = unlabelled).
    """
    X = torch.as_tensor(X)
    S = res.n_sites
    if X.dim() != 3 or X.shape[0] != S:
        raise LoopscopeError(f"X must be [{S}, N, d] like the fit, got {tuple(X.shape)}")
    if not 0 <= fold < len(res.folds):
        raise LoopscopeError(f"fold {fold} out of range 0..{len(res.folds) - 1}")
    te = res.folds[fold][1]
    if te.numel() == 0:
        raise LoopscopeError("this fit has no held-out rows (split='all'); refit with a split")
    y = torch.as_tensor(y).long()
    y = y.expand(S, X.shape[1]) if y.dim() == 1 else y
    Xt, yt = X[:, te], y[:, te]
    valid = (yt != -100) & torch.isfinite(Xt).all(-1)
    acc = np.zeros((S, S))
    for t in range(S):
        Z = (torch.nan_to_num(Xt.double()) - res.mean[fold][t]) / res.std[fold][t]
        p1 = {k: v[t : t + 1].expand(S, *v.shape[1:]) for k, v in res.params[fold].items()}
        pred = res.classes[solvers.scores(res.kind, p1, Z).argmax(-1)]  # [S, M]
        ok = ((pred == yt) & valid).double().sum(1) / valid.sum(1).clamp_min(1)
        acc[t] = ok.numpy()
    meta = {k: res.meta.get(k) for k in ("loopscope_version", "model", "seed", "split")}
    return TransferResult(
        acc=acc, site_labels=list(res.site_labels), meta={**meta, "fold": fold, "probe": res.kind}
    )


@dataclass(kw_only=True, repr=False)
class OnsetResult(Result):
    """Onset iteration per variable (``by`` key): the first iteration meeting the criterion.

    Attributes:
        frame: one row per variable: the ``by`` column(s) and ``onset`` (-1 = never).
        meta: threshold, min_selectivity, acc (the accuracy column), by.
    """

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """Variables, how many reach the criterion, and the mean / min / max onset among them."""
        on = self.frame["onset"].to_numpy(dtype=float) if len(self.frame) else np.zeros(0)
        hit = on[on >= 0]
        return float_summary(
            {
                "n_variables": len(on),
                "n_reached": len(hit),
                "mean_onset": float(hit.mean()) if hit.size else None,
                "min_onset": float(hit.min()) if hit.size else None,
                "max_onset": float(hit.max()) if hit.size else None,
            }
        )


@did_you_mean
def onset(
    frame: pd.DataFrame,
    threshold: float = 0.9,
    min_selectivity: float | None = None,
    by: Any = "position",
    acc: str = "test_acc",
) -> OnsetResult:
    """First iteration with ``acc >= threshold`` (and ``selectivity >= min_selectivity``).

    Args:
        frame: a probe table (e.g. ``probe_trace(...).to_frame()``) with ``iteration``, ``acc``
            and the ``by`` column(s) (plus ``selectivity`` when ``min_selectivity`` is set);
            rows of several folds are averaged first.
        threshold: accuracy the probe must reach.
        min_selectivity: selectivity it must reach too (None: no selectivity criterion).
        by: the column(s) that name a variable (default ``"position"``).
        acc: the accuracy column.

    Returns:
        :class:`OnsetResult`; ``onset = -1`` where the criterion is never met.
    """
    by = [by] if isinstance(by, str) else list(by)
    need = [*by, "iteration", acc] + (["selectivity"] if min_selectivity is not None else [])
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise LoopscopeError(f"onset: frame lacks column(s) {missing}; has {list(frame.columns)}")
    cols = [acc] + (["selectivity"] if min_selectivity is not None else [])
    g = frame.groupby([*by, "iteration"], as_index=False)[cols].mean()
    rows = []
    for key, grp in g.groupby(by if len(by) > 1 else by[0]):
        grp = grp.sort_values("iteration")
        hit = grp[acc] >= threshold
        if min_selectivity is not None:
            hit &= grp["selectivity"] >= min_selectivity
        key = key if isinstance(key, tuple) else (key,)
        r = dict(zip(by, key, strict=True))
        r["onset"] = int(grp["iteration"][hit].iloc[0]) if hit.any() else -1
        rows.append(r)
    settings = {"threshold": threshold, "min_selectivity": min_selectivity, "acc": acc, "by": by}
    return OnsetResult(frame=pd.DataFrame(rows), meta=settings)


@dataclass(kw_only=True, repr=False)
class OnsetRegression(Result):
    """Least-squares fit onset = slope * depth + intercept (scipy.stats.linregress).

    Attributes:
        slope, intercept, r, p, stderr: the fit; n: variables used; data: their rows.
    """

    slope: float
    intercept: float
    r: float
    p: float
    stderr: float
    n: int
    data: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.summary()]).astype({"n": int})

    def summary(self) -> dict[str, float]:
        """slope, intercept, r, p, stderr and n."""
        keys = ("slope", "intercept", "r", "p", "stderr", "n")
        return float_summary({k: getattr(self, k) for k in keys})


@did_you_mean
def onset_regression(
    onsets: OnsetResult | pd.DataFrame, depth: Any, by: str = "position"
) -> OnsetRegression:
    """Regress onset iteration on computation-graph depth ℓ(v) (variables that never reach the
    threshold, ``onset = -1``, are left out).

    Args:
        onsets: :func:`onset`'s result (or its frame).
        depth: a column name of the onsets frame, or a mapping / Series from the ``by`` key to
            depth.
        by: the key column that ``depth`` maps from.
    """
    from scipy import stats

    df = onsets.to_frame() if isinstance(onsets, OnsetResult) else onsets.copy()
    if isinstance(depth, str):
        if depth not in df.columns:
            raise LoopscopeError(f"onsets has no column {depth!r}")
        df["depth"] = df[depth]
    else:
        mapping = dict(depth.items()) if hasattr(depth, "items") else None
        if mapping is None:
            raise LoopscopeError("depth must be a column name or a mapping key -> depth")
        df["depth"] = df[by].map(mapping)
    df = df[(df["onset"] >= 0) & df["depth"].notna()]
    if len(df) < 3 or df["depth"].nunique() < 2:
        raise LoopscopeError(
            f"need >= 3 variables with an onset and 2+ distinct depths, got {len(df)}"
        )
    fit = stats.linregress(df["depth"].astype(float), df["onset"].astype(float))
    return OnsetRegression(
        slope=float(fit.slope),
        intercept=float(fit.intercept),
        r=float(fit.rvalue),
        p=float(fit.pvalue),
        stderr=float(fit.stderr),
        n=len(df),
        data=df.reset_index(drop=True),
        meta={"by": by},
    )


@dataclass(kw_only=True, repr=False)
class LensResult(Result):
    """Logit lens: argmax of ``decode(h_t)`` for every iteration ``t = 0..T``.

    Attributes:
        argmax: ``[T+1, B, pos]`` decoded class per iteration.
        targets: ``[B, pos]`` labels (-100 = none), or None.
        meta: the trace's meta (model, task, split, seed ...).
    """

    argmax: Tensor
    targets: Tensor | None

    @property
    def accuracy(self) -> np.ndarray:
        """Pooled accuracy per iteration ``[T+1]`` over labelled positions."""
        if self.targets is None:
            raise LoopscopeError("logit_lens was run without targets")
        m = self.targets != -100
        ok = (self.argmax == self.targets) & m
        return (ok.flatten(1).sum(1).double() / m.sum().clamp_min(1)).numpy()

    def to_frame(self) -> pd.DataFrame:
        """Rows (iteration, position, accuracy, n); position -1 = pooled over positions."""
        if self.targets is None:
            raise LoopscopeError("logit_lens was run without targets: no accuracy frame")
        m = self.targets != -100  # [B, P]
        ok = ((self.argmax == self.targets) & m).double()  # [T+1, B, P]
        n_pos = m.sum(0)
        rows = []
        for t in range(ok.shape[0]):
            rows.append(
                {
                    "iteration": t,
                    "position": -1,
                    "accuracy": float(self.accuracy[t]),
                    "n": int(m.sum()),
                }
            )
            per = ok[t].sum(0) / n_pos.clamp_min(1)
            for p in range(ok.shape[2]):
                if n_pos[p] > 0:
                    rows.append(
                        {
                            "iteration": t,
                            "position": p,
                            "accuracy": float(per[p]),
                            "n": int(n_pos[p]),
                        }
                    )
        df = pd.DataFrame(rows)
        for k in ("model", "task", "split", "seed"):
            if k in self.meta:
                df[k] = self.meta[k]
        return df

    def summary(self) -> dict[str, float]:
        """Iterations decoded; with targets, the accuracy at the first and last iteration, the
        best one and where it is first reached."""
        out: dict[str, Any] = {"n_iterations": int(self.argmax.shape[0])}
        if self.targets is not None:
            acc = self.accuracy
            out.update(
                initial_accuracy=acc[0],
                final_accuracy=acc[-1],
                max_accuracy=acc.max(),
                first_iteration_max=int(np.argmax(acc)),
            )
        return float_summary(out)


@did_you_mean
def logit_lens(trace: Trace, targets: Any = None) -> LensResult:
    """Decode every state of ``trace`` with ``trace.loop.decode`` (or stored ``trace.logits``).

    Returns the per-iteration argmax ``[T+1, B, pos]`` (``[T+1, B, 1]`` for a readout without a
    position axis) and, with ``targets [B, pos]``, per-iteration accuracy.
    """
    if not hasattr(trace, "decode"):
        raise LoopscopeError(f"logit_lens needs a loopscope Trace, got {type(trace).__name__}")
    am = []
    for t in range(trace.n_iter + 1):
        logits = torch.as_tensor(trace.decode(t))
        if logits.dim() < 2:
            raise LoopscopeError(
                f"decode must return [B, (pos,) classes], got {tuple(logits.shape)}"
            )
        a = logits.argmax(-1)
        am.append(a.unsqueeze(1) if a.dim() == 1 else a)
    argmax = torch.stack(am)
    tg = None
    if targets is not None:
        tg = torch.as_tensor(targets).long()
        tg = tg.unsqueeze(1) if tg.dim() == 1 else tg
        if tg.shape != argmax.shape[1:]:
            raise LoopscopeError(
                f"targets must be {tuple(argmax.shape[1:])} like the readout, got {tuple(tg.shape)}"
            )
    return LensResult(argmax=argmax, targets=tg, meta=dict(getattr(trace, "meta", {}) or {}))
