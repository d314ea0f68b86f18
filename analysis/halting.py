"""Exit / halting criteria (dynamics spec §5): scored OFFLINE on one recorded trace, or ONLINE.

Record a trajectory once with the full budget ``T``, then ask, for every criterion and threshold,
*when would this rule have stopped each sample, and what would that have cost / gained?*

Exit-step convention: the exit step ``e ∈ 1..T`` is the number of loop steps run; the output is
read from ``h_e``. A criterion's statistic at ``e`` only uses states up to ``h_e`` (what an online
rule has seen after computing ``h_e``). This is exactly ``unroll``'s ``halt(t, h_prev, h_next,
ctx)`` with ``h_next = h_{t+1}``: a sample halting there gets ``halted_at = t + 1 = e``.

============== ===================================================== ============ =========
name           statistic at exit step e                              halts when   default τ
============== ===================================================== ============ =========
residual       r_rel = ‖h_e − h_{e−1}‖ / (‖h_e‖ + eps)               < τ          1e-3
fp_residual    FPRM max_pos ‖h_{e−1} − h_e‖_∞ / (‖h_e‖_∞ + 1e-8);   < τ or s<1e-3 0.1
               damping s simulated (see below)
latent_diff    ‖Δ_e‖ / (‖h_e‖ + eps)                                 < τ          0.03
cosine         1 − cos(h_e, h_{e−1})                                 < τ          1e-3
kl             KL(p_{e−1} ‖ p_e)                                     < τ          1e-3
minp_kl        KL after min-p filtering                              < τ          1e-5
entropy_diff   |H_e − H_{e−1}|                                       < τ          1e-3
argmax_stable  consecutive steps with unchanged argmax ending at e   ≥ k          5
acceleration   ‖Δ_e − Δ_{e−1}‖ / (‖h_e‖ + eps), two hits            < τ          1e-2
period_residual min_{p≤P} ‖h_e − h_{e−p}‖ / (‖h_e‖ + eps); reports p  < τ          1e-3
q_head         HRM: q_halt − q_cont; TRM: q_halt (``variant="trm"``)  > τ          0
ouro_cdf       CDF_e = 1 − Π_{j=1..e}(1 − λ_j)                       ≥ q          0.5
predicted      r_rel,e−1 and ⌈ln(τ/r_rel)/ln κ̄⌉ vs remaining budget  r<τ or pred > T−e  1e-3
fixed          e                                                     ≥ d          T
============== ===================================================== ============ =========

``oracle`` (evaluation only) = first step after which the readout argmax never changes again.

**FPRM damping semantics.** FPRM updates ``y ← s·f(y) + (1 − s)·y`` and decays ``s ← s·decay``
whenever the residual has not improved for ``decay_patience`` steps while still ≥ τ; it halts when
r < τ or s < ``s_min``. Offline we score the *recorded* (undamped) trajectory: the step-size
schedule ``s`` is simulated on the recorded residual sequence only to reproduce the ``s < s_min``
exit; the states are never re-run with damping (record a damped loop to study damped dynamics).

Every criterion accepts ``min_steps`` (no exit before it) and ``patience`` (number of consecutive
hits needed, "two-hit" = 2). State-based criteria are usable online as ``unroll(..., halt=c)``;
output-based ones need ``decode=fn(h, ctx)``, ``q_head`` needs ``q=fn(h, ctx)`` and ``ouro_cdf``
``gate=fn(h, ctx)``.

Example:
    >>> import torch
    >>> from loopscope import FnLoop, unroll
    >>> loop = FnLoop(step=lambda h: 0.5 * h + 1.0, init_state=torch.zeros(3, dtype=torch.float64))
    >>> tr = unroll(loop, torch.zeros(2, 3), 40)
    >>> rep = evaluate(tr, {"latent_diff": [1e-2, 1e-4]})
    >>> rep.to_frame()[["criterion", "threshold", "mean_steps"]].values.tolist()
    [['latent_diff', 0.0001, 14.0], ['latent_diff', 0.01, 7.0]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.convergence import (
    _logits_positions,
    _masked_states,
    _split_positions,
    _trace_logits,
    compute_arrays,
)
from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean, suggest
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace

__all__ = ["Criterion", "HaltingReport", "evaluate", "CRITERIA", "oracle_steps"]

_NAN = float("nan")


@dataclass(frozen=True)
class _Rule:
    threshold: float | None
    direction: str  # "lt" | "gt" | "ge"
    patience: int
    kind: str  # "state" | "output" | "q" | "gate" | "fixed"
    params: dict[str, Any]


#: every criterion with its default threshold, comparison, default patience, input kind and
#: parameters (name -> default)
CRITERIA: dict[str, _Rule] = {
    "residual": _Rule(1e-3, "lt", 1, "state", {"eps": 1e-9}),
    "fp_residual": _Rule(
        0.1, "lt", 1, "state", {"decay": 0.99, "decay_patience": 5, "s_min": 1e-3}
    ),
    "latent_diff": _Rule(0.03, "lt", 1, "state", {"eps": 1e-9}),
    "cosine": _Rule(1e-3, "lt", 1, "state", {}),
    "kl": _Rule(1e-3, "lt", 1, "output", {"decode": None}),
    "minp_kl": _Rule(1e-5, "lt", 1, "output", {"decode": None, "min_p": 0.1}),
    "entropy_diff": _Rule(1e-3, "lt", 1, "output", {"decode": None}),
    "argmax_stable": _Rule(5, "ge", 1, "output", {"decode": None}),
    "acceleration": _Rule(1e-2, "lt", 2, "state", {"eps": 1e-9}),
    "period_residual": _Rule(1e-3, "lt", 1, "state", {"p_max": 16, "eps": 1e-9}),
    "q_head": _Rule(0.0, "gt", 1, "q", {"variant": "hrm", "q": None}),
    "ouro_cdf": _Rule(0.5, "ge", 1, "gate", {"gate": None}),
    "predicted": _Rule(1e-3, "lt", 1, "state", {"window": 5, "budget": None, "eps": 1e-9}),
    "fixed": _Rule(None, "ge", 1, "fixed", {}),
}


class _Signals:
    """What a criterion may look at, rows indexed by exit step ``e = e0 + row``."""

    def __init__(
        self,
        X: Tensor,
        logits: Tensor | None,
        e0: int,
        budget: int,
        last: Tensor,
        q: Tensor | None = None,
        gate_cdf: Tensor | None = None,
    ) -> None:
        self.X, self.logits, self.e0, self.budget, self.last = X, logits, e0, budget, last
        self.q, self.gate_cdf = q, gate_cdf
        self.L, self.B = X.shape[:2]
        self._cache: dict[tuple, dict[str, Tensor]] = {}

    @property
    def e(self) -> Tensor:
        return torch.arange(self.e0, self.e0 + self.L)

    def arrays(
        self,
        p_max: int = 1,
        eps: float = 1e-9,
        tol: float = 1e-3,
        window: int = 5,
        min_p: float = 0.1,
        out: bool = False,
    ) -> dict[str, Tensor]:
        key = (p_max, eps, tol, window, min_p, out)
        if key not in self._cache:
            lg = self.logits if out else None
            if out and lg is None:
                raise LoopscopeError(
                    "this criterion needs the readout: record the trace with decode=True (or pass "
                    "decode=fn(h, ctx) for online use)"
                )
            self._cache[key] = compute_arrays(
                self.X, lg, p_max=p_max, eps=eps, tol=tol, window=window, min_p=min_p
            )
        return self._cache[key]

    def valid(self) -> Tensor:
        """``[L, B]``: rows that are real exit steps (1 ≤ e ≤ last real state)."""
        e = self.e.view(-1, 1)
        return (e >= 1) & (e <= self.last.view(1, -1))


def _shift(a: Tensor) -> Tensor:
    """Row e gets row e−1 (quantities defined by the step into h_e)."""
    out = torch.full_like(a, _NAN)
    out[1:] = a[:-1]
    return out


class Criterion:
    """One exit rule with its threshold; offline (:meth:`exit_steps`) and online (``__call__``).

    Args:
        name: one of :data:`CRITERIA` (residual, fp_residual, latent_diff, cosine, kl, minp_kl,
            entropy_diff, argmax_stable, acceleration, period_residual, q_head, ouro_cdf,
            predicted, fixed).
        threshold: τ (or k / q / depth); default per criterion (``fixed`` defaults to the budget).
        min_steps: earliest allowed exit step (default 1).
        patience: consecutive hits required (default 2 for acceleration, else 1).
        eps: denominator guard (residual, latent_diff, acceleration, period_residual,
            predicted; None: 1e-9).
        p_max: longest period of period_residual (None: 16).
        window: κ̄ window of predicted (None: 5).
        budget: remaining-steps reference of predicted (None: the trace's T; required online).
        decay: FPRM step-size decay of fp_residual (None: 0.99).
        decay_patience: steps without improvement before a decay (None: 5).
        s_min: FPRM step size below which fp_residual halts (None: 1e-3).
        min_p: min-p filter level of minp_kl (None: 0.1).
        variant: q_head variant, "hrm" (q_halt − q_cont) or "trm" (q_halt) (None: "hrm").
        decode: online readout ``fn(h, ctx)`` for the output criteria.
        q: online halting head ``fn(h, ctx)`` for q_head.
        gate: online exit gate ``fn(h, ctx)`` for ouro_cdf.

    A parameter the criterion does not use is rejected (one line naming what it takes).

    Online use: ``unroll(loop, x, T, halt=Criterion("residual", 1e-6))``; the criterion keeps a
    short history of states and resets itself when called with ``t == 0``.
    """

    @did_you_mean
    def __init__(
        self,
        name: str,
        threshold: float | None = None,
        min_steps: int = 1,
        patience: int | None = None,
        *,
        eps: float | None = None,
        p_max: int | None = None,
        window: int | None = None,
        budget: int | None = None,
        decay: float | None = None,
        decay_patience: int | None = None,
        s_min: float | None = None,
        min_p: float | None = None,
        variant: str | None = None,
        decode: Callable[[Tensor, Any], Tensor] | None = None,
        q: Callable[[Tensor, Any], Tensor] | None = None,
        gate: Callable[[Tensor, Any], Tensor] | None = None,
    ) -> None:
        if name not in CRITERIA:
            raise LoopscopeError(f"unknown halting criterion {name!r}{suggest(name, CRITERIA)}")
        rule = CRITERIA[name]
        given = {
            k: v
            for k, v in dict(
                eps=eps,
                p_max=p_max,
                window=window,
                budget=budget,
                decay=decay,
                decay_patience=decay_patience,
                s_min=s_min,
                min_p=min_p,
                variant=variant,
                decode=decode,
                q=q,
                gate=gate,
            ).items()
            if v is not None
        }
        for key in given:
            if key not in rule.params:
                raise LoopscopeError(
                    f"Criterion[{name}]() got an unknown option {key!r}"
                    f"{suggest(key, rule.params)} (it takes: {', '.join(rule.params) or 'none'})"
                )
        self.name = name
        self.rule = rule
        self.threshold = rule.threshold if threshold is None else float(threshold)
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise LoopscopeError(f"threshold of {name} must be finite, got {threshold!r}")
        self.min_steps = check_positive_int("min_steps", min_steps)
        self.patience = check_positive_int(
            "patience", rule.patience if patience is None else patience
        )
        self.params = {**rule.params, **given}
        if name == "q_head" and self.params["variant"] not in ("hrm", "trm"):
            raise LoopscopeError(
                f"q_head variant must be 'hrm' or 'trm', got {self.params['variant']!r}"
            )
        for k in ("p_max", "window", "decay_patience"):
            if k in given:
                check_positive_int(k, given[k])
        self.reset()

    def __repr__(self) -> str:
        return f"Criterion({self.name!r}, threshold={self.threshold}, min_steps={self.min_steps}, patience={self.patience})"

    @property
    def label(self) -> str:
        return self.name

    # -- statistic -------------------------------------------------------------------------
    def statistic(self, sig: _Signals) -> tuple[Tensor, Tensor | None]:
        """``([L, B] statistic at each exit step, optional extra e.g. the period)``; NaN = no
        information (never a hit)."""
        n, p = self.name, self.params
        extra = None
        if n == "residual":
            s = _shift(sig.arrays(eps=p["eps"])["rel_residual"])
        elif n == "fp_residual":
            s = _shift(sig.arrays()["fprm_residual"])
        elif n == "latent_diff":
            s = sig.arrays(eps=p["eps"])["rel_step"]
        elif n == "cosine":
            s = 1.0 - sig.arrays()["state_cos"]
        elif n in ("kl", "entropy_diff", "argmax_stable"):
            s = sig.arrays(out=True)[n]
        elif n == "minp_kl":
            s = sig.arrays(out=True, min_p=p["min_p"])["minp_kl"]
        elif n == "acceleration":
            s = sig.arrays(eps=p["eps"])["rel_accel"]
        elif n == "period_residual":
            a = sig.arrays(p_max=p["p_max"], eps=p["eps"], tol=self.threshold)
            s, extra = a["period_residual"], a["period"]
        elif n == "predicted":
            a = sig.arrays(eps=p["eps"], tol=self.threshold, window=p["window"])
            rel, pred = _shift(a["rel_residual"]), _shift(a["steps_to_tol"])
            budget = sig.budget if p["budget"] is None else int(p["budget"])
            remaining = (budget - sig.e).double().view(-1, 1)
            # 1 = stop (converged, or tolerance out of reach within the budget), 0 = continue
            stop = (rel < self.threshold) | (pred > remaining)
            s = torch.where(
                torch.isnan(rel) | torch.isnan(pred), torch.full_like(rel, _NAN), stop.double()
            )
        elif n == "q_head":
            if sig.q is None:
                raise LoopscopeError(
                    "q_head needs q values: pass q=[T+1, B, 2] tensor or fn(h, ctx)"
                )
            q = sig.q.double()
            if self.params["variant"] == "trm" or q.dim() == 2 or q.shape[-1] == 1:
                s = q.reshape(q.shape[0], q.shape[1], -1)[..., 0]
            else:
                s = q[..., 0] - q[..., 1]
        elif n == "ouro_cdf":
            if sig.gate_cdf is None:
                raise LoopscopeError(
                    "ouro_cdf needs the exit gate: pass gate=[T+1, B] tensor or fn(h, ctx)"
                )
            s = sig.gate_cdf.double()
        elif n == "fixed":
            s = sig.e.double().view(-1, 1).expand(sig.L, sig.B).clone()
        else:  # pragma: no cover - guarded in __init__
            raise LoopscopeError(n)
        s = torch.where(sig.valid(), s, torch.full_like(s, _NAN))
        return s, extra

    def _threshold_for(self, budget: int) -> float:
        return float(budget) if self.threshold is None else self.threshold

    def hits(self, s: Tensor, budget: int) -> Tensor:
        th = self._threshold_for(budget)
        if self.name == "predicted":
            return s > 0.5
        d = self.rule.direction
        h = s < th if d == "lt" else s > th if d == "gt" else s >= th
        return h & ~torch.isnan(s)

    # -- offline ---------------------------------------------------------------------------
    def exit_steps(self, sig: _Signals) -> tuple[Tensor, Tensor, Tensor]:
        """``(exit [B] long, halted [B] bool, extra [B] float)`` on a full trajectory (``e0 = 0``).

        Samples that never satisfy the rule exit at the budget ``T`` (``halted = False``).
        """
        s, extra = self.statistic(sig)
        hit = self.hits(s, sig.budget)
        L, B = hit.shape
        if self.name == "fp_residual":
            hit = hit | self._damping_stop(s)
        run = torch.zeros(B, dtype=torch.long)
        exit_ = torch.full((B,), sig.budget, dtype=torch.long)
        halted = torch.zeros(B, dtype=torch.bool)
        for r in range(L):
            run = torch.where(hit[r], run + 1, torch.zeros_like(run))
            e = sig.e0 + r
            new = (run >= self.patience) & (e >= self.min_steps) & ~halted
            exit_[new] = e
            halted |= new
        ex = torch.full((B,), _NAN, dtype=torch.float64)
        if extra is not None:
            idx = exit_.clamp(max=L - 1).view(1, -1)
            ex = extra.gather(0, idx)[0]
        return exit_, halted, ex

    def _damping_stop(self, s: Tensor) -> Tensor:
        """Simulated FPRM step-size schedule: True where s < s_min (offline, recorded residuals)."""
        L, B = s.shape
        p = self.params
        step = torch.ones(B, dtype=torch.float64)
        best = torch.full((B,), math.inf, dtype=torch.float64)
        since = torch.zeros(B, dtype=torch.long)
        out = torch.zeros(L, B, dtype=torch.bool)
        for r in range(L):
            v = s[r]
            ok = ~torch.isnan(v)
            improved = ok & (v < best)
            best = torch.where(improved, v, best)
            since = torch.where(improved, torch.zeros_like(since), since + ok.long())
            decay = ok & (since >= p["decay_patience"]) & (v >= self.threshold)
            step = torch.where(decay, step * p["decay"], step)
            since = torch.where(decay, torch.zeros_like(since), since)
            out[r] = ok & (step < p["s_min"])
        return out

    # -- online ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the online history (called automatically at ``t == 0``)."""
        self._hist: list[Tensor] = []
        self._logits: list[Tensor] = []
        self._run: Tensor | None = None
        self._cdf_prod: Tensor | None = None
        self._fp_state: tuple[Tensor, Tensor, Tensor] | None = None

    def _lags(self) -> int:
        p = self.params
        if self.name == "period_residual":
            return p["p_max"] + 1
        if self.name == "predicted":
            return p["window"] + 3
        if self.name == "argmax_stable":
            return int(self._threshold_for(0)) + 2
        return 3

    def __call__(self, t: int, h_prev: Tensor, h_next: Tensor, ctx: Any) -> Tensor:
        """``unroll`` halt callable: ``BoolTensor[B]``, True where the sample stops after step t."""
        B = h_next.shape[0]
        if t == 0 or not self._hist:
            self.reset()
            self._hist.append(h_prev.detach().double().cpu())
            if self.rule.kind == "output":
                self._logits.append(self._decode(h_prev, ctx))
        self._hist.append(h_next.detach().double().cpu())
        if self.rule.kind == "output":
            self._logits.append(self._decode(h_next, ctx))
        keep = self._lags()
        self._hist = self._hist[-keep:]
        self._logits = self._logits[-keep:]
        e = t + 1
        L = len(self._hist)
        X = _split_positions(torch.stack(self._hist))
        lg = _logits_positions(torch.stack(self._logits), B) if self._logits else None
        q = gate_cdf = None
        if self.rule.kind == "q":
            fn = self.params["q"]
            if fn is None:
                raise LoopscopeError("online q_head needs q=fn(h, ctx) returning [B, 2] (or [B])")
            qv = torch.as_tensor(fn(h_next, ctx)).detach().double().cpu().reshape(B, -1)
            q = torch.full((L, B, qv.shape[-1]), _NAN, dtype=torch.float64)
            q[-1] = qv
        if self.rule.kind == "gate":
            fn = self.params["gate"]
            if fn is None:
                raise LoopscopeError(
                    "online ouro_cdf needs gate=fn(h, ctx) returning [B] exit probabilities"
                )
            lam = torch.as_tensor(fn(h_next, ctx)).detach().double().cpu().reshape(B)
            self._cdf_prod = (1 - lam) if self._cdf_prod is None else self._cdf_prod * (1 - lam)
            gate_cdf = torch.full((L, B), _NAN, dtype=torch.float64)
            gate_cdf[-1] = 1 - self._cdf_prod
        budget = self.params.get("budget")
        sig = _Signals(
            X,
            lg,
            e0=e - (L - 1),
            budget=int(budget) if budget is not None else 10**9,
            last=torch.full((B,), e, dtype=torch.long),
            q=q,
            gate_cdf=gate_cdf,
        )
        if self.name == "predicted" and budget is None:
            raise LoopscopeError("online 'predicted' needs budget= (the remaining-steps reference)")
        s, _ = self.statistic(sig)
        last = s[-1:]
        hit = self.hits(last, sig.budget)[0]
        if self.name == "fp_residual":
            hit = hit | self._fp_online(last[0])
        self._run = (
            hit.long()
            if self._run is None
            else torch.where(hit, self._run + 1, torch.zeros_like(self._run))
        )
        return (self._run >= self.patience) & (e >= self.min_steps)

    def _fp_online(self, v: Tensor) -> Tensor:
        B = v.shape[0]
        if self._fp_state is None:
            self._fp_state = (
                torch.ones(B, dtype=torch.float64),
                torch.full((B,), math.inf, dtype=torch.float64),
                torch.zeros(B, dtype=torch.long),
            )
        step, best, since = self._fp_state
        p = self.params
        ok = ~torch.isnan(v)
        improved = ok & (v < best)
        best = torch.where(improved, v, best)
        since = torch.where(improved, torch.zeros_like(since), since + ok.long())
        decay = ok & (since >= p["decay_patience"]) & (v >= self.threshold)
        step = torch.where(decay, step * p["decay"], step)
        since = torch.where(decay, torch.zeros_like(since), since)
        self._fp_state = (step, best, since)
        return ok & (step < p["s_min"])

    def _decode(self, h: Tensor, ctx: Any) -> Tensor:
        fn = self.params.get("decode")
        if fn is None:
            raise LoopscopeError(f"online {self.name} needs decode=fn(h, ctx) (e.g. loop.decode)")
        with torch.no_grad():
            return torch.as_tensor(fn(h, ctx)).detach().double().cpu()


# ---------------------------------------------------------------------------------------------
# offline harness
# ---------------------------------------------------------------------------------------------
def _parse(criteria: Any, T: int, have_out: bool, have_q: bool, have_gate: bool) -> list[Criterion]:
    if criteria is None:
        out = []
        for name, rule in CRITERIA.items():
            if rule.kind == "output" and not have_out:
                continue
            if (rule.kind == "q" and not have_q) or (rule.kind == "gate" and not have_gate):
                continue
            if name == "fixed":
                for d in sorted({max(1, round(T * f)) for f in (0.25, 0.5, 0.75, 1.0)}):
                    out.append(Criterion("fixed", d))
            else:
                out.append(Criterion(name))
        return out
    if isinstance(criteria, (str, Criterion)):
        criteria = [criteria]
    if isinstance(criteria, dict):
        out = []
        for name, ths in criteria.items():
            if not isinstance(name, str):
                raise LoopscopeError(f"criteria dict keys must be names, got {name!r}")
            if ths is None or isinstance(ths, (int, float)):
                ths = [ths]
            for th in ths:
                out.append(Criterion(name, th))
        return out
    if isinstance(criteria, Iterable):
        out = []
        for c in criteria:
            if isinstance(c, str):
                out.append(Criterion(c))
            elif isinstance(c, Criterion):
                out.append(c)
            else:
                raise LoopscopeError(
                    f"criteria entries must be names or Criterion, got {type(c).__name__}"
                )
        return out
    raise LoopscopeError(
        f"criteria must be None, a name, a Criterion, a list or a dict, got {type(criteria).__name__}"
    )


def oracle_steps(argmax: Tensor, last: Tensor) -> Tensor:
    """First step after which the argmax (all positions) never changes up to ``last``: ``[B]``."""
    T1, B = argmax.shape[:2]
    A = argmax.reshape(T1, B, -1)
    out = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        m = int(last[b])
        same = (A[: m + 1, b] == A[m, b]).all(-1)
        bad = torch.nonzero(~same).flatten()
        out[b] = 0 if bad.numel() == 0 else int(bad[-1]) + 1
    return out


def _saturation(correct: Tensor, last: Tensor) -> Tensor:
    T1, B = correct.shape
    out = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        m = int(last[b])
        same = correct[: m + 1, b] == correct[m, b]
        bad = torch.nonzero(~same).flatten()
        out[b] = 0 if bad.numel() == 0 else int(bad[-1]) + 1
    return out


def _series(x: Any, T1: int, B: int, trace: Any, what: str) -> Tensor | None:
    if x is None:
        return None
    if callable(x) and not isinstance(x, Tensor):
        if trace.loop is None and trace.ctx is None:
            raise LoopscopeError(f"{what}=callable needs a trace with its context attached")
        with torch.no_grad():
            vals = [
                torch.as_tensor(x(trace.states[t], trace.ctx)).detach().double().cpu()
                for t in range(T1)
            ]
        return torch.stack(vals)
    v = torch.as_tensor(x).detach().double().cpu()
    if v.shape[0] == T1 - 1:  # values for e = 1..T only
        v = torch.cat([torch.full((1, *v.shape[1:]), _NAN, dtype=torch.float64), v])
    if v.shape[0] != T1 or v.shape[1] != B:
        raise LoopscopeError(f"{what} must have shape [T+1={T1}, B={B}, ...], got {tuple(v.shape)}")
    return v


@dataclass(kw_only=True, repr=False)
class HaltingReport(Result):
    """Every criterion × threshold scored on one trace.

    Attributes:
        exits: per (criterion, threshold, sample): ``exit_step``, ``halted``, ``period`` (for
            period_residual), ``correct`` (if targets), ``oracle_step``, ``diverged``.
        table: per (criterion, threshold): mean / median / p90 / max steps, ``compute_saved``
            (1 − mean_steps / budget), ``halted_fraction``, ``accuracy``, ``accuracy_full``,
            ``accuracy_delta``, ``oracle_precision``, ``oracle_recall``, ``safe_rate``
            (exit ≥ oracle), ``saturation_gap`` (mean exit − accuracy-saturation step).
        budget: the fixed budget ``T``.

    Oracle agreement is measured over (sample, step) pairs e ∈ 1..T: "criterion stopped" =
    e ≥ exit, "oracle allows" = e ≥ oracle step; precision = share of stopped steps the oracle
    allows (1 ⇔ never stopped before the answer settled), recall = share of allowed steps used.
    """

    exits: pd.DataFrame
    table: pd.DataFrame
    budget: int
    oracle: Tensor | None = None
    saturation: Tensor | None = None

    def to_frame(self) -> pd.DataFrame:
        """The per (criterion, threshold) table :attr:`table` (per sample: :attr:`exits`)."""
        return self.table.copy()

    def summary(self) -> dict[str, float]:
        """Budget, and the Pareto points' best accuracy and fewest mean steps."""
        tr = self.tradeoff()
        front = tr[tr["pareto"]]
        nan = float("nan")
        return float_summary(
            {
                "budget": self.budget,
                "n_rules": len(self.table),
                "n_pareto": len(front),
                "best_accuracy": float(front["accuracy"].max()) if len(front) else nan,
                "min_mean_steps": float(self.table["mean_steps"].min()),
            }
        )

    def tradeoff(self) -> pd.DataFrame:
        """Accuracy vs mean steps per (criterion, threshold), sorted by steps, with a Pareto flag
        (no other point has fewer-or-equal steps and higher-or-equal accuracy, one strictly)."""
        df = self.table[["criterion", "threshold", "mean_steps", "accuracy"]].copy()
        df = df.sort_values(["mean_steps", "accuracy"], ascending=[True, False]).reset_index(
            drop=True
        )
        acc = df["accuracy"].to_numpy()
        st = df["mean_steps"].to_numpy()
        pareto = []
        for i in range(len(df)):
            if np.isnan(acc[i]):
                pareto.append(False)
                continue
            dom = (st <= st[i]) & (acc >= acc[i]) & ((st < st[i]) | (acc > acc[i]))
            pareto.append(not bool(dom.any()))
        df["pareto"] = pareto
        return df

    def exit_steps(self, criterion: str, threshold: float | None = None) -> np.ndarray:
        """Exit step per sample for one criterion (and threshold if several)."""
        df = self.exits[self.exits["criterion"] == criterion]
        if threshold is not None:
            df = df[np.isclose(df["threshold"].astype(float), float(threshold))]
        if df.empty:
            raise LoopscopeError(f"no exits for criterion {criterion!r} threshold {threshold!r}")
        if df["threshold"].nunique() > 1:
            raise LoopscopeError(f"criterion {criterion!r} has several thresholds: pass threshold=")
        return df.sort_values("sample")["exit_step"].to_numpy()


def _correct_per_step(
    correct: Any, targets: Any, LG: Tensor | None, T1: int, B: int
) -> Tensor | None:
    """``[T+1, B]`` bool correctness at every step, given or from targets vs the readout."""
    if correct is not None:
        correct = torch.as_tensor(correct).bool().cpu()
        if correct.shape != (T1, B):
            raise LoopscopeError(f"correct must be [T+1={T1}, B={B}], got {tuple(correct.shape)}")
        return correct
    if targets is None:
        return None
    if LG is None:
        raise LoopscopeError("targets need the readout: record the trace with decode=True")
    tg = torch.as_tensor(targets).cpu()
    if tg.dim() == 0 or tg.shape[0] != B:
        raise LoopscopeError(
            f"targets must be [B={B}] or [B={B}, positions], got shape {tuple(tg.shape)}"
        )
    tg = tg.reshape(B, -1)
    A = LG.argmax(-1).reshape(T1, B, -1)
    if tg.shape[1] != A.shape[2]:
        raise LoopscopeError(
            f"targets have {tg.shape[1]} positions per sample, readout has {A.shape[2]}"
        )
    return (A == tg.unsqueeze(0)).all(-1)


def _score(
    c: Criterion,
    sig: _Signals,
    budget: int,
    T: int,
    correct: Tensor | None,
    last: Tensor,
    sat: Tensor | None,
    oracle: Tensor | None,
    diverged: Tensor,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One criterion's per-sample exits and its summary row."""
    exit_, halted, extra = c.exit_steps(sig)
    B = exit_.shape[0]
    th = c._threshold_for(budget)
    d = {
        "criterion": c.label,
        "threshold": th,
        "sample": np.arange(B),
        "exit_step": exit_.numpy(),
        "halted": halted.numpy(),
        "period": extra.numpy(),
        "diverged": diverged.numpy(),
    }
    st = exit_.double().numpy()
    row: dict[str, Any] = {
        "criterion": c.label,
        "threshold": th,
        "mean_steps": float(st.mean()),
        "median_steps": float(np.median(st)),
        "p90_steps": float(np.percentile(st, 90)),
        "max_steps": float(st.max()),
        "compute_saved": 1.0 - float(st.mean()) / budget,
        "halted_fraction": float(halted.double().mean()),
    }
    if correct is not None:
        ce = correct[exit_.clamp(max=T), torch.arange(B)]
        cf = correct[last, torch.arange(B)]
        d["correct"] = ce.numpy()
        row["accuracy"] = float(ce.double().mean())
        row["accuracy_full"] = float(cf.double().mean())
        row["accuracy_delta"] = row["accuracy"] - row["accuracy_full"]
        row["saturation_gap"] = float((exit_ - sat).double().mean())
    else:
        row.update(accuracy=_NAN, accuracy_full=_NAN, accuracy_delta=_NAN, saturation_gap=_NAN)
    if oracle is not None:
        o = oracle.clamp_min(1)
        d["oracle_step"] = oracle.numpy()
        stopped = (T - exit_ + 1).clamp_min(0)
        allowed = (T - o + 1).clamp_min(0)
        both = (T - torch.maximum(exit_, o) + 1).clamp_min(0)
        nb, ns, na = int(both.sum()), int(stopped.sum()), int(allowed.sum())
        row["oracle_precision"] = nb / ns if ns > 0 else _NAN
        row["oracle_recall"] = nb / na if na > 0 else _NAN
        row["safe_rate"] = float((exit_ >= oracle).double().mean())
    else:
        row.update(oracle_precision=_NAN, oracle_recall=_NAN, safe_rate=_NAN)
    return pd.DataFrame(d), row


@did_you_mean
def evaluate(
    trace: Trace,
    criteria: Any = None,
    targets: Tensor | None = None,
    *,
    correct: Tensor | None = None,
    q: Tensor | Callable[[Tensor, Any], Tensor] | None = None,
    gate: Tensor | Callable[[Tensor, Any], Tensor] | None = None,
    decode: bool | str = "auto",
    budget: int | None = None,
) -> HaltingReport:
    """Score exit criteria offline on one recorded trace (record once, score every criterion).

    Args:
        trace: a Trace recorded with the full budget (``decode=True`` for output criteria).
        criteria: None (every applicable criterion at its default threshold, plus fixed depths
            T/4, T/2, 3T/4, T), a name, a :class:`Criterion`, a list of those, or a grid
            ``{name: [thresholds]}``.
        targets: answers ``[B]`` or ``[B, positions]`` compared with the readout argmax.
        correct: ``[T+1, B]`` bool correctness at every step (instead of targets).
        q: HRM/TRM halting-head values ``[T+1, B, 2]`` / ``[T+1, B]`` or ``fn(h, ctx)``.
        gate: Ouro exit-gate λ ``[T+1, B]`` (row 0 unused) / ``[T, B]`` or ``fn(h, ctx)``.
        decode: "auto" (use trace.logits), True (decode every state) or False.
        budget: fixed budget to compare against (None: T).

    Returns:
        :class:`HaltingReport` (``.to_frame()``, ``.tradeoff()``, ``.exits``).
    """
    if decode not in ("auto", True, False):
        raise LoopscopeError(f"decode must be 'auto', True or False, got {decode!r}")
    S, last = _masked_states(trace)
    T1, B = S.shape[:2]
    T = T1 - 1
    if T < 1:
        raise LoopscopeError("halting.evaluate needs a trace with at least one iteration")
    budget = T if budget is None else check_positive_int("budget", budget)
    lg = _trace_logits(trace, decode)
    LG = None
    if lg is not None:
        LG = _logits_positions(lg.detach().double().cpu(), B).clone()
        rows = torch.arange(T1).view(T1, 1)
        LG[(rows > last.view(1, -1))] = _NAN
    qs = _series(q, T1, B, trace, "q")
    gs = _series(gate, T1, B, trace, "gate")
    gate_cdf = None
    if gs is not None:
        lam = gs.reshape(T1, B).clone()
        lam[0] = 0.0
        gate_cdf = 1 - torch.cumprod(1 - lam, dim=0)
    crits = _parse(criteria, T, LG is not None, qs is not None, gs is not None)
    sig = _Signals(_split_positions(S), LG, e0=0, budget=budget, last=last, q=qs, gate_cdf=gate_cdf)
    correct = _correct_per_step(correct, targets, LG, T1, B)
    oracle = oracle_steps(LG.argmax(-1), last) if LG is not None else None
    sat = _saturation(correct, last) if correct is not None else None
    diverged = (
        (trace.diverged_at.cpu() >= 0)
        if trace.diverged_at is not None
        else torch.zeros(B, dtype=torch.bool)
    )
    scored = [_score(c, sig, budget, T, correct, last, sat, oracle, diverged) for c in crits]
    exits = pd.concat([e for e, _ in scored], ignore_index=True)
    table = pd.DataFrame([r for _, r in scored])
    table = table.sort_values(["criterion", "threshold"]).reset_index(drop=True)
    meta = {k: v for k, v in (trace.meta or {}).items() if k in ("model", "split", "seed", "task")}
    for k, v in meta.items():
        table[k] = v
    full = result_meta(trace.loop, settings={"budget": budget})
    return HaltingReport(
        exits=exits,
        table=table,
        budget=budget,
        oracle=oracle,
        saturation=sat,
        meta={**full, **meta},
    )
