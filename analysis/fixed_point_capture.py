"""Census solver: Adam warm start, chord-Newton capture by known fixed points, LM for the rest.

A census solves the *same* map from hundreds of seeds, and most seeds end at a handful of points.
Solving each seed with its own dense Levenberg–Marquardt pays an n-column Jacobian, a Gram matrix
and a Cholesky factorisation (O(n³)) at every iteration of every seed; the FixedPointFinder recipe
pays O(n²) per iteration but thousands of iterations and stops at slow points. ``capture`` spends
the O(n³) work once per *point* instead of once per seed-iteration:

1. **Warm start.** Adam on q = ½‖f(z) − z‖² (one forward and one vjp per iteration, O(n²)) for
   ``adam_iters`` iterations from every active seed, with a step ``lr`` × the RMS of that input
   sample's seeds, carries the seeds into the neighbourhoods of critical points of q; a seed
   whose r_rel drops below ``settle`` stops there (a contractive map settles every seed within
   a few steps, and Adam's fixed step would only circle the point).
2. **Capture.** Every fixed point found so far for the same input sample keeps the LU factors of
   J(h*) − I. A seed is iterated with the chord-Newton step z ← z − (J(h*) − I)⁻¹ (f(z) − z) of its
   ``n_try`` nearest known points, one at a time (``chord_steps`` steps, O(n²) each, all seeds
   that share a point in one triangular solve). A seed is *captured* only if its own iterate
   reaches r_rel < tol: the end point is that seed's own, verified fixed point (often the point
   that captured it, sometimes another one), never a copy of a representative.
3. **Representatives.** In every round but the last, ``k_rep`` uncaptured seeds per input
   sample, spread out by farthest-point sampling, are solved by the dense LM of
   :mod:`~loopscope.analysis.solvers`; their fixed points join the library and are tried on the
   remaining seeds at once. All representatives of a round are solved *before* they capture
   anything: capture is loose (a chord may drag a seed to a point it was not heading for), so
   discovering points in small batches lets early points steal the seeds of later ones (a
   9-point test map: 4 of 9 found with batches of 4, 7 with 8 representatives, 9 with 16).

After the last round's warm start and capture, every still-uncaptured seed is solved by LM from
its warm-started state, so slow points and non-converged seeds get exactly the LM's stalling
tests and labels.

Measured on random tanh RNNs (``benchmarks/census.py``): the LM work drops from every seed to a
few dozen, and more seeds end at verified fixed points than with LM alone, because the warm start
leaves fewer seeds in LM's slow-point traps.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> from loopscope.analysis.loopmap import LoopMap
    >>> loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    >>> m = LoopMap(loop, None, state_shape=(1,), batch_size=5)
    >>> z0 = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None]
    >>> res = capture_solve(m, z0, torch.zeros(5, dtype=torch.long), tol=1e-13)
    >>> res.status
    ['converged', 'converged', 'converged', 'converged', 'converged']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.solvers import LM, SolverConfig, SolveResult, _kappa, _positive, solve_map
from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.result import result_meta

__all__ = ["capture_solve", "Capture"]


@dataclass(frozen=True, kw_only=True)
class Capture(SolverConfig):
    """Settings of the census solver (see the module docstring).

    Args:
        adam_iters: Adam warm-start iterations per round.
        lr: warm-start step, relative to the RMS of the input sample's seeds.
        rounds: warm start + capture rounds (representatives are solved in all but the last).
        k_rep: representatives per input sample and round (farthest-point sampling).
        n_try: nearest known points tried per seed.
        chord_steps: chord-Newton steps per capture attempt.
        dense_max: largest state size (an n x n LU factor is kept per point).
        settle: r_rel below which a seed leaves the warm start for the chord.
        lm: settings of the LM sub-solves (representatives and the rest).
    """

    name: ClassVar[str] = "capture"
    adam_iters: int = 70
    lr: float = 0.05
    rounds: int = 2
    k_rep: int = 16
    n_try: int = 3
    chord_steps: int = 20
    dense_max: int = 1024
    settle: float = 1e-2
    lm: LM = field(default_factory=LM)

    def __post_init__(self) -> None:
        for name in ("adam_iters", "rounds", "k_rep", "n_try", "chord_steps", "dense_max"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr", "settle"):
            _positive(name, getattr(self, name))
        if not isinstance(self.lm, LM):
            raise LoopscopeError(f"lm must be an LM config, got {type(self.lm).__name__}")


Capture.__init__ = did_you_mean(Capture.__init__)  # type: ignore[method-assign]


def _farthest(X: Tensor, k: int) -> Tensor:
    """Indices of ``k`` rows of ``X [m, n]`` by farthest-point sampling from row 0 (deterministic)."""
    sel = [0]
    d = (X - X[0]).norm(dim=1)
    for _ in range(1, min(k, len(X))):
        i = int(d.argmax())
        if float(d[i]) == 0.0:
            break  # the rest coincide with a chosen row
        sel.append(i)
        d = torch.minimum(d, (X - X[i]).norm(dim=1))
    return torch.as_tensor(sel, dtype=torch.long)


class _Book:
    """Per-seed best iterate, residual traces and provenance across the three phases."""

    def __init__(self, z0: Tensor) -> None:
        S = z0.shape[0]
        inf = torch.full((S,), math.inf, dtype=torch.float64)
        self.z_best, self.z_last = z0.clone(), z0.clone()
        self.rel_best, self.abs_best, self.rel_last = inf.clone(), inf.clone(), inf.clone()
        self.best_at = torch.zeros(S, dtype=torch.long)
        self.n_rec = torch.zeros(S, dtype=torch.long)
        self.extra = {k: torch.zeros(S, dtype=torch.long) for k in ("nfe", "n_jvp", "n_vjp")}
        self.status = ["max_iter"] * S
        self.reason = ["iteration budget exhausted"] * S
        self.log: list[tuple[Tensor, Tensor, Tensor]] = []

    def record(self, idx: Tensor, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """Score iterates ``z`` of seeds ``idx``; returns their (r_rel, r_abs)."""
        r_abs = (fz - z).norm(dim=1).to(torch.float64)
        r_rel = r_abs / (fz.norm(dim=1).to(torch.float64) + 1e-9)
        finite = torch.isfinite(r_rel) & torch.isfinite(z).all(1)
        r_abs = torch.where(finite, r_abs, math.inf)
        r_rel = torch.where(finite, r_rel, math.inf)
        self._merge(idx, z, r_rel, r_abs, self.n_rec[idx])
        self.log.append((idx.clone(), r_abs.clone(), r_rel.clone()))
        self.z_last[idx], self.rel_last[idx] = z, r_rel
        self.n_rec[idx] += 1
        return r_rel, r_abs

    def _merge(self, idx: Tensor, z: Tensor, r_rel: Tensor, r_abs: Tensor, at: Tensor) -> None:
        better = r_rel < self.rel_best[idx]
        bi = idx[better]
        self.z_best[bi], self.rel_best[bi], self.abs_best[bi] = (
            z[better],
            r_rel[better],
            r_abs[better],
        )
        self.best_at[bi] = at[better]

    def absorb(self, idx: Tensor, res: SolveResult) -> None:
        """Append an LM sub-solve of seeds ``idx`` (its traces, counters, best, status)."""
        n = res.z_best.shape[0]
        zb, zl = res.z_best.reshape(n, -1), res.z_last.reshape(n, -1)
        self._merge(idx, zb, res.r_rel, res.r_abs, self.n_rec[idx] + res.iterations - 1)
        for j, b in enumerate(idx.tolist()):
            self.log.append(
                (
                    torch.full((len(res.residuals[j]),), b, dtype=torch.long),
                    torch.as_tensor(res.residuals_abs[j], dtype=torch.float64),
                    torch.as_tensor(res.residuals[j], dtype=torch.float64),
                )
            )
            self.status[b], self.reason[b] = res.status[j], f"LM: {res.reason[j]}"
        self.z_last[idx], self.rel_last[idx] = zl, res.r_rel_last
        self.n_rec[idx] += res.iterations
        self.extra["nfe"][idx] += res.nfe
        self.extra["n_jvp"][idx] += res.n_jvp
        self.extra["n_vjp"][idx] += res.n_vjp

    def traces(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        S = len(self.status)
        rel: list[list[float]] = [[] for _ in range(S)]
        ab: list[list[float]] = [[] for _ in range(S)]
        for idx, a, r in self.log:
            for b, av, rv in zip(idx.tolist(), a.tolist(), r.tolist(), strict=True):
                rel[b].append(rv)
                ab[b].append(av)
        return [np.asarray(r) for r in rel], [np.asarray(a) for a in ab]


class _CaptureRun:
    """One census solve: the seeds' iterates ``z``, their book, the per-input library of known
    fixed points ``{input: [(point, LU of J(h*) − I, pivots, seed that found it)]}``."""

    def __init__(
        self, m: LoopMap, z0: Tensor, owner: Tensor, tol: float, max_iter: int, cfg: Capture
    ) -> None:
        self.m, self.tol, self.max_iter, self.cfg = m, tol, max_iter, cfg
        S, n = z0.shape
        self.n = n
        self.owner = torch.as_tensor(owner, dtype=torch.long)
        self.z = z0.detach().clone()
        self.book = _Book(self.z)
        self.done = torch.zeros(S, dtype=torch.bool)
        self.library: dict[int, list[tuple[Tensor, Tensor, Tensor, int]]] = {}
        self.eye = torch.eye(n, dtype=self.z.dtype)
        self.owners = self.owner.unique().tolist()
        self.lr = self._step_sizes()
        self.mom, self.vel = torch.zeros_like(self.z), torch.zeros_like(self.z)
        self.steps = torch.zeros(S, dtype=torch.long)
        self.chunk = max(1, 2**25 // max(1, n * n))

    def _step_sizes(self) -> Tensor:
        """The warm-start step, relative to each input's state scale."""
        z, owner = self.z, self.owner
        lr = torch.empty(z.shape[0], dtype=z.dtype)
        finite = torch.isfinite(z).all(1)
        for b in self.owners:
            sel = owner == b
            ok = z[sel & finite]  # a NaN / inf seed must not poison its neighbours' step size
            rms = float(ok.pow(2).mean().sqrt()) if len(ok) else 1.0
            lr[sel] = float(self.cfg.lr) * max(rms, 1e-12)
        return lr

    # -- phase 1: Adam warm start ---------------------------------------------------------------
    def warm_start(self, idx: Tensor) -> None:
        m, book, settle = self.m, self.book, float(self.cfg.settle)
        b1, b2 = 0.9, 0.999
        # local contiguous copies: gathers / scatters per iteration cost more than the step
        zi, mi, vi, ti = self.z[idx], self.mom[idx], self.vel[idx], self.steps[idx]
        lri = self.lr[idx, None]
        best_z, best_r = zi.clone(), torch.full((len(idx),), math.inf, dtype=torch.float64)
        count = torch.zeros(len(idx), dtype=torch.long)
        k = torch.arange(len(idx))
        for _ in range(int(self.cfg.adam_iters)):
            fz, grad = m.q_grad(zi[k], idx[k])
            r_abs = (fz - zi[k]).norm(dim=1).to(torch.float64)
            r_rel = r_abs / (fz.norm(dim=1).to(torch.float64) + 1e-9)
            book.log.append((idx[k], r_abs, r_rel))
            count[k] += 1
            better = r_rel < best_r[k]  # NaN never compares smaller: a blown-up seed keeps its best
            best_z[k[better]], best_r[k[better]] = zi[k][better], r_rel[better]
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            ti[k] += 1
            mi[k] = b1 * mi[k] + (1 - b1) * grad
            vi[k] = b2 * vi[k] + (1 - b2) * grad * grad
            bc1 = (1 - b1 ** ti[k].to(zi.dtype))[:, None]
            bc2 = (1 - b2 ** ti[k].to(zi.dtype))[:, None]
            zi[k] = zi[k] - lri[k] * (mi[k] / bc1) / ((vi[k] / bc2).sqrt() + 1e-12)
            # a seed already near a fixed point is left for the chord
            k = k[~(r_rel < settle)]
            if k.numel() == 0:
                break
        book.n_rec[idx] += count
        zi = torch.where((best_r < settle)[:, None], best_z, zi)
        fz = m.f(best_z, idx)
        book.record(idx, best_z, fz)
        self.z[idx], self.mom[idx], self.vel[idx], self.steps[idx] = zi, mi, vi, ti

    # -- phase 2: chord-Newton capture ----------------------------------------------------------
    def chord(self, idx: Tensor, first: dict[int, int] | None = None) -> None:
        """Try to capture seeds ``idx`` with their input's nearest known points, from library
        entry ``first[b]`` on (the older ones already failed from these positions); points the
        chord lands on that the library lacks join it and are tried on the rest."""
        first = dict(first or {})
        done, owner = self.done, self.owner
        while True:
            was_done = done.clone()
            for b in self.owners:
                lib = self.library.get(b, [])[first.get(b, 0) :]
                sb = idx[(owner[idx] == b) & ~done[idx]]
                if not lib or sb.numel() == 0:
                    continue
                P = torch.stack([p for p, *_ in lib])
                order = torch.cdist(self.z[sb], P).argsort(dim=1)
                for rank in range(min(int(self.cfg.n_try), len(lib))):
                    for j, (_, LU, piv, src) in enumerate(lib):
                        sel = sb[(order[:, rank] == j) & ~done[sb]]
                        if sel.numel():
                            self._chord_run(sel, LU, piv, src)
            first = {b: len(self.library.get(b, [])) for b in self.owners}
            if not self.add_points(idx[done[idx] & ~was_done[idx]]):
                return

    def add_points(self, cand: Tensor) -> int:
        """Add the converged end points of seeds ``cand`` that the library lacks (1e-6 relative);
        one Jacobian and LU factorisation per new point. Returns how many were added."""
        book, owner = self.book, self.owner
        new: list[int] = []
        for s in cand[book.rel_best[cand] < self.tol].tolist():
            p, lib = book.z_best[s], self.library.get(int(owner[s]), [])
            pts = [q for q, *_ in lib] + [book.z_best[t] for t in new if owner[t] == owner[s]]
            if all(float((p - q).norm()) > 1e-6 * (1 + float(q.norm())) for q in pts):
                new.append(s)
        if not new:
            return 0
        found = torch.as_tensor(new, dtype=torch.long)
        J = self.m.subset(found).jacobian(book.z_best[found]) - self.eye
        book.extra["n_jvp"][found] += self.n
        added = 0
        for i, s in enumerate(new):
            LU, piv, info = torch.linalg.lu_factor_ex(J[i])
            if int(info) == 0:  # a singular J − I (a bifurcation point) cannot drive chords
                self.library.setdefault(int(owner[s]), []).append((book.z_best[s], LU, piv, s))
                added += 1
        return added

    def _chord_run(self, sel: Tensor, LU: Tensor, piv: Tensor, src: int) -> None:
        m, book, tol = self.m, self.book, self.tol
        zz = self.z[sel].clone()
        fz = m.f(zz, sel)
        r_rel, r_abs = book.record(sel, zz, fz)
        live = torch.isfinite(r_abs) & (r_rel >= tol)
        r0 = r_abs.clone()
        for _ in range(int(self.cfg.chord_steps)):
            if not bool(live.any()):
                break
            k = live.nonzero().flatten()
            step = torch.linalg.lu_solve(LU, piv, (zz[k] - fz[k]).T).T  # (J* − I) s = −g
            zz[k] = zz[k] + step
            fz[k] = m.f(zz[k], sel[k])
            rr, ra = book.record(sel[k], zz[k], fz[k])
            r_rel[k], r_abs[k] = rr, ra
            # the chord iteration is not monotone, but one that blows up will not come back
            live[k] = torch.isfinite(ra) & (rr >= tol) & (ra < 1e3 * r0[k])
        got = r_rel < tol
        for b in sel[got].tolist():
            book.status[b] = "converged"
            book.reason[b] = f"chord-Newton capture with the Jacobian of the point from seed {src}"
        self.done[sel[got]] = True

    # -- phase 3: LM for representatives and the rest -----------------------------------------
    def lm(self, idx: Tensor) -> None:
        for s0 in range(0, idx.numel(), self.chunk):
            k = idx[s0 : s0 + self.chunk]
            sub = self.m.subset(k)
            res = solve_map(sub, self.z[k].clone(), self.cfg.lm, self.tol, self.max_iter)
            self.book.absorb(k, res)
            self.done[k] = True

    def representatives(self) -> Tensor | None:
        """``k_rep`` uncaptured finite seeds per input sample, spread by farthest points."""
        reps = []
        for b in self.owners:
            # non-finite seeds are left to the final LM, which labels them diverged
            ok = (self.owner == b) & ~self.done & torch.isfinite(self.z).all(1)
            sb = ok.nonzero().flatten()
            if sb.numel():
                reps.append(sb[_farthest(self.z[sb], int(self.cfg.k_rep))])
        return torch.cat(reps) if reps else None

    def run(self) -> None:
        rounds = int(self.cfg.rounds)
        for r in range(rounds):
            active = (~self.done).nonzero().flatten()
            if active.numel() == 0:
                break
            self.warm_start(active)
            self.chord(active)
            if r == rounds - 1:
                break  # the final LM below solves every seed still uncaptured, representatives too
            rep = self.representatives()
            if rep is None:
                break
            self.lm(rep)
            sizes = {b: len(self.library.get(b, [])) for b in self.owners}
            if self.add_points(rep):
                self.chord((~self.done).nonzero().flatten(), sizes)
        rest = (~self.done).nonzero().flatten()
        if rest.numel():
            self.lm(rest)

    def result(self, wall: float) -> SolveResult:
        book, m = self.book, self.m
        rel, ab = book.traces()
        settings = {
            "resolved": "capture",
            "options": self.cfg.options(),
            "library": {b: [src for *_, src in lib] for b, lib in self.library.items()},
        }
        return SolveResult(
            z_last=m.unflatten(book.z_last),
            z_best=m.unflatten(book.z_best),
            nfe=m.nfe + book.extra["nfe"],
            n_jvp=m.n_jvp + book.extra["n_jvp"],
            n_vjp=m.n_vjp + book.extra["n_vjp"],
            iterations=book.n_rec.clone(),
            status=list(book.status),
            reason=list(book.reason),
            r_rel=book.rel_best.clone(),
            r_abs=book.abs_best.clone(),
            r_rel_last=book.rel_last.clone(),
            kappa=torch.tensor([_kappa(a) for a in ab], dtype=torch.float64),
            best_is_last=book.best_at == (book.n_rec - 1),
            residuals=rel,
            residuals_abs=ab,
            method="capture",
            tol=float(self.tol),
            wall_time=wall,
            meta=result_meta(m.loop, settings=settings),
        )


