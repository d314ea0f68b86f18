"""Convergence metrics of one recorded trajectory (dynamics spec §4), per sample or per token.

Everything is computed OFFLINE from ``trace.states [T+1, B, ...]`` (and ``trace.logits`` for the
output-space metrics): record once, score every metric. Indexing convention (row ``t`` of every
metric, ``t = 0..T``), with ``Δ_t = h_t − h_{t−1}``:

====================  ==========================================================  ==============
column                definition at row t                                         rows defined
====================  ==========================================================  ==============
residual              r_t = ‖f(h_t) − h_t‖ = ‖h_{t+1} − h_t‖ = ‖Δ_{t+1}‖          0..T−1
rel_residual          r_t / (‖f(h_t)‖ + eps)   (torchdeq definition)              0..T−1
rms                   r_t / √n                                                    0..T−1
q                     ½ r_t²   (Sussillo–Barak speed)                             0..T−1
fprm_residual         max_pos ‖h_t − f(h_t)‖_∞ / (‖f(h_t)‖_∞ + 1e-8)              0..T−1
step                  ‖Δ_t‖                                                       1..T
rel_step              ‖Δ_t‖ / (‖h_t‖ + eps)   (Huginn latent-diff)                1..T
step_cos              ⟨Δ_t, Δ_{t−1}⟩ / (‖Δ_t‖‖Δ_{t−1}‖)   (Two-Scale)             2..T
state_cos             cos(h_t, h_{t−1})                                           1..T
accel                 a_t = ‖Δ_t − Δ_{t−1}‖ (backward convention; golden #14:     2..T
                      for h_t = h* + κ^t v, a_t = (1 − κ)² κ^{t−2} ‖v‖)
rel_accel             a_t / (‖h_t‖ + eps)                                         2..T
kappa                 κ_t = r_{t+1} / r_t                                         0..T−2
kappa_bar             (r_t / r_{t−w})^{1/w}  (backward window: causal)            w..T−1
steps_to_tol          ⌈ln(tol / r_rel,t) / ln κ̄_t⌉ (0 once below tol, inf if κ̄≥1)  w..T−1
banach_bound          r_t / (1 − κ̄_t)  ≥ ‖h_t − h*‖ for a κ̄-contraction          w..T−1
res_p{p}              ‖h_t − h_{t−p}‖, p = 1..P (cycle-aware residuals)           p..T
period_residual       min_p res_p{p} / (‖h_t‖ + eps)                              1..T
period                smallest p with res_p{p}/(‖h_t‖+eps) ≤ tol, else the argmin  1..T
kl                    KL(p_{t−1} ‖ p_t) of the readout, p_{−1} uniform            0..T
minp_kl               same after min-p filtering (p < 0.1·max set to 1/V, renorm.) 0..T
entropy               H(p_t)                                                      0..T
entropy_diff          |H_t − H_{t−1}|, H_{−1} = ln V                              0..T
argmax_stable         number of consecutive steps ending at t with unchanged      0..T
                      argmax (all positions)
logit_delta           ‖ℓ_t − ℓ_{t−1}‖ (mean over positions; EqR)                  1..T
====================  ==========================================================  ==============

Undefined entries are NaN (also 0/0, e.g. the cosine of a zero step). Output-space metrics are
averaged over positions for a sample (per token with ``per_token=True``).

Diverged samples (``trace.diverged_at``) and halted samples (``trace.halted_at``) are frozen by
``unroll`` after the event; their frozen copies are not dynamics, so every row that would use a
state after the last real one is NaN and the sample is reported (``diverged`` in the summary),
never crashed on.

Example:
    >>> import torch
    >>> from loopscope import FnLoop, unroll
    >>> loop = FnLoop(step=lambda h: 0.5 * h, init_state=torch.ones(3, dtype=torch.float64))
    >>> m = metrics(unroll(loop, torch.zeros(2, 3), 10))
    >>> round(float(m["kappa"][3, 0]), 6)
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace

__all__ = [
    "metrics",
    "Metrics",
    "calibration",
    "Calibration",
    "layer_metrics",
    "LayerMetrics",
    "compute_arrays",
    "last_real_index",
    "safe_cos",
]

_NAN = float("nan")

#: columns of the per-(iteration, sample) frame, in order
STATE_COLUMNS = (
    "norm",
    "residual",
    "rel_residual",
    "rms",
    "q",
    "fprm_residual",
    "step",
    "rel_step",
    "step_cos",
    "state_cos",
    "accel",
    "rel_accel",
    "kappa",
    "kappa_bar",
    "steps_to_tol",
    "banach_bound",
    "period_residual",
    "period",
)
OUTPUT_COLUMNS = ("kl", "minp_kl", "entropy", "entropy_diff", "argmax_stable", "logit_delta")


# ---------------------------------------------------------------------------------------------
# helpers shared with halting / cycles / basins
# ---------------------------------------------------------------------------------------------
def last_real_index(trace: Any) -> Tensor:
    """Per-sample index of the last state that is real dynamics (``[B]`` long).

    ``T`` normally; ``diverged_at − 1`` for a diverged sample (``h_d`` is a frozen copy);
    ``halted_at`` for a halted one (``h_e`` is real, later states are frozen copies).
    """
    T = trace.states.shape[0] - 1
    B = trace.states.shape[1]
    last = torch.full((B,), T, dtype=torch.long)
    if trace.halted_at is not None:
        h = trace.halted_at.cpu().long()
        last = torch.where(h >= 0, torch.minimum(h, last), last)
    if trace.diverged_at is not None:
        d = trace.diverged_at.cpu().long()
        last = torch.where(d >= 0, torch.minimum(d - 1, last), last)
    return last.clamp_min(0)


def safe_cos(a: Tensor, b: Tensor, dim: int = -1, zero_tol: float = 0.0) -> Tensor:
    """Cosine along ``dim``; two zero vectors count as identical (1), one zero vector as 0.

    The convention matters for path independence: two runs that both end in the zero state
    (e.g. an all-zero carry vector) agree perfectly.
    """
    na = a.norm(dim=dim)
    nb = b.norm(dim=dim)
    dot = (a * b).sum(dim=dim)
    za, zb = na <= zero_tol, nb <= zero_tol
    out = dot / (na * nb).clamp_min(torch.finfo(a.dtype).tiny)
    out = torch.where(za & zb, torch.ones_like(out), out)
    out = torch.where(za ^ zb, torch.zeros_like(out), out)
    return out.clamp(-1.0, 1.0)


def _split_positions(states: Tensor) -> Tensor:
    """``[L, N, *S] -> [L, N, P, d]`` with ``d`` the last state axis and ``P`` the rest."""
    L, N = states.shape[:2]
    S = tuple(states.shape[2:])
    if len(S) == 0:
        return states.reshape(L, N, 1, 1)
    if len(S) == 1:
        return states.reshape(L, N, 1, S[0])
    return states.reshape(L, N, -1, S[-1])


def _nanrow(L: int, N: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.full((L, N), _NAN, dtype=dtype)


def compute_arrays(
    X: Tensor,
    logits: Tensor | None = None,
    *,
    p_max: int = 16,
    eps: float = 1e-9,
    tol: float = 1e-3,
    window: int = 5,
    min_p: float = 0.1,
) -> dict[str, Tensor]:
    """Every metric of the module docstring on a NaN-masked trajectory.

    Args:
        X: states ``[L, N, P, d]`` float64 (``P`` positions of width ``d``; rows after a sample's
            last real state set to NaN).
        logits: readout ``[L, N, Pl, V]`` or None.

    Returns:
        dict of ``[L, N]`` float64 tensors (one per column), plus ``"res_p"`` ``[p_max, L, N]``.
    """
    L, N, P, d = X.shape
    n = P * d
    Z = X.reshape(L, N, n)
    out: dict[str, Tensor] = {}
    norm = Z.norm(dim=-1)
    out["norm"] = norm
    # forward differences: D[i] = Δ_{i+1} = h_{i+1} − h_i
    D = Z[1:] - Z[:-1]
    dn = D.norm(dim=-1)

    res = _nanrow(L, N)
    res[: L - 1] = dn
    out["residual"] = res
    rel = _nanrow(L, N)
    rel[: L - 1] = dn / (norm[1:] + eps)
    out["rel_residual"] = rel
    out["rms"] = res / math.sqrt(n)
    out["q"] = 0.5 * res**2
    fp = _nanrow(L, N)
    if L > 1:
        Dinf = D.reshape(L - 1, N, P, d).abs().amax(dim=-1)
        Finf = X[1:].abs().amax(dim=-1)
        fp[: L - 1] = (Dinf / (Finf + 1e-8)).amax(dim=-1)
    out["fprm_residual"] = fp

    step = _nanrow(L, N)
    step[1:] = dn
    out["step"] = step
    out["rel_step"] = step / (norm + eps)
    scos = _nanrow(L, N)
    if L > 2:
        scos[2:] = (D[1:] * D[:-1]).sum(-1) / (dn[1:] * dn[:-1])
    out["step_cos"] = scos
    hcos = _nanrow(L, N)
    if L > 1:
        hcos[1:] = (Z[1:] * Z[:-1]).sum(-1) / (norm[1:] * norm[:-1])
    out["state_cos"] = hcos.clamp(-1.0, 1.0)
    acc = _nanrow(L, N)
    if L > 2:
        acc[2:] = (D[1:] - D[:-1]).norm(dim=-1)
    out["accel"] = acc
    out["rel_accel"] = acc / (norm + eps)

    kap = _nanrow(L, N)
    if L > 2:
        kap[: L - 2] = res[1 : L - 1] / res[: L - 2]
    out["kappa"] = kap
    kb = _nanrow(L, N)
    w = window
    if L - 1 > w:
        kb[w : L - 1] = (res[w : L - 1] / res[: L - 1 - w]) ** (1.0 / w)
    out["kappa_bar"] = kb
    pred = torch.ceil(torch.log(tol / rel) / torch.log(kb))
    pred = torch.where(kb >= 1, torch.full_like(pred, math.inf), pred)
    pred = torch.where(rel <= tol, torch.zeros_like(pred), pred)
    pred = torch.where(torch.isnan(kb) | torch.isnan(rel), torch.full_like(pred, _NAN), pred)
    out["steps_to_tol"] = pred
    ban = res / (1 - kb)
    out["banach_bound"] = torch.where(kb >= 1, torch.full_like(ban, math.inf), ban)

    rp = torch.full((p_max, L, N), _NAN, dtype=torch.float64)
    for p in range(1, min(p_max, L - 1) + 1):
        rp[p - 1, p:] = (Z[p:] - Z[:-p]).norm(dim=-1)
    out["res_p"] = rp
    relp = rp / (norm.unsqueeze(0) + eps)
    filled = torch.where(torch.isnan(relp), torch.full_like(relp, math.inf), relp)
    mn, arg = filled.min(dim=0)
    below = filled <= tol
    first_below = torch.where(below.any(0), below.float().argmax(0), arg)
    none = torch.isinf(mn)
    out["period_residual"] = torch.where(none, torch.full_like(mn, _NAN), mn)
    out["period"] = torch.where(none, torch.full_like(mn, _NAN), (first_below + 1).double())

    if logits is not None:
        out.update(_output_arrays(logits, min_p=min_p))
    return out


def _output_arrays(logits: Tensor, min_p: float = 0.1) -> dict[str, Tensor]:
    L, N, Pl, V = logits.shape
    lg = logits.double()
    valid = torch.isfinite(lg).all(dim=-1).all(dim=-1)  # [L, N]
    lg = torch.where(torch.isfinite(lg), lg, torch.zeros_like(lg))
    logp = torch.log_softmax(lg, dim=-1)
    p = logp.exp()
    H = -(p * logp).sum(-1)  # [L, N, Pl]
    lnV = math.log(V)
    kl = torch.empty(L, N, Pl, dtype=torch.float64)
    kl[0] = (-lnV - logp[0]).mean(-1)  # KL(uniform ‖ p_0)
    if L > 1:
        kl[1:] = (p[:-1] * (logp[:-1] - logp[1:])).sum(-1)
    # min-p filtering as Huginn's minp-kl: small probabilities set to 1/V, renormalised
    mx = p.amax(-1, keepdim=True)
    q = torch.where(p < min_p * mx, torch.full_like(p, 1.0 / V), p)
    q = q / q.sum(-1, keepdim=True)
    logq = q.log()
    mkl = torch.empty(L, N, Pl, dtype=torch.float64)
    mkl[0] = (-lnV - logq[0]).mean(-1)
    if L > 1:
        mkl[1:] = (q[:-1] * (logq[:-1] - logq[1:])).sum(-1)
    hd = torch.empty(L, N, Pl, dtype=torch.float64)
    hd[0] = (H[0] - lnV).abs()
    if L > 1:
        hd[1:] = (H[1:] - H[:-1]).abs()
    A = lg.argmax(-1)  # [L, N, Pl]
    same = torch.zeros(L, N, dtype=torch.bool)
    if L > 1:
        same[1:] = (A[1:] == A[:-1]).all(-1) & valid[1:] & valid[:-1]
    count = torch.zeros(L, N, dtype=torch.float64)
    for t in range(1, L):
        count[t] = torch.where(same[t], count[t - 1] + 1, torch.zeros_like(count[t]))
    ld = torch.full((L, N), _NAN, dtype=torch.float64)
    if L > 1:
        ld[1:] = (lg[1:] - lg[:-1]).norm(dim=-1).mean(-1)
    out = {
        "kl": kl.mean(-1),
        "minp_kl": mkl.mean(-1),
        "entropy": H.mean(-1),
        "entropy_diff": hd.mean(-1),
        "argmax_stable": count,
        "logit_delta": ld,
    }
    nan = torch.tensor(_NAN, dtype=torch.float64)
    prev_valid = torch.ones_like(valid)
    prev_valid[1:] = valid[:-1]
    for k in out:
        ok = valid if k in ("entropy", "argmax_stable") else valid & prev_valid
        out[k] = torch.where(ok, out[k], nan)
    out["argmax"] = A  # [L, N, Pl] long, not a column
    return out


def t_conv_from(rel: Tensor, last: Tensor, tol: float) -> Tensor:
    """``T_conv = min{t : r_rel,s < tol for all s ∈ [t, last)}``; −1 if not converged.

    ``rel [L, N]``, ``last [N]`` = index of the last real state (residual rows ``0..last−1``).
    """
    L, N = rel.shape
    out = torch.full((N,), -1, dtype=torch.long)
    ok = (rel < tol).cpu()
    for b in range(N):
        m = int(last[b])
        if m < 1:
            continue
        col = ok[:m, b]
        if not bool(col[-1]):
            continue
        bad = torch.nonzero(~col).flatten()
        out[b] = 0 if bad.numel() == 0 else int(bad[-1]) + 1
    return out


def _trace_logits(trace: Any, decode: Any) -> Tensor | None:
    if decode is False:
        return None
    if trace.logits is not None:
        return trace.logits
    if decode is True:
        if trace.loop is None or trace.ctx is None:
            raise LoopscopeError(
                "decode=True needs a trace with its loop attached (or trace.logits)"
            )
        with torch.no_grad():
            return torch.stack(
                [trace.loop.decode(trace.states[t], trace.ctx) for t in range(trace.n_iter + 1)]
            )
    return None


def _masked_states(trace: Any) -> tuple[Tensor, Tensor]:
    S = trace.states.detach().double().cpu()
    last = last_real_index(trace)
    T1 = S.shape[0]
    rows = torch.arange(T1).view(T1, 1)
    mask = rows > last.view(1, -1)  # [T+1, B]
    S = S.clone()
    S[mask] = _NAN
    return S, last


def _logits_positions(lg: Tensor, B: int) -> Tensor:
    """``[T+1, B, ...]`` -> ``[T+1, B, Pl, V]``."""
    T1 = lg.shape[0]
    if lg.dim() == 2:
        return lg.reshape(T1, B, 1, 1)
    if lg.dim() == 3:
        return lg.reshape(T1, B, 1, lg.shape[-1])
    return lg.reshape(T1, B, -1, lg.shape[-1])


@dataclass(kw_only=True, repr=False)
class Metrics(Result):
    """Per-(iteration, sample[, position]) convergence metrics of one trace.

    Attributes:
        values: column name -> ``[T+1, B]`` (or ``[T+1, B, P]`` per token) float64 tensor.
        res_p: cycle-aware residuals ``[p_max, T+1, B(, P)]`` (``res_p[p−1, t] = ‖h_t − h_{t−p}‖``).
        t_conv: ``[B]`` (or ``[B, P]``) convergence iteration, −1 = not converged.
        last: ``[B]`` index of the last real state (diverged/halted samples end early).
        diverged: ``[B]`` bool, flagged by ``unroll`` or non-finite states.
        argmax: ``[T+1, B, Pl]`` readout argmax (None without logits).
    """

    values: dict[str, Tensor]
    res_p: Tensor
    t_conv: Tensor
    last: Tensor
    diverged: Tensor
    per_token: bool = False
    p_max: int = 16
    eps: float = 1e-9
    tol: float = 1e-3
    window: int = 5
    argmax: Tensor | None = None

    def __getitem__(self, name: str) -> Tensor:
        """A column ``[T+1, B(, P)]``; ``"res_p"`` gives all ``[p_max, T+1, B(, P)]`` and
        ``"res_p{p}"`` one period."""
        if name in self.values:
            return self.values[name]
        if name == "res_p":
            return self.res_p
        if name.startswith("res_p") and name[5:].isdigit() and 1 <= int(name[5:]) <= self.p_max:
            return self.res_p[int(name[5:]) - 1]
        raise LoopscopeError(f"unknown metric {name!r}; have {sorted(self.values)}")

    @property
    def columns(self) -> list[str]:
        return list(self.values)

    @property
    def n_iter(self) -> int:
        return self.res_p.shape[1] - 1

    def final_rel_residual(self) -> Tensor:
        """Last available relative residual per sample (row ``last − 1``), ``[B]`` (or ``[B, P]``)."""
        rel = self.values["rel_residual"]
        idx = (self.last - 1).clamp_min(0)
        if self.per_token:
            idx = idx.view(1, -1, 1).expand(1, rel.shape[1], rel.shape[2])
            return rel.gather(0, idx)[0]
        return rel.gather(0, idx.view(1, -1))[0]

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (iteration, sample[, position]), one column per metric and
        ``res_p1 .. res_p{P}``; ``diverged`` flags the sample; meta (model/split/seed) columns."""
        first = next(iter(self.values.values()))
        T1, B = first.shape[:2]
        cols: dict[str, Any] = {}
        if self.per_token:
            P = first.shape[2]
            cols["iteration"] = np.repeat(np.arange(T1), B * P)
            cols["sample"] = np.tile(np.repeat(np.arange(B), P), T1)
            cols["position"] = np.tile(np.arange(P), T1 * B)
            div = np.tile(np.repeat(self.diverged.numpy(), P), T1)
        else:
            cols["iteration"] = np.repeat(np.arange(T1), B)
            cols["sample"] = np.tile(np.arange(B), T1)
            div = np.tile(self.diverged.numpy(), T1)
        for k, v in self.values.items():
            cols[k] = v.reshape(-1).numpy()
        for p in range(self.res_p.shape[0]):
            cols[f"res_p{p + 1}"] = self.res_p[p].reshape(-1).numpy()
        cols["diverged"] = div
        df = pd.DataFrame(cols)
        for key in ("model", "split", "seed"):
            if self.meta.get(key) is not None:
                df[key] = self.meta[key]
        return df

    def summary_frame(self) -> pd.DataFrame:
        """One row per sample (or sample × position): T_conv, final residuals, κ̄, period."""
        rel = self.final_rel_residual()
        kb = self.values["kappa_bar"]
        per = self.values["period"]
        if self.per_token:
            B, P = rel.shape
            idx_r = (self.last - 1).clamp_min(0).view(1, -1, 1).expand(1, B, P)
            idx_s = self.last.view(1, -1, 1).expand(1, B, P)
            kbf = kb.gather(0, idx_r)[0]
            pf = per.gather(0, idx_s)[0]
            df = pd.DataFrame(
                {
                    "sample": np.repeat(np.arange(B), P),
                    "position": np.tile(np.arange(P), B),
                    "t_conv": self.t_conv.reshape(-1).numpy(),
                    "final_rel_residual": rel.reshape(-1).numpy(),
                    "kappa_bar": kbf.reshape(-1).numpy(),
                    "period": pf.reshape(-1).numpy(),
                    "diverged": np.repeat(self.diverged.numpy(), P),
                }
            )
        else:
            B = rel.shape[0]
            kbf = kb.gather(0, (self.last - 1).clamp_min(0).view(1, -1))[0]
            pf = per.gather(0, self.last.view(1, -1))[0]
            df = pd.DataFrame(
                {
                    "sample": np.arange(B),
                    "t_conv": self.t_conv.numpy(),
                    "final_rel_residual": rel.numpy(),
                    "kappa_bar": kbf.numpy(),
                    "period": pf.numpy(),
                    "diverged": self.diverged.numpy(),
                }
            )
        df["converged"] = df["t_conv"] >= 0
        return df

    def summary(self) -> dict[str, float]:
        """Scalar summary (for :func:`loopscope.analysis.attractors.compare_splits`)."""
        s = self.summary_frame()
        return float_summary(
            {
                "residual_at_budget": float(np.nanmedian(s["final_rel_residual"]))
                if len(s)
                else _NAN,
                "kappa_bar": float(np.nanmedian(s["kappa_bar"]))
                if s["kappa_bar"].notna().any()
                else _NAN,
                "converged_fraction": float(s["converged"].mean()),
                "t_conv_mean": float(s.loc[s["converged"], "t_conv"].mean())
                if s["converged"].any()
                else _NAN,
                "diverged_fraction": float(s["diverged"].mean()),
            }
        )


