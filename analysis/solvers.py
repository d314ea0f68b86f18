"""Fixed-point solvers for a loop's step ``h* = f(h*; x)``, per sample, NFE-accounted.

Every method runs on the flat per-sample states of a :class:`LoopMap` (float64 by default) with
**per-sample masking**: a sample that has converged, diverged or stalled leaves the active set and
stops costing function evaluations (the step is called on ``index=`` subsets only). Counters of
function evaluations (``nfe``), JVPs and VJPs are kept per sample.

Convergence criterion (``stop_mode="rel"``, default): the relative residual

    r_rel = ‖f(z) − z‖ / (‖f(z)‖ + 1e-9) < tol        (torchdeq's definition)

measured at the iterate ``z`` that is returned; ``stop_mode="abs"`` uses ‖f(z) − z‖ < tol.
This is the one definition of *converged* in loopscope (:func:`is_converged`, default
``tol = CONVERGED_R_REL = 1e-6``): the fixed-point census calls a point ``fixed`` by the same test
and the same default, so a point ``solve`` calls converged is never a ``slow`` point of the census.

Methods (``method=``: a name, or a config object carrying the method's own settings, e.g.
``method=Anderson(m=10)``; a name means that config with its defaults):

- ``picard`` (:class:`Picard`): z ← τ f(z) + (1 − τ) z (``tau``, default 1 = naive iteration).
- ``anderson`` (:class:`Anderson`): Type-II (Walker–Ni) Anderson acceleration, memory ``m`` (5),
  γ = argmin ‖g_k − ΔG γ‖² + λ‖ΔG‖²_F ‖γ‖² with a *scale-free* (relative) Tikhonov term
  (``lam`` 1e-8) on column-normalised secant pairs, solved through a thin QR of ΔG whose oldest
  columns are dropped while cond(R) > ``restart_cond`` (1e10); z ← z + βg − (ΔZ + βΔG) γ
  (``beta`` 1). Safeguard (``safeguard`` True): if the residual grows more than 2× in one step,
  take a Picard step and clear the history.
- ``broyden`` (:class:`Broyden`): limited-memory "good" Broyden on g(z) = f(z) − z with the
  inverse (Sherman–Morrison) update from H₀ = −I, memory ``memory`` (restart when full).
- ``newton_krylov`` (:class:`NewtonKrylov`): Newton on g with (J − I) s = −g solved by batched
  GMRES with jvps (``gmres_tol`` 1e-3, ``max_krylov`` 50) and step halving (``max_halvings`` 6);
  converges to unstable fixed points too.
- ``lm`` (:class:`LM`): Levenberg–Marquardt on q = ½‖f(z) − z‖²: dense batched Jacobians for
  n ≤ ``dense_max`` (1024), Gauss–Newton-CG with jvp/vjp above (``cg_tol``, ``max_cg``);
  damping μ·max diag((J − I)ᵀ(J − I)) starting at ``mu0`` (0.1), Nielsen's update.
  Stops as ``stalled`` at a local minimum of q with q > 0 (a slow point): relative gradient
  below ``grad_tol`` (1e-9), damping exploded, or q down by < 1 % over ``stall_window`` (10)
  iterations.
- ``adam_q`` (:class:`AdamQ`): Adam on q (gradient by one vjp), FixedPointFinder-compatible
  baseline with the plateau learning-rate decay; for side-by-side comparisons only.
- ``auto``: Type-II Anderson with memory ``m = min(30, n)`` (all other settings as above).
  Rule and evidence: scale-free Type-II AA is GMRES-like on the linearised problem (Walker–Ni), so
  memory is what closes the gap to Broyden on symmetric linear and near-critical maps, where
  m = 5 loses (133 vs 56 NFE at eig ∈ [0, 0.99], n = 256); with column-normalised secant pairs
  extra memory does not hurt the nonlinear maps (post-LN block 21–22 NFE for m = 10…30). On the
  solver benchmark suite this is within 1.1× of the best anchor on every map
  (``benchmarks/solvers.py`` prints the table). Pass ``method=Anderson(m=...)`` to trade memory
  (2·m state copies per sample) for speed on very large states.

Status per sample: ``converged`` (criterion met), ``diverged`` (non-finite values or
‖z‖ > ``diverge_norm``·max(1, ‖z₀‖), the shared guard of :mod:`loopscope.core.numerics` with
:data:`~loopscope.core.numerics.SOLVER_BLOWUP`), ``stalled`` (no new best residual for
``patience`` iterations, or the method cannot make progress — e.g. LM at a local minimum of q),
``max_iter``.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h, x: torch.tanh(0.5 * h + x))
    >>> x = torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=torch.float64)
    >>> res = solve(loop, x, h0=torch.zeros(2, 2), method=Anderson(), tol=1e-10)
    >>> res.status
    ['converged', 'converged']
    >>> bool(((torch.tanh(0.5 * res.z_best + x) - res.z_best).abs() < 1e-9).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.core.errors import LoopscopeError, check_positive_int, check_seed, did_you_mean
from loopscope.core.loop import Loop, batch_size_of
from loopscope.core.numerics import SOLVER_BLOWUP, diverged, reference_norm
from loopscope.core.result import Result, float_summary, result_meta

__all__ = [
    "CONVERGED_R_REL",
    "is_converged",
    "solve",
    "SolveResult",
    "solve_map",
    "batched_gmres",
    "METHODS",
    "SolverConfig",
    "Picard",
    "Anderson",
    "Broyden",
    "NewtonKrylov",
    "LM",
    "AdamQ",
    "solver_config",
]

#: r_rel below which a state is a fixed point: ``solve``'s default ``tol`` and the census's
#: default ``q_tol_rel`` (one definition of "converged", see :func:`is_converged`)
CONVERGED_R_REL = 1e-6


def is_converged(r_rel: Any, tol: float = CONVERGED_R_REL) -> Any:
    """``r_rel < tol`` (strictly; NaN / inf never converged), for tensors or arrays.

    ``r_rel = ‖f(z) − z‖ / (‖f(z)‖ + 1e-9)``, the relative residual every solver reports.

    >>> import numpy as np
    >>> is_converged(np.array([1.5e-9, 2e-6, np.nan])).tolist()
    [True, False, False]
    """
    return r_rel < tol


METHODS = ("auto", "picard", "anderson", "broyden", "newton_krylov", "lm", "adam_q")


# ---------------------------------------------------------------------------------------------
# method configs: each method's own settings, defaults in the signature


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise LoopscopeError(f"{name} must be a positive number, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    """Base of the per-method settings (:class:`Picard`, :class:`Anderson`, ...)."""

    name: ClassVar[str] = ""

    def options(self) -> dict[str, Any]:
        """The settings as a plain dict (recorded in ``SolveResult.meta``)."""
        return dataclasses.asdict(self)


def _config(cls: type) -> type:
    """Freeze ``cls`` as a kw-only dataclass whose ``__init__`` names misspelt settings."""
    cls = dataclass(frozen=True, kw_only=True)(cls)
    cls.__init__ = did_you_mean(cls.__init__)  # type: ignore[method-assign]
    return cls


@_config
class Picard(SolverConfig):
    """Damped naive iteration ``z ← τ f(z) + (1 − τ) z``.

    Args:
        tau: damping τ in (0, 1] (1 = naive iteration).
    """

    name: ClassVar[str] = "picard"
    tau: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise LoopscopeError(f"picard tau must be a number in (0, 1], got {self.tau!r}")
        if not 0 < self.tau <= 1:
            raise LoopscopeError(f"picard tau must be in (0, 1], got {self.tau!r}")


@_config
class Anderson(SolverConfig):
    """Type-II Anderson acceleration (see the module docstring).

    Args:
        m: memory (secant pairs kept; capped at the state size).
        lam: relative Tikhonov regularisation of the coefficient solve.
        restart_cond: drop the oldest secant pairs while cond(R) exceeds this.
        safeguard: clear the history when the residual grows more than 2x in one step.
        beta: mixing parameter β.
    """

    name: ClassVar[str] = "anderson"
    m: int = 5
    lam: float = 1e-8
    restart_cond: float = 1e10
    safeguard: bool = True
    beta: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("anderson m", self.m)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise LoopscopeError(f"lam must be a number >= 0, got {self.lam!r}")
        _positive("restart_cond", self.restart_cond)


@_config
class Broyden(SolverConfig):
    """Limited-memory "good" Broyden with the inverse update from ``H0 = -I``.

    Args:
        memory: rank-one updates kept before a restart.
    """

    name: ClassVar[str] = "broyden"
    memory: int = 50

    def __post_init__(self) -> None:
        check_positive_int("broyden memory", self.memory)


@_config
class NewtonKrylov(SolverConfig):
    """Newton on ``g = f(z) - z`` with GMRES on jvps and step halving.

    Args:
        gmres_tol: relative GMRES tolerance of each Newton step.
        max_krylov: Krylov dimension per Newton step.
        max_halvings: step halvings before a trial point is accepted anyway.
    """

    name: ClassVar[str] = "newton_krylov"
    gmres_tol: float = 1e-3
    max_krylov: int = 50
    max_halvings: int = 6

    def __post_init__(self) -> None:
        _positive("gmres_tol", self.gmres_tol)
        check_positive_int("max_krylov", self.max_krylov)
        if isinstance(self.max_halvings, bool) or not isinstance(self.max_halvings, int):
            raise LoopscopeError(f"max_halvings must be an integer, got {self.max_halvings!r}")


@_config
class LM(SolverConfig):
    """Levenberg–Marquardt on ``q = ½‖f(z) − z‖²`` (see the module docstring).

    Args:
        mu0: initial damping μ (relative to max diag((J − I)ᵀ(J − I))).
        dense_max: dense Jacobians up to this state size, Gauss–Newton-CG above.
        cg_tol: relative CG tolerance (matrix-free path).
        max_cg: CG iterations per step (matrix-free path).
        grad_tol: relative gradient below which a sample is a slow point (stalled).
        stall_window: iterations over which q must fall by 1 %.
    """

    name: ClassVar[str] = "lm"
    mu0: float = 1e-1
    dense_max: int = 1024
    cg_tol: float = 1e-8
    max_cg: int = 100
    grad_tol: float = 1e-9
    stall_window: int = 10

    def __post_init__(self) -> None:
        _positive("mu0", self.mu0)
        check_positive_int("dense_max", self.dense_max)
        _positive("cg_tol", self.cg_tol)
        check_positive_int("max_cg", self.max_cg)
        _positive("grad_tol", self.grad_tol)
        check_positive_int("stall_window", self.stall_window)


@_config
class AdamQ(SolverConfig):
    """Adam on ``q`` with FixedPointFinder's plateau learning-rate decay.

    Args:
        lr: initial learning rate.
        lr_factor: learning-rate decay factor on a plateau.
        lr_patience: non-improving iterations before a decay.
        tol_dq: stop when ``|dq| < tol_dq * lr``.
        betas: Adam's ``(beta1, beta2)``.
    """

    name: ClassVar[str] = "adam_q"
    lr: float = 1.0
    lr_factor: float = 0.95
    lr_patience: int = 2
    tol_dq: float = 1e-20
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _positive("lr_factor", self.lr_factor)


_CONFIGS: dict[str, type[SolverConfig]] = {
    c.name: c for c in (Picard, Anderson, Broyden, NewtonKrylov, LM, AdamQ)
}


def solver_config(method: str | SolverConfig, options: dict[str, Any] | None = None) -> Any:
    """The config for ``method`` (a name or a config), with ``options`` (a dict of its settings).

    ``"auto"`` stays ``"auto"`` (resolved by :func:`auto_config` once the state size is known).
    Unknown names or settings raise a one-line :class:`LoopscopeError`.

    >>> solver_config("anderson", {"m": 3})
    Anderson(m=3, lam=1e-08, restart_cond=10000000000.0, safeguard=True, beta=1.0)
    """
    options = dict(options or {})
    if isinstance(method, SolverConfig):
        return dataclasses.replace(method, **options) if options else method
    if method not in METHODS:
        raise LoopscopeError(
            f"unknown solver method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if method == "auto":
        if options:
            raise LoopscopeError(
                f"method='auto' takes no settings, got {sorted(options)}; pass a config such as "
                "Anderson(m=...) instead"
            )
        return "auto"
    return _CONFIGS[method](**options)


def auto_config(n: int) -> Anderson:
    """The rule behind ``method="auto"``: Type-II Anderson with memory ``min(30, n)`` (see the
    module docstring and ``benchmarks/solvers.py``)."""
    return Anderson(m=min(30, n))


@dataclass(kw_only=True, repr=False)
class SolveResult(Result):
    """Per-sample outcome of :func:`solve`.

    Attributes:
        z_last: ``[B, *state]`` the last evaluated iterate (analysis dtype, float64 by default).
        z_best: ``[B, *state]`` the iterate with the lowest residual (the one that is returned
            as the solution; equals ``z_last`` where ``best_is_last``).
        nfe, n_jvp, n_vjp: ``[B]`` long, evaluations of f, JVPs and VJPs per sample.
        iterations: ``[B]`` long, iterates evaluated (the last one is ``z_last``).
        status: per sample ``converged | max_iter | diverged | stalled``; ``reason``: why.
        r_rel, r_abs: ``[B]`` residuals at ``z_best``; ``r_rel_last``: at ``z_last``.
        kappa: ``[B]`` windowed contraction estimate (r_{t}/r_{t−w})^{1/w} over the last ≤ 10
            iterates (≈ ρ(J*) for naive iteration).
        best_is_last: ``[B]`` bool.
        residuals: per sample, the relative-residual trace (numpy, one entry per iterate);
            ``residuals_abs``: the absolute one.
        method: the method run (``auto`` resolves to the method it picked, see ``meta``).
        wall_time: seconds for the whole batch.
    """

    z_last: Tensor
    z_best: Tensor
    nfe: Tensor
    n_jvp: Tensor
    n_vjp: Tensor
    iterations: Tensor
    status: list[str]
    reason: list[str]
    r_rel: Tensor
    r_abs: Tensor
    r_rel_last: Tensor
    kappa: Tensor
    best_is_last: Tensor
    residuals: list[np.ndarray]
    residuals_abs: list[np.ndarray]
    method: str
    tol: float
    wall_time: float

    @property
    def converged(self) -> Tensor:
        """``[B]`` bool."""
        return torch.tensor([s == "converged" for s in self.status], dtype=torch.bool)

    def to_frame(self) -> pd.DataFrame:
        """One row per sample (status, counters, residuals, κ̄, wall time)."""
        df = pd.DataFrame(
            {
                "sample": np.arange(len(self.status)),
                "method": self.method,
                "status": self.status,
                "reason": self.reason,
                "nfe": self.nfe.numpy(),
                "n_jvp": self.n_jvp.numpy(),
                "n_vjp": self.n_vjp.numpy(),
                "iterations": self.iterations.numpy(),
                "r_rel": self.r_rel.numpy(),
                "r_abs": self.r_abs.numpy(),
                "r_rel_last": self.r_rel_last.numpy(),
                "kappa": self.kappa.numpy(),
                "best_is_last": self.best_is_last.numpy(),
                "tol": self.tol,
                "wall_time": self.wall_time,
            }
        )
        for k in ("model", "split", "seed"):
            if self.meta.get(k) is not None:
                df[k] = self.meta[k]
        return df

    def trace_frame(self) -> pd.DataFrame:
        """Residual traces, one row per (sample, iteration)."""
        rows = [
            pd.DataFrame({"sample": b, "iteration": np.arange(len(r)), "r_rel": r, "r_abs": ra})
            for b, (r, ra) in enumerate(zip(self.residuals, self.residuals_abs, strict=True))
        ]
        return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()

    def summary(self) -> dict[str, float]:
        """Fractions per status, median NFE and residual, wall time."""
        B = len(self.status)
        out: dict[str, Any] = {
            f"{s}_fraction": sum(x == s for x in self.status) / max(B, 1)
            for s in ("converged", "max_iter", "diverged", "stalled")
        }
        finite = self.r_rel[torch.isfinite(self.r_rel)]
        out["median_nfe"] = float(self.nfe.double().median()) if B else math.nan
        out["median_r_rel"] = float(finite.median()) if finite.numel() else math.nan
        out["n_samples"] = B
        out["wall_time"] = self.wall_time
        return float_summary(out)


# ---------------------------------------------------------------------------------------------
# bookkeeping shared by every method


class _Track:
    """Best / last iterates, per-sample status and the active set."""

    def __init__(
        self, z0: Tensor, tol: float, stop_mode: str, patience: int, diverge_norm: float
    ) -> None:
        B = z0.shape[0]
        self.B = B
        self.tol = tol
        self.rel = stop_mode == "rel"
        self.patience = patience
        self.z_best = z0.clone()
        self.z_last = z0.clone()
        inf = torch.full((B,), math.inf, dtype=torch.float64)
        self.m_best, self.abs_best, self.rel_best = inf.clone(), inf.clone(), inf.clone()
        self.rel_last = inf.clone()
        self.best_at = torch.zeros(B, dtype=torch.long)
        self.n_rec = torch.zeros(B, dtype=torch.long)
        self.since = torch.zeros(B, dtype=torch.long)
        self.active = torch.ones(B, dtype=torch.bool)
        self.status = ["max_iter"] * B
        self.reason = ["iteration budget exhausted"] * B
        self.blowup = float(diverge_norm)
        self.ref = reference_norm(z0)  # the shared guard: ‖z‖ > diverge_norm · max(1, ‖z0‖)
        self.log: list[tuple[Tensor, Tensor, Tensor]] = []

    def idx(self) -> Tensor:
        return self.active.nonzero().flatten()

    def finish(self, idx: Tensor, status: str, reason: str) -> None:
        for b in idx.tolist():
            if self.active[b]:
                self.active[b] = False
                self.status[b] = status
                self.reason[b] = reason

    def _update_best(self, idx: Tensor, z: Tensor, r_abs: Tensor, r_rel: Tensor) -> Tensor:
        metric = r_rel if self.rel else r_abs
        better = metric < self.m_best[idx]
        bi = idx[better]
        self.z_best[bi] = z[better]
        self.m_best[bi] = metric[better]
        self.abs_best[bi] = r_abs[better]
        self.rel_best[bi] = r_rel[better]
        self.best_at[bi] = self.n_rec[bi]
        self.z_last[idx] = z
        self.rel_last[idx] = r_rel
        self.n_rec[idx] += 1
        self.since[idx] = torch.where(better, 0, self.since[idx] + 1)
        return metric

    def record(self, idx: Tensor, z: Tensor, fz: Tensor) -> Tensor:
        """Score iterates ``z`` (with ``f(z) = fz``) of samples ``idx``; returns the still-active
        mask (over ``idx``)."""
        g = fz - z
        r_abs = g.norm(dim=1).to(torch.float64)
        r_rel = r_abs / (fz.norm(dim=1).to(torch.float64) + 1e-9)
        finite = torch.isfinite(fz).all(1) & torch.isfinite(z).all(1)
        big = diverged(z, self.ref[idx], self.blowup) & finite
        r_abs = torch.where(finite, r_abs, torch.full_like(r_abs, math.inf))
        r_rel = torch.where(finite, r_rel, torch.full_like(r_rel, math.inf))
        self.log.append((idx.clone(), r_abs.clone(), r_rel.clone()))
        metric = self._update_best(idx, z, r_abs, r_rel)
        conv = finite & is_converged(metric, self.tol)
        div = ~finite | big
        stall = ~conv & ~div & (self.since[idx] > self.patience)
        self.finish(idx[conv], "converged", f"{'r_rel' if self.rel else 'r_abs'} < {self.tol:g}")
        self.finish(idx[~finite], "diverged", "non-finite state or step output")
        self.finish(idx[big], "diverged", "state norm blew up")
        self.finish(idx[stall], "stalled", f"no new best residual in {self.patience} iterations")
        return ~(conv | div | stall)

    def traces(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        rel: list[list[float]] = [[] for _ in range(self.B)]
        ab: list[list[float]] = [[] for _ in range(self.B)]
        for idx, a, r in self.log:
            for b, av, rv in zip(idx.tolist(), a.tolist(), r.tolist(), strict=True):
                rel[b].append(rv)
                ab[b].append(av)
        return [np.asarray(r) for r in rel], [np.asarray(a) for a in ab]


def _kappa(trace: np.ndarray, w: int = 10) -> float:
    t = trace[np.isfinite(trace)]
    if len(t) < 2 or t[-1] <= 0:
        return float("nan")
    w = min(w, len(t) - 1)
    a, b = t[-1 - w], t[-1]
    return float((b / a) ** (1.0 / w)) if a > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Krylov helpers (batched over samples, masked per sample)


def batched_gmres(
    matvec: Callable[[Tensor, Tensor], Tensor],
    rhs: Tensor,
    tol: float,
    max_krylov: int,
) -> tuple[Tensor, Tensor]:
    """Solve ``A_b x_b = rhs_b`` for every row b by GMRES from x = 0 (no restart).

    ``matvec(V, sub)`` returns ``A_b v_b`` for rows ``sub`` (``V [len(sub), n]``). A row stops
    (and stops costing matvecs) once its residual is ≤ ``tol``·‖rhs_b‖. Arnoldi uses classical
    Gram–Schmidt applied twice. Returns ``(x [b, n], matvecs [b])``.
    """
    b, n = rhs.shape
    k_max = max(1, min(max_krylov, n))
    beta = rhs.norm(dim=1)
    V = torch.zeros(b, k_max + 1, n, dtype=rhs.dtype)
    H = torch.zeros(b, k_max + 1, k_max, dtype=rhs.dtype)
    V[:, 0] = rhs / beta.clamp_min(1e-300)[:, None]
    x = torch.zeros_like(rhs)
    mv = torch.zeros(b, dtype=torch.long)
    active = beta > 0
    for j in range(k_max):
        a = active.nonzero().flatten()
        if a.numel() == 0:
            break
        w = matvec(V[a, j], a)
        mv[a] += 1
        Vj = V[a, : j + 1]
        h = torch.einsum("bkn,bn->bk", Vj, w)
        w = w - torch.einsum("bk,bkn->bn", h, Vj)
        h2 = torch.einsum("bkn,bn->bk", Vj, w)
        w = w - torch.einsum("bk,bkn->bn", h2, Vj)
        h = h + h2
        hn = w.norm(dim=1)
        H[a, : j + 1, j] = h
        H[a, j + 1, j] = hn
        V[a, j + 1] = w / hn.clamp_min(1e-300)[:, None]
        Hs = H[a, : j + 2, : j + 1]
        e1 = torch.zeros(a.numel(), j + 2, 1, dtype=rhs.dtype)
        e1[:, 0, 0] = beta[a]
        y = torch.linalg.lstsq(Hs, e1).solution
        res = (e1 - Hs @ y).flatten(1).norm(dim=1)
        x[a] = torch.einsum("bk,bkn->bn", y[:, :, 0], V[a, : j + 1])
        done = (res <= tol * beta[a]) | (hn <= 1e-14 * beta[a]) | ~torch.isfinite(res)
        active[a[done]] = False
    return x, mv


def _batched_cg(
    matvec: Callable[[Tensor, Tensor], Tensor], rhs: Tensor, tol: float, max_cg: int
) -> Tensor:
    """Conjugate gradients for SPD ``A_b x = rhs_b`` rows, masked per row."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    stop = tol**2 * rs
    active = rs > 0
    for _ in range(max_cg):
        a = active.nonzero().flatten()
        if a.numel() == 0:
            break
        Ap = matvec(p[a], a)
        alpha = rs[a] / (p[a] * Ap).sum(1).clamp_min(1e-300)
        x[a] += alpha[:, None] * p[a]
        r[a] -= alpha[:, None] * Ap
        rs_new = (r[a] * r[a]).sum(1)
        p[a] = r[a] + (rs_new / rs[a].clamp_min(1e-300))[:, None] * p[a]
        rs[a] = rs_new
        active[a[rs_new <= stop[a]]] = False
    return x


