"""Lyapunov spectrum of a loop (dynamics spec §9): Benettin / QR method, per sample.

The tangent basis ``Q [n, k]`` is propagated **forward** with the Jacobian along the trajectory,
``Q_{t+1} R_{t+1} = J(h_t) Q_t`` (thin QR, sign-fixed so that ``diag R > 0``), and

    λ_i = (1/N) Σ_t ln R_{t+1, ii}        [nats per loop iteration; bits = λ / ln 2]

after ``warmup`` steps (trajectory and basis both warmed up, so at a fixed point with real
eigenvalues the spectrum is ln|λ_i(J*)| to machine precision). Two ways to get ``J·Q``:

* ``mode="jvp"`` (default): ``k`` JVPs per step (``LoopMap.jvp_many``, vmap over torch.func.jvp);
  matrix-free, any ``n``.
* ``mode="dense"``: the trajectory is run first, then dense Jacobians of a whole chunk of steps
  are computed in one batched call (``LoopMap.jacobian`` with the sample index repeated) and
  multiplied into ``Q``; much faster for small ``n`` (Hénon: 2-D, 10⁵ steps).

Exponents are reported sorted, largest first (``lambda1`` = ``exponents[:, 0]``). A sample is
*chaotic* when λ₁ > 0 by more than its CI (:func:`is_chaotic`: the CI's lower end above
:data:`LYAP_TOL`); the one definition shared by :meth:`LyapunovResult.summary` and
:func:`loopscope.analysis.classify`.

Also returned: a moving-block bootstrap CI of each exponent, the running estimate, finite-time
(local) exponents per step, the Kaplan–Yorke dimension, and a two-trajectory cross-check of the
largest exponent (ChaosTools defaults: d0 = 1e-9, renormalised outside [d0·1e-3, d0·1e3]).

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> A = torch.diag(torch.tensor([0.5, 0.25], dtype=torch.float64))
    >>> loop = FnLoop(step=lambda h: h @ A.T)
    >>> res = lyapunov(loop, None, torch.zeros(1, 2, dtype=torch.float64), n_steps=50, warmup=10,
    ...                bootstrap=0)
    >>> [round(v, 6) for v in res.exponents[0].tolist()]
    [-0.693147, -1.386294]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.stats import block_bootstrap_ci
from loopscope.core.errors import LoopscopeError, check_positive_int, check_seed, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.numerics import BLOWUP, diverged, reference_norm
from loopscope.core.result import Result, float_summary, result_meta

__all__ = [
    "lyapunov",
    "LyapunovResult",
    "kaplan_yorke",
    "block_bootstrap_ci",
    "is_chaotic",
    "LYAP_TOL",
]

#: |λ| at or below this counts as zero (rounding makes a rotation's λ₁ ≈ ±1e-17)
LYAP_TOL = 1e-8


def is_chaotic(ci_low: np.ndarray, tol: float = LYAP_TOL) -> np.ndarray:
    """Chaotic ⇔ λ₁ > 0 by more than its CI: the lower end of λ₁'s CI is above ``tol``.

    ``ci_low`` ``[B]`` (NaN: no CI, e.g. ``bootstrap=0``, or a diverged sample) -> ``[B]`` bool;
    without a CI nothing is called chaotic.
    """
    lo = np.asarray(ci_low, dtype=float)
    return np.where(np.isnan(lo), False, lo > tol)


@dataclass(kw_only=True, repr=False)
class LyapunovResult(Result):
    """Lyapunov spectrum per sample.

    Attributes:
        exponents: ``[B, k]`` nats per iteration, sorted descending (NaN for a diverged sample).
        ci_low, ci_high: ``[B, k]`` moving-block bootstrap percentile CI of the mean.
        local: ``[N, B, k]`` finite-time exponents ln R_ii per step, columns in the order of
            ``exponents`` (``t_ons`` > 1: the log growth is booked on the re-orthonormalisation
            steps, zeros in between).
        lambda1_two_traj: ``[B]`` two-trajectory estimate of the largest exponent.
        kaplan_yorke: ``[B]`` Kaplan–Yorke dimension.
        diverged_at: ``[B]`` step (counting warm-up) where the trajectory blew up, −1 if never.
    """

    exponents: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    local: np.ndarray
    lambda1_two_traj: np.ndarray
    kaplan_yorke: np.ndarray
    diverged_at: np.ndarray
    n_steps: int
    warmup: int
    k: int
    mode: str
    seed: int
    final_state: Tensor | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def bits(self) -> np.ndarray:
        """Exponents in bits per iteration (for comparison with log2-based toolkits)."""
        return self.exponents / math.log(2)

    @property
    def diverged(self) -> np.ndarray:
        """``[B]`` bool: the trajectory blew up (its exponents are NaN)."""
        return self.diverged_at >= 0

    @property
    def lambda1(self) -> np.ndarray:
        """Largest exponent per sample ``[B]``."""
        return self.exponents[:, 0]

    @property
    def chaotic(self) -> np.ndarray:
        """``[B]`` bool by :func:`is_chaotic` (λ₁'s CI above zero)."""
        return is_chaotic(self.ci_low[:, 0])

    def running(self) -> np.ndarray:
        """Running estimate ``[N, B, k]``: mean of the local exponents up to each step."""
        return np.cumsum(self.local, axis=0) / np.arange(1, self.local.shape[0] + 1).reshape(
            -1, 1, 1
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, exponent index): exponent, CI, bits, two-trajectory λ₁, D_KY."""
        B, k = self.exponents.shape
        df = pd.DataFrame(
            {
                "sample": np.repeat(np.arange(B), k),
                "index": np.tile(np.arange(k), B),
                "exponent": self.exponents.reshape(-1),
                "ci_low": self.ci_low.reshape(-1),
                "ci_high": self.ci_high.reshape(-1),
                "bits": self.bits.reshape(-1),
                "lambda1_two_traj": np.repeat(self.lambda1_two_traj, k),
                "kaplan_yorke": np.repeat(self.kaplan_yorke, k),
                "chaotic": np.repeat(self.chaotic, k),
                "diverged": np.repeat(self.diverged, k),
            }
        )
        df["seed"] = self.seed
        for key in ("model", "split"):
            if self.meta.get(key) is not None:
                df[key] = self.meta[key]
        return df

    def summary(self) -> dict[str, float]:
        """Median λ₁, chaotic fraction (:func:`is_chaotic`), median D_KY, diverged fraction."""
        l1 = self.lambda1
        ok = ~np.isnan(l1)
        nan = float("nan")
        return float_summary(
            {
                "lambda1": float(np.median(l1[ok])) if ok.any() else nan,
                "chaotic_fraction": float(np.mean(self.chaotic[ok])) if ok.any() else nan,
                "kaplan_yorke": float(np.median(self.kaplan_yorke[ok])) if ok.any() else nan,
                "diverged_fraction": float(np.mean(~ok)),
            }
        )


def kaplan_yorke(exponents: np.ndarray) -> np.ndarray:
    """Kaplan–Yorke dimension ``j + S_j / |λ_{j+1}|`` (``S_j`` = sum of the ``j`` largest),
    per row of ``[B, k]``; 0 if λ₁ < 0; ``k`` if every partial sum is ≥ 0 (a lower bound)."""
    ex = np.atleast_2d(exponents)
    out = np.full(ex.shape[0], np.nan)
    for b, row in enumerate(ex):
        if np.isnan(row).any():
            continue
        lam = np.sort(row)[::-1]
        cs = np.cumsum(lam)
        if lam[0] < 0:
            out[b] = 0.0
            continue
        nonneg = np.nonzero(cs >= 0)[0]
        j = int(nonneg[-1])
        out[b] = float(len(lam)) if j == len(lam) - 1 else (j + 1) + cs[j] / abs(lam[j + 1])
    return out


def _random_orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def _check_args(
    n_steps: int,
    warmup: int,
    bootstrap: int,
    seed: int,
    mode: str,
    t_ons: int,
    level: float,
    blowup: float | None,
    d0: float,
) -> None:
    check_positive_int("n_steps", n_steps)
    check_positive_int("t_ons", t_ons)
    check_seed(seed)
    for name, v in (("warmup", warmup), ("bootstrap", bootstrap)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise LoopscopeError(f"{name} must be a non-negative integer, got {v!r}")
    if mode not in ("jvp", "dense"):
        raise LoopscopeError(f"mode must be 'jvp' or 'dense', got {mode!r}")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise LoopscopeError(f"level must be in (0, 1), got {level!r}")
    if blowup is not None and not (isinstance(blowup, (int, float)) and blowup > 0):
        raise LoopscopeError(f"blowup must be a positive number or None, got {blowup!r}")
    if not (isinstance(d0, (int, float)) and d0 > 0 and math.isfinite(d0)):
        raise LoopscopeError(f"d0 must be a positive number, got {d0!r}")


def _start(
    loop: Loop, inputs: object, h0: Tensor | None, ctx: object, dtype: torch.dtype, seed: int
) -> tuple[LoopMap, Tensor]:
    """The LoopMap and the flat start states ``[B, n]`` (given, or the loop's init)."""
    if h0 is None:
        m = LoopMap(loop, inputs, ctx=ctx, dtype=dtype)
        return m, m.init(torch.Generator().manual_seed(seed)).clone()
    h0 = torch.as_tensor(h0)
    if h0.dim() < 1 or h0.shape[0] == 0:
        raise LoopscopeError(
            f"h0 must be a non-empty batch of states [B, *state], got shape {tuple(h0.shape)}"
        )
    m = LoopMap(
        loop,
        inputs,
        ctx=ctx,
        dtype=dtype,
        state_shape=tuple(h0.shape[1:]),
        batch_size=h0.shape[0],
    )
    z = m.flatten(h0.to(dtype)).clone()
    m.check_state(z, name="h0")
    return m, z


class _Benettin:
    """The QR iteration's running state: tangent basis, two-trajectory partner, divergence."""

    def __init__(
        self,
        m: LoopMap,
        z: Tensor,
        k: int,
        n_steps: int,
        warmup: int,
        t_ons: int,
        two: bool,
        d0: float,
        blowup: float | None,
        seed: int,
    ) -> None:
        B, n = z.shape
        rng = np.random.default_rng(seed)
        self.m, self.z, self.B, self.n = m, z, B, n
        self.Q = torch.as_tensor(_random_orthonormal(n, k, rng), dtype=z.dtype)
        self.Q = self.Q.unsqueeze(0).repeat(B, 1, 1)
        u = torch.as_tensor(rng.standard_normal((B, n)), dtype=z.dtype)
        u = u / u.norm(dim=1, keepdim=True)
        self.z2 = z + d0 * u
        self.ref, self.blowup = reference_norm(z), blowup
        self.diverged_at = torch.full((B,), -1, dtype=torch.long)
        self.acc_two = torch.zeros(B, dtype=z.dtype)
        self.local = torch.zeros(n_steps, B, k, dtype=z.dtype)
        self.sign_one = torch.ones(B, k, dtype=z.dtype)
        self.warmup, self.total, self.t_ons = warmup, warmup + n_steps, t_ons
        self.two, self.d0 = two, d0
        self.ctx1 = m._ctx(None)
        self.ctx2 = m._ctx(torch.cat([torch.arange(B)] * 2)) if two else None

    def renormalise(self, zn: Tensor, z2n: Tensor, measuring: bool) -> Tensor:
        """Two-trajectory partner pulled back to ``d0`` when outside [d0·1e-3, d0·1e3]."""
        delta = z2n - zn
        d = delta.norm(dim=1)
        out = (d < self.d0 * 1e-3) | (d > self.d0 * 1e3)
        if not bool(out.any()):  # the common case: nothing to renormalise
            return z2n
        if measuring:
            self.acc_two = self.acc_two + torch.where(
                out, torch.log(d / self.d0), torch.zeros_like(d)
            )
        scale = torch.where(out, self.d0 / d.clamp_min(1e-300), torch.ones_like(d))
        return zn + delta * scale.view(self.B, 1)

    def trajectory(self, c: int, t: int) -> Tensor:
        """``Zs [c + 1, B, n]``: the states entering steps ``t .. t + c`` (frozen once diverged)."""
        B, m = self.B, self.m
        Zs = torch.empty(c + 1, B, self.n, dtype=self.z.dtype)
        Zs[0] = self.z
        for i in range(c):
            # raw step on the pre-selected context: LoopMap.f's per-call bookkeeping would
            # double the cost of a tiny map; evaluations are counted below instead
            if self.two:
                out = m._raw(torch.cat([Zs[i], self.z2]), self.ctx2)
                Zs[i + 1] = out[:B]
                self.z2 = self.renormalise(out[:B], out[B:], measuring=t + i >= self.warmup)
                if t + i + 1 == self.warmup:  # start the measured phase at exactly d0
                    dz = self.z2 - out[:B]
                    self.z2 = out[:B] + self.d0 * dz / dz.norm(dim=1, keepdim=True).clamp_min(
                        1e-300
                    )
            else:
                Zs[i + 1] = m._raw(Zs[i], self.ctx1)
        m.nfe += c * (2 if self.two else 1)
        self._freeze(Zs, t)
        return Zs

    def _freeze(self, Zs: Tensor, t: int) -> None:
        """Per-sample divergence, checked once per chunk (samples are independent)."""
        c, B = Zs.shape[0] - 1, self.B
        frozen = self.diverged_at >= 0
        if frozen.any():
            Zs[1:, frozen] = Zs[0, frozen]
        bad = diverged(Zs[1:].reshape(c * B, -1), self.ref.repeat(c), self.blowup).view(c, B)
        bad &= ~frozen.view(1, B)
        for b in torch.nonzero(bad.any(0)).flatten().tolist():
            i = int(torch.nonzero(bad[:, b]).flatten()[0]) + 1
            self.diverged_at[b] = t + i  # number of steps after which the state blew up
            Zs[i:, b] = Zs[i - 1, b]

    def qr_step(self, M: Tensor, t: int) -> None:
        """``Q ← qr(M)`` every ``t_ons`` steps, booking ln diag R once past the warm-up."""
        if (t + 1) % self.t_ons != 0 and t + 1 != self.total:
            self.Q = M  # accumulate t_ons steps before re-orthonormalising
            return
        Qn, R = torch.linalg.qr(M)
        dg = R.diagonal(dim1=-2, dim2=-1)
        self.Q = Qn * torch.where(dg < 0, -self.sign_one, self.sign_one).unsqueeze(-2)
        if t >= self.warmup:
            self.local[t - self.warmup] = dg.abs().log()


def _run(bt: _Benettin, mode: str, chunk: int) -> None:
    """The core loop: trajectory chunk, then its Jacobians multiplied into the tangent basis."""
    B, n, m = bt.B, bt.n, bt.m
    idx = torch.arange(B)
    t = 0
    with torch.no_grad():
        while t < bt.total:
            c = min(chunk, bt.total - t)
            Zs = bt.trajectory(c, t)
            if mode == "dense":
                J = m.jacobian(Zs[:c].reshape(c * B, n), idx.repeat(c)).reshape(c, B, n, n)
                for i in range(c):
                    bt.qr_step(J[i] @ bt.Q, t + i)
            else:
                bt.qr_step(m.jvp_many(Zs[0], bt.Q), t)
            bt.z = Zs[c]
            t += c


def _sorted_desc(exps: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Sort each sample's exponents descending and apply the same order to ``others``
    (``[B, k]`` arrays, or ``[N, B, k]`` along the last axis)."""
    order = np.argsort(-np.nan_to_num(exps, nan=-np.inf), axis=1, kind="stable")
    out = [np.take_along_axis(exps, order, axis=1)]
    for a in others:
        ordr = order if a.ndim == 2 else np.broadcast_to(order, a.shape)
        out.append(np.take_along_axis(a, ordr, axis=-1))
    return out


@did_you_mean
def lyapunov(
    loop: Loop,
    inputs: object = None,
    h0: Tensor | None = None,
    n_steps: int = 2000,
    k: int | None = None,
    warmup: int = 200,
    bootstrap: int = 200,
    seed: int = 0,
    *,
    mode: str = "jvp",
    t_ons: int = 1,
    two_trajectory: bool = True,
    d0: float = 1e-9,
    block: int | None = None,
    level: float = 0.95,
    ctx: object = None,
    dtype: torch.dtype = torch.float64,
    blowup: float | None = BLOWUP,
    chunk: int | None = None,
) -> LyapunovResult:
    """Lyapunov spectrum by the QR (Benettin) method, per sample, in nats per loop iteration.

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: what ``loop.encode`` takes (None for autonomous FnLoops).
        h0: start states ``[B, *state]`` (default ``loop.init_state`` with generator ``seed``).
        n_steps: measured steps after the warm-up.
        k: number of exponents (default ``min(n, 32)``).
        warmup: steps of trajectory *and* tangent-basis warm-up that are discarded.
        bootstrap: number of moving-block bootstrap draws for the CI (0 = no CI).
        seed: seeds the initial basis, the two-trajectory direction and the bootstrap.
        mode: "jvp" (k JVPs per step) or "dense" (batched dense Jacobians per chunk).
        t_ons: steps between re-orthonormalisations.
        two_trajectory: also run the two-trajectory λ₁ cross-check.
        d0: two-trajectory separation.
        block: bootstrap block length (None: ``max(t_ons, round(N^{1/3}))``).
        level: CI level.
        ctx: an already-encoded context (instead of ``inputs``).
        dtype: analysis dtype.
        blowup: a sample whose norm exceeds ``blowup · max(1, ‖h0‖)`` (or turns non-finite) is
            flagged diverged and frozen (None: non-finite only, e.g. an expanding linear map).
        chunk: steps per dense-Jacobian batch (None: auto).

    Returns:
        :class:`LyapunovResult` (exponents sorted, largest first; NaN rows for diverged samples).
    """
    _check_args(n_steps, warmup, bootstrap, seed, mode, t_ons, level, blowup, d0)
    m, z = _start(loop, inputs, h0, ctx, dtype, seed)
    B, n = z.shape
    k = min(n, 32) if k is None else check_positive_int("k", k)
    if k > n:
        raise LoopscopeError(f"k={k} exceeds the state dimension n={n}")
    if mode == "dense":
        chunk = chunk or max(1, min(4096, int(2**26 // max(1, B * n * n * 8))))
    else:
        chunk = 1
    two = bool(two_trajectory)
    bt = _Benettin(m, z, k, n_steps, warmup, t_ons, two, float(d0), blowup, seed)
    _run(bt, mode, chunk)
    settings = dict(n_steps=n_steps, warmup=warmup, k=k, mode=mode, t_ons=t_ons, level=level)
    return _assemble(loop, bt, m, block, bootstrap, level, seed, mode, settings)


def _assemble(
    loop: Loop,
    bt: _Benettin,
    m: LoopMap,
    block: int | None,
    bootstrap: int,
    level: float,
    seed: int,
    mode: str,
    settings: dict,
) -> LyapunovResult:
    """Exponents, CIs and the two-trajectory λ₁ from the booked log growths."""
    local = bt.local.numpy()
    B, k = bt.B, local.shape[2]
    n_steps, warmup = local.shape[0], bt.warmup
    div = bt.diverged_at.numpy()
    for b in range(B):
        if div[b] >= 0:
            local[max(0, div[b] - warmup) :, b, :] = np.nan
    exps = local.mean(axis=0)
    exps[div >= 0] = np.nan
    block = block or max(bt.t_ons, int(round(n_steps ** (1 / 3))))
    lo, hi = block_bootstrap_ci(np.nan_to_num(local), bootstrap, int(block), level, seed + 1)
    lo, hi = np.asarray(lo, dtype=float).reshape(B, k), np.asarray(hi, dtype=float).reshape(B, k)
    lo[div >= 0] = np.nan
    hi[div >= 0] = np.nan
    exps, lo, hi, local = _sorted_desc(exps, lo, hi, local)
    if bt.two:
        d_end = (bt.z2 - bt.z).norm(dim=1)
        lam2 = ((bt.acc_two + torch.log(d_end / bt.d0)) / n_steps).numpy()
        lam2[div >= 0] = np.nan
    else:
        lam2 = np.full(B, np.nan)
    total, two = bt.total, bt.two
    return LyapunovResult(
        exponents=exps,
        ci_low=lo,
        ci_high=hi,
        local=np.ascontiguousarray(local),
        lambda1_two_traj=lam2,
        kaplan_yorke=kaplan_yorke(exps),
        diverged_at=div,
        n_steps=n_steps,
        warmup=warmup,
        k=k,
        mode=mode,
        seed=seed,
        final_state=m.unflatten(bt.z),
        # per sample; counted here because a repeated LoopMap index is booked once
        counts={
            "nfe": total * (2 if two else 1),
            "n_jvp": total * (bt.n if mode == "dense" else k),
        },
        meta=result_meta(loop, seed=seed, settings=settings),
    )
