"""Cycles, Floquet multipliers and trajectory classes (dynamics spec §10).

:func:`detect_cycle` finds, per sample, the smallest period ``p ≤ p_max`` with

    ‖h_t − h_{t−p}‖ < tol · max(1, ‖h_t‖)   for the last ``hits`` consecutive t,

refines the cycle by Newton–Krylov on ``G(h) = f^p(h) − h`` (GMRES on ``(J_p − I) s = −G`` with
``J_p v`` = jvp through p compositions) and returns the Floquet multipliers = eigenvalues of the
composed Jacobian ``J(h_{p−1}) ⋯ J(h_0)`` (dense product for ``n ≤ dense_max``, else ARPACK on the
composed jvp operator with ``ncv ≥ 64``). Period 1 is a fixed point (multipliers = eig J*).

:func:`classify` labels each sample (optionally each token) ``convergent | cycle(p) | orbit |
slider | chaotic | divergent | max_iter`` by these rules, in order:

1. ``divergent``: flagged by ``unroll`` / non-finite, or exponential growth (windowed step ratio
   κ̄ > 1 + growth_tol with the state norm increasing over the window);
2. a detected period: ``convergent`` for p = 1, ``cycle(p)`` for p ≥ 2 — a 2-cycle is never
   called converged even though ``‖h_{t+2} − h_t‖`` vanishes;
3. ``chaotic``: a Lyapunov result is given and λ₁'s CI lies above ``lyap_tol``;
   ``orbit``: λ₁'s CI contains 0 (± ``lyap_tol``), the state is bounded and recurs
   (quasi-periodic);
4. ``convergent``: the residual still decays geometrically but has not reached ``tol`` yet (a
   least-squares fit of ln r over the last ``window`` steps has slope < ln ``kappa_max`` and
   R² ≥ 0.9 — a chaotic residual fails the fit);
5. ``slider``: steady drift — step cosine > ``slider_cos`` and the step norm neither decays nor
   grows over the window;
6. ``max_iter``: none of the above within the budget (chaos cannot be told from a long transient
   without ``lyap=``).

Example:
    >>> import torch
    >>> from loopscope import FnLoop, unroll
    >>> tr = unroll(FnLoop(step=lambda h: torch.tanh(-2 * h)), None, 60,
    ...             init=torch.full((1, 8), 0.3, dtype=torch.float64))
    >>> res = detect_cycle(tr)
    >>> int(res.period[0]), round(float(abs(res.multipliers[0][0])), 10)
    (2, 0.0276796716)
    >>> classify(tr).classes
    ['cycle(2)']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse.linalg import LinearOperator, eigs, gmres
from torch import Tensor

from loopscope.analysis.convergence import _masked_states
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.lyapunov_qr import LYAP_TOL, LyapunovResult, is_chaotic
from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace

__all__ = ["detect_cycle", "CycleResult", "classify", "CycleClasses", "find_period"]


@dataclass(kw_only=True, repr=False)
class CycleResult(Result):
    """Per-sample cycle detection and refinement.

    Attributes:
        period: ``[B]`` int, smallest detected period (1 = fixed point, 0 = none).
        onset: ``[B]`` first iteration from which the period condition holds to the end (−1).
        residual_before / residual_after: ``[B]`` ‖f^p(h) − h‖ / max(1, ‖h‖) at the recorded
            point and after Newton refinement.
        refined: ``[B]`` bool, Newton reduced the residual (False if skipped or failed).
        newton_iters: ``[B]`` Newton steps taken.
        one_step_residual: ``[B]`` ‖f(h) − h‖ on the (refined) cycle.
        multipliers: per sample, complex Floquet multipliers sorted by modulus (empty if none).
        states: per sample, the cycle ``[p, *state]`` (refined if possible) or None.
        diverged: ``[B]`` bool.
    """

    period: np.ndarray
    onset: np.ndarray
    residual_before: np.ndarray
    residual_after: np.ndarray
    refined: np.ndarray
    newton_iters: np.ndarray
    one_step_residual: np.ndarray
    multipliers: list[np.ndarray]
    states: list[Tensor | None]
    diverged: np.ndarray

    @property
    def max_multiplier(self) -> np.ndarray:
        """``[B]`` largest |Floquet multiplier| (NaN if not computed)."""
        return np.array([float(np.abs(m).max()) if len(m) else np.nan for m in self.multipliers])

    @property
    def stable(self) -> np.ndarray:
        """``[B]`` bool: all |multipliers| < 1 (False if not computed)."""
        mm = self.max_multiplier
        return np.where(np.isnan(mm), False, mm < 1)

    @property
    def status(self) -> list[str]:
        """Per sample: ``diverged``, ``fixed_point``, ``cycle(p)`` or ``none``."""
        out = []
        for p, d in zip(self.period, self.diverged, strict=True):
            out.append(
                "diverged" if d else "fixed_point" if p == 1 else f"cycle({p})" if p > 1 else "none"
            )
        return out

    def summary(self) -> dict[str, float]:
        """Fractions of samples with a fixed point, a cycle, none, or diverged; stable fraction."""
        st = np.array([s.split("(")[0] for s in self.status])
        return float_summary(
            {
                "fixed_point_fraction": float(np.mean(st == "fixed_point")),
                "cycle_fraction": float(np.mean(st == "cycle")),
                "none_fraction": float(np.mean(st == "none")),
                "diverged_fraction": float(np.mean(st == "diverged")),
                "stable_fraction": float(np.mean(self.stable)),
            }
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: status, period, onset, residuals, refinement, max multiplier."""
        df = pd.DataFrame(
            {
                "sample": np.arange(len(self.period)),
                "status": self.status,
                "period": self.period,
                "onset": self.onset,
                "residual_before": self.residual_before,
                "residual_after": self.residual_after,
                "refined": self.refined,
                "newton_iters": self.newton_iters,
                "one_step_residual": self.one_step_residual,
                "max_multiplier": self.max_multiplier,
                "stable": self.stable,
                "diverged": self.diverged,
            }
        )
        for k in ("model", "split", "seed"):
            if self.meta.get(k) is not None:
                df[k] = self.meta[k]
        return df