def _check_metric_args(trace: Trace, eps: float, tol: float, min_p: float, decode: Any) -> None:
    if decode not in ("auto", True, False):
        raise LoopscopeError(f"decode must be 'auto', True or False, got {decode!r}")
    for name, v, low in (("eps", eps, 0.0), ("tol", tol, None), ("min_p", min_p, None)):
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)
        if bad or (v < low if low is not None else not v > 0):
            what = "a number >= 0" if low is not None else "a positive number"
            raise LoopscopeError(f"{name} must be {what}, got {v!r}")
    if (
        not hasattr(trace, "states")
        or not isinstance(trace.states, Tensor)
        or trace.states.dim() < 2
    ):
        raise LoopscopeError(
            f"metrics needs a Trace (trace.states [T+1, B, ...]), got trace={type(trace).__name__}"
        )


def _diverged_samples(trace: Trace, S: Tensor, last: Tensor) -> Tensor:
    """``[B]``: flagged by ``unroll``, or a non-finite state up to the last real one."""
    T1, B = S.shape[:2]
    nonfinite = ~torch.isfinite(S.reshape(T1, B, -1)).all(-1)
    rows = torch.arange(T1).view(T1, 1)
    diverged = (nonfinite & (rows <= last.view(1, -1))).any(0)
    if trace.diverged_at is not None:
        diverged |= trace.diverged_at.cpu() >= 0
    return diverged


