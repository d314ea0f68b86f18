"""Batched probe solvers: every function fits ``S`` independent probes at once.

Inputs are training rows only: ``Z [S, n, d]`` (already standardised), class indices
``y [S, n]`` (long, ``0..K-1``) and row weights ``w [S, n]`` (0 = row unused at that site, e.g.
unlabelled or non-finite). Objectives match scikit-learn so a per-site reference fit gives the
same optimum:

* ``ridge``: ``||Z W + b - Y||^2 + alpha ||W||^2`` on one-vs-rest ``Y in {-1, +1}`` (sklearn
  ``Ridge(alpha)``; intercept unpenalised), closed form in float64 (batched Cholesky).
* ``logistic``: ``0.5 ||W||^2 + C * sum_i CE_i`` (sklearn ``LogisticRegression(C)``; binary
  problems in sklearn's one-vector parametrisation, ``K > 2`` multinomial), by batched Newton or
  by L-BFGS with Kronecker-factored curvature (:mod:`loopscope.probes.logistic`).
* ``lowrank``: logistic loss with ``W = L R`` (``rank`` r) and ``0.5 (||L||^2 + ||R||^2)``
  (the variational form of a nuclear-norm penalty), batched L-BFGS with autograd gradients.
* ``mlp``: one ReLU hidden layer (``hidden`` units), Adam on minibatches, L2 ``alpha``
  (sklearn ``MLPClassifier`` conventions), float32.

Every solver returns a dict of parameters; :func:`scores` maps ``Z [S, M, d]`` to class scores
``[S, M, K]``. Linear kinds store ``W [S, d, K]`` and ``b [S, K]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.probes.lbfgs import minimize
from loopscope.probes.logistic import logistic

__all__ = ["ridge", "logistic", "lowrank", "mlp", "scores", "KINDS"]

KINDS = ("ridge", "logistic", "lowrank", "mlp")


def _wmean(x: Tensor, w: Tensor) -> Tensor:
    """Weighted mean over rows: ``x [S, n, k]``, ``w [S, n]`` -> ``[S, 1, k]`` (one bmm)."""
    return (w.unsqueeze(1).to(x.dtype) @ x) / w.sum(1).clamp_min(1e-30)[:, None, None].to(x.dtype)


def _std_floor(std: Tensor, mean: Tensor) -> Tensor:
    """Constant features (std at round-off level) are left unscaled."""
    return torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))


def standard_deviation(Zc: Tensor, w: Tensor, mean: Tensor) -> Tensor:
    """Weighted std ``[S, 1, d]`` of centred rows ``Zc [S, n, d]`` (1 where a feature is constant)."""
    return _std_floor(_wmean(Zc * Zc, w).sqrt(), mean)


def ridge_centred(
    Zc: Tensor, y: Tensor, w: Tensor, K: int, mean: Tensor, *, alpha: float = 1.0
) -> tuple[dict[str, Tensor], Tensor]:
    """:func:`ridge` on standardised data, from the centred rows ``Zc`` without scaling them.

    With ``D = diag(std)`` the standardised Gram is ``D^-1 (Zc^T W Zc) D^-1`` and its right-hand
    side ``D^-1 Zc^T W Y``; the std itself is the root of the centred Gram's diagonal over n.
    Returns ``(params on the standardised scale, std [S, 1, d])`` — the same optimum as
    standardising ``Zc`` and calling :func:`ridge` (the intercept is the label mean).
    """
    # the passes over the rows run in Zc's dtype (float32 halves them), the solve in float64
    w = w.double()
    wz = w.to(Zc.dtype)
    Y = F.one_hot(y, K).to(Zc.dtype) * 2 - 1  # [S, n, K]
    n = w.sum(1).clamp_min(1e-30)[:, None]  # [S, 1]
    Zw = Zc if bool((w == 1).all()) else Zc * wz.unsqueeze(-1)
    G = (Zw.transpose(1, 2) @ Zc).double()  # [S, d, d] centred Gram
    std = _std_floor((G.diagonal(dim1=1, dim2=2) / n).clamp_min(0).sqrt().unsqueeze(1), mean)
    inv = 1.0 / std  # [S, 1, d]
    d = Zc.shape[-1]
    A = G * inv.transpose(1, 2) * inv + alpha * torch.eye(d, dtype=torch.float64)
    # centred rows: Y's mean drops out of the right-hand side
    rhs = (Zw.transpose(1, 2) @ Y).double() * inv.transpose(1, 2)
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        W = torch.cholesky_solve(rhs, L)
    else:  # alpha = 0 on rank-deficient data: least-norm solution
        W = torch.linalg.lstsq(A, rhs, driver="gelsd").solution
    return {"W": W, "b": _wmean(Y.double(), w).squeeze(1)}, std


def ridge(Z: Tensor, y: Tensor, w: Tensor, K: int, *, alpha: float = 1.0) -> dict[str, Tensor]:
    """Closed-form one-vs-rest ridge for all sites in one batched solve (float64).

    Centred moments come from raw ones (``Z^T W Z - n m m^T``) so no centred copy of ``Z`` is
    made; with all-ones weights not even a weighted one.
    """
    Z, w = Z.double(), w.double()
    Y = F.one_hot(y, K).double() * 2 - 1  # [S, n, K]
    n = w.sum(1).clamp_min(1e-30)[:, None, None]
    zm, ym = _wmean(Z, w), _wmean(Y, w)
    Zw = Z if bool((w == 1).all()) else Z * w.unsqueeze(-1)
    d = Z.shape[-1]
    A = Zw.transpose(1, 2) @ Z - n * zm.transpose(1, 2) @ zm
    A = A + alpha * torch.eye(d, dtype=torch.float64)
    rhs = Zw.transpose(1, 2) @ Y - n * zm.transpose(1, 2) @ ym
    L, info = torch.linalg.cholesky_ex(A)
    if bool((info == 0).all()):
        W = torch.cholesky_solve(rhs, L)
    else:  # alpha = 0 on rank-deficient data: least-norm solution
        W = torch.linalg.lstsq(A, rhs, driver="gelsd").solution
    b = (ym - zm @ W).squeeze(1)
    return {"W": W, "b": b}


def _weighted_ce(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Per-site ``sum_i w_i CE_i``: ``logits [S, n, K]`` -> ``[S]``."""
    lp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -(w * lp).sum(1)