# ---------------------------------------------------------------------------------------------
# methods


def _picard(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: Picard) -> None:
    tau = float(o.tau)
    for _ in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        fz = m.f(zi, idx)
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        z[k] = tau * fz[keep] + (1 - tau) * zi[keep]


def _aa_coefficients(
    dG: Tensor, g: Tensor, cnt: Tensor, lam: float, restart_cond: float
) -> tuple[Tensor, Tensor]:
    """γ = argmin ‖g − ΔG γ‖² + lam‖ΔG‖²_F‖γ‖² over the last ``cnt`` columns of ``dG [b, n, M]``.

    The columns are normalised first (γ is solved for unit-norm secant columns and scaled back),
    so the Tikhonov term is scale-free both globally and across columns whose norms shrink with
    the residual. Thin QR of the normalised ΔG; while cond(R) > restart_cond the oldest valid
    column is dropped. Invalid columns are zero and get a unit diagonal, so their γ is exactly 0.
    """
    b, n, M = dG.shape
    pos = torch.arange(M)
    cnt = cnt.clone()
    norms = dG.norm(dim=1)  # [b, M]
    cnt = torch.minimum(cnt, (norms > 0).flip(1).cumprod(1).sum(1))  # zero columns are invalid
    while True:
        valid = pos[None, :] >= (M - cnt)[:, None]
        d = torch.where(valid, norms, torch.ones_like(norms))
        A = dG * (valid / d)[:, None, :]
        Q, R = torch.linalg.qr(A)
        s = torch.linalg.svdvals(R)
        smin = s.gather(1, (cnt - 1).clamp(0, s.shape[1] - 1)[:, None])[:, 0]
        cond = s[:, 0] / smin
        bad = (cnt > 0) & ~(cond <= restart_cond)
        if not bool(bad.any()):
            break
        cnt = cnt - bad.long()
    diag = torch.where(valid, lam * cnt[:, None].to(dG.dtype), torch.ones_like(norms))
    RtR = R.transpose(1, 2) @ R + torch.diag_embed(diag)
    rhs = R.transpose(1, 2) @ (Q.transpose(1, 2) @ g[:, :, None])
    gamma = torch.linalg.solve(RtR, rhs)[:, :, 0] * valid / d
    return gamma, cnt


