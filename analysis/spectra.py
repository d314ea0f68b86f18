"""Jacobian spectra of a loop's step at given states (fixed points, or any state).

Dense path (``n <= dense_max``, default 2048): per-sample ``J = d f / d h`` by batched jvp
(:meth:`LoopMap.jacobian`), then ``torch.linalg.eigvals`` and ``svdvals``. Matrix-free path:
``scipy.sparse.linalg.eigs`` on a ``LinearOperator`` of jvps with ``ncv = max(64, 4k)`` (scipy's
default ncv stalls on spectra clustered on a circle) and a fixed ``v0``; ``svds`` with jvp/vjp
for sigma_max. Complex leading pairs are exact on both paths. ``power_iteration_rho`` (the anchor
that torchdeq uses) is provided only to show that a real Rayleigh quotient is *not* rho.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    >>> h = torch.full((1, 3), 0.9575040240772688, dtype=torch.float64)
    >>> s = spectrum(loop, None, h)
    >>> round(s.rho[0], 6)
    0.166372
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.core.errors import LoopscopeError, reject_unknown_kwargs

__all__ = ["spectrum", "spectrum_map", "Spectrum", "power_iteration_rho"]


@dataclass
class Spectrum:
    """Per-sample spectral summary of ``J(h)``.

    Attributes:
        eigenvalues: per sample, the top-k eigenvalues by modulus (complex numpy arrays).
        rho: spectral radius per sample; ``unstable``: number of |lambda| > 1;
        sigma_max: largest singular value; ``method``: "dense" or "arpack"; ``matvecs``: jvps used.
    """

    eigenvalues: list[np.ndarray]
    rho: list[float]
    unstable: list[int]
    sigma_max: list[float]
    method: str
    n: int
    matvecs: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def margin(self) -> list[float]:
        """``1 - rho`` (positive = locally stable)."""
        return [1.0 - r for r in self.rho]

    @property
    def nonnormality(self) -> list[float]:
        """``sigma_max / rho`` (1 for normal matrices)."""
        return [s / r if r > 0 else math.inf for s, r in zip(self.sigma_max, self.rho, strict=True)]

    def timescales(self, b: int = 0) -> np.ndarray:
        """Mode time scales ``tau_i = -1 / ln|lambda_i|`` (inf for |lambda| = 1)."""
        m = np.abs(self.eigenvalues[b])
        with np.errstate(divide="ignore"):
            return -1.0 / np.log(m)

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, eigenvalue rank)."""
        rows = []
        for b, ev in enumerate(self.eigenvalues):
            for i, lam in enumerate(ev):
                rows.append(
                    {
                        "sample": b,
                        "rank": i,
                        "real": float(lam.real),
                        "imag": float(lam.imag),
                        "modulus": float(abs(lam)),
                        "angle": float(np.angle(lam)),
                        "timescale": _timescale(abs(lam)),
                        "rho": self.rho[b],
                        "margin": 1.0 - self.rho[b],
                        "unstable": self.unstable[b],
                        "sigma_max": self.sigma_max[b],
                        "nonnormality": self.nonnormality[b],
                        "method": self.method,
                    }
                )
        return pd.DataFrame(rows)


def _timescale(mod: float) -> float:
    """``-1 / ln|lambda|`` (0 for lambda = 0, inf for |lambda| = 1, negative when growing)."""
    if mod == 0.0:
        return 0.0
    if mod == 1.0:
        return math.inf
    return -1.0 / math.log(mod)


_OPTIONS = ("k", "method", "dense_max", "tol", "ncv", "seed", "t", "sigma")


def spectrum(
    loop: Any,
    inputs: Any,
    state: Tensor,
    k: int | None = None,
    method: str = "auto",
    **options: Any,
) -> Spectrum:
    """Eigenvalues of the step's Jacobian at ``state [B, ...]`` (per sample).

    Args:
        k: eigenvalues kept (default: all on the dense path, 6 on ARPACK).
        method: "auto" (dense for n ≤ ``dense_max``, else ARPACK) | "dense" | "arpack".
        **options: ``dense_max`` (2048), ``tol`` (1e-8), ``ncv`` (max(64, 4k)), ``seed`` (ARPACK
            ``v0``), ``t`` (iteration index for non-autonomous loops), ``sigma`` (compute
            sigma_max, default True).
    """
    options = {**options, "method": method}
    if k is not None:
        options["k"] = k
    reject_unknown_kwargs("spectrum", options, _OPTIONS)
    if not isinstance(state, Tensor) or state.dim() < 2:
        raise LoopscopeError("state must be a tensor [B, ...] with a batch axis")
    m = LoopMap(
        loop,
        inputs,
        state_shape=tuple(state.shape[1:]),
        batch_size=state.shape[0],
        t=options.get("t"),
    )
    z = m.flatten(state.to(m.dtype or state.dtype))
    return spectrum_map(m, z, **{k: v for k, v in options.items() if k != "t"})