def find_period(
    Z: Tensor, last: Tensor, p_max: int, tol: float, hits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smallest period per trajectory of ``Z [T+1, N, n]`` (rows after ``last`` ignored).

    Returns ``(period [N], onset [N], rel_residual [N])``; period 0 = none.
    """
    T1, N, _ = Z.shape
    period = np.zeros(N, dtype=np.int64)
    onset = np.full(N, -1, dtype=np.int64)
    relres = np.full(N, np.nan)
    norms = Z.norm(dim=-1)
    for b in range(N):
        L = int(last[b])
        if not torch.isfinite(Z[: L + 1, b]).all():
            continue
        for p in range(1, p_max + 1):
            first = L - hits + 1
            if first - p < 0:
                break
            ts = torch.arange(first, L + 1)
            d = (Z[ts, b] - Z[ts - p, b]).norm(dim=-1)
            scale = norms[ts, b].clamp_min(1.0)
            if bool((d < tol * scale).all()):
                period[b] = p
                relres[b] = float(d[-1] / scale[-1])
                # onset: first t from which the condition holds up to L
                ts_all = torch.arange(p, L + 1)
                ok = (Z[ts_all, b] - Z[ts_all - p, b]).norm(dim=-1) < tol * norms[
                    ts_all, b
                ].clamp_min(1.0)
                bad = torch.nonzero(~ok).flatten()
                onset[b] = p if bad.numel() == 0 else int(ts_all[int(bad[-1])]) + 1
                break
    return period, onset, relres


def _compose(m: LoopMap, x: Tensor, p: int, idx: Tensor) -> Tensor:
    y = x
    for _ in range(p):
        y = m.f(y, idx)
    return y


def _compose_jvp(m: LoopMap, x: Tensor, v: Tensor, p: int, idx: Tensor) -> Tensor:
    y, w = x, v
    for _ in range(p):
        y, w = m.jvp(y, w, idx)
    return w


def _newton(
    m: LoopMap, x: Tensor, p: int, b: int, tol: float, max_iter: int, gmres_tol: float
) -> tuple[Tensor, int, bool]:
    """Newton–Krylov on f^p(x) − x for sample b; returns (best x, iterations, improved)."""
    idx = torch.tensor([b])
    n = x.shape[1]
    g = _compose(m, x, p, idx) - x
    r = float(g.norm())
    r0 = r
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - iteration count is returned
        if r <= tol * max(1.0, float(x.norm())):
            it -= 1
            break
        xc = x

        def mv(v: np.ndarray, xc: Tensor = xc) -> np.ndarray:
            vt = torch.as_tensor(np.asarray(v).reshape(1, n), dtype=xc.dtype)
            return (_compose_jvp(m, xc, vt, p, idx) - vt).reshape(-1).numpy()

        A = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        s, _ = gmres(
            A, -g.reshape(-1).numpy(), rtol=gmres_tol, atol=0.0, restart=min(n, 60), maxiter=20
        )
        st = torch.as_tensor(s, dtype=x.dtype).reshape(1, n)
        lam, accepted = 1.0, False
        while lam >= 1e-4:
            xn = x + lam * st
            gn = _compose(m, xn, p, idx) - xn
            rn = float(gn.norm())
            if np.isfinite(rn) and rn < r:
                x, g, r, accepted = xn, gn, rn, True
                break
            lam *= 0.5
        if not accepted:
            break
    return x, it, r < r0


def _floquet(m: LoopMap, cyc: Tensor, b: int, dense_max: int, k: int) -> np.ndarray:
    """Eigenvalues of J(x_{p−1}) ⋯ J(x_0) for the cycle ``cyc [p, n]`` of sample b."""
    idx = torch.tensor([b])
    p, n = cyc.shape
    if n <= dense_max:
        M = torch.eye(n, dtype=cyc.dtype)
        for i in range(p):
            M = m.jacobian(cyc[i : i + 1], idx)[0] @ M
        ev = np.linalg.eigvals(M.numpy())
    else:
        x0 = cyc[0:1]

        def mv(v: np.ndarray) -> np.ndarray:
            vt = torch.as_tensor(np.asarray(v).reshape(1, n), dtype=cyc.dtype)
            return _compose_jvp(m, x0, vt, p, idx).reshape(-1).numpy()

        kk = min(k, n - 2)
        ev = eigs(
            LinearOperator((n, n), matvec=mv, dtype=np.float64),
            k=kk,
            which="LM",
            ncv=min(n, max(64, 4 * kk)),
            v0=np.ones(n) / np.sqrt(n),
            tol=1e-10,
            return_eigenvectors=False,
        )
    return ev[np.argsort(-np.abs(ev), kind="stable")]


def _source(source: Any, n_iter: int | None, p_max: int, seed: int | None) -> Any:
    if hasattr(source, "states") and isinstance(getattr(source, "states", None), Tensor):
        return source
    if isinstance(source, tuple) and len(source) == 3:
        from loopscope.core.unroll import unroll

        loop, inputs, h0 = source
        n = n_iter if n_iter is not None else 200 + 4 * p_max
        kw: dict[str, Any] = {}
        if h0 is not None:
            kw["init"] = torch.as_tensor(h0)
        if seed is not None:
            kw["seed"] = seed
        return unroll(loop, inputs, n, **kw)
    raise LoopscopeError(
        f"detect_cycle needs a Trace or a (loop, inputs, h0) tuple, got {type(source).__name__}"
    )


def _check_detect(p_max: int, tol: float, hits: int) -> None:
    check_positive_int("p_max", p_max)
    check_positive_int("hits", hits)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise LoopscopeError(f"tol must be a positive number, got {tol!r}")


@dataclass
class _Refined:
    """One sample's cycle after (optional) Newton refinement."""

    states: Tensor
    one_step: float
    residual: float = np.nan
    iters: int = 0
    refined: bool = False
    multipliers: np.ndarray = field(default_factory=lambda: np.array([], dtype=complex))


def _recorded_cycle(Z: Tensor, L: int, b: int, p: int) -> _Refined:
    """The cycle as recorded (no loop attached: nothing to refine)."""
    cyc = torch.stack([Z[L - p + 1 + i, b] for i in range(p)])
    one = (cyc[1] - cyc[0]).norm() if p >= 2 else (Z[L, b] - Z[L - 1, b]).norm()
    return _Refined(states=cyc, one_step=float(one))


def _refine_sample(
    m: LoopMap,
    x: Tensor,
    p: int,
    b: int,
    refine: bool,
    floquet: bool,
    newton: tuple,
    dense_max: int,
    k_floquet: int,
) -> _Refined:
    """Newton–Krylov on ``f^p(x) − x``, the refined cycle's residuals and Floquet multipliers."""
    iters, refined = 0, False
    if refine:
        x, iters, refined = _newton(m, x, p, b, *newton)
    idx = torch.tensor([b])
    cyc = [x]
    for _ in range(p - 1):
        cyc.append(m.f(cyc[-1], idx))
    cyc_t = torch.cat(cyc)
    back = m.f(cyc_t[-1:], idx)
    out = _Refined(
        states=cyc_t,
        one_step=float(((cyc_t[1:2] if p >= 2 else back) - cyc_t[:1]).norm()),
        residual=float((back - cyc_t[:1]).norm() / max(1.0, float(cyc_t[0].norm()))),
        iters=int(iters),
        refined=bool(refined),
    )
    if floquet:
        out.multipliers = _floquet(m, cyc_t, b, dense_max, k_floquet)
    return out


@did_you_mean
def detect_cycle(
    source: Trace | tuple,
    p_max: int = 16,
    tol: float = 1e-6,
    *,
    hits: int = 3,
    refine: bool = True,
    floquet: bool = True,
    n_iter: int | None = None,
    newton_tol: float = 1e-14,
    max_newton: int = 30,
    gmres_tol: float = 1e-12,
    dense_max: int = 1024,
    k_floquet: int = 6,
    seed: int | None = None,
) -> CycleResult:
    """Per-sample period detection, Newton–Krylov refinement and Floquet multipliers.

    Args:
        source: a Trace (refinement needs its loop attached) or ``(loop, inputs, h0)`` (unrolled
            for ``n_iter`` steps first; ``h0=None`` uses the loop's init).
        p_max: largest period tried.
        tol: detection tolerance, relative to ``max(1, ‖h_t‖)``.
        hits: consecutive iterations that must satisfy the period condition.
        refine: Newton–Krylov refinement on f^p(h) − h.
        floquet: compute Floquet multipliers.
        n_iter: iterations when ``source`` is a tuple (None: 200 + 4·p_max).
        newton_tol: relative residual at which Newton stops.
        max_newton: Newton iterations.
        gmres_tol: relative GMRES tolerance per Newton step.
        dense_max: largest n for the dense composed Jacobian; ARPACK above.
        k_floquet: multipliers computed by ARPACK.
        seed: seed for ``unroll`` when ``source`` is a tuple.

    Returns:
        :class:`CycleResult` (a sample with a non-finite state is ``diverged``, period 0).
    """
    _check_detect(p_max, tol, hits)
    trace = _source(source, n_iter, p_max, seed)
    S, last = _masked_states(trace)
    T1, B = S.shape[:2]
    state_shape = tuple(S.shape[2:])
    Z = S.reshape(T1, B, -1)
    period, onset, relres = find_period(Z, last, p_max, float(tol), hits)
    diverged = _diverged(trace, Z, last)
    m = None
    if (refine or floquet) and trace.loop is not None and (period > 0).any():
        m = LoopMap(trace.loop, ctx=trace.ctx, state_shape=state_shape, batch_size=B)
    found: dict[int, _Refined] = {}
    for b in range(B):
        p, L = int(period[b]), int(last[b])
        if p == 0 or diverged[b]:
            period[b] = 0 if diverged[b] else p
            continue
        if m is None:
            found[b] = _recorded_cycle(Z, L, b, p)
            continue
        x = Z[L, b].reshape(1, -1).clone()
        newton = (float(newton_tol), int(max_newton), float(gmres_tol))
        found[b] = _refine_sample(m, x, p, b, refine, floquet, newton, dense_max, k_floquet)
    return _assemble_cycles(trace, period, onset, relres, diverged, found, state_shape)


def _diverged(trace: Trace, Z: Tensor, last: Tensor) -> np.ndarray:
    """``[B]``: flagged by ``unroll`` or a non-finite state before the sample's last real one."""
    T1, B = Z.shape[:2]
    rows = torch.arange(T1).view(T1, 1) <= last.view(1, -1)
    out = ((~torch.isfinite(Z).all(-1)) & rows).any(0).numpy()
    if trace.diverged_at is not None:
        out |= (trace.diverged_at.cpu() >= 0).numpy()
    return out


def _assemble_cycles(
    trace: Trace,
    period: np.ndarray,
    onset: np.ndarray,
    relres: np.ndarray,
    diverged: np.ndarray,
    found: dict[int, _Refined],
    state_shape: tuple[int, ...],
) -> CycleResult:
    B = len(period)
    res_after = relres.copy()
    for b, r in found.items():
        if not np.isnan(r.residual):
            res_after[b] = r.residual
    empty = np.array([], dtype=complex)
    meta = {k: v for k, v in (trace.meta or {}).items() if k in ("model", "split", "seed", "task")}
    full = result_meta(
        trace.loop, seed=meta.get("seed"), split=meta.get("split"), model=meta.get("model")
    )
    return CycleResult(
        period=period,
        onset=onset,
        residual_before=relres,
        residual_after=res_after,
        refined=np.array([found[b].refined if b in found else False for b in range(B)]),
        newton_iters=np.array(
            [found[b].iters if b in found else 0 for b in range(B)], dtype=np.int64
        ),
        one_step_residual=np.array([found[b].one_step if b in found else np.nan for b in range(B)]),
        multipliers=[found[b].multipliers if b in found else empty for b in range(B)],
        states=[
            found[b].states.reshape(-1, *state_shape) if b in found else None for b in range(B)
        ],
        diverged=diverged,
        meta={**full, **meta},
    )


# ---------------------------------------------------------------------------------------------
# trajectory classes
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class CycleClasses(Result):
    """Trajectory class per sample (or per token) from :func:`classify`.

    ``frame`` columns: ``sample`` (and ``position`` per token), ``class`` (e.g. ``"cycle(2)"``),
    ``period``, ``final_rel_residual``, ``kappa_bar``, ``step_cos``, ``lambda1``, ``chaotic``
    (:func:`~loopscope.analysis.lyapunov_qr.is_chaotic`; False without ``lyap=``).
    """

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The per-sample (per-token) table, ``sample`` a column."""
        return self.frame.copy()

    @property
    def classes(self) -> list[str]:
        """The class of every row, in order."""
        return self.frame["class"].tolist()

    def summary(self) -> dict[str, float]:
        """``class[<name>]``: the fraction of rows in each class (periods pooled: ``cycle``)."""
        c = self.frame["class"].astype(str).str.replace(r"\(\d+\)", "", regex=True)
        out = {f"class[{k}]": float(v) for k, v in c.value_counts(normalize=True).items()}
        out["n"] = float(len(self.frame))
        return float_summary(out)


@dataclass
class _Window:
    """Rate statistics of one trajectory over the last ``window`` steps."""

    kbar: float = np.nan
    cos: float = np.nan
    slope: float = np.nan
    r2: float = np.nan
    final: float = np.nan
    growing: bool = False


def _window_stats(zb: Tensor, w: int) -> _Window:
    L = zb.shape[0] - 1
    r = (zb[1:] - zb[:-1]).norm(dim=-1) if L >= 1 else torch.zeros(0, dtype=zb.dtype)
    nrm = zb.norm(dim=-1)
    out = _Window()
    if r.numel() > w:
        out.kbar = float((r[-1] / r[-1 - w]) ** (1.0 / w)) if r[-1 - w] > 0 else np.nan
        D = zb[1:] - zb[:-1]
        c = (D[-w:] * D[-w - 1 : -1]).sum(-1) / (D[-w:].norm(dim=-1) * D[-w - 1 : -1].norm(dim=-1))
        out.cos = float(c.mean())
        lr = torch.log(r[-w - 1 :]).numpy()
        if np.isfinite(lr).all():
            # log-linear fit of the residual over the window: steady geometric decay has a
            # negative slope AND a good fit (a chaotic residual does not)
            s_ = np.arange(w + 1, dtype=float)
            slope, icpt = np.polyfit(s_, lr, 1)
            ss = float(((lr - lr.mean()) ** 2).sum())
            out.slope = slope
            out.r2 = 1.0 - float(((lr - (slope * s_ + icpt)) ** 2).sum()) / ss if ss > 0 else 1.0
        out.growing = bool((nrm[-w:] > nrm[-w - 1 : -1]).all())
    out.final = float(r[-1] / (nrm[-1] + 1e-9)) if r.numel() else np.nan
    return out


@dataclass(frozen=True)
class _Rules:
    window: int
    kappa_max: float
    slider_cos: float
    growth: float
    recur_tol: float
    lyap_tol: float


def _recurs(zb: Tensor, w: int, recur_tol: float) -> bool:
    L = zb.shape[0] - 1
    nrm = float(zb[L].norm())
    return L > w and float((zb[: L - w] - zb[L]).norm(dim=-1).min()) < recur_tol * max(1.0, nrm)


def _one_class(
    zb: Tensor,
    st: _Window,
    diverged: bool,
    period: int,
    lam_lo: float,
    lam_hi: float,
    rules: _Rules,
) -> str:
    """The rules of the module docstring, in order."""
    w = rules.window
    if (
        diverged
        or not bool(torch.isfinite(zb).all())
        or (not np.isnan(st.kbar) and st.kbar > 1 + rules.growth and st.growing)
    ):
        return "divergent"
    if period == 1:
        return "convergent"
    if period > 1:
        return f"cycle({period})"
    if bool(is_chaotic(np.array([lam_lo]), rules.lyap_tol)[0]):
        return "chaotic"
    if (
        not np.isnan(lam_lo)
        and lam_lo <= rules.lyap_tol
        and lam_hi >= -rules.lyap_tol
        and not st.growing
        and _recurs(zb, w, rules.recur_tol)
    ):
        return "orbit"
    if not np.isnan(st.slope) and st.slope < np.log(rules.kappa_max) and st.r2 >= 0.9:
        return "convergent"
    if (
        not np.isnan(st.cos)
        and st.cos > rules.slider_cos
        and not np.isnan(st.kbar)
        and rules.kappa_max <= st.kbar <= 1 + rules.growth
    ):
        return "slider"
    return "max_iter"


@did_you_mean
def classify(
    trace: Trace,
    p_max: int = 16,
    tol: float = 1e-6,
    *,
    hits: int = 3,
    window: int = 10,
    lyap: LyapunovResult | None = None,
    kappa_max: float = 0.99,
    slider_cos: float = 0.999,
    growth_tol: float = 0.01,
    recur_tol: float = 1e-2,
    lyap_tol: float = LYAP_TOL,
    per_token: bool = False,
) -> CycleClasses:
    """Per-sample (or per-token) trajectory class by the rules in the module docstring.

    Args:
        trace: a Trace.
        p_max: largest period tried (see :func:`detect_cycle`).
        tol: period detection tolerance (see :func:`detect_cycle`).
        hits: consecutive iterations that must satisfy the period condition.
        window: the window of the rate rules.
        lyap: a :class:`~loopscope.analysis.lyapunov_qr.LyapunovResult` for the same samples
            (enables ``chaotic`` / ``orbit``).
        kappa_max: fitted per-step decay of the residual below this = still converging.
        slider_cos: step cosine above this = straight drift.
        growth_tol: κ̄ above 1 + growth_tol with growing norm = divergent.
        recur_tol: relative recurrence distance for ``orbit``.
        lyap_tol: |λ| at or below this is zero; chaotic = λ₁'s CI above it
            (:func:`~loopscope.analysis.lyapunov_qr.is_chaotic`).
        per_token: classify each position's trajectory (state ``[B, pos, d]``).

    Returns:
        :class:`CycleClasses`; ``.to_frame()`` has ``sample`` (and ``position``) as columns with
        ``class`` (e.g. ``"cycle(2)"``), ``period``, ``final_rel_residual``, ``kappa_bar``,
        ``step_cos``, ``lambda1``, ``chaotic``.
    """
    _check_detect(p_max, tol, hits)
    w = check_positive_int("window", window)
    rules = _Rules(
        w, float(kappa_max), float(slider_cos), float(growth_tol), float(recur_tol), float(lyap_tol)
    )
    S, last = _masked_states(trace)
    T1, B = S.shape[:2]
    P = 1
    if per_token:
        if S.dim() < 4:
            raise LoopscopeError("per_token classification needs states [T+1, B, pos, d]")
        P = int(np.prod(S.shape[2:-1]))
        S = S.reshape(T1, B * P, S.shape[-1])
        last = last.repeat_interleave(P)
    N = S.shape[1]
    Z = S.reshape(T1, N, -1)
    period, _, _ = find_period(Z, last, p_max, float(tol), hits)
    diverged = np.zeros(N, dtype=bool)
    if trace.diverged_at is not None:
        diverged |= np.repeat((trace.diverged_at.cpu() >= 0).numpy(), P)
    lam1, lam_lo, lam_hi = _lyap_columns(lyap, B, N, per_token)
    classes, stats = [], []
    for b in range(N):
        zb = Z[: int(last[b]) + 1, b]
        st = _window_stats(zb, w)
        stats.append(st)
        classes.append(
            _one_class(zb, st, bool(diverged[b]), int(period[b]), lam_lo[b], lam_hi[b], rules)
        )
    df = pd.DataFrame(
        {
            "class": classes,
            "period": period,
            "final_rel_residual": [s.final for s in stats],
            "kappa_bar": [s.kbar for s in stats],
            "step_cos": [s.cos for s in stats],
            "lambda1": np.asarray(lam1, dtype=float),
            "chaotic": is_chaotic(lam_lo, rules.lyap_tol),
        }
    )
    if per_token:
        df.insert(0, "position", np.tile(np.arange(P), B))
    df.insert(0, "sample", np.repeat(np.arange(B), P))
    meta = {k: v for k, v in (trace.meta or {}).items() if k in ("model", "split", "seed")}
    return CycleClasses(
        frame=df,
        meta={
            **result_meta(
                trace.loop, settings=dict(p_max=p_max, tol=tol, window=w, per_token=per_token)
            ),
            **meta,
        },
    )


def _lyap_columns(
    lyap: LyapunovResult | None, B: int, N: int, per_token: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """λ₁ and its CI per row (NaN without ``lyap``)."""
    if lyap is None:
        nan = np.full(N, np.nan)
        return nan, nan.copy(), nan.copy()
    if per_token:
        raise LoopscopeError("lyap= is per sample; it cannot be combined with per_token=True")
    if lyap.exponents.shape[0] != B:
        raise LoopscopeError(f"lyap has {lyap.exponents.shape[0]} samples, the trace has {B}")
    return lyap.exponents[:, 0], lyap.ci_low[:, 0], lyap.ci_high[:, 0]