def _anderson(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: Anderson) -> None:
    M = min(int(o.m), m.n)
    lam = float(o.lam)
    restart_cond = float(o.restart_cond)
    safeguard = bool(o.safeguard)
    beta = float(o.beta)
    B, n = z.shape
    dX = torch.zeros(B, n, M, dtype=z.dtype)
    dG = torch.zeros(B, n, M, dtype=z.dtype)
    cnt = torch.zeros(B, dtype=torch.long)
    zp = torch.zeros_like(z)
    gp = torch.zeros_like(z)
    rp = torch.full((B,), math.inf, dtype=torch.float64)
    for it in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        fz = m.f(zi, idx)
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        if k.numel() == 0:
            continue
        zk, gk = zi[keep], (fz - zi)[keep]
        rk = gk.norm(dim=1).to(torch.float64)
        if it > 0:
            # push the newest secant pair (columns oldest -> newest)
            dX[k] = torch.cat([dX[k, :, 1:], (zk - zp[k])[:, :, None]], 2)
            dG[k] = torch.cat([dG[k, :, 1:], (gk - gp[k])[:, :, None]], 2)
            cnt[k] = (cnt[k] + 1).clamp_max(M)
        if safeguard:
            grew = rk > 2 * rp[k]
            cnt[k[grew]] = 0
        gamma, cnt_k = _aa_coefficients(dG[k], gk, cnt[k], lam, restart_cond)
        cnt[k] = cnt_k
        upd = torch.einsum("bnm,bm->bn", dX[k] + beta * dG[k], gamma)
        zp[k], gp[k], rp[k] = zk, gk, rk
        z[k] = zk + beta * gk - upd


