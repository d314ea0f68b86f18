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
    >>> classify(tr)["class"].tolist()
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
from loopscope.core.errors import LoopscopeError, check_positive_int, reject_unknown_kwargs

__all__ = ["detect_cycle", "CycleResult", "classify", "find_period"]


@dataclass
class CycleResult:
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
    meta: dict[str, Any] = field(default_factory=dict)

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
        out = []
        for p, d in zip(self.period, self.diverged, strict=True):
            out.append(
                "diverged" if d else "fixed_point" if p == 1 else f"cycle({p})" if p > 1 else "none"
            )
        return out

    def to_frame(self) -> pd.DataFrame:
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
            if k in self.meta:
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


_DETECT_OPTIONS = (
    "hits",
    "refine",
    "floquet",
    "n_iter",
    "newton_tol",
    "max_newton",
    "gmres_tol",
    "dense_max",
    "k_floquet",
    "seed",
)


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


def detect_cycle(source: Any, p_max: int = 16, tol: float = 1e-6, **options: Any) -> CycleResult:
    """Per-sample period detection, Newton–Krylov refinement and Floquet multipliers.

    Args:
        source: a Trace (refinement needs its loop attached) or ``(loop, inputs, h0)`` (unrolled
            for ``n_iter`` steps first; ``h0=None`` uses the loop's init).
        p_max: largest period tried.
        tol: detection tolerance, relative to ``max(1, ‖h_t‖)``.

    Keyword options:
        hits: consecutive iterations that must satisfy the period condition (3).
        refine: Newton–Krylov refinement on f^p(h) − h (True).
        floquet: compute Floquet multipliers (True).
        n_iter: iterations when ``source`` is a tuple (200 + 4·p_max).
        newton_tol: relative residual at which Newton stops (1e-14).
        max_newton: Newton iterations (30).
        gmres_tol: relative GMRES tolerance per Newton step (1e-12).
        dense_max: largest n for the dense composed Jacobian (1024); ARPACK above.
        k_floquet: multipliers computed by ARPACK (6).
        seed: seed for ``unroll`` when ``source`` is a tuple.

    Returns:
        :class:`CycleResult`.
    """
    reject_unknown_kwargs("detect_cycle", options, _DETECT_OPTIONS)
    p_max = check_positive_int("p_max", p_max)
    hits = check_positive_int("hits", options.get("hits", 3))
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise LoopscopeError(f"tol must be a positive number, got {tol!r}")
    trace = _source(source, options.get("n_iter"), p_max, options.get("seed"))
    S, last = _masked_states(trace)
    T1, B = S.shape[:2]
    state_shape = tuple(S.shape[2:])
    Z = S.reshape(T1, B, -1)
    period, onset, relres = find_period(Z, last, p_max, float(tol), hits)
    diverged = np.zeros(B, dtype=bool)
    if trace.diverged_at is not None:
        diverged |= (trace.diverged_at.cpu() >= 0).numpy()
    refine = bool(options.get("refine", True))
    want_floquet = bool(options.get("floquet", True))
    m = None
    if (refine or want_floquet) and trace.loop is not None and (period > 0).any():
        m = LoopMap(trace.loop, ctx=trace.ctx, state_shape=state_shape, batch_size=B)
    res_after = relres.copy()
    refined = np.zeros(B, dtype=bool)
    iters = np.zeros(B, dtype=np.int64)
    one_step = np.full(B, np.nan)
    mults: list[np.ndarray] = [np.array([], dtype=complex) for _ in range(B)]
    states: list[Tensor | None] = [None] * B
    for b in range(B):
        p = int(period[b])
        if p == 0 or diverged[b]:
            period[b] = 0 if diverged[b] else p
            continue
        L = int(last[b])
        x = Z[L, b].reshape(1, -1).clone()
        if m is None:
            cyc = torch.stack([Z[L - p + 1 + i, b] for i in range(p)])
            states[b] = cyc.reshape(p, *state_shape)
            if p >= 2:
                one_step[b] = float((cyc[1] - cyc[0]).norm())
            else:
                one_step[b] = float((Z[L, b] - Z[L - 1, b]).norm())
            continue
        if refine:
            x, iters[b], refined[b] = _newton(
                m,
                x,
                p,
                b,
                float(options.get("newton_tol", 1e-14)),
                int(options.get("max_newton", 30)),
                float(options.get("gmres_tol", 1e-12)),
            )
        idx = torch.tensor([b])
        cyc = [x]
        for _ in range(p - 1):
            cyc.append(m.f(cyc[-1], idx))
        cyc_t = torch.cat(cyc)
        back = m.f(cyc_t[-1:], idx)
        res_after[b] = float((back - cyc_t[:1]).norm() / max(1.0, float(cyc_t[0].norm())))
        one_step[b] = float(((cyc_t[1:2] if p >= 2 else back) - cyc_t[:1]).norm())
        states[b] = cyc_t.reshape(p, *state_shape)
        if want_floquet:
            mults[b] = _floquet(
                m, cyc_t, b, int(options.get("dense_max", 1024)), int(options.get("k_floquet", 6))
            )
    meta = {k: v for k, v in (trace.meta or {}).items() if k in ("model", "split", "seed", "task")}
    return CycleResult(
        period=period,
        onset=onset,
        residual_before=relres,
        residual_after=res_after,
        refined=refined,
        newton_iters=iters,
        one_step_residual=one_step,
        multipliers=mults,
        states=states,
        diverged=diverged,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# trajectory classes
# ---------------------------------------------------------------------------------------------
_CLASSIFY_OPTIONS = (
    "hits",
    "window",
    "lyap",
    "kappa_max",
    "slider_cos",
    "growth_tol",
    "recur_tol",
    "lyap_tol",
    "per_token",
)


def classify(trace: Any, p_max: int = 16, tol: float = 1e-6, **options: Any) -> pd.DataFrame:
    """Per-sample (or per-token) trajectory class by the rules in the module docstring.

    Args:
        trace: a Trace.
        p_max, tol: period detection (see :func:`detect_cycle`).

    Keyword options:
        hits (3), window (10): detection hits and the window of the rate rules.
        lyap: a :class:`~loopscope.analysis.lyapunov_qr.LyapunovResult` for the same samples
            (enables ``chaotic`` / ``orbit``).
        kappa_max (0.99): fitted per-step decay of the residual below this = still converging.
        slider_cos (0.999): step cosine above this = straight drift.
        growth_tol (0.01): κ̄ above 1 + growth_tol with growing norm = divergent.
        recur_tol (1e-2): relative recurrence distance for ``orbit``.
        lyap_tol (1e-8): |λ| below this is zero (rounding makes a rotation's λ₁ ≈ ±1e-17).
        per_token (False): classify each position's trajectory (state ``[B, pos, d]``).

    Returns:
        DataFrame indexed by sample (and position) with ``class`` (e.g. ``"cycle(2)"``),
        ``period``, ``final_rel_residual``, ``kappa_bar``, ``step_cos``, ``lambda1``.
    """
    reject_unknown_kwargs("classify", options, _CLASSIFY_OPTIONS)
    hits = check_positive_int("hits", options.get("hits", 3))
    w = check_positive_int("window", options.get("window", 10))
    kappa_max = float(options.get("kappa_max", 0.99))
    slider_cos = float(options.get("slider_cos", 0.999))
    growth = float(options.get("growth_tol", 0.01))
    recur_tol = float(options.get("recur_tol", 1e-2))
    lyap_tol = float(options.get("lyap_tol", 1e-8))
    lyap = options.get("lyap")
    per_token = bool(options.get("per_token", False))
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
    lam1 = np.full(N, np.nan)
    lam_lo = np.full(N, np.nan)
    lam_hi = np.full(N, np.nan)
    if lyap is not None:
        if per_token:
            raise LoopscopeError("lyap= is per sample; it cannot be combined with per_token=True")
        if lyap.exponents.shape[0] != B:
            raise LoopscopeError(f"lyap has {lyap.exponents.shape[0]} samples, the trace has {B}")
        lam1, lam_lo, lam_hi = lyap.exponents[:, 0], lyap.ci_low[:, 0], lyap.ci_high[:, 0]
    classes, kbars, coss, finals = [], [], [], []
    for b in range(N):
        L = int(last[b])
        zb = Z[: L + 1, b]
        finite = bool(torch.isfinite(zb).all())
        r = (zb[1:] - zb[:-1]).norm(dim=-1) if L >= 1 else torch.zeros(0, dtype=zb.dtype)
        nrm = zb.norm(dim=-1)
        kb = cosm = slope = r2 = np.nan
        if r.numel() > w:
            kb = float((r[-1] / r[-1 - w]) ** (1.0 / w)) if r[-1 - w] > 0 else np.nan
            D = zb[1:] - zb[:-1]
            c = (D[-w:] * D[-w - 1 : -1]).sum(-1) / (
                D[-w:].norm(dim=-1) * D[-w - 1 : -1].norm(dim=-1)
            )
            cosm = float(c.mean())
            lr = torch.log(r[-w - 1 :]).numpy()
            if np.isfinite(lr).all():
                # log-linear fit of the residual over the window: steady geometric decay has a
                # negative slope AND a good fit (a chaotic residual does not)
                s_ = np.arange(w + 1, dtype=float)
                slope, icpt = np.polyfit(s_, lr, 1)
                ss = float(((lr - lr.mean()) ** 2).sum())
                r2 = 1.0 - float(((lr - (slope * s_ + icpt)) ** 2).sum()) / ss if ss > 0 else 1.0
        final = float(r[-1] / (nrm[-1] + 1e-9)) if r.numel() else np.nan
        kbars.append(kb)
        coss.append(cosm)
        finals.append(final)
        growing = r.numel() > w and bool((nrm[-w:] > nrm[-w - 1 : -1]).all())
        if diverged[b] or not finite or (not np.isnan(kb) and kb > 1 + growth and growing):
            classes.append("divergent")
        elif period[b] == 1:
            classes.append("convergent")
        elif period[b] > 1:
            classes.append(f"cycle({int(period[b])})")
        elif not np.isnan(lam_lo[b]) and lam_lo[b] > lyap_tol:
            classes.append("chaotic")
        elif (
            not np.isnan(lam_lo[b])
            and lam_lo[b] <= lyap_tol
            and lam_hi[b] >= -lyap_tol
            and L > w
            and not growing
            and float((zb[: L - w] - zb[L]).norm(dim=-1).min())
            < recur_tol * max(1.0, float(nrm[-1]))
        ):
            classes.append("orbit")
        elif not np.isnan(slope) and slope < np.log(kappa_max) and r2 >= 0.9:
            classes.append("convergent")
        elif (
            not np.isnan(cosm)
            and cosm > slider_cos
            and not np.isnan(kb)
            and kappa_max <= kb <= 1 + growth
        ):
            classes.append("slider")
        else:
            classes.append("max_iter")
    df = pd.DataFrame(
        {
            "class": classes,
            "period": period,
            "final_rel_residual": finals,
            "kappa_bar": kbars,
            "step_cos": coss,
            "lambda1": np.asarray(lam1, dtype=float),
        }
    )
    if per_token:
        df.index = pd.MultiIndex.from_arrays(
            [np.repeat(np.arange(B), P), np.tile(np.arange(P), B)], names=["sample", "position"]
        )
    else:
        df.index = pd.Index(np.arange(B), name="sample")
    return df