def _masked_logits(trace: Trace, decode: Any, last: Tensor, T1: int, B: int) -> Tensor | None:
    lg = _trace_logits(trace, decode)
    if lg is None:
        return None
    LG = _logits_positions(lg.detach().double().cpu(), B).clone()
    rows = torch.arange(T1).view(T1, 1)
    LG[rows.expand(T1, B) > last.view(1, -1)] = _NAN
    return LG


def _per_token_arrays(
    X: Tensor, LG: Tensor | None, last: Tensor, kw: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor | None]:
    """compute_arrays with every position its own trajectory: ``[T+1, B, P]`` columns."""
    T1, B, P, d = X.shape
    LGt = None
    if LG is not None:
        if LG.shape[2] != P:
            raise LoopscopeError(
                f"per_token needs one readout per state position: state has {P} positions, "
                f"logits have {LG.shape[2]}"
            )
        LGt = LG.reshape(T1, B * P, 1, LG.shape[-1])
    arr = compute_arrays(X.reshape(T1, B * P, 1, d), LGt, **kw)
    argmax = arr.pop("argmax", None)
    res_p = arr.pop("res_p").reshape(kw["p_max"], T1, B, P)
    tc = t_conv_from(arr["rel_residual"], last.repeat_interleave(P), kw["tol"]).reshape(B, P)
    values = {k: v.reshape(T1, B, P) for k, v in arr.items()}
    if argmax is not None:
        argmax = argmax.reshape(T1, B, P)
    return values, res_p, tc, argmax


