"""Hierarchical (two-state) loops: the fast loop inside every slow cycle (HRM, TRM, HRM-Text).

A hierarchical model is two Loops (DESIGN): the slow loop, state ``h = (z_H, z_L)`` of shape
``[B, 2, *z]``, whose step runs ``L`` fast steps and then updates z_H; and the fast loop
``z_L <- f_L(z_L; z_H)`` with z_H held fixed. :func:`hierarchical` unrolls the slow loop for
``n_cycles`` H-cycles and asks, in every cycle ``c``, with z_H held at its value ``z_H^c``:

* where is the fast loop's fixed point ``z_L*(c) = f_L(z_L*(c); z_H^c)`` (solved per sample with
  :mod:`loopscope.analysis.solvers`, status flags per sample) and how stable is it (spectrum of
  ``d f_L / d z_L`` at ``z_L*(c)`` with :mod:`loopscope.analysis.spectra`: rho, top-k eigenvalues);
* does the model's own inner loop reach it within the cycle: the distance of the model's z_L after
  its ``L`` inner steps from ``z_L*(c)``, the fast map's residual there, and the contraction rate
  ``(‖z_L^{c,L} − z_L*‖ / ‖z_L^{c,0} − z_L*‖)^{1/L}`` towards it;
* residual curves: the relative change ``‖x_{c+1} − x_c‖ / ‖x_{c+1}‖`` of z_H and z_L per slow
  cycle, and of z_L per fast inner step (optionally continued past the model's ``L`` steps);
* the participation ratio ``(Σλ)² / Σλ²`` of each state's covariance (over samples × positions by
  default) at every cycle.

Indexing: ``h_c = (z_H^c, z_L^c)`` is the state *entering* slow cycle ``c`` (``h_0`` = the model's
init), ``c = 0..N``; inside cycle ``c`` the inner iterates are ``z_L^{c,0} = z_L^c`` and
``z_L^{c,j+1} = f_L(z_L^{c,j}; z_H^c)``; the model stops at ``j = L`` and ``z_L^{c+1} = z_L^{c,L}``.

Accepted models (the "hierarchical protocol"):

* :class:`loopscope.models.HierarchicalLoopedTransformer` (HRM / TRM presets, zoo ``sudoku4_hrm``);
* HF HRM-Text as :class:`loopscope.models.hrm_text.HrmTextLoops` (``hrm_text_loop(bridge)``) or its
  ``TransformerBridge`` directly;
* any :class:`loopscope.Loop` with state ``[B, 2, *z]`` (slot 0 = z_H, slot 1 = z_L), a method
  ``fast_loop(z_H) -> Loop`` whose ``encode(inputs)`` holds ``z_H [B, *z]`` fixed (keep it in the
  context so that per-sample subsets select it), and ``L_cycles`` (or ``cfg.L_cycles``, or
  ``inner_steps=``) inner steps per slow step.

The analysis runs in float64 by default on a deep copy of the model (the user's model is never
mutated). A sample whose state turns non-finite is flagged (``state_finite``, solver status
``diverged``) and gets NaN in the columns that need it; the rest of the batch carries on.

Example:
    >>> from loopscope import tasks, zoo                                  # doctest: +SKIP
    >>> from loopscope.analysis import hierarchical                      # doctest: +SKIP
    >>> b = tasks.get("sudoku4").sample(8, "id", seed=0)                  # doctest: +SKIP
    >>> res = hierarchical(zoo.load("sudoku4_hrm"), b.tokens, n_cycles=4)  # doctest: +SKIP
    >>> res.summary()[["cycle", "rho_median", "frac_reached", "pr_z_H", "pr_z_L"]]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.solvers import METHODS, solve_map, solver_config
from loopscope.analysis.spectra import spectrum_map
from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.loop import Loop, batch_size_of
from loopscope.core.result import Result, float_summary

__all__ = ["hierarchical", "HierarchicalResult", "participation_ratio"]

STATES = ("z_H", "z_L")

# ---------------------------------------------------------------------------------------------
# participation ratio


def participation_ratio(X: Tensor | np.ndarray) -> float:
    """``(Σλ)² / Σλ²`` of the covariance of the rows of ``X [N, d]`` (1 ≤ PR ≤ min(N − 1, d)).

    Computed without an eigendecomposition: with centred ``Xc``, ``Σλ = ‖Xc‖²_F / (N − 1)`` and
    ``Σλ² = ‖Xc Xcᵀ‖²_F / (N − 1)²`` (the smaller Gram product is used). NaN for fewer than two
    rows, non-finite entries or a zero covariance.

    Example:
        >>> import torch
        >>> participation_ratio(torch.cat([torch.eye(3), -torch.eye(3)]))  # isotropic: d
        3.0
        >>> participation_ratio(torch.arange(5.0)[:, None] * torch.ones(1, 4))  # rank 1
        1.0
    """
    X = torch.as_tensor(X).to(torch.float64)
    if X.dim() != 2:
        raise LoopscopeError(
            f"participation_ratio needs a matrix [N, d], got shape {tuple(X.shape)}"
        )
    if X.shape[0] < 2 or not torch.isfinite(X).all():
        return float("nan")
    Xc = X - X.mean(0, keepdim=True)
    G = Xc @ Xc.T if Xc.shape[0] <= Xc.shape[1] else Xc.T @ Xc
    tr, tr2 = float(torch.trace(G)), float((G * G).sum())
    if not tr2 > 0:
        return float("nan")
    return tr * tr / tr2


# ---------------------------------------------------------------------------------------------
# result


@dataclass(kw_only=True, repr=False)
class HierarchicalResult(Result):
    """Output of :func:`hierarchical` (``N`` cycles, ``B`` samples, ``S`` fast steps per cycle).

    Attributes:
        cycles: one row per (cycle, sample), ``N·B`` rows: ``state_finite``; solver ``status``
            (converged / max_iter / stalled / diverged, or ``skipped`` with ``fixed_points=False``),
            ``converged``, ``reason``, ``iterations``, ``nfe``, ``r_rel`` (relative residual at
            z_L*); ``zstar_norm``; ``dist_start`` / ``dist_start_rel`` and ``dist_end`` /
            ``dist_end_rel`` (‖z_L^{c,0} − z_L*‖ and ‖z_L^{c,L} − z_L*‖, relative to ‖z_L*‖);
            ``inner_residual`` (``‖f_L(z) − z‖ / (‖f_L(z)‖ + 1e-9)`` at the model's
            ``z = z_L^{c,L}``); ``reached`` (converged and ``dist_end_rel ≤ reach_tol``);
            ``contraction`` ((dist_end / dist_start)^{1/L}); ``step_kappa``
            ((‖Δ_S‖ / ‖Δ_1‖)^{1/(S−1)} over the fast steps); ``rho``, ``unstable`` (number of
            |λ| > 1), ``sigma_max`` (NaN unless ``sigma=True``), ``spectrum_method``.
        residuals: long format, one row per (loop, state, cycle, step, sample): ``loop`` "slow"
            (``state`` z_H / z_L, ``step`` −1: the change over the whole cycle c, i.e. from h_c to
            h_{c+1}) or "fast" (``state`` z_L, ``step`` j = 1..S: the change from z_L^{c,j−1} to
            z_L^{c,j}); ``change`` (absolute), ``rel_change`` (divided by the norm of the newer
            state); ``dist_fp_rel`` (fast rows: ‖z_L^{c,j} − z_L*‖ / ‖z_L*‖); ``in_model``
            (j ≤ L: a step the model itself takes).
        participation: one row per (cycle, state): ``participation_ratio`` of the state entering
            cycle c (c = 0..N) for z_H and z_L, and of the fast fixed points ("z_L*", c < N),
            over finite samples; ``n_points``, ``dim``, ``pr_over``.
        spectra: one row per (cycle, sample, rank): top-k eigenvalues of d f_L / d z_L at z_L*
            (``real``, ``imag``, ``modulus``).
        states: ``[N + 1, B, 2, *z]`` slow states h_0..h_N (analysis dtype).
        fixed_points: ``[N, B, *z]`` the fast fixed points z_L*(c) (the solver's best iterate;
            NaN where not solved).
        meta: model, n_cycles, inner_steps (L), fast_steps (S), solver settings, seed, dtype,
            loopscope version, plus the user's ``meta`` (e.g. split).
    """

    cycles: pd.DataFrame
    residuals: pd.DataFrame
    participation: pd.DataFrame
    spectra: pd.DataFrame
    states: Tensor
    fixed_points: Tensor

    def to_frame(self) -> pd.DataFrame:
        """The per-(cycle, sample) table :attr:`cycles`."""
        return self.cycles.copy()

    def summary(self) -> dict[str, float]:
        """Over every (cycle, sample): fractions finite / converged / reached, median rho and
        distance of the model's z_L from z_L* at the end of the cycle."""
        c = self.cycles
        fin = c[c["state_finite"]]
        return float_summary(
            {
                "n_cycles": c["cycle"].nunique(),
                "frac_finite": float(c["state_finite"].mean()),
                "frac_converged": float(c["converged"].mean()),
                "frac_reached": float(c["reached"].mean()),
                "rho_median": float(fin["rho"].median()),
                "dist_end_rel_median": float(fin["dist_end_rel"].median()),
            }
        )

    def residual_summary(self, quantiles: tuple[float, float] = (0.25, 0.75)) -> pd.DataFrame:
        """Median and quantiles of ``rel_change`` (and ``dist_fp_rel``) over finite samples, one row
        per (loop, state, cycle, step)."""
        lo, hi = quantiles
        keys = ["loop", "state", "cycle", "step"]
        g = self.residuals.groupby(keys, sort=True)
        out = g["rel_change"].agg(
            median="median",
            q_low=lambda s: s.quantile(lo),
            q_high=lambda s: s.quantile(hi),
            n="count",
        )
        out["dist_fp_rel_median"] = g["dist_fp_rel"].median()
        out["in_model"] = g["in_model"].all()
        return out.reset_index().assign(q_low_at=lo, q_high_at=hi)

    def per_cycle(self) -> pd.DataFrame:
        """One row per cycle: fractions converged / reached / stable, medians of rho, distances,
        residuals and contraction, slow relative changes, participation ratios."""
        rows = []
        res = self.residuals
        pr = self.participation
        for c, g in self.cycles.groupby("cycle", sort=True):
            fin = g[g["state_finite"]]
            row: dict[str, Any] = {
                "cycle": int(c),
                "n": len(g),
                "frac_finite": float(g["state_finite"].mean()),
                "frac_converged": float(g["converged"].mean()),
                "frac_reached": float(g["reached"].mean()),
                "rho_median": float(fin["rho"].median()),
                "frac_stable": float((fin["rho"].dropna() < 1).mean())
                if fin["rho"].notna().any()
                else math.nan,
                "dist_end_rel_median": float(fin["dist_end_rel"].median()),
                "inner_residual_median": float(fin["inner_residual"].median()),
                "contraction_median": float(fin["contraction"].median()),
            }
            for s in STATES:
                sel = (res["loop"] == "slow") & (res["state"] == s) & (res["cycle"] == c)
                row[f"slow_rel_change_{s}"] = float(res.loc[sel, "rel_change"].median())
            for s in (*STATES, "z_L*"):
                sel = (pr["cycle"] == c) & (pr["state"] == s)
                row[f"pr_{s}"] = (
                    float(pr.loc[sel, "participation_ratio"].iloc[0]) if sel.any() else math.nan
                )
            rows.append(row)
        out = pd.DataFrame(rows)
        for k in ("model", "split", "seed"):
            if k in self.meta:
                out[k] = self.meta[k]
        return out


