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
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.core.errors import LoopscopeError, check_positive_int, reject_unknown_kwargs

__all__ = ["lyapunov", "LyapunovResult", "kaplan_yorke", "block_bootstrap_ci"]


@dataclass
class LyapunovResult:
    """Lyapunov spectrum per sample.

    Attributes:
        exponents: ``[B, k]`` nats per iteration, descending order of the QR columns (NaN for a
            diverged sample).
        ci_low, ci_high: ``[B, k]`` moving-block bootstrap percentile CI of the mean.
        local: ``[N, B, k]`` finite-time exponents ln R_ii per step (``t_ons`` > 1: the log
            growth is booked on the re-orthonormalisation steps, zeros in between).
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
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> np.ndarray:
        """Exponents in bits per iteration (for comparison with log2-based toolkits)."""
        return self.exponents / math.log(2)

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_at >= 0

    @property
    def lambda1(self) -> np.ndarray:
        """Largest exponent per sample ``[B]``."""
        return self.exponents[:, 0]

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
                "diverged": np.repeat(self.diverged, k),
            }
        )
        df["seed"] = self.seed
        for key in ("model", "split"):
            if key in self.meta:
                df[key] = self.meta[key]
        return df

    def summary(self) -> dict[str, float]:
        """Scalar summary (for ``compare_splits``)."""
        l1 = self.lambda1
        ok = ~np.isnan(l1)
        return {
            "lambda1": float(np.median(l1[ok])) if ok.any() else float("nan"),
            "chaotic_fraction": float(np.mean(self.ci_low[ok, 0] > 0))
            if ok.any()
            else float("nan"),
            "kaplan_yorke": float(np.median(self.kaplan_yorke[ok])) if ok.any() else float("nan"),
            "diverged_fraction": float(np.mean(~ok)),
        }


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


def block_bootstrap_ci(
    series: np.ndarray, n_boot: int, block: int, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Moving-block bootstrap percentile CI of the mean of ``series [N, ...]`` along axis 0."""
    N = series.shape[0]
    rest = series.shape[1:]
    if n_boot <= 0 or N == 0:
        nan = np.full(rest, np.nan)
        return nan, nan.copy()
    block = max(1, min(block, N))
    cs = np.concatenate([np.zeros((1, *rest)), np.cumsum(series, axis=0)])
    sums = cs[block:] - cs[:-block]  # [N - block + 1, ...] block sums
    m = max(1, N // block)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, *rest))
    for i in range(n_boot):
        starts = rng.integers(0, sums.shape[0], size=m)
        means[i] = sums[starts].sum(axis=0) / (m * block)
    a = (1 - level) / 2
    return np.quantile(means, a, axis=0), np.quantile(means, 1 - a, axis=0)


_OPTIONS = (
    "mode",
    "t_ons",
    "two_trajectory",
    "d0",
    "block",
    "level",
    "ctx",
    "dtype",
    "blowup",
    "chunk",
)


def _random_orthonormal(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    return q * np.sign(np.diag(r))


def lyapunov(
    loop: Any,
    inputs: Any = None,
    h0: Tensor | None = None,
    n_steps: int = 2000,
    k: int | None = None,
    warmup: int = 200,
    bootstrap: int = 200,
    seed: int = 0,
    **options: Any,
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

    Keyword options:
        mode: "jvp" (default, k JVPs per step) or "dense" (batched dense Jacobians per chunk).
        t_ons: steps between re-orthonormalisations (1).
        two_trajectory: also run the two-trajectory λ₁ cross-check (True).
        d0: two-trajectory separation (1e-9).
        block: bootstrap block length (default ``max(t_ons, round(N^{1/3}))``).
        level: CI level (0.95).
        ctx: an already-encoded context.
        dtype: analysis dtype (float64).
        blowup: a sample whose norm exceeds ``blowup · max(1, ‖h0‖)`` (or turns non-finite) is
            flagged diverged and frozen (1e8; None disables, e.g. for an expanding linear map).
        chunk: steps per dense-Jacobian batch (auto).

    Returns:
        :class:`LyapunovResult`.
    """
    reject_unknown_kwargs("lyapunov", options, _OPTIONS)
    n_steps = check_positive_int("n_steps", n_steps)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise LoopscopeError(f"warmup must be a non-negative integer, got {warmup!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise LoopscopeError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    mode = options.get("mode", "jvp")
    if mode not in ("jvp", "dense"):
        raise LoopscopeError(f"mode must be 'jvp' or 'dense', got {mode!r}")
    t_ons = check_positive_int("t_ons", options.get("t_ons", 1))
    d0 = float(options.get("d0", 1e-9))
    two = bool(options.get("two_trajectory", True))
    level = float(options.get("level", 0.95))
    blowup = options.get("blowup", 1e8)
    dtype = options.get("dtype", torch.float64)

    if h0 is not None:
        h0 = torch.as_tensor(h0)
        if h0.dim() < 1:
            raise LoopscopeError("h0 must have a leading batch axis [B, *state]")
        m = LoopMap(
            loop,
            inputs,
            ctx=options.get("ctx"),
            dtype=dtype,
            state_shape=tuple(h0.shape[1:]),
            batch_size=h0.shape[0],
        )
        z = m.flatten(h0.to(dtype)).clone()
    else:
        m = LoopMap(loop, inputs, ctx=options.get("ctx"), dtype=dtype)
        z = m.init(torch.Generator().manual_seed(seed)).clone()
    B, n = z.shape
    k = min(n, 32) if k is None else check_positive_int("k", k)
    if k > n:
        raise LoopscopeError(f"k={k} exceeds the state dimension n={n}")
    rng = np.random.default_rng(seed)
    Q = torch.as_tensor(_random_orthonormal(n, k, rng), dtype=z.dtype).unsqueeze(0).repeat(B, 1, 1)
    u = torch.as_tensor(rng.standard_normal((B, n)), dtype=z.dtype)
    u = u / u.norm(dim=1, keepdim=True)
    z2 = z + d0 * u
    idx = torch.arange(B)
    idx2 = torch.cat([idx, idx])
    ref = z.norm(dim=1).clamp_min(1.0)
    limit = None if blowup is None else float(blowup) * ref
    diverged_at = torch.full((B,), -1, dtype=torch.long)
    total = warmup + n_steps
    acc_two = torch.zeros(B, dtype=z.dtype)
    dmin, dmax = d0 * 1e-3, d0 * 1e3
    if mode == "dense":
        chunk = options.get("chunk") or max(1, min(4096, int(2**26 // max(1, B * n * n * 8))))
    else:
        chunk = 1

    def two_traj(zn: Tensor, z2n: Tensor, measuring: bool) -> Tensor:
        nonlocal acc_two
        delta = z2n - zn
        d = delta.norm(dim=1)
        out = (d < dmin) | (d > dmax)
        if not bool(out.any()):  # the common case: nothing to renormalise
            return z2n
        if measuring:
            acc_two = acc_two + torch.where(out, torch.log(d / d0), torch.zeros_like(d))
        scale = torch.where(out, d0 / d.clamp_min(1e-300), torch.ones_like(d))
        return zn + delta * scale.view(B, 1)

    local_t = torch.zeros(n_steps, B, k, dtype=z.dtype)
    sign_one = torch.ones(B, k, dtype=z.dtype)

    def qr_step(M: Tensor, t: int) -> None:
        nonlocal Q
        if (t + 1) % t_ons != 0 and t + 1 != total:
            Q = M  # accumulate t_ons steps before re-orthonormalising
            return
        Qn, R = torch.linalg.qr(M)
        dg = R.diagonal(dim1=-2, dim2=-1)
        Q = Qn * torch.where(dg < 0, -sign_one, sign_one).unsqueeze(-2)
        if t >= warmup:
            local_t[t - warmup] = dg.abs().log()

    ctx1 = m._ctx(None)
    ctx2 = m._ctx(idx2) if two else None
    t = 0
    with torch.no_grad():
        while t < total:
            c = min(chunk, total - t)
            # Zs[i] = state entering step t+i; Zs[c] = the state after the chunk
            Zs = torch.empty(c + 1, B, n, dtype=z.dtype)
            Zs[0] = z
            for i in range(c):
                # raw step on the pre-selected context: LoopMap.f's per-call bookkeeping would
                # double the cost of a tiny map; evaluations are counted below instead
                if two:
                    out = m._raw(torch.cat([Zs[i], z2]), ctx2)
                    Zs[i + 1] = out[:B]
                    z2 = two_traj(out[:B], out[B:], measuring=t + i >= warmup)
                    if t + i + 1 == warmup:  # start the measured phase at exactly d0
                        dz = z2 - out[:B]
                        z2 = out[:B] + d0 * dz / dz.norm(dim=1, keepdim=True).clamp_min(1e-300)
                else:
                    Zs[i + 1] = m._raw(Zs[i], ctx1)
            m.nfe += c * (2 if two else 1)
            # per-sample divergence, checked once per chunk (samples are independent)
            frozen = diverged_at >= 0
            if frozen.any():
                Zs[1:, frozen] = Zs[0, frozen]
            bad = ~torch.isfinite(Zs[1:]).all(-1)
            if limit is not None:
                bad |= Zs[1:].norm(dim=-1) > limit.view(1, B)
            bad &= ~frozen.view(1, B)
            if bad.any():
                for b in torch.nonzero(bad.any(0)).flatten().tolist():
                    i = int(torch.nonzero(bad[:, b]).flatten()[0]) + 1
                    diverged_at[b] = t + i  # number of steps after which the state blew up
                    Zs[i:, b] = Zs[i - 1, b]
            if mode == "dense":
                J = m.jacobian(Zs[:c].reshape(c * B, n), idx.repeat(c)).reshape(c, B, n, n)
                for i in range(c):
                    qr_step(J[i] @ Q, t + i)
            else:
                qr_step(m.jvp_many(Zs[0], Q), t)
            z = Zs[c]
            t += c
    local = local_t.numpy()

    div = diverged_at.numpy()
    for b in range(B):
        if div[b] >= 0:
            local[max(0, div[b] - warmup) :, b, :] = np.nan
    exps = local.mean(axis=0)
    exps[div >= 0] = np.nan
    block = options.get("block") or max(t_ons, int(round(n_steps ** (1 / 3))))
    lo, hi = block_bootstrap_ci(np.nan_to_num(local), bootstrap, int(block), level, seed + 1)
    lo, hi = np.asarray(lo, dtype=float).reshape(B, k), np.asarray(hi, dtype=float).reshape(B, k)
    lo[div >= 0] = np.nan
    hi[div >= 0] = np.nan
    if two:
        d_end = (z2 - z).norm(dim=1)
        lam2 = ((acc_two + torch.log(d_end / d0)) / n_steps).numpy()
        lam2[div >= 0] = np.nan
    else:
        lam2 = np.full(B, np.nan)
    meta = {"model": getattr(loop, "name", None) or type(loop).__name__}
    return LyapunovResult(
        exponents=exps,
        ci_low=lo,
        ci_high=hi,
        local=local,
        lambda1_two_traj=lam2,
        kaplan_yorke=kaplan_yorke(exps),
        diverged_at=div,
        n_steps=n_steps,
        warmup=warmup,
        k=k,
        mode=mode,
        seed=seed,
        final_state=m.unflatten(z),
        # per sample; counted here because a repeated LoopMap index is booked once
        counts={"nfe": total * (2 if two else 1), "n_jvp": total * (n if mode == "dense" else k)},
        meta=meta,
    )
