"""Fixed-point census (successor of FixedPointFinder) and IFT input sensitivity.

:func:`find_fixed_points` runs a solver in float64 from many seeds **per input sample** — by
default the ``capture`` solver (:mod:`~loopscope.analysis.fixed_point_capture`: Adam warm start,
chord-Newton capture by points already found, Levenberg–Marquardt on q = ½‖f(h) − h‖² for representatives and
the rest) for 32 ≤ n ≤ 1024 and ≥ 32 seeds, per-seed LM otherwise — then

1. classifies every seed's end point, never merging classes:
   ``fixed`` (r_rel < ``q_tol_rel``: :func:`~loopscope.analysis.solvers.is_converged`, the test
   and the default ``CONVERGED_R_REL = 1e-6`` of ``solve``, so a point ``solve`` calls converged
   is fixed here), ``slow`` (r_rel ∈ [q_tol_rel, slow_tol_rel]: the solver stopped at a local
   minimum of q or ran out of budget — ``rel_grad`` in :meth:`seeds_frame` tells the two apart)
   or ``non-converged`` (everything else, diverged included);
   r_rel = ‖f(h) − h‖ / (‖f(h)‖ + 1e-9). A stricter census (``q_tol_rel=1e-10``) calls the
   points between the two thresholds slow;
2. de-duplicates fixed and slow points separately, per input sample, by single-linkage clustering
   at a scale-aware radius ``unique_tol`` (default 1e-3·(1 + max‖h‖) over that sample's points)
   with ``scipy.spatial.cKDTree.query_pairs`` and connected components (union-find) — O(S log S),
   not O(S²); the lowest-q member represents a cluster and the cluster size is its multiplicity
   (a crude basin weight);
3. per unique point: Jacobian spectrum (:func:`~loopscope.analysis.spectra.spectrum`; stable iff
   ρ < 1, unstable dimension = #|λ| > 1), decoded output ``loop.decode(h*)`` and optionally the
   input sensitivity ‖dh*/dx‖_F.

Seeds (``seeds=``): a tensor ``[S, *state]`` (the same seeds for every input sample), a tensor
``[B, S, *state]`` (per input sample), or an int S: FixedPointFinder-style seeds — states visited
by a naive-iteration trajectory from ``loop.init_state`` (``traj_steps`` steps, 8 random inits per
sample) plus Gaussian noise of ``noise`` × the RMS of the visited states.

:func:`input_sensitivity` is dh*/dx = (I − J)⁻¹ ∂f/∂x by the implicit function theorem, with x a
tensor of the *encoded context* (the input injection held fixed across iterations), dense solve
for n ≤ ``dense_max`` or batched GMRES with jvps.

Long censuses report progress: the first batch of seeds is solved and timed, the total is
extrapolated from it (``census.meta["estimated_s"]``, next to ``wall_time``), and ``progress=``
shows a bar (True), calls ``fn(info)`` with ``{"stage", "done", "total", "elapsed_s",
"estimated_s"}`` (a callable), or (None, default) shows the bar only on a terminal and when the
estimate exceeds 30 s.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    >>> seeds = torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    >>> census = find_fixed_points(loop, None, seeds)
    >>> sorted(round(float(v), 6) for v in census.points.flatten())
    [-0.957504, 0.0, 0.957504]
    >>> census.to_frame()["stable"].tolist().count(True)
    2
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch import Tensor

from loopscope.analysis.fixed_point_capture import Capture, capture_solve
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.solvers import (
    CONVERGED_R_REL,
    LM,
    METHODS,
    SolverConfig,
    SolveResult,
    batched_gmres,
    is_converged,
    solve_map,
    solver_config,
)
from loopscope.analysis.spectra import spectrum_map
from loopscope.core.errors import LoopscopeError, check_positive_int, check_seed, did_you_mean
from loopscope.core.loop import Loop, batch_size_of
from loopscope.core.result import Result, float_summary, result_meta

__all__ = ["find_fixed_points", "FixedPointCensus", "input_sensitivity", "Sensitivity"]

_KINDS = ("fixed", "slow", "non-converged")
SEED_TOL = 1e-3  # seeds are solved to SEED_TOL x min(q_tol_rel, 1e-10)


@dataclass(kw_only=True, repr=False)
class FixedPointCensus(Result):
    """Unique fixed and slow points of every input sample, and what each seed did.

    Attributes:
        points: ``[P, *state]`` unique representatives (float64), all input samples together.
        sample: ``[P]`` input sample of each point; ``kind``: ``fixed`` | ``slow``.
        q, r_rel: ``[P]`` speed ½‖f(h) − h‖² and relative residual at each point.
        multiplicity: ``[P]`` seeds that ended in the point's cluster.
        rho, unstable_dim: ``[P]`` spectral radius of J(h*) and #|λ| > 1 (NaN / −1 if spectra
            were not computed); ``eigenvalues``: per point, complex eigenvalues by modulus;
            ``spectrum_status``: per point, which eigen-solver path ran (or why it failed).
        decoded: ``[P, ...]`` ``loop.decode`` at each point (None if ``decode=False``).
        sensitivity: ``[P]`` ‖dh*/dx‖_F (None unless ``sensitivity=True``).
        seed_class: ``[B, S]`` ``fixed | slow | non-converged`` per seed.
        seed_point: ``[B, S]`` index into ``points`` (−1 for non-converged seeds).
        seed_r_rel, seed_rel_grad: ``[B, S]`` residual and relative gradient
            ‖∇q‖/((1 + ‖J‖_F/√n)‖g‖) at each seed's end point (≈ 0 at a local minimum of q).
        end_states: ``[B, S, *state]``.
        solve: the :class:`SolveResult` of all ``B·S`` seeds (seed-major within a sample).
    """

    points: Tensor
    sample: np.ndarray
    kind: list[str]
    q: np.ndarray
    r_rel: np.ndarray
    multiplicity: np.ndarray
    rho: np.ndarray
    unstable_dim: np.ndarray
    eigenvalues: list[np.ndarray]
    spectrum_status: list[str]
    decoded: Tensor | None
    sensitivity: np.ndarray | None
    seed_class: np.ndarray
    seed_point: np.ndarray
    seed_r_rel: np.ndarray
    seed_rel_grad: np.ndarray
    end_states: Tensor
    solve: SolveResult

    @property
    def stable(self) -> np.ndarray:
        """``[P]`` bool, ρ(J(h*)) < 1."""
        return np.asarray(self.rho) < 1.0

    def select(self, b: int = 0, kind: str = "fixed") -> Tensor:
        """Unique points of input sample ``b`` of one kind, ``[p, *state]``."""
        if kind not in _KINDS[:2]:
            raise LoopscopeError(f"kind must be 'fixed' or 'slow', got {kind!r}")
        keep = [i for i in range(len(self.kind)) if self.sample[i] == b and self.kind[i] == kind]
        return self.points[keep]

    def counts(self) -> pd.DataFrame:
        """Seeds per class and unique points per kind, one row per input sample."""
        rows = []
        for b in range(self.seed_class.shape[0]):
            row = {"sample": b}
            for c in _KINDS:
                row[f"seeds_{c}"] = int((self.seed_class[b] == c).sum())
            for c in _KINDS[:2]:
                row[f"unique_{c}"] = int(
                    sum(1 for i, k in enumerate(self.kind) if k == c and self.sample[i] == b)
                )
            rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per unique point."""
        P = len(self.kind)
        flat = self.points.reshape(P, -1)
        df = pd.DataFrame(
            {
                "sample": self.sample,
                "point": np.arange(P),
                "kind": self.kind,
                "multiplicity": self.multiplicity,
                "q": self.q,
                "r_rel": self.r_rel,
                "norm": flat.norm(dim=1).numpy() if P else np.zeros(0),
                "rho": self.rho,
                "stable": self.stable,
                "unstable_dim": self.unstable_dim,
                "spectrum_status": self.spectrum_status,
            }
        )
        if self.decoded is not None and self.decoded.dim() >= 2 and self.decoded.shape[-1] > 1:
            ans = self.decoded.argmax(-1).reshape(P, -1)
            df["answer"] = [tuple(a.tolist()) if a.numel() > 1 else int(a) for a in ans]
        if self.sensitivity is not None:
            df["sensitivity"] = self.sensitivity
        for k in ("model", "split", "seed"):
            if self.meta.get(k) is not None:
                df[k] = self.meta[k]
        return df

    def summary(self) -> dict[str, float]:
        """Unique points per kind, stable points, and the seeds' class fractions."""
        kinds = np.asarray(self.kind, dtype=object)
        fixed = kinds == "fixed"
        out: dict[str, Any] = {
            "n_points": len(self.kind),
            "n_fixed": int(fixed.sum()),
            "n_slow": int((kinds == "slow").sum()),
            "n_stable_fixed": int((fixed & self.stable).sum()),
        }
        for c in _KINDS:
            out[f"seeds_{c.replace('-', '_')}_fraction"] = float((self.seed_class == c).mean())
        return float_summary(out)

    def seeds_frame(self) -> pd.DataFrame:
        """One row per (input sample, seed)."""
        B, S = self.seed_class.shape
        st = np.asarray(self.solve.status, dtype=object).reshape(B, S)
        return pd.DataFrame(
            {
                "sample": np.repeat(np.arange(B), S),
                "seed": np.tile(np.arange(S), B),
                "class": self.seed_class.reshape(-1),
                "point": self.seed_point.reshape(-1),
                "r_rel": self.seed_r_rel.reshape(-1),
                "rel_grad": self.seed_rel_grad.reshape(-1),
                "solver_status": st.reshape(-1),
                "nfe": self.solve.nfe.numpy(),
                "n_jvp": self.solve.n_jvp.numpy(),
            }
        )