def _broyden(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: Broyden) -> None:
    mem = int(o.memory)
    B, n = z.shape
    U = torch.zeros(B, n, mem, dtype=z.dtype)
    Vt = torch.zeros(B, mem, n, dtype=z.dtype)
    cnt = torch.zeros(B, dtype=torch.long)
    zp = torch.zeros_like(z)
    gp = torch.zeros_like(z)

    def hmv(k: Tensor, x: Tensor) -> Tensor:  # H x with H = -I + U V^T
        return -x + torch.einsum("bnl,bl->bn", U[k], torch.einsum("bln,bn->bl", Vt[k], x))

    def hrmv(k: Tensor, x: Tensor) -> Tensor:  # H^T x
        return -x + torch.einsum("bln,bl->bn", Vt[k], torch.einsum("bnl,bn->bl", U[k], x))

    for it in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        fz = m.f(zi, idx)
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        if k.numel() == 0:
            continue
        zk, gk = zi[keep], (fz - zi)[keep]
        if it > 0:
            dx, dg = zk - zp[k], gk - gp[k]
            full = cnt[k] >= mem
            if bool(full.any()):  # restart: a product-form update cannot drop old terms
                kf = k[full]
                U[kf] = 0
                Vt[kf] = 0
                cnt[kf] = 0
            vT = hrmv(k, dx)
            den = (vT * dg).sum(1)
            u = (dx - hmv(k, dg)) / den[:, None]
            ok = torch.isfinite(u).all(1) & torch.isfinite(vT).all(1) & (den.abs() > 1e-300)
            ko = k[ok]
            slot = cnt[ko]
            U[ko, :, slot] = u[ok]
            Vt[ko, slot, :] = vT[ok]
            cnt[ko] += 1
        zp[k], gp[k] = zk, gk
        z[k] = zk - hmv(k, gk)


