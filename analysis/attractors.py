"""Basins of attraction, path independence and ID-vs-OOD comparison (dynamics spec §11).

:func:`basins` iterates the loop from many seed states per input (seed families: the model's
init distribution, Gaussian clouds, shells of radius r around a state, ± eigen-directions, 2-D
grid slices, other inputs' states and interpolations), labels every end state by attractor
(single-linkage clustering at ε_d) **and** by decoded answer (task-level basin), and reports basin
fractions with Wilson CIs, basin entropy, the correct-basin fraction, the return probability vs
radius and convergence-time / attractor images of 2-D slices.

:func:`path_independence` is the AA score of Anil et al. (2022, Alg. 1): the cosine between the
state reached from the standard init and from another init ("swap" = another example's converged
state, "noise" = entry-scale Gaussian, "zeros", a tensor or a callable), per sample, per position,
on the raw state and on the readout.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    >>> res = basins(loop, None, seeds=GridSeeds(torch.zeros(2, dtype=torch.float64), resolution=21),
    ...              n_iter=100, batch_size=1)
    >>> int(res.summary_frame()["n_stable"][0])
    4
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.convergence import safe_cos
from loopscope.analysis.cycles import CycleClasses
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.stats import wilson_ci
from loopscope.core.errors import (
    LoopscopeError,
    check_number,
    check_positive_int,
    check_seed,
    did_you_mean,
)
from loopscope.core.loop import Loop
from loopscope.core.numerics import BLOWUP, diverged, reference_norm
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.targets import sequence_correct
from loopscope.core.trace import Trace

__all__ = [
    "basins",
    "BasinResult",
    "SeedSet",
    "InitSeeds",
    "GaussianSeeds",
    "ShellSeeds",
    "EigenSeeds",
    "GridSeeds",
    "SwapSeeds",
    "InterpolationSeeds",
    "path_independence",
    "PathIndependenceResult",
    "compare_splits",
    "SplitComparison",
    "wilson_ci",
    "single_linkage",
]


# ---------------------------------------------------------------------------------------------
# small statistics / clustering helpers
# ---------------------------------------------------------------------------------------------
def single_linkage(X: np.ndarray, eps: float) -> np.ndarray:
    """Cluster labels of the rows of ``X [S, n]`` by single linkage cut at distance ``eps``.

    Equivalent to connected components of the "distance ≤ eps" graph. Rows are first snapped to
    a grid of side ``eps / (1000 √n)`` (points in one cell are linked anyway) so that thousands
    of seeds landing on the same attractor cost one KD-tree point; distances are therefore exact
    to ``eps / 500``. Labels are ordered by cluster size (descending), ties by first occurrence;
    non-finite rows get −1.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    S, n = X.shape
    labels = np.full(S, -1, dtype=np.int64)
    ok = np.isfinite(X).all(axis=1)
    if not ok.any():
        return labels
    Xo = X[ok]
    delta = eps / (1000.0 * math.sqrt(max(n, 1)))
    keys = np.round(Xo / delta)
    _, first, inv = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    reps = Xo[first]
    U = reps.shape[0]
    if U > 1:
        pairs = cKDTree(reps).query_pairs(eps, output_type="ndarray")
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(U, U))
        _, comp = connected_components(g, directed=False)
    else:
        comp = np.zeros(1, dtype=np.int64)
    raw = comp[inv]
    # deterministic relabelling: by size desc, then by first occurrence
    uniq, first_occ, counts = np.unique(raw, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first_occ[i]))
    remap = np.empty(uniq.max() + 1, dtype=np.int64)
    for new, i in enumerate(order):
        remap[uniq[i]] = new
    labels[ok] = remap[raw]
    return labels


# ---------------------------------------------------------------------------------------------
# seed families
# ---------------------------------------------------------------------------------------------
@dataclass
class SeedSet:
    """Materialised seeds: ``states [S, B, n]`` and one ``info`` row per seed (family, radius,
    grid coordinates...)."""

    states: Tensor
    info: pd.DataFrame


def _center(center: Any, B: int, n: int, dtype: torch.dtype) -> Tensor:
    c = torch.as_tensor(center, dtype=dtype)
    if c.numel() == n:
        return c.reshape(1, n).expand(B, n).clone()
    if c.shape[0] == B and c[0].numel() == n:
        return c.reshape(B, n).clone()
    raise LoopscopeError(
        f"center must have {n} entries or shape [B={B}, {n}], got {tuple(c.shape)}"
    )


@dataclass
class InitSeeds:
    """``n`` draws from the loop's own ``init_state`` distribution, times ``scale`` (e.g. the
    spec's Gaussian at 0.5×, 1×, 2× the entry std: ``scale`` in (0.5, 1, 2))."""

    n: int = 64
    scale: float = 1.0

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        draws = [m.init(gen) * self.scale for _ in range(self.n)]
        return SeedSet(
            torch.stack(draws),
            pd.DataFrame({"family": "init", "scale": self.scale, "draw": np.arange(self.n)}),
        )


@dataclass
class GaussianSeeds:
    """``n`` Gaussian seeds ``center + std · N(0, I)`` (center default 0)."""

    n: int = 64
    std: float = 1.0
    center: Any = None

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        n = m.n
        c = (
            torch.zeros(B, n, dtype=m.dtype)
            if self.center is None
            else _center(self.center, B, n, m.dtype)
        )
        noise = torch.as_tensor(rng.standard_normal((self.n, B, n)), dtype=m.dtype)
        return SeedSet(
            c.unsqueeze(0) + self.std * noise,
            pd.DataFrame({"family": "gaussian", "std": self.std, "draw": np.arange(self.n)}),
        )


@dataclass
class ShellSeeds:
    """Seeds on spheres ``‖δ‖ = r`` around ``center`` (e.g. a fixed point h*), ``n_per_radius``
    uniform directions per radius; the center itself is included with radius 0 (the reference
    for :meth:`BasinResult.return_probability`)."""

    center: Any
    radii: Sequence[float] = (0.01, 0.1, 0.5, 1.0)
    n_per_radius: int = 32

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        n = m.n
        c = _center(self.center, B, n, m.dtype)
        out, radius = [c], [0.0]
        for r in self.radii:
            u = torch.as_tensor(rng.standard_normal((self.n_per_radius, B, n)), dtype=m.dtype)
            u = u / u.norm(dim=-1, keepdim=True)
            out.extend(c.unsqueeze(0) + float(r) * u)
            radius.extend([float(r)] * self.n_per_radius)
        return SeedSet(torch.stack(out), pd.DataFrame({"family": "shell", "radius": radius}))