def spectrum_map(m: LoopMap, z: Tensor, **options: Any) -> Spectrum:
    """:func:`spectrum` on an existing :class:`LoopMap` at flat states ``z [b, n]`` (one row
    per sample of the map; used by the fixed-point census)."""
    reject_unknown_kwargs("spectrum", options, _OPTIONS)
    method = options.get("method", "auto")
    if method not in ("auto", "dense", "arpack"):
        raise LoopscopeError(f"spectrum method must be auto, dense or arpack, got {method!r}")
    n = m.n
    k = options.get("k")
    if k is not None and (not isinstance(k, int) or k < 1 or k > n):
        raise LoopscopeError(f"k must be an integer in 1..{n} (the state dimension), got {k!r}")
    dense_max = int(options.get("dense_max", 2048))
    use_dense = method == "dense" or (method == "auto" and n <= dense_max)
    want_sigma = bool(options.get("sigma", True))
    if use_dense:
        J = m.jacobian(z)  # [B, n, n]
        ev = torch.linalg.eigvals(J).cpu().numpy()
        sig = (
            torch.linalg.matrix_norm(J, ord=2).cpu().numpy()
            if want_sigma
            else np.full(len(ev), np.nan)
        )
        eig_sorted = [e[np.argsort(-np.abs(e), kind="stable")][: (k or n)] for e in ev]
        rho = [float(np.abs(e).max()) for e in ev]
        unstable = [int((np.abs(e) > 1).sum()) for e in ev]
        return Spectrum(
            eig_sorted, rho, unstable, [float(s) for s in sig], "dense", n, [n] * len(ev)
        )
    return _arpack(m, z, k or 6, options, want_sigma)


def _arpack(m: LoopMap, z: Tensor, k: int, options: dict, want_sigma: bool) -> Spectrum:
    from scipy.sparse.linalg import LinearOperator, eigs, svds

    n = m.n
    if k >= n - 1:
        raise LoopscopeError(f"ARPACK needs k < n - 1 (k={k}, n={n}); use method='dense'")
    ncv = int(options.get("ncv", max(64, 4 * k)))
    ncv = min(max(ncv, k + 2), n)
    tol = float(options.get("tol", 1e-8))
    rng = np.random.default_rng(int(options.get("seed", 0)))
    out_ev, rho, unstable, sig, mv = [], [], [], [], []
    for b in range(z.shape[0]):
        idx = torch.tensor([b])
        zb = z[b : b + 1]
        count = [0]

        def matvec(
            v: np.ndarray, zb: Tensor = zb, idx: Tensor = idx, count: list = count
        ) -> np.ndarray:
            count[0] += 1
            vt = torch.as_tensor(
                np.real_if_close(v).astype(np.float64).reshape(1, n), dtype=zb.dtype
            )
            return m.jvp(zb, vt, idx)[1].reshape(n).cpu().numpy()

        def rmatvec(u: np.ndarray, zb: Tensor = zb, idx: Tensor = idx) -> np.ndarray:
            ut = torch.as_tensor(np.asarray(u, dtype=np.float64).reshape(1, n), dtype=zb.dtype)
            return m.vjp(zb, ut, idx)[1].reshape(n).cpu().numpy()

        op = LinearOperator((n, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
        vals = eigs(
            op,
            k=k,
            which="LM",
            ncv=ncv,
            tol=tol,
            v0=rng.standard_normal(n),
            return_eigenvectors=False,
        )
        vals = vals[np.argsort(-np.abs(vals), kind="stable")]
        out_ev.append(vals)
        rho.append(float(np.abs(vals).max()))
        unstable.append(int((np.abs(vals) > 1).sum()))
        mv.append(count[0])
        if want_sigma:
            s = svds(op, k=1, tol=tol, v0=rng.standard_normal(n), return_singular_vectors=False)
            sig.append(float(s[0]))
        else:
            sig.append(float("nan"))
    return Spectrum(out_ev, rho, unstable, sig, "arpack", n, mv, {"ncv": ncv, "tol": tol})


def power_iteration_rho(
    loop: Any, inputs: Any, state: Tensor, n_iter: int = 100, seed: int = 0
) -> list[float]:
    """The anchor's estimate: left power iteration with a real Rayleigh quotient (torchdeq
    ``power_method``). A lower bound at best; wrong for a dominant complex pair (dynamics §12.3)."""
    m = LoopMap(loop, inputs, state_shape=tuple(state.shape[1:]), batch_size=state.shape[0])
    z = m.flatten(state.to(m.dtype or state.dtype))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(z.shape, generator=g, dtype=z.dtype)
    for _ in range(n_iter):
        v = m.vjp(z, v)[1]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    Jv = m.jvp(z, v)[1]
    return ((v * Jv).sum(1) / (v * v).sum(1)).abs().tolist()