@did_you_mean
def capture_solve(
    m: LoopMap,
    z0: Tensor,
    owner: Tensor,
    tol: float,
    max_iter: int = 100,
    *,
    config: Capture | None = None,
) -> SolveResult:
    """Solve ``f(z) = z`` from seeds ``z0 [S, n]`` of a census (see the module docstring).

    Args:
        m: LoopMap over the S seeds (sample i is seed i; its context that of input ``owner[i]``).
        z0: ``[S, n]`` seeds in the analysis dtype.
        owner: ``[S]`` long, the input sample of each seed: only seeds of the same input share
            fixed points (the map differs between inputs).
        tol: r_rel below which a seed has converged.
        max_iter: the LM iteration budget per seed (warm-start and chord steps come on top).
        config: :class:`Capture` settings (default ``Capture()``; its ``lm`` field configures
            the LM sub-solves).

    Returns:
        :class:`~loopscope.analysis.solvers.SolveResult` over the S seeds; ``status`` is
        ``converged`` for captured seeds (``reason`` names the seed whose point captured it) and
        the LM's status for the others; ``iterations`` counts every evaluated iterate.
    """
    cfg = Capture() if config is None else config
    if not isinstance(cfg, Capture):
        raise LoopscopeError(f"config must be a Capture config, got {type(cfg).__name__}")
    if not isinstance(m, LoopMap):
        raise LoopscopeError(f"m must be a LoopMap, got {type(m).__name__}")
    if not isinstance(z0, Tensor) or z0.dim() != 2 or z0.shape != (m.B, m.n):
        raise LoopscopeError(f"z0 must be a tensor [{m.B}, {m.n}] (the map's seeds)")
    _positive("tol", tol)
    check_positive_int("max_iter", max_iter)
    S, n = z0.shape
    if n > int(cfg.dense_max):
        raise LoopscopeError(
            f"capture keeps an {n}x{n} LU factor per fixed point; states above dense_max="
            f"{cfg.dense_max} need method='lm' (Gauss-Newton-CG)"
        )
    t0 = time.perf_counter()
    m.reset_counts()
    run = _CaptureRun(m, z0, owner, tol, max_iter, cfg)
    run.run()
    return run.result(time.perf_counter() - t0)