@dataclass
class EigenSeeds:
    """``center ± s · v`` for each direction ``v`` (rows of ``vectors [k, n]`` or ``[B, k, n]``,
    e.g. unstable / slow eigenvectors, normalised) and each scale ``s``."""

    center: Any
    vectors: Any
    scales: Sequence[float] = (0.01, 0.1)

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        n = m.n
        c = _center(self.center, B, n, m.dtype)
        V = torch.as_tensor(self.vectors)
        if V.is_complex():
            V = V.real
        V = V.to(m.dtype)
        V = V.reshape(1, -1, n).expand(B, -1, n) if V.dim() <= 2 else V.reshape(B, -1, n)
        V = V / V.norm(dim=-1, keepdim=True)
        out, rows = [], []
        for j in range(V.shape[1]):
            for s in self.scales:
                for sign in (1.0, -1.0):
                    out.append(c + sign * float(s) * V[:, j])
                    rows.append(
                        {"family": "eigen", "direction": j, "scale": float(s), "sign": sign}
                    )
        return SeedSet(torch.stack(out), pd.DataFrame(rows))


@dataclass
class GridSeeds:
    """2-D slice ``center + α u + β v`` on a ``resolution × resolution`` grid,
    α, β ∈ linspace(−extent, extent) (u, v default: the first two state axes). The grid
    includes α = 0 and β = 0 exactly when ``resolution`` is odd."""

    center: Any
    u: Any = None
    v: Any = None
    extent: float = 1.0
    resolution: int = 201

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        n = m.n
        if n < 2 and (self.u is None or self.v is None):
            raise LoopscopeError("GridSeeds needs u and v for a state with fewer than 2 entries")
        c = _center(self.center, B, n, m.dtype)
        eye = torch.eye(n, dtype=m.dtype)
        u = eye[0] if self.u is None else torch.as_tensor(self.u, dtype=m.dtype)
        v = eye[1] if self.v is None else torch.as_tensor(self.v, dtype=m.dtype)
        # one direction for every input ([n]) or one per input ([B, n])
        u = u.reshape(1, n) if u.numel() == n else u.reshape(B, n)
        v = v.reshape(1, n) if v.numel() == n else v.reshape(B, n)
        a = np.linspace(-self.extent, self.extent, self.resolution)
        if self.resolution % 2 == 1:
            a[self.resolution // 2] = 0.0
        ii, jj = np.meshgrid(np.arange(self.resolution), np.arange(self.resolution), indexing="ij")
        al = torch.as_tensor(a[ii.reshape(-1)], dtype=m.dtype).view(-1, 1, 1)
        be = torch.as_tensor(a[jj.reshape(-1)], dtype=m.dtype).view(-1, 1, 1)
        states = c.unsqueeze(0) + al * u.unsqueeze(0) + be * v.unsqueeze(0)
        info = pd.DataFrame(
            {
                "family": "grid",
                "i": ii.reshape(-1),
                "j": jj.reshape(-1),
                "alpha": a[ii.reshape(-1)],
                "beta": a[jj.reshape(-1)],
            }
        )
        return SeedSet(states, info)


@dataclass
class SwapSeeds:
    """For input b, the states of the other inputs (``states [B, n]``, e.g. their converged
    states): seed j is ``states[(b + j) % B]``, j = 1..B−1."""

    states: Any

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        X = torch.as_tensor(self.states, dtype=m.dtype).reshape(B, m.n)
        if B < 2:
            raise LoopscopeError("SwapSeeds needs at least 2 inputs")
        out = [X.roll(-j, dims=0) for j in range(1, B)]
        return SeedSet(
            torch.stack(out), pd.DataFrame({"family": "swap", "offset": np.arange(1, B)})
        )


@dataclass
class InterpolationSeeds:
    """``(1 − α) a + α b`` for α in ``alphas`` (``a``, ``b``: ``[B, n]`` or ``[n]``), e.g. between
    two inputs' fixed points; bisection-free boundary location = where the attractor changes."""

    a: Any
    b: Any
    alphas: Sequence[float] = tuple(np.linspace(0, 1, 21))

    def materialise(
        self, m: LoopMap, B: int, gen: torch.Generator, rng: np.random.Generator
    ) -> SeedSet:
        A = _center(self.a, B, m.n, m.dtype)
        Bt = _center(self.b, B, m.n, m.dtype)
        out = [(1 - float(al)) * A + float(al) * Bt for al in self.alphas]
        return SeedSet(
            torch.stack(out),
            pd.DataFrame({"family": "interpolation", "alpha": [float(x) for x in self.alphas]}),
        )


_FAMILIES = (
    InitSeeds,
    GaussianSeeds,
    ShellSeeds,
    EigenSeeds,
    GridSeeds,
    SwapSeeds,
    InterpolationSeeds,
)


def _seed_count(seeds: Any) -> int | None:
    """Seeds a family will draw per input (None when unknown before materialising)."""
    if isinstance(seeds, InitSeeds | GaussianSeeds):
        return int(seeds.n)
    if isinstance(seeds, GridSeeds):
        return int(seeds.resolution) ** 2
    if isinstance(seeds, ShellSeeds):
        return len(seeds.radii) * int(seeds.n_per_radius)
    if isinstance(seeds, (list, tuple)):
        counts = [_seed_count(s) for s in seeds]
        return None if any(c is None for c in counts) else sum(counts)
    return None


def _check_seed_memory(seeds: Any, B: int, n: int, dtype: torch.dtype, chunk: int) -> None:
    """Every seed state is kept (start, end, and one chunk in flight): refuse before
    materialising a seed set larger than half the free memory, with the numbers and the way out."""
    from loopscope.core.capture import available_memory_bytes
    from loopscope.core.errors import CaptureMemoryError

    S = _seed_count(seeds)
    if S is None:
        return
    item = torch.empty(0, dtype=dtype).element_size()
    need = 3 * S * B * n * item + min(S * B, chunk) * n * item
    budget = available_memory_bytes("cpu") // 2
    if need > budget:
        raise CaptureMemoryError(
            f"seeds: {S} seeds x {B} inputs x {n} state entries would need ~{need / 2**30:.1f} GiB "
            f"but the budget is {budget / 2**30:.1f} GiB (half the free memory); use fewer seeds "
            "(a smaller GridSeeds resolution or n), fewer inputs per call, or a smaller state"
        )


def _materialise(seeds: Any, m: LoopMap, B: int, seed: int) -> SeedSet:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    if isinstance(seeds, str):
        if seeds != "init":
            raise LoopscopeError(f"seeds as a string must be 'init', got {seeds!r}")
        seeds = InitSeeds()
    if isinstance(seeds, SeedSet):
        return seeds
    if isinstance(seeds, _FAMILIES):
        return seeds.materialise(m, B, gen, rng)
    if isinstance(seeds, Tensor):
        X = seeds.to(m.dtype)
        if X.dim() == 0 or X.shape[0] == 0:
            raise LoopscopeError(
                f"seeds is empty (shape {tuple(X.shape)}): basins needs at least one seed state"
            )
        if X[0].numel() == m.n:  # [S, *state]: the same seeds for every input
            X = X.reshape(X.shape[0], 1, m.n).expand(X.shape[0], B, m.n).clone()
        elif X.dim() >= 2 and X.shape[1] == B and X[0, 0].numel() == m.n:
            X = X.reshape(X.shape[0], B, m.n)
        else:
            raise LoopscopeError(
                f"seed tensor must be [S, *state] or [S, B={B}, *state], got {tuple(X.shape)}"
            )
        return SeedSet(X, pd.DataFrame({"family": "given", "draw": np.arange(X.shape[0])}))
    if isinstance(seeds, (list, tuple)):
        parts = [_materialise(s, m, B, seed + i) for i, s in enumerate(seeds)]
        return SeedSet(
            torch.cat([p.states for p in parts]),
            pd.concat([p.info for p in parts], ignore_index=True),
        )
    raise LoopscopeError(
        f"unsupported seeds {type(seeds).__name__}: use 'init', a seed family, a tensor or a list"
    )


# ---------------------------------------------------------------------------------------------
# basins
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class BasinResult(Result):
    """End-state attractors and basins per input.

    Attributes:
        seeds: one row per (sample, seed): seed-family columns, ``attractor`` (the end state's
            cluster id, −1 = diverged), ``kind`` of that cluster, ``answer`` (decoded argmax, as
            a string), ``correct``, ``conv_time`` (first iteration after which the step stays
            below tol; −1 = not converged), ``end_residual``, ``diverged``.
        attractors: one row per (sample, cluster): ``kind`` ("fixed_point", "cycle" or
            "end_region": a cluster of end states that is neither, e.g. seeds still moving at
            the budget), ``period`` (1 for a fixed point, p for a cycle, 0 for an end region),
            ``count``, ``fraction`` (of all seeds) with Wilson ``ci_low``/``ci_high``, ``norm``,
            ``residual`` ‖f(x) − x‖ of the representative, ``rho`` (spectral radius of J there
            when it is a fixed point and n ≤ ``stability_max``), ``stable``, ``answer``,
            ``correct``.
        end_states: ``[S, B, *state]``; seed_states: the seeds, same shape.
    """

    seeds: pd.DataFrame
    attractors: pd.DataFrame
    end_states: Tensor
    seed_states: Tensor
    eps_d: np.ndarray
    n_iter: int

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, seed): :attr:`seeds`."""
        return self.seeds.copy()

    def summary_frame(self) -> pd.DataFrame:
        """Per sample: n_attractors (fixed points and cycles), n_end_regions, n_stable, basin
        entropy −Σ π ln π over every cluster (diverged mass counted as one outcome),
        correct-basin fraction, number of answers, answer entropy, diverged fraction."""
        rows = []
        for b, g in self.seeds.groupby("sample"):
            a = self.attractors[self.attractors["sample"] == b]
            S = len(g)
            div = int(g["diverged"].sum())
            pi = np.concatenate([a["count"].to_numpy() / S, [div / S] if div else []])
            pi = pi[pi > 0]
            ans = g.loc[~g["diverged"], "answer"].value_counts().to_numpy() / S
            real = a["kind"] != "end_region" if len(a) else np.zeros(0, dtype=bool)
            rows.append(
                {
                    "sample": b,
                    "n_attractors": int(np.sum(real)),
                    "n_end_regions": int(len(a) - np.sum(real)),
                    "n_stable": int(a["stable"].sum()),
                    "entropy": float(-(pi * np.log(pi)).sum()),
                    "correct_fraction": float(g["correct"].mean())
                    if g["correct"].notna().all()
                    else np.nan,
                    "n_answers": int(g.loc[~g["diverged"], "answer"].nunique()),
                    "answer_entropy": float(-(ans * np.log(ans)).sum()) if len(ans) else np.nan,
                    "diverged_fraction": div / S,
                    "eps_d": float(self.eps_d[b]),
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Means over samples: attractors, end regions, basin entropy, correct-basin and
        diverged fractions."""
        s = self.summary_frame()
        return float_summary(
            {
                "n_attractors": float(s["n_attractors"].mean()),
                "n_end_regions": float(s["n_end_regions"].mean()),
                "basin_entropy": float(s["entropy"].mean()),
                "correct_basin_fraction": float(s["correct_fraction"].mean()),
                "diverged_fraction": float(s["diverged_fraction"].mean()),
            }
        )

    def answer_basins(self) -> pd.DataFrame:
        """Task-level basins: per (sample, decoded answer) count, fraction and Wilson CI."""
        g = (
            self.seeds[~self.seeds["diverged"]]
            .groupby(["sample", "answer"])
            .size()
            .rename("count")
            .reset_index()
        )
        tot = self.seeds.groupby("sample").size()
        g["fraction"] = g["count"] / g["sample"].map(tot)
        lo, hi = wilson_ci(g["count"].to_numpy(), g["sample"].map(tot).to_numpy())
        g["ci_low"], g["ci_high"] = lo, hi
        return g

    def return_probability(self) -> pd.DataFrame:
        """Basin-stability curve P(end at the attractor of the radius-0 seed | ‖δ‖ = r) per
        sample and radius, with Wilson CIs (needs :class:`ShellSeeds`)."""
        if "radius" not in self.seeds:
            raise LoopscopeError("return_probability needs ShellSeeds (a 'radius' column)")
        rows = []
        for b, g in self.seeds[self.seeds["radius"].notna()].groupby("sample"):
            home = g[g["radius"] == 0.0]
            if home.empty:
                raise LoopscopeError("return_probability needs the radius-0 center seed")
            target = int(home["attractor"].iloc[0])
            for r, gr in g[g["radius"] > 0].groupby("radius"):
                k = int((gr["attractor"] == target).sum())
                lo, hi = wilson_ci(k, len(gr))
                rows.append(
                    {
                        "sample": b,
                        "radius": r,
                        "n": len(gr),
                        "p_return": k / len(gr),
                        "ci_low": float(lo),
                        "ci_high": float(hi),
                    }
                )
        return pd.DataFrame(rows)

    def grid_image(self, sample: int = 0, kind: str = "attractor") -> np.ndarray:
        """``[res, res]`` image of a 2-D grid slice: ``kind`` = "attractor" (id, −1 diverged),
        "time" (convergence time) or "answer" (index into the sorted answers)."""
        g = self.seeds[(self.seeds["sample"] == sample) & (self.seeds["family"] == "grid")]
        if g.empty:
            raise LoopscopeError("grid_image needs GridSeeds")
        res = int(g["i"].max()) + 1
        img = np.full((res, res), np.nan)
        if kind == "attractor":
            vals = g["attractor"].to_numpy(dtype=float)
        elif kind == "time":
            vals = g["conv_time"].to_numpy(dtype=float)
        elif kind == "answer":
            vals = pd.Categorical(g["answer"]).codes.astype(float)
        else:
            raise LoopscopeError(f"kind must be 'attractor', 'time' or 'answer', got {kind!r}")
        img[g["i"].to_numpy(), g["j"].to_numpy()] = vals
        return img


