"""Batched L-BFGS: ``S`` independent smooth problems advanced in lockstep, each with its own
curvature history, step size and convergence test.

Running one L-BFGS on the *sum* of S objectives shares step sizes and curvature pairs between
unrelated problems (slow, and the worst-conditioned site sets the pace); here the two-loop
recursion, the Armijo backtracking and the stopping rule are vectorised per site, and converged
sites drop out of the working set (the objective is re-sliced only when the set halves).

Example:
    >>> import torch
    >>> A = torch.tensor([[1.0], [10.0]], dtype=torch.float64)   # two quadratics 0.5 a x^2 - x
    >>> def fg(x, sel):
    ...     a = A[sel]
    ...     return (0.5 * a * x * x - x).sum(1), a * x - 1
    >>> x, n_iter = minimize(fg, torch.zeros(2, 1, dtype=torch.float64), tol=1e-12)
    >>> [round(v, 8) for v in x.flatten().tolist()]
    [1.0, 0.1]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["minimize"]

#: ``fg(x [s, P], sel [s]) -> (f [s], g [s, P])`` for the sites ``sel`` (global indices)
ObjectiveFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def minimize(
    fg: ObjectiveFn,
    x0: Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    precond: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, int]:
    """Minimise S problems at once from ``x0 [S, P]``.

    ``precond(q, sel) -> H0 q`` is an optional fixed initial inverse-Hessian (e.g. from a
    curvature bound) used in the two-loop recursion instead of the scalar ``s.y / y.y``.
    Stops a site when ``max |grad| <= tol`` or its line search cannot decrease ``f`` any more.
    Returns the solutions ``[S, P]`` and the number of iterations run.
    """
    S, P = x0.shape
    out = x0.clone()
    idx = torch.arange(S)
    x = x0.clone()
    f, g = fg(x, idx)
    m = history
    Sh = x.new_zeros(m, S, P)
    Yh = x.new_zeros(m, S, P)
    rho = x.new_zeros(m, S)
    # first step without a preconditioner: unit length along -g
    gamma = torch.ones_like(f) if precond is not None else 1.0 / g.norm(dim=1).clamp_min(1e-12)
    head, n_hist = 0, 0
    active = g.abs().amax(1) > tol
    n_iter = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        n_iter += 1
        if int(active.sum()) <= len(idx) // 2:  # compact the working set
            out[idx] = x
            keep = torch.nonzero(active).flatten()
            idx, x, f, g = idx[keep], x[keep], f[keep], g[keep]
            Sh, Yh, rho, gamma, active = (
                Sh[:, keep],
                Yh[:, keep],
                rho[:, keep],
                gamma[keep],
                active[keep],
            )
        # two-loop recursion, newest pair first (pairs with rho = 0 are inert)
        q = g.clone()
        order = [(head - 1 - i) % m for i in range(n_hist)]
        alphas = []
        for j in order:
            a = rho[j] * (Sh[j] * q).sum(1)
            q -= a.unsqueeze(1) * Yh[j]
            alphas.append(a)
        r = gamma.unsqueeze(1) * q if precond is None else precond(q, idx)
        for j, a in zip(reversed(order), reversed(alphas), strict=True):
            b = rho[j] * (Yh[j] * r).sum(1)
            r += Sh[j] * (a - b).unsqueeze(1)
        d = -r
        gd = (g * d).sum(1)
        uphill = gd >= 0
        if bool(uphill.any()):  # lost descent (bad curvature): fall back to steepest descent
            sd = gamma.unsqueeze(1) * g if precond is None else precond(g, idx)
            d = torch.where(uphill.unsqueeze(1), -sd, d)
            gd = (g * d).sum(1)
        # Armijo backtracking, per site
        t = torch.ones_like(f)
        pending = active.clone()
        xn, fn, gn = x.clone(), f.clone(), g.clone()
        for _ in range(40):
            xt = x + t.unsqueeze(1) * d
            ft, gt = fg(xt, idx)
            ok = pending & torch.isfinite(ft) & (ft <= f + 1e-4 * t * gd)
            xn = torch.where(ok.unsqueeze(1), xt, xn)
            fn = torch.where(ok, ft, fn)
            gn = torch.where(ok.unsqueeze(1), gt, gn)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            t = torch.where(pending, 0.5 * t, t)
        moved = active & ~pending
        s, y = xn - x, gn - g
        sy = (s * y).sum(1)
        valid = moved & (sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1))
        Sh[head] = torch.where(valid.unsqueeze(1), s, torch.zeros_like(s))
        Yh[head] = torch.where(valid.unsqueeze(1), y, torch.zeros_like(y))
        rho[head] = torch.where(valid, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        gamma = torch.where(valid, sy / (y * y).sum(1).clamp_min(1e-300), gamma)
        head, n_hist = (head + 1) % m, min(n_hist + 1, m)
        x, f, g = xn, fn, gn
        active = moved & (g.abs().amax(1) > tol)
    out[idx] = x
    return out, n_iter