def _newton_krylov(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: NewtonKrylov) -> None:
    gmres_tol = float(o.gmres_tol)
    max_krylov = int(o.max_krylov)
    max_halvings = int(o.max_halvings)
    B, n = z.shape
    za = z.clone()  # accepted point
    ra = torch.full((B,), math.inf, dtype=torch.float64)
    s = torch.zeros_like(z)
    alpha = torch.ones(B, dtype=z.dtype)
    halv = torch.zeros(B, dtype=torch.long)
    for _ in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        fz = m.f(zi, idx)
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        if k.numel() == 0:
            continue
        zk, gk = zi[keep], (fz - zi)[keep]
        rk = gk.norm(dim=1).to(torch.float64)
        accept = (rk < ra[k]) | (halv[k] >= max_halvings)  # ra starts at inf
        ka, kr = k[accept], k[~accept]
        # rejected trial: halve the step from the accepted point
        alpha[kr] *= 0.5
        halv[kr] += 1
        z[kr] = za[kr] + alpha[kr, None] * s[kr]
        if ka.numel() == 0:
            continue
        za[ka], ra[ka] = zk[accept], rk[accept]
        halv[ka] = 0
        alpha[ka] = 1.0
        zc = za[ka]

        def mv(v: Tensor, sub: Tensor, zc: Tensor = zc, ka: Tensor = ka) -> Tensor:
            return m.jvp(zc[sub], v, ka[sub])[1] - v

        step, _ = batched_gmres(mv, -gk[accept], gmres_tol, max_krylov)
        s[ka] = step
        z[ka] = zc + step