@did_you_mean
def metrics(
    trace: Trace,
    p_max: int = 16,
    per_token: bool = False,
    *,
    eps: float = 1e-9,
    tol: float = 1e-3,
    window: int = 5,
    decode: bool | str = "auto",
    min_p: float = 0.1,
) -> Metrics:
    """Convergence metrics (dynamics spec §4) of a recorded trajectory.

    Args:
        trace: a :class:`loopscope.Trace` (``states [T+1, B, ...]``).
        p_max: largest period P of the cycle-aware residuals ``res_p1..res_pP``.
        per_token: metrics per position (state ``[B, pos, d]``: positions are every axis between
            the batch and the last one) instead of per sample.
        eps: denominator guard of relative quantities (torchdeq).
        tol: r_rel tolerance for T_conv and steps-to-tolerance.
        window: w of the windowed contraction κ̄.
        decode: output-space metrics from ``trace.logits`` ("auto"), always (True: decode every
            state with the attached loop) or never (False).
        min_p: min-p filter level of ``minp_kl``.

    Returns:
        :class:`Metrics`; ``.to_frame()`` is tidy (iteration, sample, [position], metrics...).
        A sample with a non-finite state is ``diverged`` (NaN rows after its last real state);
        the other samples are untouched.

    Example:
        >>> import torch
        >>> from loopscope import FnLoop, unroll
        >>> tr = unroll(FnLoop(step=lambda h: torch.tanh(-2 * h)), None, 40,
        ...             init=torch.full((1, 8), 0.3, dtype=torch.float64))
        >>> m = metrics(tr)
        >>> float(m["res_p"][1, -1, 0]) < 1e-12   # period-2 residual vanishes on the 2-cycle
        True
    """
    p_max = check_positive_int("p_max", p_max)
    window = check_positive_int("window", window)
    _check_metric_args(trace, eps, tol, min_p, decode)
    eps, tol = float(eps), float(tol)
    S, last = _masked_states(trace)
    T1, B = S.shape[:2]
    diverged = _diverged_samples(trace, S, last)
    X = _split_positions(S)
    LG = _masked_logits(trace, decode, last, T1, B)
    kw = {"p_max": p_max, "eps": eps, "tol": tol, "window": window, "min_p": float(min_p)}
    if per_token:
        values, res_p, tc, argmax = _per_token_arrays(X, LG, last, kw)
    else:
        values = compute_arrays(X, LG, **kw)
        argmax = values.pop("argmax", None)
        res_p = values.pop("res_p")
        tc = t_conv_from(values["rel_residual"], last, tol)
    tc = torch.where(
        diverged.view(-1, *([1] * (tc.dim() - 1))).expand_as(tc), torch.full_like(tc, -1), tc
    )
    meta = {k: v for k, v in (trace.meta or {}).items() if k in ("model", "split", "seed", "task")}
    full = result_meta(trace.loop, settings=dict(p_max=p_max, tol=tol, window=window))
    return Metrics(
        values=values,
        res_p=res_p,
        t_conv=tc,
        last=last,
        diverged=diverged,
        per_token=per_token,
        p_max=p_max,
        eps=eps,
        tol=tol,
        window=window,
        argmax=argmax,
        meta={**full, **meta},
    )