# ---------------------------------------------------------------------------------------------


def _cluster(X: np.ndarray, q: np.ndarray, tol: float) -> list[np.ndarray]:
    """Single-linkage clusters at radius ``tol`` (KD-tree pairs + connected components); each
    cluster's members sorted by q, lowest first."""
    if len(X) == 0:
        return []
    pairs = cKDTree(X).query_pairs(r=tol, output_type="ndarray")
    adj = coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else ([], ([], [])),
        shape=(len(X), len(X)),
    )
    n_comp, labels = connected_components(adj, directed=False)
    out = []
    for c in range(n_comp):
        members = np.nonzero(labels == c)[0]
        out.append(members[np.argsort(q[members], kind="stable")])
    # deterministic order: by the representative's coordinates
    out.sort(key=lambda mem: tuple(np.round(X[mem[0]], 12)))
    return out


def _concat(results: list[SolveResult]) -> SolveResult:
    if len(results) == 1:
        return results[0]
    r0 = results[0]

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(r, name) for r in results])

    def lst(name: str) -> list:
        return [x for r in results for x in getattr(r, name)]

    return SolveResult(
        z_last=cat("z_last"),
        z_best=cat("z_best"),
        nfe=cat("nfe"),
        n_jvp=cat("n_jvp"),
        n_vjp=cat("n_vjp"),
        iterations=cat("iterations"),
        status=lst("status"),
        reason=lst("reason"),
        r_rel=cat("r_rel"),
        r_abs=cat("r_abs"),
        r_rel_last=cat("r_rel_last"),
        kappa=cat("kappa"),
        best_is_last=cat("best_is_last"),
        residuals=lst("residuals"),
        residuals_abs=lst("residuals_abs"),
        method=r0.method,
        tol=r0.tol,
        wall_time=sum(r.wall_time for r in results),
        meta=dict(r0.meta),
    )