class _LM:
    """Levenberg–Marquardt state of every sample: accepted point ``za`` (residual ``ga``, q
    ``qa``), damping ``mu`` / ``nu``, the Gauss–Newton system ``A`` / ``grad`` / ``scale`` at
    ``za``, and the stagnation reference ``q_ref`` taken at iteration ``ref_it``."""

    def __init__(self, m: LoopMap, z: Tensor, o: LM) -> None:
        B, n = z.shape
        self.m, self.o, self.n = m, o, n
        self.dense = n <= int(o.dense_max)
        self.za = z.clone()
        self.ga = torch.zeros_like(z)
        self.qa = torch.full((B,), math.inf, dtype=torch.float64)
        self.mu = torch.zeros(B, dtype=z.dtype)
        self.scale = torch.ones(B, dtype=z.dtype)
        self.A = torch.zeros(B, n, n, dtype=z.dtype) if self.dense else None
        self.grad = torch.zeros_like(z)
        self.eye = torch.eye(n, dtype=z.dtype)
        self.nu = torch.full((B,), 2.0, dtype=z.dtype)
        self.pred = torch.ones(B, dtype=torch.float64)  # model decrease of q, pending trial
        self.q_ref = torch.full((B,), math.inf, dtype=torch.float64)
        self.ref_it = torch.zeros(B, dtype=torch.long)

    def update_damping(self, it: int, k: Tensor, accept: Tensor, qk: Tensor) -> None:
        """Nielsen's damping update from the gain ratio actual / predicted decrease of q."""
        ka, kr = k[accept], k[~accept]
        mu, nu = self.mu, self.nu
        mu[kr] *= nu[kr]
        nu[kr] *= 2.0
        if it == 0:
            mu[ka] = float(self.o.mu0)
        else:
            gain = ((self.qa[ka] - qk[accept]) / self.pred[ka].clamp_min(1e-300)).to(mu.dtype)
            mu[ka] = (mu[ka] * torch.clamp(1 - (2 * gain - 1) ** 3, min=1 / 3)).clamp_min(1e-16)
        nu[ka] = 2.0

    def linearise(self, it: int, ka: Tensor, tr: _Track) -> None:
        """Gauss–Newton system at the newly accepted points ``ka``; a vanishing relative
        gradient of q with q > 0 (a slow point) stops the sample as stalled."""
        m, za, ga, n = self.m, self.za, self.ga, self.n
        if self.dense:
            Jg = m.jacobian(za[ka], ka) - self.eye
            self.grad[ka] = torch.einsum("bij,bi->bj", Jg, ga[ka])
            self.A[ka] = Jg.transpose(1, 2) @ Jg
            self.scale[ka] = self.A[ka].diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-300)
            jnorm = (Jg + self.eye).flatten(1).norm(dim=1)  # ‖J‖_F
        else:
            _, jtg = m.vjp(za[ka], ga[ka], ka)
            self.grad[ka] = jtg - ga[ka]
            # ‖J − I‖_F² estimated by one Hutchinson probe (only a scale for mu)
            gen = torch.Generator().manual_seed(it)
            v = torch.randn(za[ka].shape, generator=gen, dtype=za.dtype)
            jv = m.jvp(za[ka], v, ka)[1]
            self.scale[ka] = (((jv - v) ** 2).sum(1) / n).clamp_min(1e-300)
            jnorm = jv.norm(dim=1)  # ≈ ‖J‖_F
        # local minimum of q with q > 0: ‖(J − I)ᵀg‖ / ((1 + ‖J‖_F/√n)‖g‖) vanishes
        gnorm = ga[ka].norm(dim=1)
        rel_grad = self.grad[ka].norm(dim=1) / ((1 + jnorm / math.sqrt(n)) * gnorm).clamp_min(
            1e-300
        )
        flat = (rel_grad < float(self.o.grad_tol)) & (gnorm > 0)
        tr.finish(ka[flat], "stalled", "gradient of q vanished with q > 0 (slow point)")

    def check_stall(self, it: int, k: Tensor, tr: _Track) -> None:
        # the method cannot decrease q any more (mu exploded): a local minimum or round-off
        dead = self.mu[k] > 1e12
        tr.finish(k[dead], "stalled", "LM damping exploded: q cannot be decreased")
        # stagnation: q fell by < 1% over the last `window` iterations (a plateau of q: each
        # further iteration costs a Jacobian for nothing)
        window = int(self.o.stall_window)
        due = (it - self.ref_it[k]) >= window
        kd = k[due]
        flat_q = self.qa[kd] > 0.99 * self.q_ref[kd]
        tr.finish(kd[flat_q], "stalled", f"q decreased < 1% in {window} iterations (plateau)")
        self.q_ref[kd], self.ref_it[kd] = self.qa[kd], it

    def step(self, k: Tensor) -> Tensor:
        """The damped step ``s = -(A + mu D)^-1 grad`` for samples ``k``."""
        mu, scale, grad = self.mu, self.scale, self.grad
        if self.dense:
            Ak = self.A[k]  # a gathered copy: the damping is added in place
            Ak.diagonal(dim1=1, dim2=2).add_((mu[k] * scale[k])[:, None])
            L, info = torch.linalg.cholesky_ex(Ak)  # SPD: Cholesky is ~2x cheaper than LU
            s = -torch.cholesky_solve(grad[k][:, :, None], L)[:, :, 0]
            bad = info != 0
            if bool(bad.any()):
                s[bad] = -torch.linalg.lstsq(Ak[bad], grad[k][bad][:, :, None]).solution[:, :, 0]
            return s
        zc, m = self.za[k], self.m

        def mv(v: Tensor, sub: Tensor) -> Tensor:
            kk = k[sub]
            jv = m.jvp(zc[sub], v, kk)[1] - v
            jtjv = m.vjp(zc[sub], jv, kk)[1] - jv
            return jtjv + (mu[kk] * scale[kk])[:, None] * v

        return _batched_cg(mv, -grad[k], float(self.o.cg_tol), int(self.o.max_cg))


