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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.analysis.convergence import safe_cos
from loopscope.analysis.loopmap import LoopMap
from loopscope.core.errors import LoopscopeError, check_positive_int, reject_unknown_kwargs

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
    "wilson_ci",
    "single_linkage",
]


# ---------------------------------------------------------------------------------------------
# small statistics / clustering helpers
# ---------------------------------------------------------------------------------------------
def wilson_ci(
    k: np.ndarray | int, n: np.ndarray | int, z: float = 1.959963984540054
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``k / n`` (95 % by default)."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        den = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / den
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


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
@dataclass
class BasinResult:
    """End-state attractors and basins per input.

    Attributes:
        seeds: one row per (sample, seed): seed-family columns, ``attractor`` (−1 = diverged),
            ``answer`` (decoded argmax, as a string), ``correct``, ``conv_time`` (first iteration
            after which the step stays below tol; −1 = not converged), ``end_residual``,
            ``diverged``.
        attractors: one row per (sample, attractor): ``count``, ``fraction`` (of all seeds) with
            Wilson ``ci_low``/``ci_high``, ``norm``, ``residual`` ‖f(x) − x‖ of the
            representative, ``rho`` (spectral radius of J there when it is a fixed point and
            n ≤ ``stability_max``), ``stable``, ``answer``, ``correct``.
        end_states: ``[S, B, *state]``; seed_states: the seeds, same shape.
    """

    seeds: pd.DataFrame
    attractors: pd.DataFrame
    end_states: Tensor
    seed_states: Tensor
    eps_d: np.ndarray
    n_iter: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.seeds

    def summary_frame(self) -> pd.DataFrame:
        """Per sample: n_attractors, n_stable, basin entropy −Σ π ln π (diverged mass counted as
        one outcome), correct-basin fraction, number of answers, answer entropy, diverged
        fraction."""
        rows = []
        for b, g in self.seeds.groupby("sample"):
            a = self.attractors[self.attractors["sample"] == b]
            S = len(g)
            div = int(g["diverged"].sum())
            pi = np.concatenate([a["count"].to_numpy() / S, [div / S] if div else []])
            pi = pi[pi > 0]
            ans = g.loc[~g["diverged"], "answer"].value_counts().to_numpy() / S
            rows.append(
                {
                    "sample": b,
                    "n_attractors": len(a),
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
        s = self.summary_frame()
        return {
            "n_attractors": float(s["n_attractors"].mean()),
            "basin_entropy": float(s["entropy"].mean()),
            "correct_basin_fraction": float(s["correct_fraction"].mean()),
            "diverged_fraction": float(s["diverged_fraction"].mean()),
        }

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


_BASIN_OPTIONS = (
    "eps_d",
    "targets",
    "seed",
    "tol",
    "decode",
    "stability_max",
    "ctx",
    "state_shape",
    "batch_size",
    "blowup",
    "chunk",
    "dtype",
)


def _answers(loop: Any, X: Tensor, ctx: Any) -> Tensor:
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


def _make_map(loop: Any, inputs: Any, seeds: Any, options: dict[str, Any]) -> LoopMap:
    kw = {
        "ctx": options.get("ctx"),
        "dtype": options.get("dtype", torch.float64),
        "batch_size": options.get("batch_size"),
    }
    shape = options.get("state_shape")
    if shape is None:
        try:
            return LoopMap(loop, inputs, **kw)
        except (LoopscopeError, NotImplementedError):
            shape = _shape_hint(seeds, kw["batch_size"])
            if shape is None:
                raise LoopscopeError(
                    "cannot infer the state shape (the loop has no init_state): pass state_shape="
                ) from None
    return LoopMap(loop, inputs, state_shape=tuple(shape), **kw)


def basins(
    loop: Any, inputs: Any = None, seeds: Any = "init", n_iter: int = 200, **options: Any
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

    Keyword options:
        eps_d: single-linkage distance (default ``1e-3 · (1 + median ‖end state‖)`` per input).
        targets: ``[B]`` / ``[B, positions]`` answers for the correct-basin fraction.
        seed: RNG seed of the seed families (0).
        tol: relative step below which a seed counts as converged (1e-9).
        decode: label end states by decoded answer (True).
        stability_max: largest n for the spectral radius at attractor representatives (256).
        ctx, state_shape, batch_size, dtype: LoopMap construction.
        blowup: seeds whose norm exceeds ``blowup · max(1, ‖seed‖)`` or turn non-finite are
            flagged diverged and frozen (1e8).
        chunk: trajectories per batch (65536).

    Returns:
        :class:`BasinResult`.
    """
    reject_unknown_kwargs("basins", options, _BASIN_OPTIONS)
    n_iter = check_positive_int("n_iter", n_iter)
    seed = int(options.get("seed", 0))
    tol = float(options.get("tol", 1e-9))
    blowup = float(options.get("blowup", 1e8))
    chunk = check_positive_int("chunk", options.get("chunk", 65536))
    stability_max = int(options.get("stability_max", 256))
    m = _make_map(loop, inputs, seeds, options)
    B, n = m.B, m.n
    ss = _materialise(seeds, m, B, seed)
    X0 = ss.states.to(m.dtype)
    S = X0.shape[0]
    flat = X0.reshape(S * B, n).clone()
    idx_all = torch.arange(B).repeat(S)
    ends = torch.empty_like(flat)
    conv = torch.full((S * B,), -1, dtype=torch.long)
    div = torch.zeros(S * B, dtype=torch.bool)
    resid = torch.empty(S * B, dtype=m.dtype)
    for s0 in range(0, S * B, chunk):
        z = flat[s0 : s0 + chunk].clone()
        idx = idx_all[s0 : s0 + chunk]
        ctx = m._ctx(idx) if m._has_batch_ctx else m.ctx
        limit = blowup * z.norm(dim=1).clamp_min(1.0)
        last_bad = torch.full((z.shape[0],), -1, dtype=torch.long)
        dv = torch.zeros(z.shape[0], dtype=torch.bool)
        with torch.no_grad():
            for t in range(n_iter):
                zn = m._raw(z, ctx)
                bad = (~torch.isfinite(zn).all(1)) | (zn.norm(dim=1) > limit)
                dv |= bad
                zn = torch.where(dv.view(-1, 1), z, zn)
                moving = (zn - z).norm(dim=1) > tol * z.norm(dim=1).clamp_min(1.0)
                last_bad = torch.where(moving, torch.full_like(last_bad, t), last_bad)
                z = zn
            f_end = m._raw(z, ctx)
        ends[s0 : s0 + chunk] = z
        div[s0 : s0 + chunk] = dv
        resid[s0 : s0 + chunk] = (f_end - z).norm(dim=1)
        ok_last = ~((f_end - z).norm(dim=1) > tol * z.norm(dim=1).clamp_min(1.0))
        conv[s0 : s0 + chunk] = torch.where(
            ok_last & ~dv, last_bad + 1, torch.full_like(last_bad, -1)
        )
    m.nfe += S * (n_iter + 1)  # booked here: LoopMap counts a repeated index once
    E = ends.reshape(S, B, n)
    answers = None
    if options.get("decode", True):
        ans_t = []
        for s0 in range(0, S * B, chunk):
            idx = idx_all[s0 : s0 + chunk]
            ctx = m._ctx(idx) if m._has_batch_ctx else m.ctx
            ans_t.append(_answers(m.loop, m.unflatten(ends[s0 : s0 + chunk]), ctx))
        A = torch.cat(ans_t)
        answers = np.array([",".join(map(str, r)) for r in A.tolist()], dtype=object).reshape(S, B)
    targets = options.get("targets")
    correct_sb = None
    if targets is not None:
        if answers is None:
            raise LoopscopeError("targets need decode=True")
        tg = torch.as_tensor(targets).reshape(B, -1)
        A3 = A.reshape(S, B, -1)
        if A3.shape[2] != tg.shape[1]:
            raise LoopscopeError(
                f"targets have {tg.shape[1]} positions per sample, the readout has {A3.shape[2]}"
            )
        # positions labelled -100 (no target, e.g. BOS) are ignored
        correct_sb = ((A3 == tg.unsqueeze(0)) | (tg.unsqueeze(0) == -100)).all(-1).numpy()
    eps_opt = options.get("eps_d")
    Enp = E.numpy()
    eps_d = np.zeros(B)
    seed_rows, att_rows = [], []
    div_np = div.reshape(S, B).numpy()
    conv_np = conv.reshape(S, B).numpy()
    res_np = resid.reshape(S, B).numpy()
    for b in range(B):
        Xb = Enp[:, b].copy()
        Xb[div_np[:, b]] = np.nan
        fin = np.isfinite(Xb).all(1)
        med = float(np.median(np.linalg.norm(Xb[fin], axis=1))) if fin.any() else 0.0
        eps_d[b] = float(eps_opt) if eps_opt is not None else 1e-3 * (1.0 + med)
        lab = single_linkage(Xb, eps_d[b])
        df = ss.info.copy()
        df.insert(0, "sample", b)
        df.insert(1, "seed", np.arange(S))
        df["attractor"] = lab
        df["answer"] = answers[:, b] if answers is not None else ""
        df["correct"] = correct_sb[:, b] & ~div_np[:, b] if correct_sb is not None else np.nan
        df["conv_time"] = conv_np[:, b]
        df["end_residual"] = res_np[:, b]
        df["diverged"] = div_np[:, b]
        seed_rows.append(df)
        for a in range(int(lab.max()) + 1 if (lab >= 0).any() else 0):
            mem = np.nonzero(lab == a)[0]
            rep = int(mem[np.argmin(res_np[mem, b])])
            x = torch.as_tensor(Xb[rep], dtype=m.dtype).reshape(1, n)
            r = float(res_np[rep, b])
            rho = np.nan
            if n <= stability_max and r <= 1e-6 * max(1.0, float(x.norm())):
                J = m.jacobian(x, torch.tensor([b]))[0]
                rho = float(np.abs(np.linalg.eigvals(J.numpy())).max())
            lo, hi = wilson_ci(len(mem), S)
            att_rows.append(
                {
                    "sample": b,
                    "attractor": a,
                    "count": len(mem),
                    "fraction": len(mem) / S,
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                    "norm": float(x.norm()),
                    "residual": r,
                    "rho": rho,
                    "stable": bool(rho < 1) if not np.isnan(rho) else False,
                    "answer": answers[rep, b] if answers is not None else "",
                    "correct": bool(correct_sb[rep, b]) if correct_sb is not None else np.nan,
                }
            )
    meta = {"seed": seed}
    return BasinResult(
        seeds=pd.concat(seed_rows, ignore_index=True),
        attractors=pd.DataFrame(att_rows),
        end_states=E.reshape(S, B, *m.state_shape),
        seed_states=X0.reshape(S, B, *m.state_shape),
        eps_d=eps_d,
        n_iter=n_iter,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# path independence (AA score)
# ---------------------------------------------------------------------------------------------
@dataclass
class PathIndependenceResult:
    """AA scores: ``frame`` has one row per (init, sample, space, position): ``aa`` = cos of the
    end state (or readout) from the reference init and from ``init``; position −1 = the whole
    sample. ``residual`` columns give each run's final step ‖h_T − h_{T−1}‖ (absolute, relative).
    """

    frame: pd.DataFrame
    runs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.frame

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
        f = self.frame[self.frame["position"] == -1]
        out = {"aa_state": float(f[f["space"] == "state"]["aa"].mean())}
        if (f["space"] == "readout").any():
            out["aa_readout"] = float(f[f["space"] == "readout"]["aa"].mean())
        return out


_PI_OPTIONS = ("readout", "seed", "noise_std", "meta")


def path_independence(
    loop: Any,
    inputs: Any = None,
    inits: Sequence[Any] = ("default", "swap"),
    n_iter: int = 100,
    **options: Any,
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

    Keyword options:
        readout: ``fn(h, ctx)`` for the readout-space AA (default ``loop.decode``; False = skip).
        seed: generator seed for random inits (0).
        noise_std: std of "noise" inits (default: the default init's entry std, else 1).
        meta: dict merged into the result meta (model, split...).

    Returns:
        :class:`PathIndependenceResult` (per sample, per position, state and readout). Two
        zero vectors count as identical (cos = 1).
    """
    from loopscope.core.unroll import unroll

    reject_unknown_kwargs("path_independence", options, _PI_OPTIONS)
    n_iter = check_positive_int("n_iter", n_iter)
    inits = list(inits)
    if len(inits) < 2:
        raise LoopscopeError(
            f"path_independence needs at least 2 inits (reference + other), got {len(inits)}"
        )
    seed = int(options.get("seed", 0))
    readout = options.get("readout")
    with torch.no_grad():
        ctx = loop.encode(inputs)
    runs: dict[str, Any] = {}
    default = None

    def default_init() -> Tensor:
        nonlocal default
        if default is None:
            with torch.no_grad():
                default = loop.init_state(ctx, torch.Generator().manual_seed(seed))
        return default

    def resolve(spec: Any, ref_final: Tensor | None) -> Tensor:
        gen = torch.Generator().manual_seed(seed + 1)
        if isinstance(spec, str):
            if spec == "default":
                return default_init()
            if spec == "zeros":
                return torch.zeros_like(default_init())
            if spec == "noise":
                d = default_init()
                std = options.get("noise_std")
                if std is None:
                    std = (
                        float(d.double().std())
                        if d.numel() > 1 and float(d.double().std()) > 0
                        else 1.0
                    )
                return torch.randn(d.shape, generator=gen, dtype=torch.float64).to(d.dtype) * float(
                    std
                )
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
            ref = ref_final if ref_final is not None else None
            if ref is not None and spec.shape == ref.shape[1:]:
                return spec.unsqueeze(0).expand_as(ref).clone()
            return spec
        if callable(spec):
            return spec(ctx, gen)
        raise LoopscopeError(f"unsupported init {type(spec).__name__}")

    def name(spec: Any, i: int) -> str:
        return spec if isinstance(spec, str) else f"init{i}"

    ref_spec = inits[0]
    h0 = resolve(ref_spec, None)
    ref = unroll(loop, inputs, n_iter, init=h0)
    runs[name(ref_spec, 0)] = ref

    def read(h: Tensor) -> Tensor | None:
        if readout is False:
            return None
        with torch.no_grad():
            return (readout or loop.decode)(h, ref.ctx)

    ref_read = read(ref.final)
    rows = []
    B = ref.final.shape[0]
    ref_res = _final_residual(ref)
    for i, spec in enumerate(inits[1:], start=1):
        nm = name(spec, i)
        run = unroll(loop, inputs, n_iter, init=resolve(spec, ref.final))
        runs[nm] = run
        res = _final_residual(run)
        for space, a, b in (
            ("state", ref.final, run.final),
            ("readout", ref_read, read(run.final) if ref_read is not None else None),
        ):
            if a is None:
                continue
            a, b = a.double(), b.double()
            whole = safe_cos(a.reshape(B, -1), b.reshape(B, -1))
            rows.append(
                pd.DataFrame(
                    {
                        "init": nm,
                        "sample": np.arange(B),
                        "space": space,
                        "position": -1,
                        "aa": whole.numpy(),
                        "residual": res[0],
                        "rel_residual": res[1],
                        "ref_residual": ref_res[0],
                    }
                )
            )
            if a.dim() >= 3:  # per position: all axes between batch and the last one
                P = int(np.prod(a.shape[1:-1]))
                pc = safe_cos(a.reshape(B, P, -1), b.reshape(B, P, -1))
                rows.append(
                    pd.DataFrame(
                        {
                            "init": nm,
                            "sample": np.repeat(np.arange(B), P),
                            "space": space,
                            "position": np.tile(np.arange(P), B),
                            "aa": pc.reshape(-1).numpy(),
                            "residual": np.repeat(res[0], P),
                            "rel_residual": np.repeat(res[1], P),
                            "ref_residual": np.repeat(ref_res[0], P),
                        }
                    )
                )
    meta = {
        "seed": seed,
        "reference": name(ref_spec, 0),
        "n_iter": n_iter,
        **(options.get("meta") or {}),
    }
    frame = pd.concat(rows, ignore_index=True)
    for k in ("model", "split"):
        if k in meta:
            frame[k] = meta[k]
    return PathIndependenceResult(frame=frame, runs=runs, meta=meta)


def _final_residual(tr: Any) -> tuple[np.ndarray, np.ndarray]:
    S = tr.states.double()
    B = S.shape[1]
    d = (S[-1] - S[-2]).reshape(B, -1).norm(dim=1)
    rel = d / (S[-1].reshape(B, -1).norm(dim=1) + 1e-9)
    return d.numpy(), rel.numpy()


# ---------------------------------------------------------------------------------------------
# ID vs OOD
# ---------------------------------------------------------------------------------------------
def _summaries(obj: Any) -> dict[str, float]:
    if isinstance(obj, pd.DataFrame) and "class" in obj:
        fr = obj["class"].value_counts(normalize=True)
        return {f"class[{k}]": float(v) for k, v in fr.items()}
    if hasattr(obj, "summary") and callable(obj.summary):
        return dict(obj.summary())
    if isinstance(obj, dict):
        return {str(k): float(v) for k, v in obj.items()}
    raise LoopscopeError(
        f"cannot summarise {type(obj).__name__}: give results with .summary() or a classify frame"
    )


def compare_splits(results_by_split: dict[str, Any]) -> pd.DataFrame:
    """Same statistics side by side for ID vs shifted splits (OOD protocol, spec §11).

    Args:
        results_by_split: ``{split: result}`` or ``{split: [results...]}`` where a result is any
            loopscope result with ``.summary()`` (Metrics, LyapunovResult, BasinResult,
            PathIndependenceResult), a :func:`classify` frame, or a plain ``{metric: value}``.

    Returns:
        tidy DataFrame ``split, source, metric, value`` (pivot with
        ``df.pivot_table(index=["source", "metric"], columns="split", values="value")``).
    """
    if not isinstance(results_by_split, dict) or not results_by_split:
        raise LoopscopeError("compare_splits needs a non-empty {split: result(s)} dict")
    rows = []
    for split, res in results_by_split.items():
        items = res if isinstance(res, (list, tuple)) else [res]
        for r in items:
            src = "classify" if isinstance(r, pd.DataFrame) else type(r).__name__
            for k, v in _summaries(r).items():
                rows.append({"split": split, "source": src, "metric": k, "value": v})
    return pd.DataFrame(rows)