def _answers(loop: Loop, X: Tensor, ctx: Any) -> Tensor:
    with torch.no_grad():
        out = loop.decode(X, ctx)
    out = torch.as_tensor(out)
    return out.argmax(-1).reshape(X.shape[0], -1) if out.dim() >= 2 else out.reshape(X.shape[0], -1)


def _shape_hint(seeds: Any, bs: int | None) -> tuple[int, ...] | None:
    """State shape implied by a seed family's center / endpoints / states, or a seed tensor."""
    if isinstance(seeds, (list, tuple)):
        for s in seeds:
            h = _shape_hint(s, bs)
            if h is not None:
                return h
        return None
    if isinstance(seeds, SwapSeeds):
        return tuple(torch.as_tensor(seeds.states).shape[1:])
    if isinstance(seeds, Tensor):
        if seeds.dim() >= 3 and bs is not None and seeds.shape[1] == bs:
            return tuple(seeds.shape[2:])
        return tuple(seeds.shape[1:]) if seeds.dim() >= 2 else None
    for attr in ("center", "a"):
        c = getattr(seeds, attr, None)
        if isinstance(c, Tensor):
            return (
                tuple(c.shape[1:])
                if (c.dim() >= 2 and bs is not None and c.shape[0] == bs)
                else tuple(c.shape)
            )
    return None