def _autograd_objective(loss_fn: Callable[[Tensor, Tensor], Tensor]):
    """``fg(x, sel)`` from a per-site loss via autograd."""

    def fg(x: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xl = x.detach().requires_grad_()
            f = loss_fn(xl, sel)
            (g,) = torch.autograd.grad(f.sum(), xl)
        return f.detach(), g

    return fg


def lowrank(
    Z: Tensor,
    y: Tensor,
    w: Tensor,
    K: int,
    *,
    rank: int,
    C: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Rank-``rank`` logistic probe ``W = L R`` for all sites (batched L-BFGS; non-convex,
    seeded init)."""
    Z, w = Z.double(), w.double()
    S, n, d = Z.shape
    nL, nR = d * rank, rank * K
    scale = 1.0 / (C * w.sum(1).clamp_min(1.0))

    def loss(x: Tensor, sel: Tensor) -> Tensor:
        s = len(sel)
        L = x[:, :nL].reshape(s, d, rank)
        R = x[:, nL : nL + nR].reshape(s, rank, K)
        b = x[:, nL + nR :]
        ce = _weighted_ce(Z[sel] @ (L @ R) + b.unsqueeze(1), y[sel], w[sel])
        reg = 0.5 * ((L * L).sum((1, 2)) + (R * R).sum((1, 2)))
        return (C * ce + reg) * scale[sel]

    x0 = torch.cat(
        [0.1 * torch.randn(S, nL + nR, generator=generator, dtype=Z.dtype), Z.new_zeros(S, K)], 1
    )
    x, _ = minimize(_autograd_objective(loss), x0, max_iter=max_iter, tol=tol)
    L = x[:, :nL].reshape(S, d, rank)
    R = x[:, nL : nL + nR].reshape(S, rank, K)
    return {"W": L @ R, "b": x[:, nL + nR :], "L": L, "R": R}


def mlp(
    Z: Tensor,
    y: Tensor,
    w: Tensor,
    K: int,
    *,
    hidden: int = 256,
    alpha: float = 1e-4,
    lr: float = 3e-3,
    epochs: int = 50,
    batch_size: int = 256,
    tol: float = 1e-4,
    patience: int = 10,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One-hidden-layer ReLU MLP probes for all sites at once (batched matmuls, Adam, float32).

    Conventions of scikit-learn's ``MLPClassifier``: Glorot-uniform init, loss = mean CE +
    ``alpha / (2 * batch)`` * squared weights, stop when the epoch loss has not improved by
    ``tol`` for ``patience`` epochs (checked on the mean loss over sites).
    """
    Z, w = Z.float(), w.float()
    S, n, d = Z.shape

    def glorot(fan_in: int, fan_out: int, *shape: int) -> Tensor:
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

    W1 = glorot(d, hidden, S, d, hidden).requires_grad_()
    b1 = glorot(d, hidden, S, 1, hidden).requires_grad_()
    W2 = glorot(hidden, K, S, hidden, K).requires_grad_()
    b2 = glorot(hidden, K, S, 1, K).requires_grad_()
    params = [W1, b1, W2, b2]
    opt = torch.optim.Adam(params, lr=lr)
    best, stall = float("inf"), 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator)
            total = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                zb, yb, wb = Z[:, idx], y[:, idx], w[:, idx]
                logits = torch.relu(zb @ W1 + b1) @ W2 + b2
                nb = wb.sum(1).clamp_min(1.0)
                ce = _weighted_ce(logits, yb, wb) / nb
                reg = alpha / (2 * nb) * ((W1 * W1).sum((1, 2)) + (W2 * W2).sum((1, 2)))
                loss = (ce + reg).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            total /= n * S
            if total > best - tol:
                stall += 1
                if stall >= patience:
                    break
            else:
                stall = 0
            best = min(best, total)
    return {"W1": W1.detach(), "b1": b1.detach(), "W2": W2.detach(), "b2": b2.detach()}


def fold_standardisation(
    kind: str, params: dict[str, Tensor], mean: Tensor, std: Tensor
) -> dict[str, Tensor]:
    """Parameters that act on raw ``X`` exactly as ``params`` act on ``(X - mean) / std``
    (the standardisation folds into the first linear layer)."""
    kW, kb = ("W1", "b1") if kind == "mlp" else ("W", "b")
    W = params[kW]
    inv = (1.0 / std).to(W.dtype).transpose(1, 2)  # [S, d, 1]
    Wr = W * inv
    shift = (mean.to(W.dtype) @ Wr).squeeze(1)  # [S, H]
    out = dict(params)
    out[kW] = Wr
    out[kb] = params[kb] - (shift.unsqueeze(1) if params[kb].dim() == 3 else shift)
    return out


def scores(kind: str, params: dict[str, Tensor], Z: Tensor) -> Tensor:
    """Class scores ``[S, M, K]`` of fitted probes on standardised ``Z [S, M, d]``."""
    if kind == "mlp":
        Z = Z.float()
        return torch.relu(Z @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
    if kind in ("ridge", "logistic", "lowrank"):
        W = params["W"]
        return Z.to(W.dtype) @ W + params["b"].unsqueeze(1)
    raise LoopscopeError(f"unknown probe kind {kind!r}; choose one of {', '.join(KINDS)}")