def _seeds_from_int(m: LoopMap, S: int, seed: int, noise: float, traj_steps: int) -> Tensor:
    """FixedPointFinder-style seeds ``[B, S, n]``: visited trajectory states + noise."""
    n_traj = min(S, 8)
    gen = torch.Generator().manual_seed(seed)
    try:
        starts = [m.init(gen) for _ in range(n_traj)]  # each [B, n]
    except (NotImplementedError, LoopscopeError) as e:
        raise LoopscopeError(
            "seeds=int needs loop.init_state; pass seeds as a tensor [S, *state] instead"
        ) from e
    z = torch.stack(starts, 1).reshape(m.B * n_traj, m.n)
    idx = torch.arange(m.B).repeat_interleave(n_traj)
    visited = [z]
    for _ in range(traj_steps):
        z = m.f(z, idx)
        z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        visited.append(z)
    V = torch.stack(visited, 1).reshape(m.B, n_traj * (traj_steps + 1), m.n)
    rms = V.pow(2).mean((1, 2)).sqrt().clamp_min(1e-12)  # [B]
    pick = torch.randint(0, V.shape[1], (m.B, S), generator=gen)
    base = torch.gather(V, 1, pick[:, :, None].expand(m.B, S, m.n))
    eps = torch.randn(m.B, S, m.n, generator=gen, dtype=V.dtype)
    return base + noise * rms[:, None, None] * eps


def _check_census_args(
    q_tol_rel: Any, slow_tol_rel: Any, unique_tol: Any, max_iter: Any, seed: Any
) -> None:
    for name, v in (("q_tol_rel", q_tol_rel), ("slow_tol_rel", slow_tol_rel)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise LoopscopeError(f"{name} must be a positive number, got {v!r}")
    if slow_tol_rel < q_tol_rel:
        raise LoopscopeError(
            f"slow_tol_rel ({slow_tol_rel!r}) must be >= q_tol_rel ({q_tol_rel!r})"
        )
    if unique_tol is not None and not (
        isinstance(unique_tol, (int, float)) and not isinstance(unique_tol, bool) and unique_tol > 0
    ):
        raise LoopscopeError(f"unique_tol must be a positive number, got {unique_tol!r}")
    check_positive_int("max_iter", max_iter)
    check_seed(seed)


def _census_method(method: Any) -> str | SolverConfig:
    """``method`` as ``"auto"``, a :class:`Capture` or a solver config (validated)."""
    if isinstance(method, Capture) or method == "capture":
        return Capture() if method == "capture" else method
    if isinstance(method, str) and method not in METHODS:
        raise LoopscopeError(
            f"unknown solver method {method!r}; choose one of capture, {', '.join(METHODS)}"
        )
    if not isinstance(method, (str, SolverConfig)):
        raise LoopscopeError(
            f"method must be a method name or a solver config, got {type(method).__name__}"
        )
    return solver_config(method)


def _int_seeds(
    loop: Loop, inputs: Any, S: int, t: int | None, seed: int, noise: float, traj_steps: int,
    dtype: torch.dtype,
) -> tuple[LoopMap, Tensor]:  # fmt: skip
    check_positive_int("seeds", S)
    try:
        m0 = LoopMap(loop, inputs, t=t, dtype=dtype)
    except (NotImplementedError, LoopscopeError) as e:
        raise LoopscopeError(
            "seeds=int needs loop.init_state; pass seeds as a tensor [S, *state] instead"
        ) from e
    return m0, _seeds_from_int(m0, S, seed, float(noise), int(traj_steps))


def _tensor_seeds(
    loop: Loop, inputs: Any, seeds: Tensor, t: int | None, state_shape: Any, dtype: torch.dtype
) -> tuple[LoopMap, Tensor]:
    """The map and ``[B, S, n]`` seeds from ``[S, *state]`` or ``[B, S, *state]`` tensors."""
    ctx_b = None
    try:
        m0 = LoopMap(loop, inputs, t=t, state_shape=state_shape, dtype=dtype)
        state_shape, ctx_b = m0.state_shape, m0.B
    except (NotImplementedError, LoopscopeError):
        m0 = None  # no init_state: the batch size comes from the context below
        if state_shape is not None:
            state_shape = tuple(state_shape)
            probe = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=1, dtype=dtype)
            ctx_b = batch_size_of(probe.ctx) if probe._has_batch_ctx else 1
    if state_shape is not None and tuple(seeds.shape[2:]) == state_shape and seeds.dim() >= 2:
        if seeds.shape[0] != ctx_b:
            raise LoopscopeError(
                f"per-sample seeds have {seeds.shape[0]} samples but the inputs have {ctx_b}"
            )
        per_sample = True
    elif state_shape is None or tuple(seeds.shape[1:]) == state_shape:
        per_sample = False
        state_shape = tuple(seeds.shape[1:])
    else:
        raise LoopscopeError(
            f"seeds of shape {tuple(seeds.shape)} match neither [S, *state] nor "
            f"[B, S, *state] for state shape {state_shape}"
        )
    if m0 is None:
        probe = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=1, dtype=dtype)
        B = batch_size_of(probe.ctx) if probe._has_batch_ctx else 1
        m0 = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=B, dtype=dtype)
    B = m0.B
    seeds = seeds.to(m0.dtype or seeds.dtype)
    if per_sample:
        return m0, seeds.reshape(B, -1, m0.n)
    return m0, seeds.reshape(1, -1, m0.n).expand(B, -1, m0.n)