def _make_map(
    loop: Loop,
    inputs: Any,
    seeds: Any,
    ctx: Any,
    dtype: torch.dtype,
    batch_size: int | None,
    state_shape: tuple[int, ...] | None,
) -> LoopMap:
    kw = {"ctx": ctx, "dtype": dtype, "batch_size": batch_size}
    shape = state_shape
    if shape is None:
        try:
            return LoopMap(loop, inputs, **kw)
        except (LoopscopeError, NotImplementedError) as e:
            shape = _shape_hint(seeds, batch_size)
            if isinstance(e, LoopscopeError) and "init_state" not in str(e):
                raise  # not a missing init_state (e.g. offloaded weights): say what it is
            if shape is None:
                raise LoopscopeError(
                    "cannot infer the state shape (the loop has no init_state): pass state_shape="
                ) from None
    return LoopMap(loop, inputs, state_shape=tuple(shape), **kw)


def _check_basin_args(
    n_iter: int, seed: int, tol: float, blowup: float, chunk: int, eps_d: float | None
) -> None:
    check_positive_int("n_iter", n_iter)
    check_positive_int("chunk", chunk)
    check_seed(seed)
    for name, v in (("tol", tol), ("blowup", blowup)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise LoopscopeError(f"{name} must be a positive number, got {v!r}")
    if eps_d is not None and (not isinstance(eps_d, (int, float)) or not eps_d > 0):
        raise LoopscopeError(f"eps_d must be a positive number or None, got {eps_d!r}")


@dataclass
class _Ends:
    """Where every (seed, sample) trajectory ended, flat over ``S·B`` (seed-major)."""

    states: Tensor
    conv: Tensor
    diverged: Tensor
    residual: Tensor


def _iterate(
    m: LoopMap, flat: Tensor, idx_all: Tensor, n_iter: int, tol: float, blowup: float, chunk: int
) -> _Ends:
    """Iterate every seed ``n_iter`` times, ``chunk`` trajectories at a time (the core loop)."""
    N = flat.shape[0]
    ends = torch.empty_like(flat)
    conv = torch.full((N,), -1, dtype=torch.long)
    div = torch.zeros(N, dtype=torch.bool)
    resid = torch.empty(N, dtype=m.dtype)
    for s0 in range(0, N, chunk):
        z = flat[s0 : s0 + chunk].clone()
        idx = idx_all[s0 : s0 + chunk]
        ctx = m._ctx(idx) if m._has_batch_ctx else m.ctx
        ref = reference_norm(z)
        last_bad = torch.full((z.shape[0],), -1, dtype=torch.long)
        dv = torch.zeros(z.shape[0], dtype=torch.bool)
        with torch.no_grad():
            for t in range(n_iter):
                zn = m._raw(z, ctx)
                dv |= diverged(zn, ref, blowup)
                zn = torch.where(dv.view(-1, 1), z, zn)
                moving = (zn - z).norm(dim=1) > tol * z.norm(dim=1).clamp_min(1.0)
                last_bad = torch.where(moving, torch.full_like(last_bad, t), last_bad)
                z = zn
            f_end = m._raw(z, ctx)
        step = (f_end - z).norm(dim=1)
        ends[s0 : s0 + chunk] = z
        div[s0 : s0 + chunk] = dv
        resid[s0 : s0 + chunk] = step
        ok_last = ~(step > tol * z.norm(dim=1).clamp_min(1.0))
        conv[s0 : s0 + chunk] = torch.where(
            ok_last & ~dv, last_bad + 1, torch.full_like(last_bad, -1)
        )
    m.nfe += N // max(1, m.B) * (n_iter + 1)  # booked here: LoopMap counts a repeated index once
    return _Ends(ends, conv, div, resid)


def _decoded(m: LoopMap, ends: Tensor, idx_all: Tensor, chunk: int) -> Tensor:
    """Readout argmax of every end state, ``[S·B, positions]``."""
    out = []
    for s0 in range(0, ends.shape[0], chunk):
        idx = idx_all[s0 : s0 + chunk]
        ctx = m._ctx(idx) if m._has_batch_ctx else m.ctx
        X = m.unflatten(ends[s0 : s0 + chunk])
        # in the analysis dtype: decode may close over modules the copy does not own
        out.append(m._call(lambda X=X, ctx=ctx: _answers(m.loop, X, ctx)))
    return torch.cat(out)


def _correct(A: Tensor, targets: Any, S: int, B: int) -> np.ndarray:
    """``[S, B]`` bool: every labelled position of the decoded answer right."""
    tg = torch.as_tensor(targets)
    A3 = A.reshape(S, B, -1)
    P = A3.shape[2]
    if tg.dim() == 0 or tg.shape[0] != B or tg[0].numel() != P:
        hint = (
            " (transposed? targets are [B, positions])"
            if tg.dim() == 2 and tg.shape == (P, B)
            else ""
        )
        raise LoopscopeError(
            f"targets must be [B={B}] or [B={B}, {P}] (one per readout position), "
            f"got shape {tuple(tg.shape)}{hint}"
        )
    tg = tg.reshape(B, P).unsqueeze(0)
    return sequence_correct(A3, tg).numpy()


def _seed_rows(
    ss: SeedSet,
    b: int,
    lab: np.ndarray,
    ends: _Ends,
    answers: np.ndarray | None,
    correct: np.ndarray | None,
    S: int,
    B: int,
) -> pd.DataFrame:
    div = ends.diverged.reshape(S, B).numpy()[:, b]
    df = ss.info.copy()
    df.insert(0, "sample", b)
    df.insert(1, "seed", np.arange(S))
    df["attractor"] = lab
    df["answer"] = answers[:, b] if answers is not None else ""
    df["correct"] = correct[:, b] & ~div if correct is not None else np.nan
    df["conv_time"] = ends.conv.reshape(S, B).numpy()[:, b]
    df["end_residual"] = ends.residual.reshape(S, B).numpy()[:, b]
    df["diverged"] = div
    return df


def _cluster_rows(
    m: LoopMap,
    b: int,
    Xb: np.ndarray,
    lab: np.ndarray,
    res_b: np.ndarray,
    answers: np.ndarray | None,
    correct: np.ndarray | None,
    stability_max: int,
) -> list[dict[str, Any]]:
    """One row per cluster of sample ``b``'s end states (representative: smallest residual)."""
    S, n = Xb.shape
    rows = []
    for a in range(int(lab.max()) + 1 if (lab >= 0).any() else 0):
        mem = np.nonzero(lab == a)[0]
        rep = int(mem[np.argmin(res_b[mem])])
        x = torch.as_tensor(Xb[rep], dtype=m.dtype).reshape(1, n)
        r = float(res_b[rep])
        rho = np.nan
        period = _period_of(m, x, b, r)
        if n <= stability_max and period == 1:
            J = m.jacobian(x, torch.tensor([b]))[0]
            rho = float(np.abs(np.linalg.eigvals(J.numpy())).max())
        lo, hi = wilson_ci(len(mem), S)
        rows.append(
            {
                "sample": b,
                "attractor": a,
                "kind": KINDS[min(period, 2)],
                "period": period,
                "count": len(mem),
                "fraction": len(mem) / S,
                "ci_low": float(lo),
                "ci_high": float(hi),
                "norm": float(x.norm()),
                "residual": r,
                "rho": rho,
                "stable": bool(rho < 1) if not np.isnan(rho) else False,
                "answer": answers[rep, b] if answers is not None else "",
                "correct": bool(correct[rep, b]) if correct is not None else np.nan,
            }
        )
    return rows


#: cluster kinds by period: 0 = neither a fixed point nor a cycle, 1 = fixed point, p >= 2 cycle
KINDS = ("end_region", "fixed_point", "cycle")
#: relative residual ‖f^p(x) − x‖ / max(1, ‖x‖) at or below which x is on a period-p orbit
FIXED_TOL = 1e-6
#: longest cycle looked for at a cluster representative
CYCLE_MAX = 16
ATTRACTOR_COLUMNS = (
    "sample",
    "attractor",
    "kind",
    "period",
    "count",
    "fraction",
    "ci_low",
    "ci_high",
    "norm",
    "residual",
    "rho",
    "stable",
    "answer",
    "correct",
)


def _period_of(m: LoopMap, x: Tensor, b: int, r: float) -> int:
    """1 if ``x`` is a fixed point (``r`` = ‖f(x) − x‖), p if it is on a p-cycle (p ≤
    :data:`CYCLE_MAX`), else 0 (an end region: the seeds had not settled)."""
    scale = FIXED_TOL * max(1.0, float(x.norm()))
    if r <= scale:
        return 1
    if not np.isfinite(r):
        return 0
    idx = torch.tensor([b])
    y = x
    with torch.no_grad():
        for p in range(1, CYCLE_MAX + 1):
            y = m.f(y, idx)
            if p >= 2 and float((y - x).norm()) <= scale:
                return p
    return 0


@did_you_mean
def basins(
    loop: Loop,
    inputs: Any = None,
    seeds: Any = "init",
    n_iter: int = 200,
    *,
    eps_d: float | None = None,
    targets: Tensor | None = None,
    seed: int = 0,
    tol: float = 1e-9,
    decode: bool = True,
    stability_max: int = 256,
    ctx: Any = None,
    state_shape: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    blowup: float = BLOWUP,
    chunk: int = 65536,
    dtype: torch.dtype = torch.float64,
    attractors: bool = True,
) -> BasinResult:
    """Iterate from every seed, cluster end states into attractors and decoded-answer basins.

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode`` (None for autonomous FnLoops; then pass
            ``batch_size=`` / ``state_shape=`` if the loop has no init).
        seeds: "init" (64 draws of the loop's init), a seed family (:class:`InitSeeds`,
            :class:`GaussianSeeds`, :class:`ShellSeeds`, :class:`EigenSeeds`,
            :class:`GridSeeds`, :class:`SwapSeeds`, :class:`InterpolationSeeds`), a tensor
            ``[S, *state]`` / ``[S, B, *state]``, or a list of those.
        n_iter: iterations per seed.
        eps_d: single-linkage distance (None: ``1e-3 · (1 + median ‖end state‖)`` per input).
        targets: ``[B]`` / ``[B, positions]`` answers for the correct-basin fraction.
        seed: RNG seed of the seed families.
        tol: relative step below which a seed counts as converged.
        decode: label end states by decoded answer.
        stability_max: largest n for the spectral radius at attractor representatives.
        ctx: an already-encoded context (instead of ``inputs``).
        state_shape: trailing state shape when the loop has no ``init_state``.
        batch_size: batch size when the context has none.
        blowup: seeds whose norm exceeds ``blowup · max(1, ‖seed‖)`` or turn non-finite are
            flagged diverged and frozen.
        chunk: trajectories per batch.
        dtype: analysis dtype.
        attractors: cluster the end states into attractors (period, stability at each
            representative). False skips it when only the decoded answers matter (a
            correct-basin fraction): the seeds table's ``attractor`` column is then -1 and the
            attractors table is empty.

    Returns:
        :class:`BasinResult`.
    """
    _check_basin_args(n_iter, seed, tol, blowup, chunk, eps_d)
    m = _make_map(loop, inputs, seeds, ctx, dtype, batch_size, state_shape)
    B, n = m.B, m.n
    _check_seed_memory(seeds, B, n, m.dtype or torch.float64, chunk)
    ss = _materialise(seeds, m, B, seed)
    X0 = ss.states.to(m.dtype)
    S = X0.shape[0]
    if S == 0:
        raise LoopscopeError("seeds is empty: basins needs at least one seed state")
    if targets is not None and not decode:
        raise LoopscopeError("targets need decode=True")
    idx_all = torch.arange(B).repeat(S)
    ends = _iterate(m, X0.reshape(S * B, n).clone(), idx_all, n_iter, float(tol), blowup, chunk)
    answers = correct = None
    if decode:
        A = _decoded(m, ends.states, idx_all, chunk)
        answers = np.array([",".join(map(str, r)) for r in A.tolist()], dtype=object).reshape(S, B)
        if targets is not None:
            correct = _correct(A, targets, S, B)
    return _assemble_basins(
        loop, m, ss, X0, ends, answers, correct, eps_d, stability_max, n_iter, seed, attractors
    )


def _assemble_basins(
    loop: Loop,
    m: LoopMap,
    ss: SeedSet,
    X0: Tensor,
    ends: _Ends,
    answers: np.ndarray | None,
    correct: np.ndarray | None,
    eps_opt: float | None,
    stability_max: int,
    n_iter: int,
    seed: int,
    attractors: bool = True,
) -> BasinResult:
    """Cluster each sample's end states and build the seed / attractor tables."""
    S, B, n = X0.shape[0], m.B, m.n
    E = ends.states.reshape(S, B, n)
    Enp = E.numpy()
    div_np = ends.diverged.reshape(S, B).numpy()
    res_np = ends.residual.reshape(S, B).numpy()
    eps_d = np.zeros(B)
    seed_rows, att_rows = [], []
    for b in range(B):
        Xb = Enp[:, b].copy()
        Xb[div_np[:, b]] = np.nan
        fin = np.isfinite(Xb).all(1)
        med = float(np.median(np.linalg.norm(Xb[fin], axis=1))) if fin.any() else 0.0
        eps_d[b] = float(eps_opt) if eps_opt is not None else 1e-3 * (1.0 + med)
        if not attractors:
            seed_rows.append(_seed_rows(ss, b, np.full(S, -1), ends, answers, correct, S, B))
            continue
        lab = single_linkage(Xb, eps_d[b])
        seed_rows.append(_seed_rows(ss, b, lab, ends, answers, correct, S, B))
        att_rows.extend(_cluster_rows(m, b, Xb, lab, res_np[:, b], answers, correct, stability_max))
    return BasinResult(
        seeds=pd.concat(seed_rows, ignore_index=True),
        attractors=pd.DataFrame(att_rows, columns=list(ATTRACTOR_COLUMNS)),
        end_states=E.reshape(S, B, *m.state_shape),
        seed_states=X0.reshape(S, B, *m.state_shape),
        eps_d=eps_d,
        n_iter=n_iter,
        meta=result_meta(loop, seed=seed, settings={"n_iter": n_iter, "n_seeds": S}),
    )


# ---------------------------------------------------------------------------------------------
# path independence (AA score)
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class PathIndependenceResult(Result):
    """AA scores: ``frame`` has one row per (init, sample, space, position): ``aa`` = cos of the
    end state (or readout) from the reference init and from ``init``; position −1 = the whole
    sample. ``residual`` columns give each run's final step ‖h_T − h_{T−1}‖ (absolute, relative);
    ``finite`` is False where either end state is not finite (``aa`` is NaN there).
    """

    frame: pd.DataFrame
    runs: dict[str, Any]

    def to_frame(self) -> pd.DataFrame:
        """The per (init, sample, space, position) table :attr:`frame`."""
        return self.frame.copy()

    @property
    def score(self) -> float:
        """Mean AA on the raw state over samples and non-reference inits."""
        f = self.frame
        return float(f[(f["space"] == "state") & (f["position"] == -1)]["aa"].mean())

    def aa(self, init: str | None = None, space: str = "state") -> np.ndarray:
        """Per-sample AA ``[B]`` for one init (default: the first non-reference one)."""
        f = self.frame[(self.frame["space"] == space) & (self.frame["position"] == -1)]
        init = init if init is not None else f["init"].iloc[0]
        return f[f["init"] == init].sort_values("sample")["aa"].to_numpy()

    def summary(self) -> dict[str, float]:
        """Mean AA of the whole state (and of the readout, when measured)."""
        f = self.frame[self.frame["position"] == -1]
        out = {"aa_state": float(f[f["space"] == "state"]["aa"].mean())}
        if (f["space"] == "readout").any():
            out["aa_readout"] = float(f[f["space"] == "readout"]["aa"].mean())
        return float_summary(out)


class _Inits:
    """Turns the ``inits`` specs of :func:`path_independence` into start states."""

    def __init__(self, loop: Loop, ctx: Any, seed: int, noise_std: float | None) -> None:
        self.loop, self.ctx, self.seed, self.noise_std = loop, ctx, seed, noise_std
        self._default: Tensor | None = None

    def default(self) -> Tensor:
        if self._default is None:
            with torch.no_grad():
                self._default = self.loop.init_state(
                    self.ctx, torch.Generator().manual_seed(self.seed)
                )
        return self._default

    def noise(self, gen: torch.Generator) -> Tensor:
        d = self.default()
        std = self.noise_std
        if std is None:
            std = float(d.double().std()) if d.numel() > 1 and float(d.double().std()) > 0 else 1.0
        return torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d.dtype) * float(std)

    def resolve(self, spec: Any, ref_final: Tensor | None) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1)
        if isinstance(spec, str):
            if spec == "default":
                return self.default()
            if spec == "zeros":
                return torch.zeros_like(self.default())
            if spec == "noise":
                return self.noise(gen)
            if spec == "swap":
                if ref_final is None:
                    raise LoopscopeError("'swap' cannot be the reference init")
                if ref_final.shape[0] < 2:
                    raise LoopscopeError("'swap' needs a batch of at least 2 examples")
                return ref_final.roll(1, dims=0).clone()
            raise LoopscopeError(
                f"unknown init {spec!r}: use default, zeros, noise, swap, a tensor or a callable"
            )
        if isinstance(spec, Tensor):
            if ref_final is not None and spec.shape == ref_final.shape[1:]:
                return spec.unsqueeze(0).expand_as(ref_final).clone()
            return spec
        if callable(spec):
            return spec(self.ctx, gen)
        raise LoopscopeError(f"unsupported init {type(spec).__name__}")