# ---------------------------------------------------------------------------------------------
# the protocol


@dataclass
class _Hier:
    slow: Loop
    fast_at: Callable[[Tensor], Loop]
    inner_steps: int
    n_slow: int | None
    name: str


def _param_dtype(module: Any) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in getattr(module, "buffers", lambda: [])():
        if b.is_floating_point():
            return b.dtype
    return None


def _inner_steps_of(model: Any) -> int | None:
    for obj in (model, getattr(model, "cfg", None)):
        v = getattr(obj, "L_cycles", None) if obj is not None else None
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _resolve(model: Any, dtype: torch.dtype, inner_steps: int | None) -> _Hier:
    """The slow loop, ``z_H -> fast loop``, inner step count, in the analysis dtype.

    A model adapter that is not one Loop (e.g. ``hrm_text_loop(bridge)``) provides
    ``hierarchical_parts(dtype) -> (slow, fast_at, L, H_cycles or None, name)``.
    """
    parts = getattr(model, "hierarchical_parts", None)
    if callable(parts):
        slow, fast_at, L, n_slow, name = parts(dtype)
        return _Hier(slow, fast_at, inner_steps or int(L), n_slow, str(name))
    if isinstance(model, Loop) and callable(getattr(model, "fast_loop", None)):
        L = inner_steps or _inner_steps_of(model)
        if L is None:
            raise LoopscopeError(
                f"hierarchical() cannot tell how many fast steps {type(model).__name__} takes per "
                "slow step (no L_cycles or cfg.L_cycles): pass inner_steps="
            )
        name = getattr(model, "zoo_name", None) or getattr(
            getattr(model, "cfg", None), "name", type(model).__name__
        )
        if _param_dtype(model) not in (None, dtype):
            model = copy.deepcopy(model).to(dtype)
        slow = model.slow_loop() if callable(getattr(model, "slow_loop", None)) else model
        return _Hier(slow, model.fast_loop, int(L), None, str(name))
    raise LoopscopeError(
        "hierarchical() needs a two-state hierarchical model (HierarchicalLoopedTransformer, "
        "hrm_text_loop(bridge) for an HRM-Text TransformerBridge, or a Loop with state "
        f"[B, 2, ...] and a fast_loop(z_H) method), got {type(model).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# the analysis


@dataclass(frozen=True)
class _Settings:
    """The checked options of one :func:`hierarchical` run (see its docstring)."""

    method: str
    tol: float
    max_iter: int
    solver_options: dict[str, Any]
    start: str
    fixed_points: bool
    spectrum: str
    k: int
    sigma: bool
    fast_steps: int | None
    inner_steps: int | None
    reach_tol: float
    pr_over: str
    seed: int
    dtype: torch.dtype
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LoopscopeError(
                f"unknown solver method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        for key in ("tol", "reach_tol"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise LoopscopeError(f"{key} must be a positive number, got {v!r}")
        check_positive_int("max_iter", self.max_iter)
        check_positive_int("k", self.k)
        if self.fast_steps is not None:
            check_positive_int("fast_steps", self.fast_steps)
        if self.inner_steps is not None:
            check_positive_int("inner_steps", self.inner_steps)
        if not isinstance(self.solver_options, dict):
            raise LoopscopeError(
                f"solver_options must be a dict, got {type(self.solver_options).__name__}"
            )
        choices = {
            "start": ("end", "start"),
            "spectrum": ("auto", "dense", "arpack", "none"),
            "pr_over": ("tokens", "samples"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LoopscopeError(
                    f"{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}"
                )
        if not isinstance(self.meta, dict):
            raise LoopscopeError(f"meta must be a dict, got {type(self.meta).__name__}")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise LoopscopeError(f"seed must be an integer >= 0, got {seed!r}")


def _slow_states(
    h: _Hier, inputs: Any, N: int, init: Tensor | None, seed: int, dtype: torch.dtype
) -> Tensor:
    """``[N + 1, B, 2, *z]``: h_0 (init) and the slow loop's states after each cycle."""
    with torch.no_grad():
        ctx = h.slow.encode(inputs)
        if init is None:
            h0 = h.slow.init_state(ctx, torch.Generator().manual_seed(seed))
        else:
            if not isinstance(init, Tensor):
                raise LoopscopeError(
                    f"init must be a tensor [B, 2, ...], got {type(init).__name__}"
                )
            h0 = init
        h0 = h0.to(dtype)
        if h0.dim() < 3 or h0.shape[1] != 2:
            raise LoopscopeError(
                f"a hierarchical state is [B, 2, ...] = (z_H, z_L); got shape {tuple(h0.shape)}"
            )
        bc = batch_size_of(ctx)
        if bc is not None and bc != h0.shape[0]:
            raise LoopscopeError(f"init has batch {h0.shape[0]} but the inputs have batch {bc}")
        states = [h0]
        for c in range(N):
            states.append(h.slow.step(states[-1], ctx, c).to(dtype))
    return torch.stack(states)


def _finite(x: Tensor) -> Tensor:
    return torch.isfinite(x.flatten(1)).all(1)


def _rel(diff: Tensor, ref: Tensor) -> Tensor:
    """Per-sample ``‖diff‖ / ‖ref‖`` over all but the batch axis (NaN where undefined)."""
    d = diff.flatten(1).norm(dim=1)
    r = ref.flatten(1).norm(dim=1)
    return torch.where(r > 0, d / r.clamp_min(1e-300), torch.full_like(d, math.nan))


def _no_spectra(B: int) -> dict[str, np.ndarray]:
    nan = np.full(B, np.nan)
    return {
        "rho": nan.copy(),
        "unstable": nan.copy(),
        "sigma_max": nan.copy(),
        "spectrum_method": np.array(["none"] * B, dtype=object),
    }


def _spectra(
    fast: Loop, lm: LoopMap, zstar: Tensor, ok: Tensor, o: _Settings, c: int
) -> tuple[dict, list]:
    """rho / unstable / sigma_max per sample and top-k eigenvalue rows, one sample at a time so
    that one failed eigensolve costs one sample."""
    B = zstar.shape[0]
    out = _no_spectra(B)
    method = out["spectrum_method"]
    rows: list[dict] = []
    if o.spectrum == "none":
        return out, rows
    k = min(o.k, lm.n)
    for b in ok.nonzero().flatten().tolist():
        idx = torch.tensor([b])
        sub = LoopMap(
            fast,
            ctx=fast.select(lm.ctx, idx),
            dtype=lm.dtype,
            state_shape=lm.state_shape,
            batch_size=1,
        )
        try:
            sp = spectrum_map(sub, zstar[b : b + 1], k=k, method=o.spectrum, sigma=o.sigma)
        except (RuntimeError, np.linalg.LinAlgError) as err:  # ARPACK / LAPACK failure
            method[b] = f"failed: {type(err).__name__}"
            continue
        out["rho"][b], out["unstable"][b] = sp.rho[0], sp.unstable[0]
        out["sigma_max"][b] = sp.sigma_max[0]
        method[b] = sp.method
        for r, lam in enumerate(sp.eigenvalues[0]):
            rows.append(
                {
                    "cycle": c,
                    "sample": b,
                    "rank": r,
                    "real": float(lam.real),
                    "imag": float(lam.imag),
                    "modulus": float(abs(lam)),
                }
            )
    return out, rows


@dataclass(frozen=True)
class _FastRun:
    """The fast loop of one cycle (z_H held at z_H^c) and its iterates from z_L^c."""

    fast: Loop
    ctx: Any
    iterates: list[Tensor]  # z_L^{c,0} .. z_L^{c,n_fast}
    f_end: Tensor  # f_L(z_L^{c,L}): the fast map at the model's end-of-cycle z_L
    finite: Tensor  # [B] the slow states entering and leaving the cycle are finite


def _run_fast(h: _Hier, inputs: Any, c: int, S: Tensor, n_fast: int) -> _FastRun:
    """Iterate the fast loop of cycle ``c`` and check that it is the slow step's inner loop."""
    L = h.inner_steps
    zH, zL0, zL_model = S[c][:, 0], S[c][:, 1], S[c + 1][:, 1]
    fast = h.fast_at(zH)
    with torch.no_grad():
        fctx = fast.encode(inputs)
        its = [zL0]
        for j in range(max(n_fast, L)):
            its.append(fast.step(its[-1], fctx, j).to(zL0.dtype))
        f_end = fast.step(zL_model, fctx, L)
    fin = _finite(S[c]) & _finite(zL_model)
    # the fast loop must be the slow step's inner loop: catches a wrong inner_steps / protocol
    if fin.any():
        a, b_ = its[L][fin], zL_model[fin]
        err = float((a - b_).abs().max())
        if not err <= 1e-6 * (1.0 + float(b_.abs().max())):
            raise LoopscopeError(
                f"the fast loop does not reproduce the slow step: after {L} fast steps z_L differs "
                f"from the slow state's z_L by {err:.3g} in cycle {c}; pass inner_steps= matching "
                "the model's inner loop"
            )
    return _FastRun(fast, fctx, its[: n_fast + 1], f_end, fin)


@dataclass(frozen=True)
class _FixedPoint:
    """The fast fixed point z_L*(c) per sample, the solver's report and the spectrum there."""

    zstar: Tensor  # [B, *z], NaN where not solved
    status: list[str]
    reason: list[str]
    iterations: np.ndarray
    nfe: np.ndarray
    r_rel: np.ndarray
    spectrum: dict[str, np.ndarray]
    spectrum_rows: list[dict]


def _fixed_point(
    run: _FastRun, z_start: Tensor, z_end: Tensor, o: _Settings, c: int
) -> _FixedPoint:
    """Solve ``z = f_L(z; z_H^c)`` per sample from the model's z_L (``start``), then its spectrum."""
    B, n_z = z_start.shape[0], tuple(z_start.shape[1:])
    if not o.fixed_points:
        nan = np.full(B, np.nan)
        zeros = np.zeros(B, dtype=np.int64)
        zstar = torch.full_like(z_start, math.nan)
        return _FixedPoint(
            zstar=zstar,
            status=["skipped"] * B,
            reason=["fixed_points=False"] * B,
            iterations=zeros,
            nfe=zeros,
            r_rel=nan,
            spectrum=_no_spectra(B),
            spectrum_rows=[],
        )
    lm = LoopMap(run.fast, ctx=run.ctx, dtype=o.dtype, state_shape=n_z, batch_size=B)
    z0 = lm.flatten(z_end if o.start == "end" else z_start)
    method = solver_config(o.method, o.solver_options)
    res = solve_map(lm, z0, method, o.tol, o.max_iter)
    zstar = res.z_best.to(z_start.dtype)
    ok = _finite(zstar)
    zstar = torch.where(ok.view(-1, *[1] * len(n_z)), zstar, torch.full_like(zstar, math.nan))
    spec, spec_rows = _spectra(run.fast, lm, lm.flatten(zstar), ok, o, c)
    return _FixedPoint(
        zstar=zstar,
        status=list(res.status),
        reason=list(res.reason),
        iterations=res.iterations.numpy(),
        nfe=res.nfe.numpy(),
        r_rel=res.r_rel.numpy(),
        spectrum=spec,
        spectrum_rows=spec_rows,
    )


def _power(ratio: np.ndarray, base: np.ndarray, p: float) -> np.ndarray:
    """``ratio ** p`` where ``base > 0``, NaN elsewhere (per-step rates from whole-run ratios)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, ratio**p, np.nan)


def _cycle_rows(
    c: int, run: _FastRun, fp: _FixedPoint, zL_model: Tensor, L: int, reach_tol: float
) -> pd.DataFrame:
    """One row per sample of cycle ``c``: solver report, distances to z_L*, rates, spectrum."""
    its, zstar = run.iterates, fp.zstar
    zL0 = its[0]
    B = zL0.shape[0]
    converged = np.array([s == "converged" for s in fp.status])
    d_start = (zL0 - zstar).flatten(1).norm(dim=1).numpy()
    d_end = (zL_model - zstar).flatten(1).norm(dim=1).numpy()
    d_end_rel = _rel(zL_model - zstar, zstar).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        contraction = _power(d_end / d_start, d_start, 1.0 / L)
    steps = _step_norms(its)
    if len(steps) >= 2:
        first, last = steps[0].numpy(), steps[-1].numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            step_kappa = _power(last / first, first, 1.0 / (len(steps) - 1))
    else:
        step_kappa = np.full(B, np.nan)
    f_end = run.f_end
    inner_res = (f_end - zL_model).flatten(1).norm(dim=1) / (f_end.flatten(1).norm(dim=1) + 1e-9)
    fin = run.finite.numpy()

    def nanif(x: Any) -> np.ndarray:
        return np.where(fin, np.asarray(x, dtype=float), np.nan)

    return pd.DataFrame(
        {
            "cycle": c,
            "sample": np.arange(B),
            "state_finite": fin,
            "status": fp.status,
            "converged": converged,
            "reason": fp.reason,
            "iterations": fp.iterations,
            "nfe": fp.nfe,
            "r_rel": fp.r_rel,
            "zstar_norm": zstar.flatten(1).norm(dim=1).numpy(),
            "dist_start": nanif(d_start),
            "dist_start_rel": nanif(_rel(zL0 - zstar, zstar)),
            "dist_end": nanif(d_end),
            "dist_end_rel": nanif(d_end_rel),
            "inner_residual": nanif(inner_res),
            "reached": converged & fin & (np.nan_to_num(d_end_rel, nan=np.inf) <= reach_tol),
            "contraction": nanif(contraction),
            "step_kappa": nanif(step_kappa),
            **fp.spectrum,
        }
    )


def _step_norms(its: list[Tensor]) -> Tensor:
    """``[len(its) - 1, B]``: ‖z^{j} − z^{j−1}‖ per fast step."""
    return torch.stack([(its[j] - its[j - 1]).flatten(1).norm(dim=1) for j in range(1, len(its))])


def _fast_rows(c: int, its: list[Tensor], zstar: Tensor, L: int) -> pd.DataFrame:
    """Residual-curve rows of the fast loop in cycle ``c``, one per (step, sample)."""
    B = its[0].shape[0]
    steps = _step_norms(its)
    frames = [
        pd.DataFrame(
            {
                "loop": "fast",
                "state": "z_L",
                "cycle": c,
                "step": j,
                "sample": np.arange(B),
                "change": steps[j - 1].numpy(),
                "rel_change": _rel(its[j] - its[j - 1], its[j]).numpy(),
                "dist_fp_rel": _rel(its[j] - zstar, zstar).numpy(),
                "in_model": j <= L,
            }
        )
        for j in range(1, len(its))
    ]
    return pd.concat(frames, ignore_index=True)


def _slow_rows(S: Tensor) -> pd.DataFrame:
    N, B = S.shape[0] - 1, S.shape[1]
    frames = []
    for k, state in enumerate(STATES):
        X = S[:, :, k]
        for c in range(N):
            frames.append(
                pd.DataFrame(
                    {
                        "loop": "slow",
                        "state": state,
                        "cycle": c,
                        "step": -1,
                        "sample": np.arange(B),
                        "change": (X[c + 1] - X[c]).flatten(1).norm(dim=1).numpy(),
                        "rel_change": _rel(X[c + 1] - X[c], X[c + 1]).numpy(),
                        "dist_fp_rel": np.nan,
                        "in_model": True,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _pr_rows(S: Tensor, zstars: Tensor, pr_over: str) -> pd.DataFrame:
    rows = []

    def one(c: int, state: str, X: Tensor) -> None:
        X = X[_finite(X)]
        M = X.reshape(-1, X.shape[-1]) if pr_over == "tokens" else X.flatten(1)
        rows.append(
            {
                "cycle": c,
                "state": state,
                "participation_ratio": participation_ratio(M) if len(M) else math.nan,
                "n_points": int(M.shape[0]),
                "dim": int(M.shape[1]),
                "pr_over": pr_over,
            }
        )

    for c in range(S.shape[0]):
        for k, state in enumerate(STATES):
            one(c, state, S[c][:, k])
        if c < len(zstars):
            one(c, "z_L*", zstars[c])
    return pd.DataFrame(rows)


@did_you_mean
def hierarchical(
    model: Any,
    inputs: Any,
    n_cycles: int | None = None,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int = 200,
    solver_options: dict[str, Any] | None = None,
    start: str = "end",
    fixed_points: bool = True,
    spectrum: str = "auto",
    k: int = 6,
    sigma: bool = False,
    fast_steps: int | None = None,
    inner_steps: int | None = None,
    reach_tol: float = 1e-3,
    pr_over: str = "tokens",
    init: Tensor | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    meta: dict[str, Any] | None = None,
) -> HierarchicalResult:
    """Fast-loop fixed points and spectra inside each slow cycle, residual curves across cycles
    and inner steps, participation ratio of each state (see the module docstring).

    Args:
        model: a hierarchical model: ``HierarchicalLoopedTransformer`` (HRM/TRM),
            ``hrm_text_loop(bridge)`` (any adapter with ``hierarchical_parts(dtype)``), or a Loop
            following the protocol in the module docstring. Never mutated (the analysis dtype
            runs on a deep copy).
        inputs: what the slow loop's ``encode`` takes (token ids ``[B, pos]``).
        n_cycles: slow cycles ``N`` to unroll (None: the model's own ``H_cycles`` where it has
            one, else 8).
        method: fast fixed-point solver (see :func:`~loopscope.analysis.solve`).
        tol: solver tolerance on the relative residual (None: 1e-10 in float64, 1e-5 in float32).
        max_iter: solver iterations.
        solver_options: extra solver options as a dict (e.g. ``{"m": 5}`` for Anderson).
        start: solver seed, ``"end"`` (the model's z_L after its inner loop) or ``"start"`` (z_L
            entering the cycle).
        fixed_points: solve and take spectra; False gives only the curves and PRs.
        spectrum: Jacobian spectrum at z_L*: ``"auto"`` (dense for n ≤ 2048, else ARPACK) |
            ``"dense"`` | ``"arpack"`` | ``"none"``.
        k: eigenvalues kept.
        sigma: also sigma_max.
        fast_steps: fast steps recorded per cycle for the residual curves (None: the model's L;
            more continues the inner loop past what the model does, marked ``in_model``).
        inner_steps: the model's fast steps per slow step L (None: from the model).
        reach_tol: ``dist_end_rel`` at or below which the inner loop "reached" z_L*.
        pr_over: participation ratio over ``"tokens"`` (rows = samples × positions, features =
            d) or ``"samples"`` (rows = samples, features = the flattened state).
        init: start state ``[B, 2, *z]`` (None: the model's init with generator ``seed``).
        seed: seed of the init generator.
        dtype: analysis dtype (torch.float64 or torch.float32).
        meta: dict stored in ``result.meta`` (e.g. ``{"split": "ood"}``).

    Returns:
        :class:`HierarchicalResult` with ``cycles`` (N·B rows), ``residuals`` (long),
        ``participation`` ((N+1)·2 + N rows), ``spectra``, ``states [N+1, B, 2, *z]``,
        ``fixed_points [N, B, *z]``; ``per_cycle()`` is the one-row-per-cycle table.

    Raises:
        LoopscopeError: a non-hierarchical model, ``n_cycles < 1``, an unknown option or a bad
            option value, a state that is not ``[B, 2, ...]``, or a fast loop that does not
            reproduce the slow step's inner loop.

    Example:
        >>> from loopscope import tasks, zoo                               # doctest: +SKIP
        >>> b = tasks.get("sudoku4").sample(4, "id", seed=0)               # doctest: +SKIP
        >>> res = hierarchical(zoo.load("sudoku4_hrm"), b.tokens, 3)        # doctest: +SKIP
        >>> res.cycles[["cycle", "sample", "status", "rho", "dist_end_rel", "reached"]]  # doctest: +SKIP
    """
    if n_cycles is not None:
        check_positive_int("n_cycles", n_cycles)
    if dtype not in (torch.float64, torch.float32):
        raise LoopscopeError(f"dtype must be torch.float64 or torch.float32, got {dtype!r}")
    o = _Settings(
        method=method,
        tol=(1e-10 if dtype == torch.float64 else 1e-5) if tol is None else tol,
        max_iter=max_iter,
        solver_options=solver_options or {},
        start=start,
        fixed_points=fixed_points,
        spectrum=spectrum,
        k=k,
        sigma=sigma,
        fast_steps=fast_steps,
        inner_steps=inner_steps,
        reach_tol=reach_tol,
        pr_over=pr_over,
        seed=seed,
        dtype=dtype,
        meta={} if meta is None else meta,
    )
    h = _resolve(model, dtype, o.inner_steps)
    N = n_cycles if n_cycles is not None else (h.n_slow or 8)
    n_fast = o.fast_steps or h.inner_steps
    S = _slow_states(h, inputs, N, init, o.seed, dtype)

    cycles, fast_frames, spec_rows, zstars = [], [], [], []
    for c in range(N):
        run = _run_fast(h, inputs, c, S, n_fast)
        fp = _fixed_point(run, S[c][:, 1], S[c + 1][:, 1], o, c)
        cycles.append(_cycle_rows(c, run, fp, S[c + 1][:, 1], h.inner_steps, o.reach_tol))
        fast_frames.append(_fast_rows(c, run.iterates, fp.zstar, h.inner_steps))
        spec_rows.extend(fp.spectrum_rows)
        zstars.append(fp.zstar)

    return _assemble(h, o, S, torch.stack(zstars), cycles, fast_frames, spec_rows, n_fast)


def _assemble(
    h: _Hier,
    o: _Settings,
    S: Tensor,
    Z: Tensor,
    cycles: list[pd.DataFrame],
    fast_frames: list[pd.DataFrame],
    spec_rows: list[dict],
    n_fast: int,
) -> HierarchicalResult:
    """The per-cycle frames, residual curves, participation ratios and meta as one result."""
    from loopscope import __version__

    meta = {
        "model": h.name,
        "n_cycles": S.shape[0] - 1,
        "inner_steps": h.inner_steps,
        "fast_steps": n_fast,
        "method": o.method,
        "tol": o.tol,
        "start": o.start,
        "reach_tol": o.reach_tol,
        "seed": o.seed,
        "dtype": str(o.dtype).replace("torch.", ""),
        "loopscope_version": __version__,
        **o.meta,
    }
    spectra = pd.DataFrame(
        spec_rows, columns=["cycle", "sample", "rank", "real", "imag", "modulus"]
    )
    return HierarchicalResult(
        cycles=pd.concat(cycles, ignore_index=True),
        residuals=pd.concat([_slow_rows(S), *fast_frames], ignore_index=True),
        participation=_pr_rows(S, Z, o.pr_over),
        spectra=spectra,
        states=S,
        fixed_points=Z,
        meta=meta,
    )
