"""Fixed-point census (successor of FixedPointFinder) and IFT input sensitivity.

:func:`find_fixed_points` runs a solver in float64 from many seeds **per input sample** — by
default the ``capture`` solver (:mod:`~loopscope.analysis.capture`: Adam warm start, chord-Newton
capture by points already found, Levenberg–Marquardt on q = ½‖f(h) − h‖² for representatives and
the rest) for 32 ≤ n ≤ 1024 and ≥ 32 seeds, per-seed LM otherwise — then

1. classifies every seed's end point, never merging classes:
   ``fixed`` (r_rel < ``q_tol_rel``), ``slow`` (r_rel ∈ [q_tol_rel, slow_tol_rel]: the solver
   stopped at a local minimum of q or ran out of budget — ``rel_grad`` in :meth:`seeds_frame`
   tells the two apart) or ``non-converged`` (everything else, diverged included);
   r_rel = ‖f(h) − h‖ / (‖f(h)‖ + 1e-9);
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
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch import Tensor

from loopscope.analysis.capture import CAPTURE_OPTIONS, capture_solve
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.solvers import METHODS, SolveResult, batched_gmres, solve_map
from loopscope.analysis.spectra import spectrum_map
from loopscope.core.errors import LoopscopeError, check_positive_int, reject_unknown_kwargs
from loopscope.core.loop import batch_size_of

__all__ = ["find_fixed_points", "FixedPointCensus", "input_sensitivity"]

_KINDS = ("fixed", "slow", "non-converged")


@dataclass
class FixedPointCensus:
    """Unique fixed and slow points of every input sample, and what each seed did.

    Attributes:
        points: ``[P, *state]`` unique representatives (float64), all input samples together.
        sample: ``[P]`` input sample of each point; ``kind``: ``fixed`` | ``slow``.
        q, r_rel: ``[P]`` speed ½‖f(h) − h‖² and relative residual at each point.
        multiplicity: ``[P]`` seeds that ended in the point's cluster.
        rho, unstable_dim: ``[P]`` spectral radius of J(h*) and #|λ| > 1 (NaN / −1 if spectra
            were not computed); ``eigenvalues``: per point, complex eigenvalues by modulus.
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
    decoded: Tensor | None
    sensitivity: np.ndarray | None
    seed_class: np.ndarray
    seed_point: np.ndarray
    seed_r_rel: np.ndarray
    seed_rel_grad: np.ndarray
    end_states: Tensor
    solve: SolveResult
    meta: dict[str, Any] = field(default_factory=dict)

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
            }
        )
        if self.decoded is not None and self.decoded.dim() >= 2 and self.decoded.shape[-1] > 1:
            ans = self.decoded.argmax(-1).reshape(P, -1)
            df["answer"] = [tuple(a.tolist()) if a.numel() > 1 else int(a) for a in ans]
        if self.sensitivity is not None:
            df["sensitivity"] = self.sensitivity
        for k in ("model", "split", "seed"):
            if k in self.meta:
                df[k] = self.meta[k]
        return df

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


_OPTIONS = (
    "max_iter",
    "seed",
    "noise",
    "traj_steps",
    "spectra",
    "k",
    "spectrum_method",
    "decode",
    "sensitivity",
    "wrt",
    "t",
    "solver_options",
    "chunk",
    "state_shape",
)