def _lm(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: LM) -> None:
    st = _LM(m, z, o)
    for it in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        fz = m.f(zi, idx)
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        if k.numel() == 0:
            continue
        zk, gk = zi[keep], (fz - zi)[keep]
        qk = 0.5 * (gk * gk).sum(1).to(torch.float64)
        accept = qk < st.qa[k]  # qa starts at inf: the first iterate is always accepted
        st.update_damping(it, k, accept, qk)
        ka = k[accept]
        if ka.numel():
            st.za[ka], st.ga[ka], st.qa[ka] = zk[accept], gk[accept], qk[accept]
            st.linearise(it, ka, tr)
        st.check_stall(it, k, tr)
        k = k[tr.active[k]]
        if k.numel() == 0:
            continue
        s = st.step(k)
        # for s = -(A + mu D)^-1 grad: q(z) - model(z + s) = (mu D |s|^2 - grad.s) / 2
        mD = st.mu[k] * st.scale[k]
        st.pred[k] = (0.5 * (mD * (s * s).sum(1) - (st.grad[k] * s).sum(1))).to(torch.float64)
        z[k] = st.za[k] + s


def _adam_q(m: LoopMap, z: Tensor, tr: _Track, max_iter: int, o: AdamQ) -> None:
    lr0 = float(o.lr)
    factor = float(o.lr_factor)
    lr_patience = int(o.lr_patience)
    tol_dq = float(o.tol_dq)
    b1, b2 = o.betas
    B, n = z.shape
    mom = torch.zeros_like(z)
    vel = torch.zeros_like(z)
    lr = torch.full((B,), lr0, dtype=z.dtype)
    qbest = torch.full((B,), math.inf, dtype=torch.float64)
    bad = torch.zeros(B, dtype=torch.long)
    qprev = torch.full((B,), math.inf, dtype=torch.float64)
    steps = torch.zeros(B, dtype=torch.long)
    for _ in range(max_iter):
        idx = tr.idx()
        if idx.numel() == 0:
            return
        zi = z[idx]
        # one forward and one pullback give f(z) and grad q = (J - I)^T (f(z) - z)
        fz, gq = m.q_grad(zi, idx)
        g = fz - zi
        keep = tr.record(idx, zi, fz)
        k = idx[keep]
        if k.numel() == 0:
            continue
        grad = gq[keep]
        q = 0.5 * (g * g).sum(1).to(torch.float64)[keep]
        small_dq = (qprev[k] - q).abs() < tol_dq * lr[k]
        tr.finish(k[small_dq], "stalled", "|dq| < tol_dq * lr (FixedPointFinder stop)")
        qprev[k] = q
        improved = q < qbest[k]
        qbest[k] = torch.minimum(qbest[k], q)
        bad[k] = torch.where(improved, 0, bad[k] + 1)
        dec = bad[k] > lr_patience
        lr[k[dec]] *= factor
        bad[k[dec]] = 0
        keep2 = tr.active[k]
        k, grad = k[keep2], grad[keep2]
        steps[k] += 1
        mom[k] = b1 * mom[k] + (1 - b1) * grad
        vel[k] = b2 * vel[k] + (1 - b2) * grad * grad
        mh = mom[k] / (1 - b1 ** steps[k].to(z.dtype))[:, None]
        vh = vel[k] / (1 - b2 ** steps[k].to(z.dtype))[:, None]
        z[k] = z[k] - lr[k, None] * mh / (vh.sqrt() + 1e-8)


_RUNNERS: dict[str, Callable[..., None]] = {
    "picard": _picard,
    "anderson": _anderson,
    "broyden": _broyden,
    "newton_krylov": _newton_krylov,
    "lm": _lm,
    "adam_q": _adam_q,
}