def _init_name(spec: Any, i: int) -> str:
    return spec if isinstance(spec, str) else f"init{i}"


def _per_position(loop: Any, space: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """``[B, pos, rest]`` views of both end states (or readouts), None without positions: a
    state's positions come from the loop's ``state_axes`` (a stack axis is never counted as
    positions); a readout ``[B, pos, C]`` has them on axis 1."""
    if space == "state":
        from loopscope.core.layout import positions_per_sample

        pa = positions_per_sample(loop, a)
        return None if pa is None else (pa, positions_per_sample(loop, b))
    if a.dim() < 3:
        return None
    B = a.shape[0]
    return a.reshape(B, a.shape[1], -1), b.reshape(B, b.shape[1], -1)


def _aa_frames(
    loop: Any,
    nm: str,
    space: str,
    a: Tensor,
    b: Tensor,
    res: tuple,
    ref_res: tuple,
    healthy: Tensor,
) -> list[pd.DataFrame]:
    """AA rows of one (init, space): the whole sample (position −1) and, for states with a
    position axis, every position. Samples not ``healthy`` (diverged in either run: ``unroll``
    froze them at their last finite state, whose numbers mean nothing) get NaN."""
    a, b = a.double(), b.double()
    B = a.shape[0]
    finite = torch.isfinite(a.reshape(B, -1)).all(1) & torch.isfinite(b.reshape(B, -1)).all(1)
    finite = finite & healthy
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    whole = torch.where(finite, safe_cos(a.reshape(B, -1), b.reshape(B, -1)), nan)
    keep = finite.numpy()
    cols = {
        k: np.where(keep, v, np.nan)
        for k, v in {"residual": res[0], "rel_residual": res[1], "ref_residual": ref_res[0]}.items()
    }
    out = [
        pd.DataFrame(
            {
                "init": nm,
                "sample": np.arange(B),
                "space": space,
                "position": -1,
                "aa": whole.numpy(),
                **cols,
                "finite": finite.numpy(),
            }
        )
    ]
    per_pos = _per_position(loop, space, a, b)
    if per_pos is not None:  # per position: the state's declared positions, else pos = axis 1
        pa, pb = per_pos
        P = pa.shape[1]
        pc = safe_cos(pa, pb)
        pc = torch.where(finite.view(B, 1), pc, nan)
        out.append(
            pd.DataFrame(
                {
                    "init": nm,
                    "sample": np.repeat(np.arange(B), P),
                    "space": space,
                    "position": np.tile(np.arange(P), B),
                    "aa": pc.reshape(-1).numpy(),
                    **{k: np.repeat(v, P) for k, v in cols.items()},
                    "finite": np.repeat(finite.numpy(), P),
                }
            )
        )
    return out


@did_you_mean
def path_independence(
    loop: Loop,
    inputs: Any = None,
    inits: Sequence[Any] = ("default", "swap"),
    n_iter: int = 100,
    *,
    readout: Callable[[Tensor, Any], Tensor] | bool | None = None,
    seed: int = 0,
    noise_std: float | None = None,
    meta: dict[str, Any] | None = None,
) -> PathIndependenceResult:
    """AA score (Anil et al. 2022): cosine between end states reached from different inits.

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode``.
        inits: the reference first, then the others. Each is "default" (``loop.init_state``),
            "zeros", "noise" (Gaussian with the default init's entry std, or ``noise_std``),
            "swap" (another example's converged state: the reference end states rolled by one
            along the batch), a tensor ``[B, *state]`` / ``[*state]``, or ``fn(ctx, generator)``.
        n_iter: the budget for every run.
        readout: ``fn(h, ctx)`` for the readout-space AA (None: ``loop.decode``; False: skip).
        seed: generator seed for random inits.
        noise_std: std of "noise" inits (None: the default init's entry std, else 1).
        meta: dict merged into the result meta (model, split...).

    Returns:
        :class:`PathIndependenceResult` (per sample, per position, state and readout). Two
        zero vectors count as identical (cos = 1); a non-finite end state or a sample either run
        flagged diverged gives NaN, flagged ``finite=False``.
    """
    from loopscope.core.unroll import unroll

    check_positive_int("n_iter", n_iter)
    check_seed(seed)
    if noise_std is not None:
        check_number("noise_std", noise_std, low=0, strict=True)
    inits = list(inits)
    if len(inits) < 2:
        raise LoopscopeError(
            f"path_independence needs at least 2 inits (reference + other), got {len(inits)}"
        )
    if meta is not None and not isinstance(meta, dict):
        raise LoopscopeError(f"meta must be a dict, got {type(meta).__name__}")
    with torch.no_grad():
        ctx = loop.encode(inputs)
    resolver = _Inits(loop, ctx, seed, noise_std)
    ref = unroll(loop, inputs, n_iter, init=resolver.resolve(inits[0], None))
    runs: dict[str, Any] = {_init_name(inits[0], 0): ref}

    def read(h: Tensor) -> Tensor | None:
        if readout is False:
            return None
        with torch.no_grad():
            return (readout or loop.decode)(h, ref.ctx)

    ref_read = read(ref.final)
    ref_res = _final_residual(ref)
    ref_ok = _not_diverged(ref)
    rows: list[pd.DataFrame] = []
    for i, spec in enumerate(inits[1:], start=1):
        nm = _init_name(spec, i)
        run = unroll(loop, inputs, n_iter, init=resolver.resolve(spec, ref.final))
        runs[nm] = run
        res = _final_residual(run)
        ok = ref_ok & _not_diverged(run)
        rows += _aa_frames(loop, nm, "state", ref.final, run.final, res, ref_res, ok)
        if ref_read is not None:
            rows += _aa_frames(loop, nm, "readout", ref_read, read(run.final), res, ref_res, ok)
    info = {"seed": seed, "reference": _init_name(inits[0], 0), "n_iter": n_iter, **(meta or {})}
    frame = pd.concat(rows, ignore_index=True)
    for k in ("model", "split"):
        if k in info:
            frame[k] = info[k]
    full = result_meta(loop, seed=seed, split=info.get("split"), model=info.get("model"))
    return PathIndependenceResult(frame=frame, runs=runs, meta={**full, **info})


def _not_diverged(tr: Trace) -> Tensor:
    """``[B]`` bool: samples ``unroll`` did not flag as diverged."""
    return torch.tensor([s != "diverged" for s in tr.status] or [True] * tr.states.shape[1])


def _final_residual(tr: Trace) -> tuple[np.ndarray, np.ndarray]:
    S = tr.states.double()
    B = S.shape[1]
    d = (S[-1] - S[-2]).reshape(B, -1).norm(dim=1)
    rel = d / (S[-1].reshape(B, -1).norm(dim=1) + 1e-9)
    return d.numpy(), rel.numpy()


# ---------------------------------------------------------------------------------------------
# ID vs OOD
# ---------------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class SplitComparison(Result):
    """Same statistics side by side per split: ``frame`` columns ``split, source, metric, value``
    (pivot with ``frame.pivot_table(index=["source", "metric"], columns="split",
    values="value")``)."""

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The tidy ``split, source, metric, value`` table."""
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """``{"<source>.<metric>[<split>]": value}`` for every row."""
        return float_summary(
            {f"{r.source}.{r.metric}[{r.split}]": r.value for r in self.frame.itertuples()}
        )


def _summaries(obj: Any) -> dict[str, float]:
    if isinstance(obj, CycleClasses):
        fr = obj.frame["class"].value_counts(normalize=True)
        return {f"class[{k}]": float(v) for k, v in fr.items()}
    if isinstance(obj, pd.DataFrame) and "class" in obj:
        fr = obj["class"].value_counts(normalize=True)
        return {f"class[{k}]": float(v) for k, v in fr.items()}
    if hasattr(obj, "summary") and callable(obj.summary):
        return dict(obj.summary())
    if isinstance(obj, dict):
        return {str(k): float(v) for k, v in obj.items()}
    raise LoopscopeError(
        f"cannot summarise {type(obj).__name__}: give results with .summary() or a classify result"
    )


@did_you_mean
def compare_splits(results_by_split: dict[str, Any]) -> SplitComparison:
    """Same statistics side by side for ID vs shifted splits (OOD protocol, spec §11).

    Args:
        results_by_split: ``{split: result}`` or ``{split: [results...]}`` where a result is any
            loopscope :class:`~loopscope.core.result.Result` (its ``summary()``), a
            :func:`~loopscope.analysis.classify` result (class fractions), or a plain
            ``{metric: value}``.

    Returns:
        :class:`SplitComparison`; ``.to_frame()`` is the tidy ``split, source, metric, value``.
    """
    if not isinstance(results_by_split, dict) or not results_by_split:
        raise LoopscopeError("compare_splits needs a non-empty {split: result(s)} dict")
    rows = []
    for split, res in results_by_split.items():
        items = res if isinstance(res, (list, tuple)) else [res]
        for r in items:
            src = "classify" if isinstance(r, (pd.DataFrame, CycleClasses)) else type(r).__name__
            for k, v in _summaries(r).items():
                rows.append({"split": split, "source": src, "metric": k, "value": v})
    return SplitComparison(
        frame=pd.DataFrame(rows), meta=result_meta(settings={"splits": list(results_by_split)})
    )