class CensusProgress:
    """Progress of one census: ``start(total)``, ``done(n, stage)``; the first batch's time gives
    the estimate. ``progress``: True (a rich bar on stderr), a callable ``fn(info)``, False, or
    None (a bar only on a terminal and when the estimate exceeds ``show_after`` seconds)."""

    def __init__(self, progress: Any, show_after: float = 30.0) -> None:
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise LoopscopeError(
                f"progress must be True, False, None or a callable fn(info), got {progress!r}"
            )
        self.progress = progress
        self.show_after = show_after
        self.t0 = time.perf_counter()
        self.total = 0
        self.n = 0
        self.estimated_s: float | None = None
        self._bar: Any = None
        self._task: Any = None

    def start(self, total: int) -> None:
        self.total = total
        self.t0 = time.perf_counter()

    def done(self, n: int, stage: str = "solve") -> None:
        self.n += n
        elapsed = time.perf_counter() - self.t0
        if self.estimated_s is None and self.n < self.total:
            self.estimated_s = elapsed * self.total / max(1, self.n)
            if self.progress is True or (
                self.progress is None and self.estimated_s > self.show_after and sys.stderr.isatty()
            ):
                self._open()
        info = {
            "stage": stage,
            "done": self.n,
            "total": self.total,
            "elapsed_s": elapsed,
            "estimated_s": self.estimated_s,
        }
        if callable(self.progress) and not isinstance(self.progress, bool):
            self.progress(info)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.n, description=f"census: {stage}")

    def _open(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} seeds"),
            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self._bar.start()
        self._task = self._bar.add_task(
            f"census (estimated {self.estimated_s:.0f} s)", total=self.total, completed=self.n
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _batches(total: int, chunk: int) -> list[tuple[int, int]]:
    """Seed ranges: a small first batch (about 1/8 of the seeds) whose time gives the estimate,
    then ``chunk``-sized ones."""
    first = min(chunk, max(1, -(-total // 8))) if total > 1 else total
    out, s0 = [(0, first)], first
    while s0 < total:
        out.append((s0, min(total, s0 + chunk)))
        s0 = out[-1][1]
    return out


def _solve_seeds(
    m0: LoopMap,
    Z: Tensor,
    method: str | SolverConfig,
    tol: float,
    max_iter: int,
    chunk: int,
    progress: CensusProgress,
) -> tuple[SolveResult, str]:
    """Every seed solved (one virtual sample per (input sample, seed)); the resolved method.

    The seeds go in batches whose results are concatenated in seed order: per-seed methods in
    :func:`_batches`, capture per input sample first (input 0, timed, then the rest together:
    capture shares points only within an input sample)."""
    B, S, n = Z.shape
    # the context is replicated per seed by select()
    owner = torch.arange(B).repeat_interleave(S)
    if method == "auto":
        # capture pays once the O(n³) LM iteration dominates and seeds outnumber the points
        # they end at; tiny states or few seeds are cheaper (and keep every seed's own LM basin)
        # with LM per seed
        method = Capture() if 32 <= n <= Capture().dense_max and S >= 32 else LM()
    flat = Z.reshape(B * S, n)
    progress.start(B * S)
    if isinstance(method, Capture):
        parts = [(0, S), (S, B * S)] if B > 1 else [(0, B * S)]
        results = []
        for s0, s1 in parts:
            own = owner[s0:s1]
            results.append(
                capture_solve(
                    m0.subset(own), flat[s0:s1].clone(), own, tol, max_iter, config=method
                )
            )
            progress.done(s1 - s0, "capture")
        return _concat(results), "capture"
    results = []
    for s0, s1 in _batches(B * S, chunk):
        mc = m0.subset(owner[s0:s1])
        results.append(solve_map(mc, flat[s0:s1], method, tol, max_iter))
        progress.done(s1 - s0, method.name)
    return _concat(results), method.name


def _classify(r_rel: np.ndarray, q_tol_rel: float, slow_tol_rel: float) -> np.ndarray:
    """``fixed | slow | non-converged`` per seed from its end point's r_rel."""
    finite = np.isfinite(r_rel)
    cls = np.full(r_rel.shape, "non-converged", dtype=object)
    cls[finite & (r_rel <= slow_tol_rel)] = "slow"
    cls[finite & is_converged(r_rel, q_tol_rel)] = "fixed"  # solve's own test
    return cls


@dataclass
class _Unique:
    rep_idx: list[int]
    kind: list[str]
    sample: list[int]
    mult: list[int]
    seed_point: np.ndarray


def _unique_points(
    endsn: np.ndarray, cls: np.ndarray, r_rel: np.ndarray, unique_tol: float | None
) -> _Unique:
    """De-duplicate fixed and slow end points per input sample and kind (``endsn [B, S, n]``)."""
    B, S, _ = endsn.shape
    u = _Unique([], [], [], [], np.full((B, S), -1, dtype=np.int64))
    for b in range(B):
        for kind in ("fixed", "slow"):
            sel = np.nonzero(cls[b] == kind)[0]
            if len(sel) == 0:
                continue
            X = endsn[b, sel]
            tol = (
                unique_tol
                if unique_tol is not None
                else 1e-3 * (1.0 + float(np.linalg.norm(X, axis=1).max()))
            )
            for members in _cluster(X, r_rel[b, sel], tol):
                u.seed_point[b, sel[members]] = len(u.rep_idx)
                u.rep_idx.append(b * S + int(sel[members[0]]))
                u.kind.append(kind)
                u.sample.append(b)
                u.mult.append(len(members))
    return u


def _point_properties(
    m0: LoopMap, pts: Tensor, psample: np.ndarray, *, spectra: bool, k: int | None,
    spectrum_method: str, decode: bool, sensitivity: bool, wrt: Any,
) -> dict[str, Any]:  # fmt: skip
    """Spectrum, decoded output and input sensitivity at each unique point ``pts [P, n]``."""
    P = pts.shape[0]
    out: dict[str, Any] = {
        "rho": np.full(P, np.nan),
        "unstable_dim": np.full(P, -1, dtype=np.int64),
        "eigenvalues": [np.zeros(0, dtype=complex) for _ in range(P)],
        "spectrum_status": ["not computed"] * P,
        "decoded": None,
        "sensitivity": None,
    }
    if not P:
        return out
    mp = m0.subset(torch.as_tensor(psample))
    if spectra:
        # one spectrum call per input sample: a sample's numbers never depend on the others'
        for b in np.unique(psample).tolist():
            sel = np.nonzero(psample == b)[0]
            idx = torch.as_tensor(sel)
            sp = spectrum_map(mp.subset(idx), pts[idx], k=k, method=spectrum_method, sigma=False)
            out["rho"][sel] = sp.rho
            out["unstable_dim"][sel] = sp.unstable
            for i, j in enumerate(sel.tolist()):
                out["eigenvalues"][j] = sp.eigenvalues[i]
                out["spectrum_status"][j] = sp.status[i] if sp.status[i] != "ok" else sp.path[i]
    if decode:
        out["decoded"] = mp.decode(pts)
    if sensitivity:
        dh = _sensitivity_map(mp, pts, wrt, None, "auto", 1e-12, 2048)
        out["sensitivity"] = dh.reshape(P, -1).norm(dim=1).numpy()
    return out


@did_you_mean
def find_fixed_points(
    loop: Loop,
    inputs: Any,
    seeds: Tensor | int,
    method: str | SolverConfig = "auto",
    q_tol_rel: float = CONVERGED_R_REL,
    slow_tol_rel: float = 1e-3,
    unique_tol: float | None = None,
    *,
    max_iter: int = 100,
    seed: int = 0,
    noise: float = 0.5,
    traj_steps: int = 50,
    spectra: bool = True,
    k: int | None = None,
    spectrum_method: str = "auto",
    decode: bool = True,
    sensitivity: bool = False,
    wrt: Any = None,
    t: int | None = None,
    chunk: int | None = None,
    state_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool | Callable[[dict], None] | None = None,
) -> FixedPointCensus:
    """Census of fixed and slow points of ``h ↦ f(h; x)`` for every input sample.

    Args:
        loop: a :class:`loopscope.Loop`; analysed in float64 on a copy.
        inputs: inputs for ``loop.encode`` (``None`` for autonomous maps); B input samples.
        seeds: ``[S, *state]`` shared seeds, ``[B, S, *state]`` per-sample seeds, or an int S.
        method: ``auto`` (default: ``capture`` for 32 ≤ n ≤ 1024 state numbers and at least
            32 seeds per input, ``lm`` otherwise), ``capture`` or a :class:`Capture` config (warm
            start, chord-Newton capture by known points, LM for the rest: see
            :mod:`~loopscope.analysis.fixed_point_capture`), or any :func:`~loopscope.analysis.solve`
            method name or config run per seed (``lm``, ``LM(mu0=1.0)``, ``newton_krylov``, …).
            Seeds are solved to r_rel < 1e-3·min(q_tol_rel, 1e-10).
        q_tol_rel: r_rel below which an end point is a fixed point: ``solve``'s test and
            default (``CONVERGED_R_REL`` = 1e-6); 1e-10 for a strict float64 census.
        slow_tol_rel: upper r_rel of a slow point.
        unique_tol: clustering radius (default 1e-3·(1 + max‖h‖) per sample and kind).
        max_iter: solver iterations per seed.
        seed: seed of the int-seeds generator (trajectory starts and noise).
        noise: noise scale of int seeds, relative to the RMS of the visited states.
        traj_steps: naive-iteration steps whose visited states seed an int census.
        spectra: compute the Jacobian spectrum at every unique point.
        k: eigenvalues kept per point (passed to the spectrum).
        spectrum_method: ``auto | dense | arpack`` for the spectra.
        decode: store ``loop.decode`` at every unique point.
        sensitivity: also compute ‖dh*/dx‖_F (needs ``wrt`` unless the context is one tensor).
        wrt: the context tensor differentiated by ``sensitivity``.
        t: iteration index for non-autonomous loops.
        chunk: seeds per solver call (default bounds the dense-Jacobian memory to ~256 MB).
        state_shape: needed to tell ``[B, S, *state]`` seeds from ``[S, *state]`` when the loop
            has no ``init_state`` (without it seeds are read as ``[S, *state]``).
        dtype: analysis dtype.
        progress: True (a progress bar with the estimate), a callable ``fn(info)`` (``info``:
            ``stage``, ``done``, ``total`` seeds, ``elapsed_s``, ``estimated_s``), False, or None
            (a bar only on a terminal and when the estimate from the first batch exceeds 30 s).

    Returns:
        :class:`FixedPointCensus` (``meta``: ``estimated_s`` from the timed first batch,
        ``wall_time``).
    """
    _check_census_args(q_tol_rel, slow_tol_rel, unique_tol, max_iter, seed)
    method = _census_method(method)
    clock = CensusProgress(progress)
    if chunk is not None:
        check_positive_int("chunk", chunk)
    t0 = time.perf_counter()
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Tensor)):
        raise LoopscopeError(f"seeds must be a tensor or an int, got {type(seeds).__name__}")
    if isinstance(seeds, int):
        m0, Z = _int_seeds(loop, inputs, seeds, t, seed, noise, traj_steps, dtype)
    else:
        m0, Z = _tensor_seeds(loop, inputs, seeds, t, state_shape, dtype)
    if Z.shape[1] == 0:
        raise LoopscopeError("seeds is empty")
    chunk = chunk or max(1, 2**25 // max(1, Z.shape[2] ** 2))
    try:
        # seeds are solved as far as float64 goes (the classes need the end points' own
        # precision, not the threshold's): 1e-3 x the stricter of q_tol_rel and 1e-10
        res, resolved = _solve_seeds(
            m0, Z, method, SEED_TOL * min(q_tol_rel, 1e-10), max_iter, chunk, clock
        )
    finally:
        clock.close()
    settings = {
        "method": resolved,  # auto resolved
        "q_tol_rel": q_tol_rel,
        "slow_tol_rel": slow_tol_rel,
        "unique_tol": unique_tol,
        "n_seeds": Z.shape[1],
        "estimated_s": clock.estimated_s,
    }
    point_options = dict(
        spectra=spectra, k=k, spectrum_method=spectrum_method, decode=decode,
        sensitivity=sensitivity, wrt=wrt,
    )  # fmt: skip
    census = _assemble(m0, Z.shape, res, chunk, settings, point_options)
    census.meta = result_meta(
        m0.loop, seed=int(seed), settings={**census.meta, "wall_time": time.perf_counter() - t0}
    )
    return census


def _assemble(
    m0: LoopMap, shape: tuple[int, ...], res: SolveResult, chunk: int, settings: dict,
    point_options: dict,
) -> FixedPointCensus:  # fmt: skip
    """Classify the seeds' end points, de-duplicate them, and measure every unique point."""
    B, S, n = shape
    ends = res.z_best.reshape(B * S, n)
    r_rel = res.r_rel.numpy().reshape(B, S)
    cls = _classify(r_rel, settings["q_tol_rel"], settings["slow_tol_rel"])
    owner = torch.arange(B).repeat_interleave(S)
    rel_grad = _rel_grad(m0, ends, owner, chunk).reshape(B, S)
    u = _unique_points(ends.numpy().reshape(B, S, n), cls, r_rel, settings["unique_tol"])
    P = len(u.rep_idx)
    pts = ends[u.rep_idx] if P else torch.zeros(0, n, dtype=ends.dtype)
    rep = torch.as_tensor(u.rep_idx, dtype=torch.long)
    psample = np.asarray(u.sample, dtype=np.int64)
    props = _point_properties(m0, pts, psample, **point_options)
    fz_abs = res.r_abs[rep].numpy() if P else np.zeros(0)
    return FixedPointCensus(
        points=pts.reshape(P, *m0.state_shape),
        sample=psample,
        kind=u.kind,
        q=0.5 * fz_abs**2,
        r_rel=res.r_rel[rep].numpy() if P else np.zeros(0),
        multiplicity=np.asarray(u.mult, dtype=np.int64),
        **props,
        seed_class=cls,
        seed_point=u.seed_point,
        seed_r_rel=r_rel,
        seed_rel_grad=rel_grad,
        end_states=ends.reshape(B, S, *m0.state_shape),
        solve=res,
        meta={**settings, "jacobian_path": m0.jacobian_path},
    )


def _rel_grad(m0: LoopMap, ends: Tensor, owner: Tensor, chunk: int) -> np.ndarray:
    """‖(J − I)ᵀ g‖ / ((1 + ‖J‖_F/√n) ‖g‖) at each end point: 0 at a local minimum of q (a slow
    point), O(1) elsewhere, NaN where g = 0 exactly; ‖J‖_F from one Hutchinson probe."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for s0 in range(0, len(owner), chunk):
        sub = owner[s0 : s0 + chunk]
        mc = m0.subset(sub)
        z = ends[s0 : s0 + chunk]
        z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        fz, grad_q = mc.q_grad(z)
        g = fz - z
        v = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        fro = mc.jvp(z, v)[1].norm(dim=1)  # E‖Jv‖² = ‖J‖²_F for v ~ N(0, I)
        scale = 1.0 + fro / math.sqrt(mc.n)
        num = grad_q.norm(dim=1)
        gn = g.norm(dim=1)
        rel = torch.where(gn > 0, num / (scale * gn).clamp_min(1e-300), torch.nan)
        out.append(rel.numpy())  # NaN where g = 0 exactly (the ratio is undefined)
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# implicit-function-theorem sensitivity


def _get(ctx: Any, wrt: Any) -> Tensor:
    if wrt is None:
        if not isinstance(ctx, Tensor):
            raise LoopscopeError(
                f"the context is a {type(ctx).__name__}, not one tensor: pass wrt= (a key, index "
                "or attribute name of the context tensor to differentiate)"
            )
        return ctx
    try:
        x = ctx[wrt] if isinstance(ctx, (dict, list, tuple)) else getattr(ctx, wrt)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise LoopscopeError(f"wrt={wrt!r} is not a field of the loop's context") from e
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise LoopscopeError(f"wrt={wrt!r} must name a floating-point tensor of the context")
    return x


def _put(ctx: Any, wrt: Any, x: Tensor) -> Any:
    import dataclasses

    if wrt is None:
        return x
    if isinstance(ctx, dict):
        return {**ctx, wrt: x}
    if isinstance(ctx, (list, tuple)):
        out = list(ctx)
        out[wrt] = x
        return type(ctx)(out)
    if dataclasses.is_dataclass(ctx):
        return dataclasses.replace(ctx, **{wrt: x})
    raise LoopscopeError(f"cannot substitute wrt={wrt!r} in a {type(ctx).__name__} context")


def _dfdx(
    m: LoopMap, f_of_x: Any, x: Tensor, direction: Tensor | None, batched: bool, p: int
) -> Tensor:
    """∂f/∂x as ``[B, n, p]`` (or times ``direction``: ``[B, n, 1]``): forward mode on the map's
    Jacobian path, reverse mode (one pullback per output) where forward AD is unsupported."""
    B, n = m.B, m.n
    xs = x.shape[1:] if batched else x.shape
    if direction is not None:
        out = m._forward_mode(lambda: torch.func.jvp(f_of_x, (x,), (direction.to(x.dtype),))[1])
        m.n_jvp += 1
        if out is not None:
            return out.detach()[:, :, None]
    else:
        eye = torch.eye(p, dtype=x.dtype)
        # column j: e_j in every sample (batched x) or in the shared x
        E = eye.reshape(p, 1, *xs).expand(p, B, *xs) if batched else eye.reshape(p, *xs)
        m.n_jvp += p
        out = m._forward_mode(
            lambda: torch.func.vmap(lambda V: torch.func.jvp(f_of_x, (x,), (V,))[1])(E)
        )
        if out is not None:
            return out.detach().permute(1, 2, 0)
    xx = x.detach().requires_grad_(True)
    with torch.enable_grad():
        fx = f_of_x(xx)
    rows = []
    for i in range(n):  # samples are independent: one pullback gives row i of each (batched x)
        if batched:
            e = torch.zeros_like(fx)
            e[:, i] = 1.0
            rows.append(torch.autograd.grad(fx, xx, e, retain_graph=True)[0].reshape(B, p))
        else:
            g = [torch.autograd.grad(fx[b, i], xx, retain_graph=True)[0] for b in range(B)]
            rows.append(torch.stack(g).reshape(B, p))
    F = torch.stack(rows, 1).detach()
    if direction is not None:
        return _apply_dir(F, direction.to(x.dtype), batched)
    return F


def _apply_dir(F: Tensor, d: Tensor, batched: bool) -> Tensor:
    """``F [B, n, p]`` times a tangent ``d`` shaped like x: ``[B, n, 1]``."""
    B = F.shape[0]
    dv = d.reshape(B, -1) if batched else d.reshape(1, -1).expand(B, -1)
    return torch.einsum("bnp,bp->bn", F, dv)[:, :, None]


def _sensitivity_map(
    m: LoopMap,
    z: Tensor,
    wrt: Any,
    direction: Tensor | None,
    method: str,
    tol: float,
    dense_max: int,
) -> Tensor:
    B, n = z.shape
    x = _get(m.ctx, wrt)
    batched = m._has_batch_ctx and x.dim() > 0 and x.shape[0] == B
    xs = x.shape[1:] if batched else x.shape
    p = int(math.prod(xs))

    def f_of_x(xx: Tensor) -> Tensor:
        out = m._call(lambda: m.loop.step(m.unflatten(z), _put(m.ctx, wrt, xx), m.t))
        return out.reshape(B, n)

    if direction is not None and tuple(direction.shape) != tuple(x.shape):
        raise LoopscopeError(
            f"direction must have the shape of the context tensor {tuple(x.shape)}, got "
            f"{tuple(direction.shape)}"
        )
    F = _dfdx(m, f_of_x, x, direction, batched, p)  # [B, n, p] or [B, n, 1]
    use_dense = method == "dense" or (method == "auto" and n <= dense_max)
    if use_dense:
        J = m.jacobian(z)
        Y = torch.linalg.solve(torch.eye(n, dtype=z.dtype) - J, F)
    else:
        k = F.shape[2]
        rows = F.permute(0, 2, 1).reshape(B * k, n)
        rep = torch.arange(B).repeat_interleave(k)
        zr = z[rep]

        def mv(v: Tensor, sub: Tensor) -> Tensor:
            return v - m.jvp(zr[sub], v, rep[sub])[1]

        Yr, _ = batched_gmres(mv, rows, tol, n)
        Y = Yr.reshape(B, k, n).permute(0, 2, 1)
    if direction is not None:
        return m.unflatten(Y[:, :, 0])
    return Y.reshape(B, *m.state_shape, *xs)


@dataclass(kw_only=True, repr=False)
class Sensitivity(Result):
    """dh*/dx at fixed points (:func:`input_sensitivity`).

    Attributes:
        dh_dx: ``[B, *state, *xs]`` (full Jacobian) or ``[B, *state]`` (a directional derivative,
            when ``direction`` was given).
        r_rel: ``[B]`` relative residual of each ``h_star`` (checked below ``check_tol``).
    """

    dh_dx: Tensor
    r_rel: Tensor

    def norms(self) -> np.ndarray:
        """``[B]`` Frobenius norm of each sample's dh*/dx."""
        return self.dh_dx.reshape(self.dh_dx.shape[0], -1).norm(dim=1).numpy()

    def to_frame(self) -> pd.DataFrame:
        """One row per sample: ‖dh*/dx‖_F and the fixed point's r_rel."""
        return pd.DataFrame(
            {
                "sample": np.arange(self.dh_dx.shape[0]),
                "sensitivity": self.norms(),
                "r_rel": self.r_rel.numpy(),
            }
        )

    def summary(self) -> dict[str, float]:
        """Mean and max ‖dh*/dx‖_F over samples."""
        s = self.norms()
        return float_summary({"mean_sensitivity": s.mean(), "max_sensitivity": s.max()})


@did_you_mean
def input_sensitivity(
    loop: Loop,
    inputs: Any,
    h_star: Tensor,
    wrt: Any = None,
    *,
    direction: Tensor | None = None,
    method: str = "auto",
    tol: float = 1e-12,
    dense_max: int = 2048,
    t: int | None = None,
    check_tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
) -> Sensitivity:
    """dh*/dx = (I − J)⁻¹ ∂f/∂x at fixed points ``h_star [B, *state]`` (implicit function thm).

    ``x`` is a tensor of the encoded context (``loop.encode(inputs)``): the context itself when it
    is a tensor (``wrt=None``), else ``ctx[wrt]`` / ``getattr(ctx, wrt)``. With a per-sample x
    (``[B, *xs]``) ``dh_dx`` is ``[B, *state, *xs]`` (sample b's fixed point depends only on its
    own x); with a shared x (no batch axis) it is ``[B, *state, *x.shape]``.

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode``.
        h_star: ``[B, *state]`` fixed points.
        wrt: key, index or attribute of the context tensor x (None: the context itself).
        direction: a tangent shaped like x: return the directional derivative ``[B, *state]``.
        method: ``"auto" | "dense" | "gmres"``.
        tol: GMRES relative tolerance.
        dense_max: dense solve up to this state size (auto).
        t: iteration index for non-autonomous loops.
        check_tol: ``h_star`` must have r_rel below this.
        dtype: analysis dtype.

    Example:
        >>> import torch
        >>> from loopscope import FnLoop
        >>> loop = FnLoop(step=lambda h, x: 0.5 * h + x)        # h* = 2x, dh*/dx = 2 I
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> input_sensitivity(loop, x, 2 * x).dh_dx[0]
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    if method not in ("auto", "dense", "gmres"):
        raise LoopscopeError(
            f"input_sensitivity method must be auto, dense or gmres, got {method!r}"
        )
    if not isinstance(h_star, Tensor) or h_star.dim() < 2:
        raise LoopscopeError("h_star must be a tensor [B, *state] with a batch axis")
    if direction is not None and not isinstance(direction, Tensor):
        raise LoopscopeError(f"direction must be a tensor, got {type(direction).__name__}")
    check_positive_int("dense_max", dense_max)
    m = LoopMap(
        loop, inputs, t=t, state_shape=tuple(h_star.shape[1:]), batch_size=h_star.shape[0],
        dtype=dtype,
    )  # fmt: skip
    z = m.flatten(h_star.to(m.dtype or h_star.dtype))
    m.check_state(z, name="h_star")
    fz = m.f(z)
    r_rel = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
    if not bool(torch.isfinite(r_rel).all()) or bool((r_rel > float(check_tol)).any()):
        raise LoopscopeError(
            f"h_star is not a fixed point: max r_rel = {float(r_rel.max()):.3g} > {check_tol:g} "
            "(solve first, or raise check_tol)"
        )
    dh = _sensitivity_map(m, z, wrt, direction, method, float(tol), int(dense_max))
    settings = {"method": method, "wrt": wrt, "jacobian_path": m.jacobian_path}
    return Sensitivity(
        dh_dx=dh, r_rel=r_rel.to(torch.float64), meta=result_meta(m.loop, settings=settings)
    )
