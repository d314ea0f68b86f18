"""Linear probes fitted for every iteration (and site) in ONE batched solve.

``fit_probes(X, y)`` takes stacked activations ``X [S, N, d]`` (S = iterations x sites) and
labels ``y [N]`` (or ``[S, N]``) and fits S ridge-regression classifiers (one-vs-rest on one-hot
targets, closed form, float64) at once with a batched Cholesky solve, standardising with the
train-fold statistics and splitting by example (``groups``) so tokens of one example never
straddle train and test. ``probe_trace`` applies it to a :class:`loopscope.Trace`.

Example:
    >>> import torch
    >>> X = torch.randn(3, 200, 8, dtype=torch.float64); y = (X[1, :, 0] > 0).long()
    >>> res = fit_probes(X, y, seed=0)
    >>> res.test_acc.argmax().item()
    1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.errors import LoopscopeError

__all__ = [
    "fit_probes",
    "ProbeResult",
    "probe_trace",
    "transfer_matrix",
    "onset",
    "steer_set_projection",
]


@dataclass
class ProbeResult:
    """Batched probe fit: weights ``W [S, d+1, C]``, accuracies ``[S]``, the split and labels."""

    W: Tensor
    mean: Tensor
    std: Tensor
    train_acc: Tensor
    test_acc: Tensor
    classes: Tensor
    test_index: Tensor
    site_labels: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, X: Tensor) -> Tensor:
        """Class predictions of every probe on ``X [S, M, d]`` -> ``[S, M]``."""
        Z = (X.double() - self.mean) / self.std
        Z = torch.cat([Z, torch.ones(*Z.shape[:2], 1, dtype=Z.dtype)], -1)
        return self.classes[(Z @ self.W).argmax(-1)]

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for s in range(self.W.shape[0]):
            r = dict(self.site_labels[s]) if self.site_labels else {"site": s}
            r.update(train_acc=float(self.train_acc[s]), test_acc=float(self.test_acc[s]))
            r.update({k: v for k, v in self.meta.items() if k in ("seed", "model", "split")})
            rows.append(r)
        return pd.DataFrame(rows)


def _split(N: int, groups: Tensor | None, test_frac: float, seed: int) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    g = np.arange(N) if groups is None else np.asarray(groups)
    uniq = rng.permutation(np.unique(g))
    n_test = max(1, int(round(test_frac * len(uniq))))
    test_groups = set(uniq[:n_test].tolist())
    is_test = np.array([x in test_groups for x in g])
    return torch.as_tensor(np.nonzero(~is_test)[0]), torch.as_tensor(np.nonzero(is_test)[0])


def fit_probes(
    X: Tensor,
    y: Tensor,
    *,
    l2: float = 1e-2,
    groups: Any = None,
    test_frac: float = 0.25,
    seed: int = 0,
    site_labels: list[dict] | None = None,
) -> ProbeResult:
    """Fit one linear (ridge one-vs-rest) probe per site for all ``S`` sites in one batched solve.

    Args:
        X: ``[S, N, d]`` activations (S sites/iterations, N examples).
        y: ``[N]`` labels shared by every site, or ``[S, N]``.
        l2: ridge penalty (on standardised features).
        groups: ``[N]`` example ids; a group is entirely train or test.
    """
    if X.dim() != 3:
        raise LoopscopeError(f"X must be [sites, examples, features], got {tuple(X.shape)}")
    S, N, d = X.shape
    y = torch.as_tensor(y)
    if y.dim() == 1 and y.shape[0] == N:
        y = y.expand(S, N)
    if y.shape != (S, N):
        raise LoopscopeError(f"y must be [N] or [S, N] = [{S}, {N}], got {tuple(y.shape)}")
    if N < 4:
        raise LoopscopeError(f"need at least 4 examples to fit probes, got {N}")
    tr, te = _split(N, groups, test_frac, seed)
    X = X.double()
    mean = X[:, tr].mean(1, keepdim=True)
    std = X[:, tr].std(1, keepdim=True).clamp_min(1e-8)
    Z = torch.cat([(X - mean) / std, torch.ones(S, N, 1, dtype=torch.float64)], -1)
    classes = torch.unique(y)
    Y = (y.unsqueeze(-1) == classes).double() * 2 - 1  # [S, N, C]
    Ztr, Ytr = Z[:, tr], Y[:, tr]
    A = Ztr.transpose(1, 2) @ Ztr + l2 * len(tr) * torch.eye(d + 1, dtype=torch.float64)
    W = torch.linalg.solve(A, Ztr.transpose(1, 2) @ Ytr)  # [S, d+1, C]
    pred = classes[(Z @ W).argmax(-1)]
    ok = (pred == y).double()
    return ProbeResult(
        W,
        mean,
        std,
        ok[:, tr].mean(1),
        ok[:, te].mean(1),
        classes,
        te,
        site_labels or [],
        {"seed": seed},
    )


def probe_trace(
    trace: Any,
    targets: Tensor,
    *,
    site: str = "state",
    positions: Any = None,
    mask: Tensor | None = None,
    seed: int = 0,
    l2: float = 1e-2,
    pooled: bool = True,
) -> tuple[ProbeResult, pd.DataFrame]:
    """Probe a target variable at every iteration of a trace.

    ``site="state"`` uses ``trace.states[1:]`` (``[T, B, pos, d]``), else ``trace[site]``.
    ``targets [B, pos]`` (-100 or ``mask`` False = no label). With ``pooled`` one probe per iteration
    is fitted on all labelled positions (examples grouped by sequence); otherwise one per
    (iteration, position). Returns the fit and a tidy frame (iteration, position, test_acc ...).
    """
    acts = trace.states[1:] if site == "state" else trace[site]
    T, B, P = acts.shape[:3]
    tg = torch.as_tensor(targets)
    m = (tg != -100) if mask is None else mask & (tg != -100)
    if pooled:
        b_idx, p_idx = torch.nonzero(m, as_tuple=True)
        X = acts[:, b_idx, p_idx].reshape(T, len(b_idx), -1)
        res = fit_probes(
            X,
            tg[b_idx, p_idx],
            groups=b_idx.numpy(),
            seed=seed,
            l2=l2,
            site_labels=[{"site": site, "iteration": t + 1, "position": -1} for t in range(T)],
        )
        return res, res.to_frame()
    frames = []
    pos_list = range(P) if positions is None else positions
    for p in pos_list:
        if not 0 <= p < P:
            raise LoopscopeError(f"position {p} out of range 0..{P - 1}")
        keep = m[:, p]
        if keep.sum() < 8 or tg[keep, p].unique().numel() < 2:
            continue
        X = acts[:, keep, p].reshape(T, int(keep.sum()), -1)
        res = fit_probes(
            X,
            tg[keep, p],
            seed=seed,
            l2=l2,
            site_labels=[{"site": site, "iteration": t + 1, "position": p} for t in range(T)],
        )
        frames.append(res.to_frame())
    return res, pd.concat(frames, ignore_index=True)


def transfer_matrix(res: ProbeResult, X: Tensor, y: Tensor) -> np.ndarray:
    """Accuracy of the probe fitted at site t scored at site t': ``[S, S]`` on held-out rows."""
    te = res.test_index
    S = X.shape[0]
    out = np.zeros((S, S))
    for t in range(S):
        Xt = X[:, te]
        Z = (Xt.double() - res.mean[t]) / res.std[t]
        Z = torch.cat([Z, torch.ones(*Z.shape[:2], 1, dtype=Z.dtype)], -1)
        pred = res.classes[(Z @ res.W[t]).argmax(-1)]  # [S, M]
        out[t] = (pred == torch.as_tensor(y)[te]).double().mean(1).numpy()
    return out


def onset(frame: pd.DataFrame, threshold: float = 0.9, by: str = "position") -> pd.DataFrame:
    """First iteration whose test accuracy reaches ``threshold``, per ``by`` group (-1 = never)."""
    rows = []
    for key, g in frame.groupby(by):
        g = g.sort_values("iteration")
        hit = g[g["test_acc"] >= threshold]
        rows.append({by: key, "onset": int(hit["iteration"].iloc[0]) if len(hit) else -1})
    return pd.DataFrame(rows)


def steer_set_projection(h: Tensor, u: Tensor, c: float) -> Tensor:
    """Set the component along unit ``u`` to ``c``: ``h - (h.u)u + c u`` (causal check of a probe)."""
    u = u / u.norm()
    return h - (h @ u).unsqueeze(-1) * u + c * u