# ---------------------------------------------------------------------------------------------
# calibration (EqR Fig. 1)
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class Calibration(Result):
    """Accuracy per final-residual bin and the AUROC of the residual as a correctness predictor.

    ``auroc`` = P(r_rel of a correct sample < r_rel of a wrong one) (ties count ½); 1 = the
    residual separates perfectly, 0.5 = uninformative, NaN when only one class is present.
    ``bins``: one row per bin; ``per_sample``: one row per sample with a finite residual.
    """

    bins: pd.DataFrame
    auroc: float
    per_sample: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: ``sample, final_rel_residual, correct``."""
        return self.per_sample.copy()

    def summary(self) -> dict[str, float]:
        """AUROC, accuracy and the number of samples scored."""
        c = self.per_sample["correct"]
        return float_summary(
            {"auroc": self.auroc, "accuracy": float(c.mean()) if len(c) else _NAN, "n": len(c)}
        )


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return _NAN
    r = rankdata(score)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@did_you_mean
def calibration(
    metrics_or_trace: Metrics | Trace,
    correct: Tensor | np.ndarray,
    n_bins: int = 10,
    *,
    binning: str = "quantile",
) -> Calibration:
    """Bin samples by final relative residual; accuracy per bin; AUROC (EqR Fig. 1).

    Args:
        metrics_or_trace: a :class:`Metrics` or a Trace (metrics computed with defaults).
        correct: ``[B]`` bool (or 0/1) per-sample correctness.
        n_bins: number of bins (fewer if residuals repeat).
        binning: "quantile" (equal counts) or "log" (log-uniform edges).
    """
    n_bins = check_positive_int("n_bins", n_bins)
    if binning not in ("quantile", "log"):
        raise LoopscopeError(f"binning must be 'quantile' or 'log', got {binning!r}")
    m = metrics_or_trace if isinstance(metrics_or_trace, Metrics) else metrics(metrics_or_trace)
    if m.per_token:
        raise LoopscopeError("calibration needs per-sample metrics (per_token=False)")
    r = m.final_rel_residual().numpy()
    c = np.asarray(torch.as_tensor(correct).cpu().numpy()).astype(bool).reshape(-1)
    if c.shape[0] != r.shape[0]:
        raise LoopscopeError(
            f"correct has {c.shape[0]} entries but the trace has {r.shape[0]} samples"
        )
    ok = np.isfinite(r)
    r, c = r[ok], c[ok]
    edges = _bin_edges(r, n_bins, binning)
    idx = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for i in range(len(edges) - 1):
        sel = idx == i
        rows.append(
            {
                "bin": i,
                "lo": edges[i],
                "hi": edges[i + 1],
                "n": int(sel.sum()),
                "accuracy": float(c[sel].mean()) if sel.any() else _NAN,
                "median_rel_residual": float(np.median(r[sel])) if sel.any() else _NAN,
            }
        )
    per = pd.DataFrame({"sample": np.nonzero(ok)[0], "final_rel_residual": r, "correct": c})
    return Calibration(
        bins=pd.DataFrame(rows), auroc=_auroc(-r, c), per_sample=per, meta=dict(m.meta)
    )


def _bin_edges(r: np.ndarray, n_bins: int, binning: str) -> np.ndarray:
    if binning == "quantile":
        edges = (
            np.unique(np.quantile(r, np.linspace(0, 1, n_bins + 1)))
            if len(r)
            else np.array([0.0, 1.0])
        )
    elif binning == "log":
        lo, hi = np.log10(max(r.min(), 1e-300)), np.log10(max(r.max(), 1e-300))
        edges = np.logspace(lo, hi if hi > lo else lo + 1, n_bins + 1)
    else:
        raise LoopscopeError(f"binning must be 'quantile' or 'log', got {binning!r}")
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]])
    return edges


# ---------------------------------------------------------------------------------------------
# per-layer residuals and attention stabilisation inside a K-layer block
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class LayerMetrics(Result):
    """Per-layer residual / cosine between consecutive iterations and per-head attention JS.

    ``frame`` columns: hook, sub, iteration, sample, head (−1 for state hooks), metric, value.
    Metrics: ``residual`` ‖x_t − x_{t−1}‖, ``rel_residual`` (÷ ‖x_t‖), ``cosine``
    cos(x_t, x_{t−1}) for state-like hooks; ``attn_js`` = mean over queries of
    JS(A_t[q, :] ‖ A_{t−1}[q, :]) (nats) for attention patterns ``[B, heads, q, k]``.
    """

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The long table :attr:`frame`."""
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """``mean_<metric>``: each metric averaged over hooks, iterations and samples."""
        g = self.frame.groupby("metric")["value"].mean()
        return float_summary({f"mean_{k}": v for k, v in g.items()})