def _check_common(
    tol: Any, max_iter: Any, stop_mode: Any, patience: Any, diverge_norm: Any
) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise LoopscopeError(f"tol must be a positive number, got {tol!r}")
    check_positive_int("max_iter", max_iter)
    if stop_mode not in ("rel", "abs"):
        raise LoopscopeError(f"stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
    check_positive_int("patience", patience)
    _positive("diverge_norm", diverge_norm)


@did_you_mean
def solve_map(
    lmap: LoopMap,
    z0: Tensor,
    method: str | SolverConfig = "auto",
    tol: float = CONVERGED_R_REL,
    max_iter: int = 100,
    *,
    stop_mode: str = "rel",
    patience: int = 50,
    diverge_norm: float = SOLVER_BLOWUP,
) -> SolveResult:
    """:func:`solve` on an existing :class:`LoopMap` from flat states ``z0 [B, n]``.

    The map's counters are reset first, so ``nfe``/``n_jvp``/``n_vjp`` are this solve's cost.

    Args:
        lmap: the map (its samples are the rows of ``z0``).
        z0: ``[B, n]`` flat start states.
        method: a method name (``METHODS``) or a :class:`SolverConfig` such as ``Anderson(m=5)``.
        tol: tolerance on r_rel (``stop_mode="rel"``) or ‖f(z) − z‖ (``"abs"``).
        max_iter: iterations per sample.
        stop_mode: ``"rel"`` or ``"abs"``.
        patience: iterations without a new best residual before a sample is ``stalled``.
        diverge_norm: a sample whose ‖z‖ exceeds ``diverge_norm · max(1, ‖z0‖)`` is diverged.
    """
    cfg = solver_config(method)
    _check_common(tol, max_iter, stop_mode, patience, diverge_norm)
    run = auto_config(lmap.n) if cfg == "auto" else cfg
    name = "auto" if cfg == "auto" else cfg.name
    m = lmap
    m.reset_counts()
    z = z0.detach().clone().to(m.dtype or z0.dtype)
    tr = _Track(z, float(tol), stop_mode, int(patience), float(diverge_norm))
    # a sample whose input holds NaN has no map to solve: flagged before any evaluation
    tr.finish(m.bad_input.nonzero().flatten(), "diverged", "non-finite input (NaN in the context)")
    t0 = time.perf_counter()
    _RUNNERS[run.name](m, z, tr, int(max_iter), run)
    wall = time.perf_counter() - t0
    rel, ab = tr.traces()
    kappa = torch.tensor([_kappa(a) for a in ab], dtype=torch.float64)
    settings = {"resolved": run.name, "options": run.options(), "stop_mode": stop_mode}
    return SolveResult(
        z_last=m.unflatten(tr.z_last),
        z_best=m.unflatten(tr.z_best),
        nfe=m.nfe.clone(),
        n_jvp=m.n_jvp.clone(),
        n_vjp=m.n_vjp.clone(),
        iterations=tr.n_rec.clone(),
        status=list(tr.status),
        reason=list(tr.reason),
        r_rel=tr.rel_best.clone(),
        r_abs=tr.abs_best.clone(),
        r_rel_last=tr.rel_last.clone(),
        kappa=kappa,
        best_is_last=tr.best_at == (tr.n_rec - 1),
        residuals=rel,
        residuals_abs=ab,
        method=name,
        tol=float(tol),
        wall_time=wall,
        meta=result_meta(m.loop, settings=settings),
    )


def _start_map(
    loop: Loop, inputs: Any, h0: Tensor | None, dtype: torch.dtype, t: int | None, seed: int
) -> tuple[LoopMap, Tensor]:
    """The LoopMap and the flat start states of :func:`solve` (``h0`` validated)."""
    if h0 is None:
        m = LoopMap(loop, inputs, dtype=dtype, t=t)
        return m, m.init(torch.Generator().manual_seed(int(seed)))
    if not isinstance(h0, Tensor) or h0.dim() < 1:
        raise LoopscopeError("h0 must be a tensor [B, *state] with a batch axis")
    m = LoopMap(
        loop, inputs, dtype=dtype, t=t, state_shape=tuple(h0.shape[1:]), batch_size=h0.shape[0]
    )
    if m._has_batch_ctx and m.ctx is not None:
        bc = batch_size_of(m.ctx)
        if bc != h0.shape[0]:
            raise LoopscopeError(f"h0 has batch {h0.shape[0]} but the inputs have batch {bc}")
    z = m.flatten(h0.to(m.dtype or h0.dtype))
    m.check_state(z, name="h0")
    return m, z


@did_you_mean
def solve(
    loop: Loop,
    inputs: Any,
    h0: Tensor | None = None,
    method: str | SolverConfig = "auto",
    tol: float = CONVERGED_R_REL,
    max_iter: int = 100,
    *,
    stop_mode: str = "rel",
    seed: int = 0,
    t: int | None = None,
    patience: int = 50,
    diverge_norm: float = SOLVER_BLOWUP,
    dtype: torch.dtype = torch.float64,
) -> SolveResult:
    """Find ``h* = f(h*; x)`` per sample of ``inputs``, starting from ``h0``.

    Args:
        loop: a :class:`loopscope.Loop` (e.g. ``FnLoop``); never mutated (float64 analysis runs
            on a deep copy).
        inputs: inputs for ``loop.encode``; one fixed point is sought per sample.
        h0: ``[B, *state]`` start states; default ``loop.init_state`` with a generator seeded
            by ``seed``.
        method: ``auto | picard | anderson | broyden | newton_krylov | lm | adam_q``, or a
            config carrying the method's settings (``Anderson(m=10)``, ``LM(mu0=1.0)``, ...).
        tol: tolerance on r_rel (``stop_mode="rel"``) or ‖f(z) − z‖ (``"abs"``).
        max_iter: iterations per sample (each evaluates f once at the current iterate).
        stop_mode: ``"rel"`` (relative residual) or ``"abs"``.
        seed: seed of the ``init_state`` generator when ``h0`` is None.
        t: iteration index passed to the step (non-autonomous loops).
        patience: iterations without a new best residual before a sample is ``stalled``.
        diverge_norm: blow-up factor of the divergence guard (``SOLVER_BLOWUP``).
        dtype: analysis dtype.

    Returns:
        :class:`SolveResult` with ``z_best``/``z_last`` of shape ``[B, *state]``.
    """
    cfg = solver_config(method)
    _check_common(tol, max_iter, stop_mode, patience, diverge_norm)
    seed = check_seed(seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LoopscopeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    m, z0 = _start_map(loop, inputs, h0, dtype, t, seed)
    res = solve_map(
        m, z0, cfg, tol, max_iter, stop_mode=stop_mode, patience=patience, diverge_norm=diverge_norm
    )
    res.meta["seed"] = seed
    return res
