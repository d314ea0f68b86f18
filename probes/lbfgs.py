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

__all__ = ["minimize", "armijo"]

#: ``fg(x [s, P], sel [s]) -> (f [s], g [s, P])`` for the sites ``sel`` (global indices)
ObjectiveFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
#: ``precond(q [s, P], sel [s]) -> H0 q``: a fixed initial inverse Hessian per site
Preconditioner = Callable[[Tensor, Tensor], Tensor]


class _History:
    """Per-site curvature pairs ``(s, y)`` in a ring of ``m`` slots (a pair with rho = 0 is
    inert), and the scalar initial inverse-Hessian ``gamma`` of each site."""

    def __init__(self, m: int, x: Tensor, gamma: Tensor) -> None:
        S, P = x.shape
        self.m, self.head, self.n = m, 0, 0
        self.s = x.new_zeros(m, S, P)
        self.y = x.new_zeros(m, S, P)
        self.rho = x.new_zeros(m, S)
        self.gamma = gamma

    def keep(self, rows: Tensor) -> None:
        """Keep the sites ``rows`` of the working set (the others converged)."""
        self.s, self.y, self.rho = self.s[:, rows], self.y[:, rows], self.rho[:, rows]
        self.gamma = self.gamma[rows]

    def h0(self, q: Tensor, precond: Preconditioner | None, idx: Tensor) -> Tensor:
        return self.gamma.unsqueeze(1) * q if precond is None else precond(q, idx)

    def direction(self, g: Tensor, precond: Preconditioner | None, idx: Tensor) -> Tensor:
        """``-H g`` by the two-loop recursion, newest pair first."""
        q = g.clone()
        order = [(self.head - 1 - i) % self.m for i in range(self.n)]
        alphas = []
        for j in order:
            a = self.rho[j] * (self.s[j] * q).sum(1)
            q -= a.unsqueeze(1) * self.y[j]
            alphas.append(a)
        r = self.h0(q, precond, idx)
        for j, a in zip(reversed(order), reversed(alphas), strict=True):
            b = self.rho[j] * (self.y[j] * r).sum(1)
            r += self.s[j] * (a - b).unsqueeze(1)
        return -r

    def push(self, s: Tensor, y: Tensor, moved: Tensor) -> None:
        """Store the step's pair where the site moved with positive curvature ``s.y``."""
        sy = (s * y).sum(1)
        valid = moved & (sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1))
        self.s[self.head] = torch.where(valid.unsqueeze(1), s, torch.zeros_like(s))
        self.y[self.head] = torch.where(valid.unsqueeze(1), y, torch.zeros_like(y))
        self.rho[self.head] = torch.where(valid, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        self.gamma = torch.where(valid, sy / (y * y).sum(1).clamp_min(1e-300), self.gamma)
        self.head, self.n = (self.head + 1) % self.m, min(self.n + 1, self.m)


def armijo(
    fg: ObjectiveFn,
    x: Tensor,
    f: Tensor,
    g: Tensor,
    d: Tensor,
    active: Tensor,
    idx: Tensor,
    *,
    max_halvings: int = 40,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-site Armijo backtracking from the unit step along the descent direction ``d``.

    Each trial evaluates only the sites still searching. Returns the accepted ``(x, f, g)``
    (unchanged where no step was accepted), ``moved``, the active sites that took a step, and
    ``t``, the step length each moved site took.
    """
    gd = (g * d).sum(1)
    t = torch.ones_like(f)
    pending = active.clone()
    xn, fn, gn = x.clone(), f.clone(), g.clone()
    for _ in range(max_halvings):
        r = pending.nonzero().flatten()
        xt = x[r] + t[r].unsqueeze(1) * d[r]
        ft, gt = fg(xt, idx[r])
        ok = torch.isfinite(ft) & (ft <= f[r] + 1e-4 * t[r] * gd[r])
        hit = r[ok]
        xn[hit], fn[hit], gn[hit] = xt[ok], ft[ok], gt[ok]
        pending[hit] = False
        if not bool(pending.any()):
            break
        t = torch.where(pending, 0.5 * t, t)
    return xn, fn, gn, active & ~pending, t


def minimize(
    fg: ObjectiveFn,
    x0: Tensor,
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    history: int = 10,
    precond: Preconditioner | None = None,
    compact: float = 0.5,
) -> tuple[Tensor, int]:
    """Minimise S problems at once from ``x0 [S, P]``.

    ``precond(q, sel) -> H0 q`` is an optional fixed initial inverse-Hessian (e.g. from a
    curvature bound) used in the two-loop recursion instead of the scalar ``s.y / y.y``.
    Converged sites leave the working set once the active ones are at most ``compact`` of it
    (1.0: at once, for objectives that slice for free; 0.5 amortises re-slicing copies).
    Stops a site when ``max |grad| <= tol`` or its line search cannot decrease ``f`` any more.
    Returns the solutions ``[S, P]`` and the number of iterations run.
    """
    S, P = x0.shape
    out = x0.clone()
    idx = torch.arange(S)
    x = x0.clone()
    f, g = fg(x, idx)
    # first step without a preconditioner: unit length along -g
    gamma = torch.ones_like(f) if precond is not None else 1.0 / g.norm(dim=1).clamp_min(1e-12)
    hist = _History(history, x, gamma)
    active = g.abs().amax(1) > tol
    n_iter = 0
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        n_iter += 1
        n_active = int(active.sum())
        if n_active < len(idx) and n_active <= compact * len(idx):  # compact the working set
            out[idx] = x
            keep = torch.nonzero(active).flatten()
            idx, x, f, g, active = idx[keep], x[keep], f[keep], g[keep], active[keep]
            hist.keep(keep)
        d = hist.direction(g, precond, idx)
        uphill = (g * d).sum(1) >= 0
        if bool(uphill.any()):  # lost descent (bad curvature): fall back to steepest descent
            d = torch.where(uphill.unsqueeze(1), -hist.h0(g, precond, idx), d)
        xn, fn, gn, moved, _ = armijo(fg, x, f, g, d, active, idx)
        hist.push(xn - x, gn - g, moved)
        x, f, g = xn, fn, gn
        active = moved & (g.abs().amax(1) > tol)
    out[idx] = x
    return out, n_iter
