"""Batched probe solvers: every function fits ``S`` independent probes at once.

Inputs are training rows only: ``Z [S, n, d]`` (already standardised), class indices
``y [S, n]`` (long, ``0..K-1``) and row weights ``w [S, n]`` (0 = row unused at that site, e.g.
unlabelled or non-finite). Objectives match scikit-learn so a per-site reference fit gives the
same optimum:

* ``ridge``: ``||Z W + b - Y||^2 + alpha ||W||^2`` on one-vs-rest ``Y in {-1, +1}`` (sklearn
  ``Ridge(alpha)``; intercept unpenalised), closed form in float64 (batched Cholesky).
* ``logistic``: ``0.5 ||W||^2 + C * sum_i CE_i`` (sklearn ``LogisticRegression(C)``): binary
  problems by batched Newton (exact Hessians ``[S, d+1, d+1]``), ``K > 2`` by multinomial
  L-BFGS on the sum of the S objectives (separable, so its optimum is every site's optimum).
* ``lowrank``: logistic loss with ``W = L R`` (``rank`` r) and ``0.5 (||L||^2 + ||R||^2)``
  (the variational form of a nuclear-norm penalty), L-BFGS.
* ``mlp``: one ReLU hidden layer (``hidden`` units), Adam on minibatches, L2 ``alpha``
  (sklearn ``MLPClassifier`` conventions), float32.

Every solver returns a dict of parameters; :func:`scores` maps ``Z [S, M, d]`` to class scores
``[S, M, K]``. Linear kinds store ``W [S, d, K]`` and ``b [S, K]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.errors import LoopscopeError

__all__ = ["ridge", "logistic", "lowrank", "mlp", "scores", "KINDS"]

KINDS = ("ridge", "logistic", "lowrank", "mlp")


def _wmean(x: Tensor, w: Tensor) -> Tensor:
    """Weighted mean over rows: ``x [S, n, k]``, ``w [S, n]`` -> ``[S, 1, k]``."""
    return (w.unsqueeze(-1) * x).sum(1, keepdim=True) / w.sum(1).clamp_min(1e-30)[:, None, None]


def ridge(Z: Tensor, y: Tensor, w: Tensor, K: int, *, alpha: float = 1.0) -> dict[str, Tensor]:
    """Closed-form one-vs-rest ridge for all sites in one batched solve (float64)."""
    Z, w = Z.double(), w.double()
    Y = F.one_hot(y, K).double() * 2 - 1  # [S, n, K]
    zm, ym = _wmean(Z, w), _wmean(Y, w)
    Zc, Yc = Z - zm, Y - ym
    Zw = Zc * w.unsqueeze(-1)
    d = Z.shape[-1]
    A = Zw.transpose(1, 2) @ Zc + alpha * torch.eye(d, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(A)
    rhs = Zw.transpose(1, 2) @ Yc
    if bool((info == 0).all()):
        W = torch.cholesky_solve(rhs, L)
    else:  # alpha = 0 on rank-deficient data: least-norm solution
        W = torch.linalg.lstsq(A, rhs, driver="gelsd").solution
    b = (ym - zm @ W).squeeze(1)
    return {"W": W, "b": b}


def _logistic_binary(
    Z: Tensor, y: Tensor, w: Tensor, C: float, max_iter: int, tol: float
) -> dict[str, Tensor]:
    S, n, d = Z.shape
    Zb = torch.cat([Z, torch.ones(S, n, 1, dtype=Z.dtype)], -1)  # [S, n, d+1]
    yf = y.to(Z.dtype)
    pen = torch.ones(d + 1, dtype=Z.dtype)
    pen[-1] = 0.0  # intercept unpenalised, as in scikit-learn
    beta = torch.zeros(S, d + 1, dtype=Z.dtype)

    def objective(bt: Tensor) -> Tensor:
        z = (Zb @ bt.unsqueeze(-1)).squeeze(-1)
        return C * (w * (F.softplus(z) - yf * z)).sum(1) + 0.5 * (pen * bt * bt).sum(1)

    active = torch.ones(S, dtype=torch.bool)
    f0 = objective(beta)
    for _ in range(max_iter):
        z = (Zb @ beta.unsqueeze(-1)).squeeze(-1)
        p = torch.sigmoid(z)
        g = C * (Zb.transpose(1, 2) @ (w * (p - yf)).unsqueeze(-1)).squeeze(-1) + pen * beta
        r = C * w * p * (1 - p)
        H = (Zb * r.unsqueeze(-1)).transpose(1, 2) @ Zb
        # a tiny floor keeps the unpenalised intercept solvable on separable data
        H = H + torch.diag_embed(pen + 1e-10)
        step = torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
        dec = (g * step).sum(1)  # squared Newton decrement
        active = active & (dec > tol * (1.0 + f0.abs()))
        if not bool(active.any()):
            break
        a = torch.ones(S, dtype=Z.dtype)
        pending = active.clone()
        for _ in range(40):  # backtracking (Armijo), per site
            cand = beta - a.unsqueeze(-1) * step
            fc = objective(cand)
            ok = pending & (fc <= f0 - 1e-4 * a * dec)
            beta = torch.where(ok.unsqueeze(-1), cand, beta)
            f0 = torch.where(ok, fc, f0)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            a = torch.where(pending, a * 0.5, a)
        active = active & ~pending  # a site whose line search failed is at its optimum
    W = torch.zeros(S, d, 2, dtype=Z.dtype)
    W[:, :, 1] = beta[:, :d]
    b = torch.zeros(S, 2, dtype=Z.dtype)
    b[:, 1] = beta[:, d]
    return {"W": W, "b": b}


def _lbfgs(params: list[Tensor], loss_fn, max_iter: int, tol: float) -> None:
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def _weighted_ce(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Per-site ``sum_i w_i CE_i``: ``logits [S, n, K]`` -> ``[S]``."""
    lp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -(w * lp).sum(1)


