"""L2-logistic probes for every site at once: scikit-learn's objective, second-order solvers.

Per site, with standardised rows ``z_i``, labels ``y_i``, row weights ``w_i`` (0 = row unused) and
``n = Σ w_i``, the objective is scikit-learn's ``LogisticRegression(C)`` in its own scaling::

    F(W, b) = [C Σ_i w_i CE(z_i W + b, y_i) + ½ ||W||²] / (C n)

so ``tol`` bounds the same gradient as scikit-learn's. Binary problems use its one-vector
parametrisation (a sigmoid), ``K > 2`` the full multinomial one (a softmax over K columns);
intercepts are unpenalised. Parameters are ``x [S, (d + 1) K']``: ``W`` (``d x K'``, row-major)
then ``b`` (``K'``), with ``K' = 1`` for binary problems and ``K`` otherwise.

Solvers (``solver=``):

* ``"lbfgs"`` (the default): per-site L-BFGS whose initial inverse Hessian is the
  Kronecker-factored curvature (K-FAC) ``(Ā ⊗ Ḡ + I / (C n))⁻¹``: ``Ḡ`` the weighted Gram of
  ``[z, 1]`` (once per fit), ``Ā`` the mean softmax curvature ``diag(p) - p pᵀ`` (``K' x K'``)
  at the latest iterate. At the first iterate (``p`` the same for every row) this IS the
  Hessian, so the first step is Newton's; whitened by ``Ḡ`` and scaled by ``Ā``, the problem
  left to L-BFGS is well conditioned: on the benchmark's probes it converges in 10-14 data
  passes per site where plain L-BFGS takes 80-100.
* ``"newton"``: Newton / IRLS. The Hessian is ``K'(K'+1)/2`` weighted Gram matrices of
  ``[z, 1]`` per site (formed in float32: it only shapes the step), factorised by one batched
  Cholesky per iteration; a site whose factorisation fails gets diagonal jitter (reported, never
  a crash). The multinomial Hessian is singular along equal intercept shifts (the softmax does
  not see them); the gradient has no component there, so a rank-one term on that direction
  makes the factorisation possible without changing the step. It converges in about 6
  iterations, but each Hessian costs ``K'(K'+1)/2`` Gram products: measured on 128 sites with
  2000 rows, it was no faster than the K-FAC L-BFGS for binary probes (d = 4 to 64, also
  nearly separable ones with C = 100) and 1.5-3.5x slower for 3 classes.

Both solve in float32 passes first; with ``dtype=float64`` they then continue in float64 until
``max |∇F| <= tol`` holds in float64 (usually one float64 pass confirms it): float32 gradients
are accurate to ~1e-7, far below the default ``tol``, and cost a quarter to a half of float64
ones here.

Data passes go site-chunk by site-chunk through numpy's stacked matmul: a chunk's rows stay in
cache between the forward and the backward product, no ``[S, n, ...]`` temporary is allocated
(large temporaries page-fault on every pass), and on the development machine numpy's BLAS ran
these skinny products 1.5-6x faster than ``torch.bmm``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.probes.lbfgs import armijo, minimize

__all__ = ["logistic", "check_solver", "SOLVERS"]

SOLVERS = ("lbfgs", "newton")

#: bytes of one chunk's rows: small enough to stay in cache between passes
_CHUNK_BYTES = 1 << 22
#: float32 gradients are good to ~1e-7; the float32 phase stops there at the latest
_TOL32 = 1e-6


class _Rows:
    """Every site's training rows, standardised, in chunks of consecutive sites.

    The float32 chunks are materialised once (the solver reads them on every pass); the float64
    passes read the raw activations in place (see :meth:`block`). No array exceeds a chunk:
    glibc hands memory above its mmap threshold (<= 32 MiB) back to the system on free, and a
    large array then page-faults afresh every time — measured as the larger part of a fit's
    time before this layout.

    Attributes:
        mean, std: ``[S, 1, d]`` float64 training-row statistics (std 1 for constant features).
    """

    def __init__(self, X: Tensor, rows: Tensor | None, w: Tensor, standardize: bool) -> None:
        self.X = X.detach().cpu().double().numpy()  # [S, N, d] raw activations
        self.rows = None if rows is None else rows.cpu().numpy()
        S, _, d = self.X.shape
        n = self.X.shape[1] if self.rows is None else len(self.rows)
        self.S, self.n, self.d = S, n, d
        self.chunk = max(1, _CHUNK_BYTES // max(1, n * d * 8))
        wn = w.detach().cpu().double().numpy()
        n_s = np.maximum(wn.sum(1), 1e-30)[:, None, None]
        self.mean = np.zeros((S, 1, d))
        self.std = np.ones((S, 1, d))
        self._f32: list[np.ndarray] = []
        unit = bool((wn == 1).all())
        for lo in range(0, S, self.chunk):
            hi = min(lo + self.chunk, S)
            Xc = self._gather(lo, hi)
            Z32 = np.empty(Xc.shape, dtype=np.float32)
            if standardize:
                wc = None if unit else wn[lo:hi, :, None]
                inv = self._standardise(Xc, wc, n_s[lo:hi], slice(lo, hi))
                np.multiply(Xc, inv, out=Z32, casting="same_kind")  # scale and cast: one pass
            else:
                Z32[...] = Xc
            self._f32.append(Z32)

    def _standardise(
        self, Xc: np.ndarray, wc: np.ndarray | None, n_s: np.ndarray, sites: slice
    ) -> np.ndarray:
        """Centre ``Xc`` in place, record the weighted mean and std of ``sites``; returns 1/std."""
        # finite activations can still overflow when squared: their std is inf, as in torch
        with np.errstate(over="ignore", invalid="ignore"):
            if wc is None:  # every row counts: no weighted copies
                self.mean[sites] = Xc.mean(1, keepdims=True)
                Xc -= self.mean[sites]
                ss = np.einsum("cnd,cnd->cd", Xc, Xc)[:, None, :]
            else:
                self.mean[sites] = (Xc * wc).sum(1, keepdims=True) / n_s
                Xc -= self.mean[sites]
                ss = np.einsum("cnd,cnd,cnk->ckd", Xc, Xc, wc)
            std = np.sqrt(ss / n_s)
            # constant features (std at round-off level) are left unscaled
            keep = std > 1e-12 * (1 + np.abs(self.mean[sites]))
            self.std[sites] = np.where(keep, std, 1.0)
        return 1.0 / self.std[sites]

    def _gather(self, lo: int, hi: int) -> np.ndarray:
        """Raw training rows of sites ``lo:hi`` (a fresh float64 array)."""
        return self.X[lo:hi].copy() if self.rows is None else self.X[lo:hi][:, self.rows]

    def block(self, sites: slice, dtype: np.dtype) -> np.ndarray:
        """``sites`` (within one chunk): float32, the standardised training rows ``[c, n, d]``;
        float64, the raw activations ``[c, N, d]`` (a view: the float64 passes fold the
        standardisation into the parameters and weigh non-training rows 0)."""
        if dtype == np.float64:
            return self.X[sites]
        k = sites.start // self.chunk
        lo = k * self.chunk
        return self._f32[k][sites.start - lo : sites.stop - lo]

    def all_rows(self, v: np.ndarray) -> np.ndarray:
        """Per-training-row values ``[S, n]`` spread over all ``N`` rows (0 elsewhere)."""
        if self.rows is None:
            return v
        out = np.zeros((self.S, self.X.shape[1]), dtype=v.dtype)
        out[:, self.rows] = v
        return out


class _Passes:
    """The objective's data passes in one precision: ``f``, ``∇f`` and the curvature ``Ā``."""

    def __init__(
        self, rows: _Rows, y: Tensor, w: Tensor, K: int, C: float, dtype: torch.dtype
    ) -> None:
        self.rows = rows
        self.dtype = np.float32 if dtype == torch.float32 else np.float64
        # float64 passes read the raw activations: every row, non-training ones weighted 0
        self.raw = self.dtype == np.float64
        y = y.detach().cpu().numpy().astype(np.intp)
        w = w.detach().cpu().double().numpy()
        self.n_s = np.maximum(w.sum(1), 1.0)  # [S]
        if self.raw:
            y, w = rows.all_rows(y), rows.all_rows(w)
        self.y = y  # [S, n] class indices
        self.w = w.astype(self.dtype)  # [S, n]
        self.S, self.n, self.d = rows.S, y.shape[1], rows.d
        self.K, self.Kp, self.C = K, (1 if K == 2 else K), C
        if self.Kp > 1:  # w · onehot(y) [S, K, n]: picks the label's logit with one product
            self.yw = np.zeros((self.S, K, self.n), dtype=self.dtype)
            np.put_along_axis(self.yw, self.y[:, None, :], self.w[:, None, :], 1)
        else:
            self.yw = self.y.astype(self.dtype) * self.w  # [S, n]
        self.unit_weights = bool((self.w == 1).all())

    @property
    def n_params(self) -> int:
        return (self.d + 1) * self.Kp

    def Z(self, sites: slice) -> np.ndarray:
        return self.rows.block(sites, self.dtype)

    def pieces(self, sel: np.ndarray) -> Iterator[tuple[slice, slice]]:
        """``(rows of sel, sites)``: runs of consecutive sites within one chunk."""
        start, chunk = 0, self.rows.chunk
        while start < len(sel):
            stop = start + 1
            while (
                stop < len(sel)
                and sel[stop] == sel[stop - 1] + 1
                and sel[stop] // chunk == sel[start] // chunk
            ):
                stop += 1
            yield slice(start, stop), slice(int(sel[start]), int(sel[stop - 1]) + 1)
            start = stop

    def _split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, Kp = self.d, self.Kp
        return x[:, : d * Kp].reshape(-1, d, Kp), x[:, d * Kp :]

    def probabilities(self, x: np.ndarray, sites: slice) -> np.ndarray:
        """Class probabilities ``[c, K', n]`` (the sigmoid of class 1 for binary problems)."""
        W, b = self._split(x)
        L = np.ascontiguousarray(np.matmul(self.Z(sites), W.astype(self.dtype)).transpose(0, 2, 1))
        L += b.astype(self.dtype)[:, :, None]  # [c, K', n]
        if self.Kp == 1:
            return expit(L)
        L -= L.max(1, keepdims=True)
        E = np.exp(L)
        return E / E.sum(1, keepdims=True)

    def evaluate(self, x: Tensor, sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``F`` [s], ``∇F`` [s, P] (float64) and ``Ā`` [s, K', K'] at ``x [s, P]`` for ``sel``."""
        xs = x.detach().cpu().double().numpy()
        s, Kp, d, C = len(xs), self.Kp, self.d, self.C
        f, g = np.empty(s), np.empty((s, self.n_params))
        A = np.empty((s, Kp, Kp))
        for rows, sites in self.pieces(sel.numpy()):
            W, _ = self._split(xs[rows])
            fd, gW, gb, A[rows] = self._data_terms(xs[rows], sites)
            f[rows] = C * fd + 0.5 * (W * W).sum((1, 2))
            g[rows, : d * Kp] = (C * gW + W).reshape(len(W), -1)
            g[rows, d * Kp :] = C * gb
        scale = 1.0 / (C * self.n_s[sel.numpy()])
        A /= self.n_s[sel.numpy()][:, None, None]
        return (
            torch.from_numpy(f * scale),
            torch.from_numpy(g * scale[:, None]),
            torch.from_numpy(A),
        )

    def _data_terms(
        self, x: np.ndarray, sites: slice
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``Σ w CE`` [c], its gradient in W [c, d, K'] and b [c, K'], and ``Σ w (diag p - p pᵀ)``."""
        Zc, wc, yw = self.Z(sites), self.w[sites], self.yw[sites]
        W, b = self._split(x)
        if self.raw:  # z W + b on standardised z == x (W / std) + (b - mean W / std) on raw x
            mean, inv = self.rows.mean[sites], 1.0 / self.rows.std[sites]  # [c, 1, d]
            W = W * inv.transpose(0, 2, 1)
            b = b - np.matmul(mean, W)[:, 0]
        L = np.ascontiguousarray(np.matmul(Zc, W.astype(Zc.dtype)).transpose(0, 2, 1))
        L += b.astype(Zc.dtype)[:, :, None]  # [c, K', n]: reductions over K' run along n
        if self.Kp == 1:
            z = L[:, 0]
            # softplus(z) = max(z, 0) + log(1 + exp(-|z|)): stable (log1p buys nothing at this
            # precision) and 2-4x faster than np.logaddexp / np.log1p
            sp = np.exp(-np.abs(z))
            sp += 1
            np.log(sp, out=sp)
            sp += np.maximum(z, 0)
            if not self.unit_weights:
                sp *= wc
            fd = sp.sum(1, dtype=np.float64) - (yw * z).sum(1, dtype=np.float64)
            p = expit(z)
            wp = p if self.unit_weights else wc * p
            R = (wp - yw)[:, None, :]  # w (p - y): [c, 1, n]
            curv = (wp * (1 - p)).sum(1, dtype=np.float64)[:, None, None]
        else:
            m = L.max(1, keepdims=True)
            picked = (L * yw).sum((1, 2), dtype=np.float64)  # Σ w z_y
            L -= m
            p = np.exp(L, out=L)  # in place: the logits are not needed any more
            se = p.sum(1, keepdims=True)
            p /= se
            lse = np.log(se, out=se)[:, 0]
            lse += m[:, 0]
            fd = (lse if self.unit_weights else wc * lse).sum(1, dtype=np.float64) - picked
            R = p if self.unit_weights else p * wc[:, None, :]  # w p: [c, K, n]
            curv = -np.matmul(R, p.transpose(0, 2, 1)).astype(np.float64)
            idx = np.arange(self.Kp)
            curv[:, idx, idx] += R.sum(2, dtype=np.float64)
            R -= yw  # w (p - onehot(y)); p itself is not needed any more
        gR = R.sum(2, dtype=np.float64)  # [c, K']
        gW = np.matmul(R, Zc).astype(np.float64)  # [c, K', d]
        if self.raw:  # back to the standardised coordinates: (Σ r x - mean Σ r) / std
            gW = (gW - gR[:, :, None] * mean) * inv
        return fd, gW.transpose(0, 2, 1), gR, curv

    def hessian(self, x: Tensor, sel: Tensor) -> Tensor:
        """The exact Hessian ``[s, P, P]`` of ``F`` (float64; the Gram products in this precision)."""
        xs = x.detach().cpu().double().numpy()
        d, Kp, P1 = self.d, self.Kp, self.d + 1
        H = np.zeros((len(xs), P1, Kp, P1, Kp))
        for rows, sites in self.pieces(sel.numpy()):
            p = self.probabilities(xs[rows], sites)  # [c, K', n]
            Zc, cw = self.Z(sites), self.C * self.w[sites]
            for k in range(Kp):
                for j in range(k, Kp):
                    c = p[:, k] * ((k == j) - p[:, j]) if Kp > 1 else p[:, 0] * (1 - p[:, 0])
                    c *= cw
                    # the Gram of [z, 1] weighted by c, without concatenating a copy of Z
                    Zw = Zc * c[:, :, None]
                    B = H[rows, :, k, :, j]
                    B[:, :d, :d] = np.matmul(Zw.transpose(0, 2, 1), Zc)
                    B[:, :d, d] = B[:, d, :d] = Zw.sum(1)
                    B[:, d, d] = c.sum(1)
                    H[rows, :, j, :, k] = B.transpose(0, 2, 1)
        H = torch.from_numpy(H.reshape(len(xs), P1 * Kp, P1 * Kp))
        reg = torch.ones(P1 * Kp, dtype=torch.float64)
        reg[d * Kp :] = 0  # intercepts are unpenalised
        H += torch.diag(reg)
        if Kp > 1:  # equal intercept shifts: a rank-one term the gradient never points along
            mu = H.diagonal(dim1=1, dim2=2).mean(1)[:, None, None]
            H[:, d * Kp :, d * Kp :] += mu / Kp
        return H / torch.from_numpy(self.C * self.n_s[sel.numpy()])[:, None, None]

    def gram(self) -> tuple[Tensor, Tensor]:
        """Eigen-decomposition of ``Ḡ = Σ w [z, 1][z, 1]ᵀ / n`` per site: ``(values, vectors)``."""
        G = np.empty((self.S, self.d + 1, self.d + 1))
        for rows, sites in self.pieces(np.arange(self.S)):
            Zc, wc = self.Z(sites), self.w[sites]
            Zw = Zc if self.unit_weights else Zc * wc[:, :, None]
            G[rows, : self.d, : self.d] = np.matmul(Zw.transpose(0, 2, 1), Zc)
            G[rows, : self.d, self.d] = G[rows, self.d, : self.d] = Zw.sum(1)
            G[rows, self.d, self.d] = wc.sum(1)
        G /= self.n_s[:, None, None]
        # a preconditioner's basis: float32 is accurate enough and twice as fast
        ev, V = torch.linalg.eigh(torch.from_numpy(G).float())
        return ev.double().clamp_min(0), V.double()


# -- Newton ---------------------------------------------------------------------------------------


def _cholesky_step(H: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Newton step ``-H⁻¹ g`` per site, and the diagonal jitter each needed (0: none).

    A rank-deficient or non-finite Hessian gets jitter growing from 1e-10 to 1 times its largest
    diagonal entry; a site no jitter rescues takes a scaled gradient step instead (jitter inf).
    """
    L, info = torch.linalg.cholesky_ex(H)
    jitter = torch.zeros(len(H), dtype=torch.float64)
    bad = info != 0
    if bool(bad.any()):
        eye = torch.eye(H.shape[-1], dtype=H.dtype)
        top = torch.nan_to_num(H.diagonal(dim1=1, dim2=2).abs().amax(1), nan=1.0).clamp_min(1e-12)
        for e in (1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0):
            rows = bad.nonzero().flatten()
            if rows.numel() == 0:
                break
            Lj, ij = torch.linalg.cholesky_ex(H[rows] + (e * top[rows])[:, None, None] * eye)
            ok = ij == 0
            L[rows[ok]] = Lj[ok]
            jitter[rows[ok]] = e * top[rows[ok]]
            bad[rows[ok]] = False
        jitter[bad] = float("inf")
        L[bad] = eye
    step = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    if bool(bad.any()):
        step[bad] = -g[bad] / top[bad].unsqueeze(1)
    return step, jitter


def _line_search(
    passes: _Passes, x: Tensor, f: Tensor, g: Tensor, step: Tensor, sel: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Armijo backtracking from the full step, then one secant extrapolation where the full step
    was still going downhill (far from the optimum the loss is flatter than its quadratic model:
    Newton steps fall short). Evaluates only the sites still searching. Returns ``(x, f, g,
    moved)``."""
    gd = (g * step).sum(1)
    searching = torch.ones_like(f, dtype=torch.bool)
    xn, fn, gn, moved, t = armijo(
        lambda xs, idx: passes.evaluate(xs, idx)[:2], x, f, g, step, searching, sel, max_halvings=30
    )
    slope = (gn * step).sum(1)  # φ'(1) at the accepted full steps
    far = moved & (t == 1) & (slope < 0)
    t2 = (gd / (gd - slope)).clamp(max=4.0)
    r = (far & (t2 > 1.05)).nonzero().flatten()
    if r.numel():
        xt = x[r] + t2[r, None] * step[r]
        ft, gt, _ = passes.evaluate(xt, sel[r])
        ok = torch.isfinite(ft) & (ft < fn[r])
        xn[r[ok]], fn[r[ok]], gn[r[ok]] = xt[ok], ft[ok], gt[ok]
    return xn, fn, gn, moved


def _newton(
    passes: _Passes, hess: _Passes, x: Tensor, *, tol: float, max_iter: int
) -> tuple[Tensor, int, Tensor]:
    """Newton iterations with per-site convergence; returns ``(x, iterations, jitter per site)``."""
    S = len(x)
    sel = torch.arange(S)
    f, g, _ = passes.evaluate(x, sel)
    jitter = torch.zeros(S, dtype=torch.float64)
    active = g.abs().amax(1) > tol
    it = 0
    while it < max_iter and bool(active.any()):
        it += 1
        a = active.nonzero().flatten()
        step, jit = _cholesky_step(hess.hessian(x[a], a), g[a])
        jitter[a] = torch.maximum(jitter[a], jit)
        xa, fa, ga, moved = _line_search(passes, x[a], f[a], g[a], step, a)
        x[a], f[a], g[a] = xa, fa, ga
        # a site whose line search cannot decrease F any more has reached this precision
        active[a] = moved & (ga.abs().amax(1) > tol)
    return x, it, jitter


# -- L-BFGS with Kronecker-factored curvature ------------------------------------------------------


def _kfac_lbfgs(
    passes: _Passes, x: Tensor, eig: tuple[Tensor, Tensor], *, tol: float, max_iter: int
) -> tuple[Tensor, int]:
    """L-BFGS from ``x`` with ``(Ā ⊗ Ḡ + I / (C n))⁻¹`` as the initial inverse Hessian;
    ``eig`` is Ḡ's eigen-decomposition. Returns ``(x, iterations)``."""
    ev, V = eig
    Kp, d = passes.Kp, passes.d
    curv = torch.zeros(passes.S, Kp, Kp, dtype=torch.float64)
    lam = torch.from_numpy(1.0 / (passes.C * passes.n_s))  # the scaled L2 curvature

    def fg(xs: Tensor, sel: Tensor) -> tuple[Tensor, Tensor]:
        f, g, A = passes.evaluate(xs, sel)
        curv[sel] = A  # the latest iterate's curvature shapes the next step
        return f, g

    def precond(q: Tensor, sel: Tensor) -> Tensor:
        s = len(sel)
        Q = torch.cat([q[:, : d * Kp].reshape(s, d, Kp), q[:, d * Kp :].unsqueeze(1)], 1)
        if Kp == 1:  # binary: the curvature is a scalar
            ea, U = curv[sel, :, 0], torch.ones(s, 1, 1, dtype=torch.float64)
        else:
            ea, U = torch.linalg.eigh(curv[sel])
        Vs, Qn, Un = V[sel].numpy(), Q.numpy(), U.numpy()
        c = np.matmul(np.matmul(Vs.transpose(0, 2, 1), Qn), Un)  # in the eigenbases of Ḡ, Ā
        den = ev[sel].unsqueeze(-1) * ea.clamp_min(0).unsqueeze(1) + lam[sel, None, None]
        out = torch.from_numpy(np.matmul(np.matmul(Vs, c / den.numpy()), Un.transpose(0, 2, 1)))
        return torch.cat([out[:, :d].reshape(s, -1), out[:, d]], 1)

    # the passes slice sites for free: converged sites leave the working set at once
    return minimize(fg, x, max_iter=max_iter, tol=tol, precond=precond, compact=1.0)


# -- the solver -----------------------------------------------------------------------------------


def check_solver(solver: str) -> str:
    """``solver`` if it names a logistic solver (else a one-line error naming the choices)."""
    if solver not in SOLVERS:
        raise LoopscopeError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return solver


def logistic(
    X: Tensor,
    y: Tensor,
    w: Tensor,
    K: int,
    *,
    rows: Tensor | None = None,
    standardize: bool = False,
    C: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    dtype: torch.dtype = torch.float64,
    solver: str = "lbfgs",
) -> dict[str, Tensor]:
    """L2-logistic regression for all ``S`` sites at once (see the module docstring).

    Args:
        X: ``[S, N, d]`` activations (standardised already unless ``standardize``).
        y: ``[S, n]`` class indices ``0..K-1`` of the training rows; w: ``[S, n]`` their weights
            (0 = unused); K: classes.
        rows: ``[n]`` the training rows of ``X`` (default: all ``N``).
        standardize: z-score each site with its training rows' weighted mean and std first.
        C: inverse L2 strength (scikit-learn's). max_iter: iteration cap (of each precision).
        tol: stop at ``max |∇F| <= tol``. dtype: precision the answer is converged in.
        solver: ``"lbfgs"`` (K-FAC preconditioned) or ``"newton"``.

    Returns:
        ``W [S, d, K]``, ``b [S, K]`` on the standardised scale (binary problems: class 0's
        column is zero), ``mean`` / ``std`` ``[S, 1, d]`` (the standardisation; 0 / 1 without),
        and per site ``iterations`` and ``jitter`` (the diagonal a failed Hessian factorisation
        needed; 0: none, inf: none sufficed and the site took gradient steps).
    """
    S, _, d = X.shape
    Kp = 1 if K == 2 else K
    check_solver(solver)
    if rows is not None:  # gathering rows in memory order is ~2x faster; the fit ignores order
        order = torch.argsort(rows)
        rows, y, w = rows[order], y[:, order], w[:, order]
    data = _Rows(X, rows, w, standardize)
    fast = _Passes(data, y, w, K, C, torch.float32)
    # the float32 phase aims below tol, so that one float64 pass usually confirms it
    phases = [(fast, max(0.9 * tol, _TOL32) if dtype == torch.float64 else tol)]
    if dtype == torch.float64:
        phases.append((_Passes(data, y, w, K, C, torch.float64), tol))
    x = torch.zeros(S, fast.n_params, dtype=torch.float64)
    iterations = torch.zeros(S, dtype=torch.long)
    jitter = torch.zeros(S, dtype=torch.float64)
    eig = fast.gram() if solver == "lbfgs" else None
    for passes, phase_tol in phases:
        if solver == "newton":
            x, it, jit = _newton(passes, fast, x, tol=phase_tol, max_iter=max_iter)
            jitter = torch.maximum(jitter, jit)
        else:
            x, it = _kfac_lbfgs(passes, x, eig, tol=phase_tol, max_iter=max_iter)
        iterations += it
    W = x[:, : d * Kp].reshape(S, d, Kp)
    b = x[:, d * Kp :]
    if Kp == 1:  # scikit-learn's binary vector is class 1's score against a zero class 0
        W = torch.cat([torch.zeros_like(W), W], 2)
        b = torch.cat([torch.zeros_like(b), b], 1)
    else:  # the softmax ignores equal intercept shifts: report scikit-learn's (sum 0)
        b = b - b.mean(1, keepdim=True)
    return {
        "W": W,
        "b": b,
        "mean": torch.from_numpy(data.mean),
        "std": torch.from_numpy(data.std),
        "iterations": iterations,
        "jitter": jitter,
    }