def _js(P: Tensor, Q: Tensor, dim: int = -1) -> Tensor:
    M = 0.5 * (P + Q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(
            a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), torch.zeros_like(a)
        ).sum(dim)

    return 0.5 * kl(P, M) + 0.5 * kl(Q, M)


def _pair_rows(kind: str, name: str, subv: Any, t1: int, a: Tensor, b: Tensor, eps: float):
    """Rows comparing one hook's firing at iteration ``t1`` with the one at ``t1 − 1``."""
    B = a.shape[0]
    if kind == "state":
        fa, fb = a.reshape(B, -1), b.reshape(B, -1)
        r = (fa - fb).norm(dim=-1)
        vals = {
            "residual": r,
            "rel_residual": r / (fa.norm(dim=-1) + eps),
            "cosine": safe_cos(fa, fb),
        }
        return [
            pd.DataFrame(
                {
                    "hook": name,
                    "sub": subv,
                    "iteration": t1,
                    "sample": np.arange(B),
                    "head": -1,
                    "metric": met,
                    "value": v.cpu().numpy(),
                }
            )
            for met, v in vals.items()
        ]
    if a.dim() != 4:
        raise LoopscopeError(
            f"attention pattern hook {name!r} must be [B, heads, q, k], got {tuple(a.shape)}"
        )
    js = _js(a, b).mean(-1)  # [B, heads]
    H = js.shape[1]
    return [
        pd.DataFrame(
            {
                "hook": name,
                "sub": subv,
                "iteration": t1,
                "sample": np.repeat(np.arange(B), H),
                "head": np.tile(np.arange(H), B),
                "metric": "attn_js",
                "value": js.reshape(-1).cpu().numpy(),
            }
        )
    ]