def find_fixed_points(
    loop: Any,
    inputs: Any,
    seeds: Tensor | int,
    method: str = "auto",
    q_tol_rel: float = 1e-10,
    slow_tol_rel: float = 1e-3,
    unique_tol: float | None = None,
    **options: Any,
) -> FixedPointCensus:
    """Census of fixed and slow points of ``h ↦ f(h; x)`` for every input sample.

    Args:
        loop: a :class:`loopscope.Loop`; analysed in float64 on a copy.
        inputs: inputs for ``loop.encode`` (``None`` for autonomous maps); B input samples.
        seeds: ``[S, *state]`` shared seeds, ``[B, S, *state]`` per-sample seeds, or an int S.
        method: ``auto`` (default: ``capture`` for 32 ≤ n ≤ 1024 state numbers and at least
            32 seeds per input, ``lm`` otherwise),
            ``capture`` (warm start, chord-Newton capture by known points, LM for the rest: see
            :mod:`~loopscope.analysis.capture`) or any :func:`~loopscope.analysis.solve` method
            run per seed (``lm``, ``newton_krylov``, ``adam_q``, ``anderson``, …). Seeds are
            solved to r_rel < 1e-3·q_tol_rel.
        q_tol_rel: r_rel below which an end point is a fixed point (1e-10 in float64).
        slow_tol_rel: upper r_rel of a slow point (1e-3).
        unique_tol: clustering radius (default 1e-3·(1 + max‖h‖) per sample and kind).
        **options: ``max_iter`` (100), ``seed`` (0), ``noise`` (0.5, for int seeds),
            ``traj_steps`` (50), ``spectra`` (True), ``k`` / ``spectrum_method`` (passed to the
            spectrum), ``decode`` (True), ``sensitivity`` (False; needs ``wrt`` unless the context
            is one tensor), ``wrt``, ``t``, ``solver_options`` (dict for the solver; with
            ``capture`` its own options go to it and the rest to the LM sub-solves), ``chunk``
            (seeds per solver call; default bounds the dense-Jacobian memory to ~256 MB),
            ``state_shape`` (needed to tell ``[B, S, *state]`` seeds from ``[S, *state]`` when
            the loop has no ``init_state``; without it seeds are read as ``[S, *state]``).

    Returns:
        :class:`FixedPointCensus`.
    """
    reject_unknown_kwargs("find_fixed_points", options, _OPTIONS)
    if method not in (*METHODS, "capture"):
        raise LoopscopeError(
            f"unknown solver method {method!r}; choose one of capture, {', '.join(METHODS)}"
        )
    for name, v in (("q_tol_rel", q_tol_rel), ("slow_tol_rel", slow_tol_rel)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise LoopscopeError(f"{name} must be a positive number, got {v!r}")
    if slow_tol_rel < q_tol_rel:
        raise LoopscopeError(
            f"slow_tol_rel ({slow_tol_rel!r}) must be >= q_tol_rel ({q_tol_rel!r})"
        )
    if unique_tol is not None and not (isinstance(unique_tol, (int, float)) and unique_tol > 0):
        raise LoopscopeError(f"unique_tol must be a positive number, got {unique_tol!r}")
    max_iter = check_positive_int("max_iter", options.get("max_iter", 100))
    seed = int(options.get("seed", 0))
    t = options.get("t")
    solver_options = dict(options.get("solver_options") or {})
    t0 = time.perf_counter()

    # -- the map and the seeds --------------------------------------------------------------
    if isinstance(seeds, bool) or not isinstance(seeds, (int, Tensor)):
        raise LoopscopeError(f"seeds must be a tensor or an int, got {type(seeds).__name__}")
    if isinstance(seeds, int):
        check_positive_int("seeds", seeds)
        try:
            m0 = LoopMap(loop, inputs, t=t)
        except (NotImplementedError, LoopscopeError) as e:
            raise LoopscopeError(
                "seeds=int needs loop.init_state; pass seeds as a tensor [S, *state] instead"
            ) from e
        Z = _seeds_from_int(
            m0,
            seeds,
            seed,
            float(options.get("noise", 0.5)),
            int(options.get("traj_steps", 50)),
        )
        state_shape = m0.state_shape
    else:
        ctx_b = None
        state_shape = options.get("state_shape")
        try:
            m0 = LoopMap(loop, inputs, t=t, state_shape=state_shape)
            state_shape, ctx_b = m0.state_shape, m0.B
        except (NotImplementedError, LoopscopeError):
            m0 = None  # no init_state: the batch size comes from the context below
            if state_shape is not None:
                state_shape = tuple(state_shape)
                probe = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=1)
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
            probe = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=1)
            B = batch_size_of(probe.ctx) if probe._has_batch_ctx else 1
            m0 = LoopMap(loop, inputs, t=t, state_shape=state_shape, batch_size=B)
        B = m0.B
        seeds = seeds.to(m0.dtype)
        Z = (
            seeds.reshape(B, -1, m0.n)
            if per_sample
            else seeds.reshape(1, -1, m0.n).expand(B, -1, m0.n)
        )
    B, S, n = Z.shape
    if S == 0:
        raise LoopscopeError("seeds is empty")

    # one virtual sample per (input sample, seed): the context is replicated by select()
    owner = torch.arange(B).repeat_interleave(S)
    chunk = int(options.get("chunk", max(1, 2**25 // max(1, n * n))))
    if method == "auto":
        # capture pays once the O(n³) LM iteration dominates and seeds outnumber the points
        # they end at; tiny states or few seeds are cheaper (and keep every seed's own LM basin)
        # with LM per seed
        method = "capture" if 32 <= n <= CAPTURE_OPTIONS["dense_max"] and S >= 32 else "lm"
    if method == "capture":
        cap_opts = {k: v for k, v in solver_options.items() if k in CAPTURE_OPTIONS}
        lm_opts = {k: v for k, v in solver_options.items() if k not in CAPTURE_OPTIONS}
        res = capture_solve(
            m0.subset(owner),
            Z.reshape(B * S, n).clone(),
            owner,
            1e-3 * q_tol_rel,
            max_iter,
            lm_options=lm_opts,
            **cap_opts,
        )
        results = [res]
    else:
        results = []
        for s0 in range(0, B * S, chunk):
            sub = owner[s0 : s0 + chunk]
            mc = m0.subset(sub)
            results.append(
                solve_map(
                    mc,
                    Z.reshape(B * S, n)[s0 : s0 + chunk],
                    method,
                    1e-3 * q_tol_rel,
                    max_iter,
                    **solver_options,
                )
            )
    res = _concat(results)
    ends = res.z_best.reshape(B * S, n)
    r_rel = res.r_rel.numpy().reshape(B, S)
    finite = np.isfinite(r_rel)
    cls = np.full((B, S), "non-converged", dtype=object)
    cls[finite & (r_rel <= slow_tol_rel)] = "slow"
    cls[finite & (r_rel < q_tol_rel)] = "fixed"
    rel_grad = _rel_grad(m0, ends, owner, chunk).reshape(B, S)

    # -- uniqueness per sample and kind ------------------------------------------------------
    rep_idx, rep_kind, rep_sample, mult = [], [], [], []
    seed_point = np.full((B, S), -1, dtype=np.int64)
    endsn = ends.numpy().reshape(B, S, n)
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
                seed_point[b, sel[members]] = len(rep_idx)
                rep_idx.append(b * S + int(sel[members[0]]))
                rep_kind.append(kind)
                rep_sample.append(b)
                mult.append(len(members))
    P = len(rep_idx)
    pts = ends[rep_idx] if P else torch.zeros(0, n, dtype=ends.dtype)
    rep = torch.as_tensor(rep_idx, dtype=torch.long)
    psample = np.asarray(rep_sample, dtype=np.int64)
    fz_abs = res.r_abs[rep].numpy() if P else np.zeros(0)

    # -- per point: spectrum, decoded output, sensitivity --------------------------------------
    rho = np.full(P, np.nan)
    unstable = np.full(P, -1, dtype=np.int64)
    eigs: list[np.ndarray] = [np.zeros(0, dtype=complex)] * P
    decoded = None
    sens = None
    if P:
        mp = m0.subset(torch.as_tensor(psample))
        if options.get("spectra", True):
            spec_opts = {"sigma": False}
            if options.get("k") is not None:
                spec_opts["k"] = options["k"]
            if options.get("spectrum_method") is not None:
                spec_opts["method"] = options["spectrum_method"]
            sp = spectrum_map(mp, pts, **spec_opts)
            rho = np.asarray(sp.rho)
            unstable = np.asarray(sp.unstable, dtype=np.int64)
            eigs = sp.eigenvalues
        if options.get("decode", True):
            with torch.no_grad():
                decoded = mp.loop.decode(mp.unflatten(pts), mp.ctx)
        if options.get("sensitivity", False):
            dh = _sensitivity_map(mp, pts, options.get("wrt"), None, "auto", 1e-12, 2048)
            sens = dh.reshape(P, -1).norm(dim=1).numpy()
    return FixedPointCensus(
        points=pts.reshape(P, *state_shape),
        sample=psample,
        kind=rep_kind,
        q=0.5 * fz_abs**2,
        r_rel=res.r_rel[rep].numpy() if P else np.zeros(0),
        multiplicity=np.asarray(mult, dtype=np.int64),
        rho=rho,
        unstable_dim=unstable,
        eigenvalues=list(eigs),
        decoded=decoded,
        sensitivity=sens,
        seed_class=cls,
        seed_point=seed_point,
        seed_r_rel=r_rel,
        seed_rel_grad=rel_grad,
        end_states=ends.reshape(B, S, *state_shape),
        solve=res,
        meta={
            "method": method,  # auto resolved
            "q_tol_rel": q_tol_rel,
            "slow_tol_rel": slow_tol_rel,
            "unique_tol": unique_tol,
            "seed": seed,
            "n_seeds": S,
            "wall_time": time.perf_counter() - t0,
        },
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
        out = m.loop.step(m.unflatten(z), _put(m.ctx, wrt, xx), m.t)
        return out.reshape(B, n)

    def dfdx(V: Tensor) -> Tensor:  # V [*x.shape] tangent -> [B, n]
        m.n_jvp += 1
        return torch.func.jvp(f_of_x, (x,), (V,))[1].detach()

    if direction is not None:
        if tuple(direction.shape) != tuple(x.shape):
            raise LoopscopeError(
                f"direction must have the shape of the context tensor {tuple(x.shape)}, got "
                f"{tuple(direction.shape)}"
            )
        F = dfdx(direction.to(x.dtype))[:, :, None]  # [B, n, 1]
    else:
        eye = torch.eye(p, dtype=x.dtype)
        if batched:
            E = eye.reshape(p, 1, *xs).expand(p, B, *xs)  # column j: e_j in every sample
        else:
            E = eye.reshape(p, *xs)
        F = torch.func.vmap(lambda V: torch.func.jvp(f_of_x, (x,), (V,))[1])(E).detach()
        m.n_jvp += p
        F = F.permute(1, 2, 0)  # [B, n, p]
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


def input_sensitivity(
    loop: Any,
    inputs: Any,
    h_star: Tensor,
    wrt: Any = None,
    **options: Any,
) -> Tensor:
    """dh*/dx = (I − J)⁻¹ ∂f/∂x at fixed points ``h_star [B, *state]`` (implicit function thm).

    ``x`` is a tensor of the encoded context (``loop.encode(inputs)``): the context itself when it
    is a tensor (``wrt=None``), else ``ctx[wrt]`` / ``getattr(ctx, wrt)``. With a per-sample x
    (``[B, *xs]``) the result is ``[B, *state, *xs]`` (sample b's fixed point depends only on its
    own x); with a shared x (no batch axis) it is ``[B, *state, *x.shape]``.

    Options: ``direction`` (a tangent shaped like x: returns the directional derivative
    ``[B, *state]`` instead of the full Jacobian), ``method`` ("auto" | "dense" | "gmres"),
    ``tol`` (GMRES relative tolerance, 1e-12), ``dense_max`` (2048), ``t``, ``check_tol``
    (1e-6: h_star must have r_rel below it).

    Example:
        >>> import torch
        >>> from loopscope import FnLoop
        >>> loop = FnLoop(step=lambda h, x: 0.5 * h + x)        # h* = 2x, dh*/dx = 2 I
        >>> x = torch.ones(1, 2, dtype=torch.float64)
        >>> input_sensitivity(loop, x, 2 * x)[0]
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    reject_unknown_kwargs(
        "input_sensitivity", options, ("direction", "method", "tol", "dense_max", "t", "check_tol")
    )
    method = options.get("method", "auto")
    if method not in ("auto", "dense", "gmres"):
        raise LoopscopeError(
            f"input_sensitivity method must be auto, dense or gmres, got {method!r}"
        )
    if not isinstance(h_star, Tensor) or h_star.dim() < 2:
        raise LoopscopeError("h_star must be a tensor [B, *state] with a batch axis")
    m = LoopMap(
        loop,
        inputs,
        t=options.get("t"),
        state_shape=tuple(h_star.shape[1:]),
        batch_size=h_star.shape[0],
    )
    z = m.flatten(h_star.to(m.dtype or h_star.dtype))
    fz = m.f(z)
    r_rel = (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
    check_tol = float(options.get("check_tol", 1e-6))
    if bool((r_rel > check_tol).any()):
        raise LoopscopeError(
            f"h_star is not a fixed point: max r_rel = {float(r_rel.max()):.3g} > {check_tol:g} "
            "(solve first, or raise check_tol)"
        )
    return _sensitivity_map(
        m,
        z,
        wrt,
        options.get("direction"),
        method,
        float(options.get("tol", 1e-12)),
        int(options.get("dense_max", 2048)),
    )
