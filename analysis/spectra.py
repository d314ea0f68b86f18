"""Jacobian spectra of a loop's step at given states (fixed points, or any state).

Dense path (``n <= dense_max``, default 2048): per-sample ``J = d f / d h`` by batched jvp
(:meth:`LoopMap.jacobian`), then ``torch.linalg.eigvals`` and ``svdvals``. Matrix-free path:
``scipy.sparse.linalg.eigs`` on a ``LinearOperator`` of jvps with ``ncv = max(64, 4k)`` (scipy's
default ncv stalls on spectra clustered on a circle) and a fixed ``v0``; ``svds`` with jvp/vjp
for sigma_max. Complex leading pairs are exact on both paths. ``power_iteration_rho`` (the anchor
that torchdeq uses) is provided only to show that a real Rayleigh quotient is *not* rho.

Bad numbers stay per sample: a non-finite state or Jacobian is never handed to LAPACK / ARPACK
(whose reaction to NaN ranges from a plausible number to a hang); that sample gets ``rho = NaN``
and a ``status`` saying why, and the other samples are computed exactly as without it. When
LAPACK's ``geev`` fails (ill-conditioned or heavily repeated eigenvalues) the eigenvalues come from
``scipy.linalg.eig``, then a complex Schur form (``scipy.linalg.schur``), then a tiny shifted
retry; ``path`` records per sample which one ran. ARPACK that does not converge is retried with
a larger subspace, then falls back to the dense path where the state is small enough
(``arpack_fallback_max``), else the sample is flagged.

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
from loopscope.core.errors import LoopscopeError, check_positive_int, check_seed, did_you_mean
from loopscope.core.loop import Loop, batch_size_of
from loopscope.core.result import Result, float_summary, result_meta

__all__ = ["spectrum", "spectrum_map", "Spectrum", "power_iteration_rho", "RayleighEstimate"]

_OK = "ok"


@dataclass(kw_only=True, repr=False)
class Spectrum(Result):
    """Per-sample spectral summary of ``J(h)``.

    Attributes:
        eigenvalues: per sample, the top-k eigenvalues by modulus (complex numpy arrays; empty
            for a flagged sample).
        rho: spectral radius per sample (NaN for a flagged sample); ``unstable``: number of
            |lambda| > 1 (-1 when flagged);
        sigma_max: largest singular value; ``method``: "dense" or "arpack"; ``matvecs``: jvps used.
        status: per sample ``ok`` or why it has no spectrum (``non-finite state``, ...).
        path: per sample, the eigen-solver that ran (``eigvals``, ``scipy.linalg.eig``,
            ``schur``, ``shifted``, ``arpack``, ``dense fallback``, or ``none``).
    """

    eigenvalues: list[np.ndarray]
    rho: list[float]
    unstable: list[int]
    sigma_max: list[float]
    method: str
    n: int
    matvecs: list[int] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        B = len(self.rho)
        self.status = self.status or [_OK] * B
        self.path = self.path or ["eigvals" if self.method == "dense" else "arpack"] * B

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

    def _sample_row(self, b: int) -> dict[str, Any]:
        return {
            "rho": self.rho[b],
            "margin": 1.0 - self.rho[b],
            "unstable": self.unstable[b],
            "sigma_max": self.sigma_max[b],
            "nonnormality": self.nonnormality[b],
            "method": self.method,
            "status": self.status[b],
            "path": self.path[b],
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, eigenvalue rank); a flagged sample has one row of NaNs."""
        rows = []
        nan = float("nan")
        for b, ev in enumerate(self.eigenvalues):
            per = self._sample_row(b)
            if len(ev) == 0:
                rows.append({"sample": b, "rank": 0, "real": nan, "imag": nan, "modulus": nan,
                             "angle": nan, "timescale": nan, **per})  # fmt: skip
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
                        **per,
                    }
                )
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Mean / max rho over healthy samples, the stable fraction and the flagged count."""
        rho = np.asarray(self.rho, dtype=float)
        ok = np.isfinite(rho)
        out = {
            "mean_rho": rho[ok].mean() if ok.any() else math.nan,
            "max_rho": rho[ok].max() if ok.any() else math.nan,
            "stable_fraction": float((rho[ok] < 1).mean()) if ok.any() else math.nan,
            "n_samples": len(rho),
            "n_flagged": int((~ok).sum()),
        }
        return float_summary(out)


def _timescale(mod: float) -> float:
    """``-1 / ln|lambda|`` (0 for lambda = 0, inf for |lambda| = 1, negative when growing)."""
    if mod == 0.0:
        return 0.0
    if mod == 1.0:
        return math.inf
    return -1.0 / math.log(mod)


# ---------------------------------------------------------------------------------------------
# eigenvalues that survive LAPACK failures


def _eig_one(A: np.ndarray) -> tuple[np.ndarray, str]:
    """Eigenvalues of one finite matrix, falling back on LAPACK failure; returns (eig, path)."""
    import scipy.linalg

    try:
        return torch.linalg.eigvals(torch.from_numpy(A)).numpy(), "eigvals"
    except RuntimeError:  # torch.linalg.LinAlgError: geev did not converge
        pass
    try:
        return scipy.linalg.eig(A, right=False, check_finite=False), "scipy.linalg.eig"
    except (np.linalg.LinAlgError, ValueError):
        pass
    try:  # a different LAPACK route (gees): the diagonal of the complex Schur form
        T, _ = scipy.linalg.schur(A.astype(complex), output="complex", check_finite=False)
        return np.diag(T), "schur"
    except (np.linalg.LinAlgError, ValueError):
        pass
    # a tiny shift moves repeated eigenvalues apart without changing the spectrum visibly
    eps = 1e-12 * max(1.0, float(np.abs(A).max()))
    rng = np.random.default_rng(0)
    P = A + eps * rng.standard_normal(A.shape)
    return torch.linalg.eigvals(torch.from_numpy(P)).numpy(), "shifted"


def _eigvals(J: Tensor) -> tuple[list[np.ndarray], list[str]]:
    """Eigenvalues of finite ``J [b, n, n]``: one batched call, per-matrix fallbacks on failure."""
    try:
        return list(torch.linalg.eigvals(J).cpu().numpy()), ["eigvals"] * J.shape[0]
    except RuntimeError:
        out = [_eig_one(A) for A in J.detach().cpu().numpy()]
        return [e for e, _ in out], [p for _, p in out]


def _spectral_norms(J: Tensor) -> np.ndarray:
    try:
        return torch.linalg.matrix_norm(J, ord=2).cpu().numpy()
    except RuntimeError:  # gesdd failed: scipy's gesvd driver
        import scipy.linalg

        return np.asarray(
            [scipy.linalg.svdvals(A, lapack_driver="gesvd")[0] for A in J.cpu().numpy()]
        )


# ---------------------------------------------------------------------------------------------


def _check_spectrum_args(
    method: Any, k: Any, n: int, dense_max: Any, tol: Any, ncv: Any, seed: Any
) -> None:
    if method not in ("auto", "dense", "arpack"):
        raise LoopscopeError(f"spectrum method must be auto, dense or arpack, got {method!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n):
        raise LoopscopeError(f"k must be an integer in 1..{n} (the state dimension), got {k!r}")
    check_positive_int("dense_max", dense_max)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise LoopscopeError(f"tol must be a number >= 0, got {tol!r}")
    if ncv is not None:
        check_positive_int("ncv", ncv)
    check_seed(seed)


@did_you_mean
def spectrum(
    loop: Loop,
    inputs: Any,
    state: Tensor,
    k: int | None = None,
    method: str = "auto",
    *,
    dense_max: int = 2048,
    tol: float = 1e-8,
    ncv: int | None = None,
    seed: int = 0,
    t: int | None = None,
    sigma: bool = True,
    dtype: torch.dtype = torch.float64,
) -> Spectrum:
    """Eigenvalues of the step's Jacobian at ``state [B, ...]`` (per sample).

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode`` (one context per sample of ``state``).
        state: ``[B, *state]`` states at which J is taken.
        k: eigenvalues kept (default: all on the dense path, 6 on ARPACK).
        method: "auto" (dense for n ≤ ``dense_max``, else ARPACK) | "dense" | "arpack".
        dense_max: largest state size of the dense path under ``auto``.
        tol: ARPACK tolerance.
        ncv: ARPACK subspace size (default max(64, 4k)).
        seed: seed of ARPACK's start vectors.
        t: iteration index for non-autonomous loops.
        sigma: also compute sigma_max (the largest singular value).
        dtype: analysis dtype (float64 default; float32 accepted).

    Returns:
        :class:`Spectrum` (a sample with a non-finite state or Jacobian has ``rho = NaN`` and a
        ``status`` saying why).
    """
    if not isinstance(state, Tensor) or state.dim() < 2:
        raise LoopscopeError("state must be a tensor [B, ...] with a batch axis")
    if state.shape[0] == 0:
        raise LoopscopeError("state is empty (batch size 0)")
    m = LoopMap(
        loop,
        inputs,
        state_shape=tuple(state.shape[1:]),
        batch_size=state.shape[0],
        t=t,
        dtype=dtype,
    )
    bc = batch_size_of(m.ctx) if m._has_batch_ctx else None
    if bc is not None and bc != state.shape[0]:
        raise LoopscopeError(f"state has batch {state.shape[0]} but the inputs have batch {bc}")
    z = m.flatten(state.to(m.dtype or state.dtype))
    m.check_state(z)
    return spectrum_map(
        m, z, k=k, method=method, dense_max=dense_max, tol=tol, ncv=ncv, seed=seed, sigma=sigma
    )


@did_you_mean
def spectrum_map(
    m: LoopMap,
    z: Tensor,
    *,
    k: int | None = None,
    method: str = "auto",
    dense_max: int = 2048,
    tol: float = 1e-8,
    ncv: int | None = None,
    seed: int = 0,
    sigma: bool = True,
    arpack_fallback_max: int = 4096,
) -> Spectrum:
    """:func:`spectrum` on an existing :class:`LoopMap` at flat states ``z [b, n]`` (one row
    per sample of the map; used by the fixed-point census).

    Args:
        m: the map; z: ``[b, n]`` flat states (see :func:`spectrum` for the rest).
        arpack_fallback_max: a sample whose ARPACK run fails falls back to the dense path up to
            this state size (above it the sample is flagged).
    """
    n = m.n
    _check_spectrum_args(method, k, n, dense_max, tol, ncv, seed)
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != n:
        raise LoopscopeError(f"z must be flat states [b, {n}], got {getattr(z, 'shape', z)!r}")
    use_dense = method == "dense" or (method == "auto" and n <= dense_max)
    if use_dense:
        _check_dense_memory(n, z.shape[0], m.dtype or z.dtype)
        sp = _dense(m, z, k, bool(sigma))
    else:
        sp = _arpack(m, z, k or 6, ncv, float(tol), int(seed), bool(sigma), arpack_fallback_max)
    sp.meta = result_meta(m.loop, settings={**sp.meta, "jacobian_path": m.jacobian_path})
    return sp


def _check_dense_memory(n: int, B: int, dtype: torch.dtype) -> None:
    """The dense path holds B Jacobians of n x n and an eigen workspace of a few n x n: refused
    before allocating when that passes half the free memory (the way out: ARPACK)."""
    from loopscope.core.capture import available_memory_bytes
    from loopscope.core.errors import CaptureMemoryError

    item = torch.empty(0, dtype=dtype).element_size()
    need = (B + 4) * n * n * item
    budget = available_memory_bytes("cpu") // 2
    if need > budget:
        raise CaptureMemoryError(
            f"spectrum method='dense' at n = {n} would need ~{need / 2**30:.1f} GiB ({B} "
            f"Jacobian(s) of {n} x {n} and the eigen workspace) but the budget is "
            f"{budget / 2**30:.1f} GiB (half the free memory); use method='arpack' (the k leading "
            "eigenvalues from matrix-free products), fewer samples per call, or a smaller state"
        )


def _dense(m: LoopMap, z: Tensor, k: int | None, want_sigma: bool) -> Spectrum:
    """Dense eigenvalues of the finite samples; non-finite ones flagged and never decomposed."""
    n, B = m.n, z.shape[0]
    status = _input_status(m, z)
    ok = torch.tensor([st == _OK for st in status], dtype=torch.bool)
    ev: list[np.ndarray] = [np.zeros(0, dtype=complex)] * B
    sig = np.full(B, np.nan)
    path = ["none"] * B
    if bool(ok.any()):
        # the whole batch, flagged rows replaced by zeros: the healthy samples' Jacobians are
        # computed exactly as in a batch without the bad ones (same shapes, same kernels)
        J = m.jacobian(torch.where(ok[:, None], z, torch.zeros_like(z)))  # [B, n, n]
        jok = ok & torch.isfinite(J).flatten(1).all(1)
        for b in (ok & ~jok).nonzero().flatten().tolist():
            status[b] = "non-finite jacobian"
        keep = jok.nonzero().flatten()
        Jk = J if bool(jok.all()) else J[jok]
        if keep.numel():
            vals, paths = _eigvals(Jk)
            for i, b in enumerate(keep.tolist()):
                ev[b], path[b] = vals[i], paths[i]
            if want_sigma:
                sig[keep.numpy()] = _spectral_norms(Jk)
    top = [e[np.argsort(-np.abs(e), kind="stable")][: (k or n)] for e in ev]
    rho = [float(np.abs(e).max()) if len(e) else math.nan for e in ev]
    unstable = [int((np.abs(e) > 1).sum()) if len(e) else -1 for e in ev]
    return Spectrum(
        eigenvalues=top, rho=rho, unstable=unstable, sigma_max=[float(s) for s in sig],
        method="dense", n=n, matvecs=[n] * B, status=status, path=path,
    )  # fmt: skip


def _input_status(m: LoopMap, z: Tensor) -> list[str]:
    """Per sample ``ok``, ``non-finite state`` or ``non-finite input`` (NaN in its context)."""
    finite = torch.isfinite(z).all(1)
    bad_in = m.bad_input if m.bad_input.numel() == z.shape[0] else torch.zeros_like(finite)
    return [
        "non-finite state" if not bool(f) else "non-finite input" if bool(bi) else _OK
        for f, bi in zip(finite, bad_in, strict=True)
    ]


class _NonFinite(ArithmeticError):
    """A matvec produced non-finite values (the sample's Jacobian is not finite)."""


def _arpack_one(
    m: LoopMap, zb: Tensor, b: int, k: int, ncv: int, tol: float, v0: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, float, int, str]:
    """ARPACK eigenvalues (and sigma_max) of sample ``b``; raises on failure."""
    from scipy.sparse.linalg import LinearOperator, eigs, svds

    n, idx, count = m.n, torch.tensor([b]), [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        vt = torch.as_tensor(np.real_if_close(v).astype(np.float64).reshape(1, n), dtype=zb.dtype)
        out = m.jvp(zb, vt, idx)[1].reshape(n).cpu().numpy().astype(np.float64)
        if not np.isfinite(out).all():
            raise _NonFinite
        return out

    def rmatvec(u: np.ndarray) -> np.ndarray:
        ut = torch.as_tensor(np.asarray(u, dtype=np.float64).reshape(1, n), dtype=zb.dtype)
        out = m.vjp(zb, ut, idx)[1].reshape(n).cpu().numpy().astype(np.float64)
        if not np.isfinite(out).all():
            raise _NonFinite
        return out

    op = LinearOperator((n, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    vals = eigs(op, k=k, which="LM", ncv=ncv, tol=tol, v0=v0[0], return_eigenvectors=False)
    vals = vals[np.argsort(-np.abs(vals), kind="stable")]
    s = math.nan
    if len(v0) > 1:  # sigma_max wanted
        s = float(svds(op, k=1, tol=tol, v0=v0[1], return_singular_vectors=False)[0])
    return vals, s, count[0], "arpack"


def _arpack(
    m: LoopMap, z: Tensor, k: int, ncv_opt: int | None, tol: float, seed: int, want_sigma: bool,
    fallback_max: int,
) -> Spectrum:  # fmt: skip
    from scipy.sparse.linalg import ArpackError

    n = m.n
    if k >= n - 1:
        raise LoopscopeError(f"ARPACK needs k < n - 1 (k={k}, n={n}); use method='dense'")
    ncv = int(ncv_opt) if ncv_opt is not None else max(64, 4 * k)
    ncv = min(max(ncv, k + 2), n)
    rng = np.random.default_rng(seed)
    ev, rho, unstable, sig, mv, status, path = [], [], [], [], [], [], []
    first = _input_status(m, z)
    for b in range(z.shape[0]):
        zb = z[b : b + 1]
        # start vectors drawn for every sample, flagged or not: the stream (and so every other
        # sample's result) is the same as in a run without the bad sample
        v0 = tuple(rng.standard_normal(n) for _ in range(2 if want_sigma else 1))
        vals, s, count, p, st = np.zeros(0, dtype=complex), math.nan, 0, "none", first[b]
        if st == _OK:
            try:
                vals, s, count, p = _arpack_one(m, zb, b, k, ncv, tol, v0)
            except _NonFinite:
                st = "non-finite jacobian"
            except ArpackError as e:  # ArpackNoConvergence included
                vals, s, count, p, st = _arpack_fallback(m, zb, b, k, ncv, tol, v0, fallback_max, e)
        ev.append(vals)
        rho.append(float(np.abs(vals).max()) if len(vals) else math.nan)
        unstable.append(int((np.abs(vals) > 1).sum()) if len(vals) else -1)
        sig.append(s)
        mv.append(count)
        status.append(st)
        path.append(p)
    return Spectrum(
        eigenvalues=ev, rho=rho, unstable=unstable, sigma_max=sig, method="arpack", n=n,
        matvecs=mv, status=status, path=path, meta={"ncv": ncv, "tol": tol},
    )  # fmt: skip


def _arpack_fallback(
    m: LoopMap, zb: Tensor, b: int, k: int, ncv: int, tol: float, v0: tuple[np.ndarray, ...],
    fallback_max: int, err: Exception,
) -> tuple[np.ndarray, float, int, str, str]:  # fmt: skip
    """After an ARPACK failure: a doubled subspace, then the dense path, else a flagged sample."""
    from scipy.sparse.linalg import ArpackError

    n = m.n
    try:
        vals, s, count, _ = _arpack_one(m, zb, b, k, min(n, 2 * ncv), tol, v0)
        return vals, s, count, "arpack (ncv doubled)", _OK
    except (ArpackError, _NonFinite):
        pass
    if n <= fallback_max:
        sub = _dense(m.subset(torch.tensor([b])), zb, k, len(v0) > 1)
        return (
            sub.eigenvalues[0],
            sub.sigma_max[0],
            n,
            f"dense fallback ({sub.path[0]})",
            sub.status[0],
        )
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return np.zeros(0, dtype=complex), math.nan, 0, "none", f"arpack failed: {msg}"


@dataclass(kw_only=True, repr=False)
class RayleighEstimate(Result):
    """The power-iteration (real Rayleigh quotient) estimate of rho per sample."""

    rho: list[float]

    def to_frame(self) -> pd.DataFrame:
        """One row per sample."""
        return pd.DataFrame({"sample": np.arange(len(self.rho)), "rho": self.rho})

    def summary(self) -> dict[str, float]:
        """Mean estimate."""
        return float_summary({"mean_rho": float(np.mean(self.rho)) if self.rho else math.nan})


@did_you_mean
def power_iteration_rho(
    loop: Loop, inputs: Any, state: Tensor, *, n_iter: int = 100, seed: int = 0
) -> RayleighEstimate:
    """The anchor's estimate: left power iteration with a real Rayleigh quotient (torchdeq
    ``power_method``). A lower bound at best; wrong for a dominant complex pair (see
    :func:`spectrum` for the exact rho).

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode``.
        state: ``[B, *state]`` states.
        n_iter: power iterations.
        seed: seed of the start vectors.
    """
    if not isinstance(state, Tensor) or state.dim() < 2:
        raise LoopscopeError("state must be a tensor [B, ...] with a batch axis")
    check_positive_int("n_iter", n_iter)
    check_seed(seed)
    m = LoopMap(loop, inputs, state_shape=tuple(state.shape[1:]), batch_size=state.shape[0])
    z = m.flatten(state.to(m.dtype or state.dtype))
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(z.shape, generator=g, dtype=z.dtype)
    for _ in range(n_iter):
        v = m.vjp(z, v)[1]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    Jv = m.jvp(z, v)[1]
    rho = ((v * Jv).sum(1) / (v * v).sum(1)).abs().tolist()
    return RayleighEstimate(
        rho=rho, meta=result_meta(m.loop, seed=seed, settings={"n_iter": n_iter})
    )