def _hook_rows(trace: Trace, kind: str, name: str, eps: float) -> list[pd.DataFrame]:
    """Firings grouped by their label after the iteration, consecutive iterations compared."""
    acts = trace[name]
    labels = trace.labels.get(trace._canonical(name)) if name in trace else None
    if labels is None:
        labels = [(t, 0) for t in range(acts.shape[0])]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(tuple(lab[1:]), []).append((int(lab[0]), i))
    rows: list[pd.DataFrame] = []
    for sub, items in groups.items():
        items.sort()
        for (t0, i0), (t1, i1) in zip(items[:-1], items[1:], strict=True):
            if t1 != t0 + 1:
                continue
            subv = sub[0] if len(sub) == 1 else str(sub)
            rows += _pair_rows(kind, name, subv, t1, acts[i1].double(), acts[i0].double(), eps)
    return rows


@did_you_mean
def layer_metrics(
    trace: Trace,
    hooks: str | list[str] | None = None,
    patterns: str | list[str] | None = None,
    *,
    eps: float = 1e-9,
) -> LayerMetrics:
    """Per-layer residuals and attention-pattern stabilisation from captured hooks.

    Firings of one hook are grouped by their label after the iteration (``label[1:]``, e.g. the
    sub-step of a K-layer block) and compared between consecutive iterations.

    Args:
        trace: a Trace with captured activations.
        hooks: state-like hook names (None: every captured hook that is not a pattern).
        patterns: attention-pattern hooks ``[B, heads, q, k]`` (None: captured names ending in
            ``hook_pattern``).
        eps: denominator guard of the relative residual.
    """
    eps = float(eps)
    captured = list(trace.acts)
    if patterns is None:
        patterns = [h for h in captured if h.endswith("hook_pattern")]
    elif isinstance(patterns, str):
        patterns = [patterns]
    if hooks is None:
        hooks = [h for h in captured if h not in patterns]
    elif isinstance(hooks, str):
        hooks = [hooks]
    rows: list[pd.DataFrame] = []
    for kind, names in (("state", hooks), ("pattern", patterns)):
        for name in names:
            rows += _hook_rows(trace, kind, name, eps)
    cols = ["hook", "sub", "iteration", "sample", "head", "metric", "value"]
    frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)
    return LayerMetrics(frame=frame, meta=result_meta(trace.loop))