def logistic(
    Z: Tensor,
    y: Tensor,
    w: Tensor,
    K: int,
    *,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-12,
) -> dict[str, Tensor]:
    """L2-logistic regression for all sites at once (Newton if K = 2, else multinomial L-BFGS)."""
    Z, w = Z.double(), w.double()
    if K == 2:
        return _logistic_binary(Z, y, w, C, max_iter, tol)
    S, n, d = Z.shape
    W = torch.zeros(S, d, K, dtype=Z.dtype, requires_grad=True)
    b = torch.zeros(S, K, dtype=Z.dtype, requires_grad=True)
    scale = 1.0 / w.sum(1).clamp_min(1.0)  # per-site scaling keeps gradients O(1)

    def loss() -> Tensor:
        ce = _weighted_ce(Z @ W + b.unsqueeze(1), y, w)
        return ((C * ce + 0.5 * (W * W).sum((1, 2))) * scale).sum()

    _lbfgs([W, b], loss, max_iter=max(10 * max_iter, 500), tol=1e-9)
    return {"W": W.detach(), "b": b.detach()}


def lowrank(
    Z: Tensor,
    y: Tensor,
    w: Tensor,
    K: int,
    *,
    rank: int,
    C: float = 1.0,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Rank-``rank`` logistic probe ``W = L R`` for all sites (L-BFGS; non-convex, seeded init)."""
    Z, w = Z.double(), w.double()
    S, n, d = Z.shape
    L = (0.01 * torch.randn(S, d, rank, generator=generator, dtype=Z.dtype)).requires_grad_()
    R = (0.01 * torch.randn(S, rank, K, generator=generator, dtype=Z.dtype)).requires_grad_()
    b = torch.zeros(S, K, dtype=Z.dtype, requires_grad=True)
    scale = 1.0 / w.sum(1).clamp_min(1.0)

    def loss() -> Tensor:
        ce = _weighted_ce(Z @ (L @ R) + b.unsqueeze(1), y, w)
        reg = 0.5 * ((L * L).sum((1, 2)) + (R * R).sum((1, 2)))
        return ((C * ce + reg) * scale).sum()

    _lbfgs([L, R, b], loss, max_iter=max(10 * max_iter, 500), tol=1e-9)
    L, R = L.detach(), R.detach()
    return {"W": L @ R, "b": b.detach(), "L": L, "R": R}


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


def scores(kind: str, params: dict[str, Tensor], Z: Tensor) -> Tensor:
    """Class scores ``[S, M, K]`` of fitted probes on standardised ``Z [S, M, d]``."""
    if kind == "mlp":
        Z = Z.float()
        return torch.relu(Z @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]
    if kind in ("ridge", "logistic", "lowrank"):
        W = params["W"]
        return Z.to(W.dtype) @ W + params["b"].unsqueeze(1)
    raise LoopscopeError(f"unknown probe kind {kind!r}; choose one of {', '.join(KINDS)}")
