"""Working memory of a loop over input blocks: drift, spectrum, filler fixed point, decay, transplant.

A block-recurrent loop (e.g. :class:`loopscope.models.FAMTransformer`) carries a memory ``M_t``
from block to block, ``M_{t+1} = step(M_t, ctx, t)``. Five questions, one function each:

* :func:`memory_drift`: does ``||M_t||`` stay bounded over hundreds of blocks, does it settle?
* :func:`memory_spectrum`: eigenvalues of ``dM_{t+1} / dM_t`` at a fixed block input; modes with
  ``|lambda|`` near 1 are the directions that can hold an item (its capacity), a strong
  contraction predicts forgetting.
* :func:`filler_fixed_point`: the fixed point ``M*`` of the map of one repeated filler block and
  the distance of a carried memory from it (approaching ``M*`` = forgetting what was written).
* :func:`decodability`: linear probes (:func:`loopscope.probes.fit_probes`) for the stored item
  from the memory ``k`` updates after it was written, for every ``k``: one batched solve.
* :func:`memory_transplant`: the donor's memory put into the recipient's run at block t
  (:func:`loopscope.circuits.state_transplant`): does the answer follow the donor?

The functions know Loops and Traces, never a particular model or task.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> A = torch.diag(torch.tensor([0.999, 0.5, 0.1], dtype=torch.float64))
    >>> loop = FnLoop(step=lambda h: h @ A.T, init_state=torch.ones(3, dtype=torch.float64))
    >>> sp = memory_spectrum(loop, torch.zeros(1, 1), state=torch.zeros(1, 3, dtype=torch.float64))
    >>> sp.summary()["n_near_unit"]
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace

__all__ = [
    "memory_drift",
    "memory_spectrum",
    "filler_fixed_point",
    "decodability",
    "memory_transplant",
    "MemoryDriftResult",
    "MemorySpectrumResult",
    "FillerFixedPointResult",
    "DecodabilityResult",
    "MemoryTransplantResult",
]


def _flat_norm(x: Tensor) -> Tensor:
    return x.detach().reshape(x.shape[0], -1).double().norm(dim=1)


# -- drift --------------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class MemoryDriftResult(Result):
    """Memory norm per block.

    Attributes:
        norm: ``[T + 1, B]`` ``||M_t||``; change: ``[T, B]`` ``||M_{t+1} - M_t|| / ||M_t||``.
        bound: the growth factor counted as bounded (``max_t ||M_t|| <= bound * ||M_0||``).
    """

    norm: np.ndarray
    change: np.ndarray
    bound: float
    settle_tol: float

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration, sample): norm, rel_norm (``/ ||M_0||``), rel_change."""
        T1, B = self.norm.shape
        change = np.vstack([self.change, np.full((1, B), np.nan)])
        return pd.DataFrame(
            {
                "iteration": np.repeat(np.arange(T1), B),
                "sample": np.tile(np.arange(B), T1),
                "norm": self.norm.ravel(),
                "rel_norm": (self.norm / self.norm[:1]).ravel(),
                "rel_change": change.ravel(),
            }
        )

    def summary(self) -> dict[str, float]:
        """Median growth (end, max), bounded / settled fractions, median last relative change."""
        growth = self.norm / self.norm[:1]
        half = self.norm.shape[0] // 2
        late = (self.norm[-1] - self.norm[half]) / self.norm[:1].clip(1e-300)
        return float_summary(
            {
                "n_blocks": self.norm.shape[0] - 1,
                "growth_end": float(np.median(growth[-1])),
                "growth_max": float(np.median(growth.max(0))),
                "late_growth": float(np.median(late)),
                "bounded_fraction": float((growth.max(0) <= self.bound).mean()),
                "last_rel_change": float(np.median(self.change[-1])),
                "settled_fraction": float((self.change[-1] < self.settle_tol).mean()),
            }
        )


@did_you_mean
def memory_drift(
    loop: Loop,
    inputs: Any,
    *,
    n_iter: int,
    bound: float = 10.0,
    settle_tol: float = 1e-3,
    seed: int = 0,
    split: str | None = None,
) -> MemoryDriftResult:
    """Norm and per-block change of the memory over ``n_iter`` blocks of ``inputs``.

    Args:
        loop: a block-recurrent Loop. inputs: what ``loop.encode`` takes (>= n_iter blocks).
        n_iter: blocks consumed. bound: growth factor still counted as bounded.
        settle_tol: a sample has settled when its last relative change is below this.
        seed: init seed. split: recorded in ``meta``.
    """
    from loopscope.core.unroll import unroll

    n_iter = check_positive_int("n_iter", n_iter)
    tr = unroll(loop, inputs, n_iter, seed=seed)
    S = tr.states
    norm = torch.stack([_flat_norm(s) for s in S])
    change = torch.stack([_flat_norm(S[t + 1] - S[t]) for t in range(n_iter)])
    change = change / norm[:-1].clamp_min(1e-300)
    return MemoryDriftResult(
        norm=norm.numpy(),
        change=change.numpy(),
        bound=float(bound),
        settle_tol=float(settle_tol),
        meta=result_meta(loop, seed=seed, split=split, settings={"n_iter": n_iter, "bound": bound}),
    )


# -- spectrum -----------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class MemorySpectrumResult(Result):
    """Eigenvalues of the memory map's Jacobian per sample (all of them, dense)."""

    eigenvalues: list[np.ndarray]
    band: float
    rho: list[float] = field(default_factory=list)

    def n_near_unit(self) -> list[int]:
        """Per sample, modes with ``| |lambda| - 1 | <= band``: the directions that hold an item."""
        return [int((np.abs(np.abs(e) - 1) <= self.band).sum()) for e in self.eigenvalues]

    def to_frame(self) -> pd.DataFrame:
        """One row per (sample, rank): real, imag, modulus, timescale, near_unit."""
        rows = []
        for b, ev in enumerate(self.eigenvalues):
            mod = np.abs(ev)
            with np.errstate(divide="ignore"):
                tau = np.where(mod == 0, 0.0, -1.0 / np.log(np.where(mod == 1, np.nan, mod)))
            rows.append(
                pd.DataFrame(
                    {
                        "sample": b,
                        "rank": np.arange(len(ev)),
                        "real": ev.real,
                        "imag": ev.imag,
                        "modulus": mod,
                        "timescale": tau,
                        "near_unit": np.abs(mod - 1) <= self.band,
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def summary(self) -> dict[str, float]:
        """Median rho, mean / min / max count of near-unit modes, state dimension."""
        n = self.n_near_unit()
        return float_summary(
            {
                "rho_median": float(np.median(self.rho)),
                "n_near_unit": float(np.mean(n)),
                "n_near_unit_min": min(n),
                "n_near_unit_max": max(n),
                "n_unstable": float(
                    np.mean([(np.abs(e) > 1 + self.band).sum() for e in self.eigenvalues])
                ),
                "dim": len(self.eigenvalues[0]),
            }
        )


@did_you_mean
def memory_spectrum(
    loop: Loop,
    inputs: Any,
    *,
    state: Tensor,
    t: int | None = 0,
    band: float = 0.05,
    split: str | None = None,
) -> MemorySpectrumResult:
    """Dense spectrum of ``d step(M, ctx, t) / dM`` at ``state [B, ...]`` (float64).

    Args:
        loop, inputs: the loop and the inputs whose block ``t`` is held fixed.
        state: memory at which to linearise (e.g. the filler fixed point). t: the block index.
        band: ``| |lambda| - 1 | <= band`` counts as a near-unit (memory) mode.
        split: recorded in ``meta``.
    """
    from loopscope.analysis.spectra import spectrum

    if not isinstance(state, Tensor) or state.dim() < 2:
        raise LoopscopeError("state must be a memory tensor [B, ...] with a batch axis")
    if not 0 < band < 1:
        raise LoopscopeError(f"band must be in (0, 1), got {band!r}")
    sp = spectrum(loop, inputs, state, method="dense", t=t, sigma=False)
    return MemorySpectrumResult(
        eigenvalues=[np.asarray(e) for e in sp.eigenvalues],
        band=float(band),
        rho=list(sp.rho),
        meta=result_meta(loop, split=split, settings={"t": t, "band": band}),
    )


# -- filler fixed point -------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class FillerFixedPointResult(Result):
    """The fixed point of one repeated block's map and a carried memory's distance from it.

    Attributes:
        fixed_point: ``[B, ...]`` (float64); status / r_rel: per sample, from the solver
            (``escaped``: a root far beyond the start's norm, see :func:`filler_fixed_point`).
        distance: ``[T + 1, B]`` ``||M_t - M*|| / ||M*||`` of the trace given (or None).
    """

    fixed_point: Tensor
    status: list[str]
    r_rel: np.ndarray
    distance: np.ndarray | None = None

    def to_frame(self) -> pd.DataFrame:
        """Rows per (iteration, sample) with ``distance`` (or per sample if no trace)."""
        B = self.fixed_point.shape[0]
        base = pd.DataFrame({"sample": np.arange(B), "status": self.status, "r_rel": self.r_rel})
        if self.distance is None:
            return base
        T1 = self.distance.shape[0]
        d = pd.DataFrame(
            {
                "iteration": np.repeat(np.arange(T1), B),
                "sample": np.tile(np.arange(B), T1),
                "distance": self.distance.ravel(),
            }
        )
        return d.merge(base, on="sample")

    def summary(self) -> dict[str, float]:
        """Converged fraction, median residual, median distance at the first / last block (over
        the converged samples: NaN if none)."""
        out: dict[str, Any] = {
            "converged_fraction": float(np.mean([s == "converged" for s in self.status])),
            "r_rel_median": float(np.median(self.r_rel)),
            "fixed_point_norm": float(_flat_norm(self.fixed_point).median()),
        }
        conv = np.array([s == "converged" for s in self.status])
        if self.distance is not None:  # only where M* is a fixed point
            d = self.distance[:, conv]
            out["distance_start"] = float(np.median(d[0])) if conv.any() else np.nan
            out["distance_end"] = float(np.median(d[-1])) if conv.any() else np.nan
        return float_summary(out)


@did_you_mean
def filler_fixed_point(
    loop: Loop,
    filler: Any,
    *,
    trace: Trace | None = None,
    t: int = 0,
    h0: Tensor | None = None,
    tol: float = 1e-9,
    max_iter: int = 2000,
    method: str = "anderson",
    escape: float = 1e3,
    split: str | None = None,
) -> FillerFixedPointResult:
    """Fixed point of ``M -> step(M, encode(filler), t)`` per sample, and a trace's distance to it.

    Args:
        loop: a block-recurrent Loop. filler: inputs whose block ``t`` is the repeated block.
        trace: a run of ``loop`` (same batch) whose memory is compared with ``M*``.
        t: block index of ``filler`` that is repeated. h0: start (default ``loop.init_state``).
        tol: tolerance on ``||f(M) - M||`` relative to ``max(1, ||h0||)`` (absolute stop).
        max_iter, method: passed to :func:`loopscope.analysis.solve`.
        escape: a root with ``||M*|| > escape * max(1, ||h0||)`` is flagged ``escaped``.
        split: recorded in ``meta``.
    """
    from loopscope.analysis.solvers import solve
    from loopscope.core.numerics import reference_norm

    if h0 is None:
        with torch.no_grad():
            h0 = loop.init_state(loop.encode(filler), torch.Generator().manual_seed(0))
    ref = reference_norm(h0)
    # absolute tolerance: a relative one "converges" at infinity on a map that drifts by a
    # bounded step (f(z) - z = c: r_rel = |c| / |z| -> 0), the pre-norm memory's case
    abs_tol = tol * float(ref.median())
    res = solve(
        loop, filler, h0=h0, method=method, tol=abs_tol, max_iter=max_iter, t=t, stop_mode="abs"
    )
    zstar = res.z_best.detach()
    status = list(res.status)
    far = _flat_norm(zstar) > escape * ref
    for i in far.nonzero().flatten().tolist():
        status[i] = "escaped"  # a far-away root, not the point the memory sees
    dist = None
    if trace is not None:
        if trace.states.shape[1] != zstar.shape[0]:
            raise LoopscopeError(
                f"trace has batch {trace.states.shape[1]} but filler has {zstar.shape[0]}"
            )
        ref = _flat_norm(zstar).clamp_min(1e-300)
        dist = torch.stack([_flat_norm(s.double() - zstar) / ref for s in trace.states]).numpy()
    return FillerFixedPointResult(
        fixed_point=zstar,
        status=status,
        r_rel=res.r_rel.double().numpy(),
        distance=dist,
        meta=result_meta(loop, split=split, settings={"t": t, "tol": tol, "method": method}),
    )


# -- decodability vs updates since written ---------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class DecodabilityResult(Result):
    """Probe accuracy for the stored item vs memory updates since it was written."""

    frame: pd.DataFrame
    chance: float

    def to_frame(self) -> pd.DataFrame:
        """One row per ``updates`` (k): test_acc, train_acc, n (examples with a state k after)."""
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """Accuracy after 1 and after the most updates; half-life (first k below half-way to chance)."""
        f = self.frame.sort_values("updates")
        acc = f["test_acc"].to_numpy()
        half = (acc[0] + self.chance) / 2
        below = np.nonzero(acc < half)[0]
        return float_summary(
            {
                "acc_first": acc[0],
                "acc_last": acc[-1],
                "max_updates": int(f["updates"].max()),
                "half_life": float(f["updates"].iloc[below[0]]) if len(below) else np.inf,
                "chance": self.chance,
            }
        )


@did_you_mean
def decodability(
    trace: Trace,
    item: Any,
    written_at: Any,
    *,
    max_updates: int | None = None,
    probe: str = "logistic",
    min_examples: int = 20,
    seed: int = 0,
    split: str | None = None,
) -> DecodabilityResult:
    """Linear probes for ``item [B]`` from the memory ``k`` updates after it was written.

    Site ``k`` uses ``states[written_at + k]`` of every sample where that state exists (the item
    is written by the step that consumes block ``written_at``, so ``k >= 1``). All sites are one
    batched :func:`loopscope.probes.fit_probes` solve (random 75/25 split per site).

    Args:
        trace: a run whose ``states [T + 1, B, ...]`` are the memory. item: ``[B]`` labels.
        written_at: ``[B]`` block index where the item was consumed.
        max_updates: largest k (default: T). probe: ``fit_probes`` probe kind.
        min_examples: sites with fewer examples are dropped. seed: split seed. split: meta.
    """
    from loopscope.probes import fit_probes

    y = torch.as_tensor(item).long().reshape(-1)
    w = torch.as_tensor(written_at).long().reshape(-1)
    S = trace.states
    T, B = S.shape[0] - 1, S.shape[1]
    if y.numel() != B or w.numel() != B:
        raise LoopscopeError(
            f"item and written_at must be [B] = [{B}], got {y.numel()}, {w.numel()}"
        )
    K = T if max_updates is None else min(T, check_positive_int("max_updates", max_updates))
    X = S.reshape(T + 1, B, -1).double()
    sites, labels, ks = [], [], []
    for k in range(1, K + 1):
        at = w + k
        ok = at <= T
        if int(ok.sum()) < min_examples:
            continue
        sites.append(X[at.clamp_max(T), torch.arange(B)])
        labels.append(torch.where(ok, y, torch.full_like(y, -100)))
        ks.append(k)
    if not sites:
        raise LoopscopeError(f"no update count has {min_examples} examples: pass more samples")
    res = fit_probes(
        torch.stack(sites), torch.stack(labels), probe=probe, seed=seed, classes=torch.unique(y)
    )
    pf = res.to_frame().groupby("site")[["test_acc", "train_acc", "n_test"]].mean()
    frame = pd.DataFrame(
        {
            "updates": ks,
            "test_acc": pf["test_acc"].to_numpy(),
            "train_acc": pf["train_acc"].to_numpy(),
            "n": [int((lab != -100).sum()) for lab in labels],
            "n_test": pf["n_test"].to_numpy().astype(int),
        }
    )
    chance = float(torch.bincount(y).max()) / B
    return DecodabilityResult(
        frame=frame,
        chance=chance,
        meta=result_meta(trace.loop, seed=seed, split=split, settings={"probe": probe}),
    )


# -- transplant ---------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class MemoryTransplantResult(Result):
    """Per (iteration, sample): the recipient's answer after receiving the donor's memory at t."""

    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """iteration (block t), sample, margin (donor minus recipient logit), follows_donor, recovery."""
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """Fraction following the donor at the first and the last transplant block, and overall."""
        f = self.frame
        g = f.groupby("iteration")["follows_donor"].mean()
        return float_summary(
            {
                "follows_donor": float(f["follows_donor"].mean()),
                "follows_donor_first": float(g.iloc[0]),
                "follows_donor_last": float(g.iloc[-1]),
            }
        )


@did_you_mean
def memory_transplant(
    loop: Loop,
    donor: Any,
    recipient: Any,
    *,
    donor_answer: Any,
    recipient_answer: Any,
    n_iter: int,
    position: int = -1,
    iterations: Any = "all",
    seed: int = 0,
    split: str | None = None,
) -> MemoryTransplantResult:
    """Transplant the donor's memory ``M_t`` into the recipient's run at every block ``t``.

    The read-out margin is ``logit[donor_answer] - logit[recipient_answer]`` at ``position`` of
    the decoded output after ``n_iter`` blocks; ``follows_donor`` = margin > 0. The memory carries
    the item iff the answer follows the donor exactly when the donor's item was written before t
    and the recipient's was not written after it.

    Args:
        loop: a block-recurrent Loop. donor, recipient: inputs (same shape).
        donor_answer, recipient_answer: ``[B]`` class ids. n_iter: blocks consumed.
        position: output position read. iterations: blocks t to transplant at ("all" or a list).
        seed: init seed. split: recorded in ``meta``.
    """
    from loopscope.circuits.patching import state_transplant

    da = torch.as_tensor(donor_answer).long().reshape(-1, 1)
    ra = torch.as_tensor(recipient_answer).long().reshape(-1, 1)

    def margin(logits: Tensor, idx: Tensor) -> Tensor:
        lg = logits[:, position].double()
        return lg.gather(1, da[idx]).squeeze(1) - lg.gather(1, ra[idx]).squeeze(1)

    sw = state_transplant(
        loop, donor, recipient, margin, n_iter=n_iter, iterations=iterations, seed=seed
    ).to_frame()
    sw = sw[sw["measured_at"] == n_iter]
    frame = pd.DataFrame(
        {
            "iteration": sw["t"].to_numpy(),
            "sample": sw["example"].to_numpy(),
            "margin": sw["metric"].to_numpy(),
            "follows_donor": sw["metric"].to_numpy() > 0,
            "recovery": sw["recovery"].to_numpy(),
        }
    )
    return MemoryTransplantResult(
        frame=frame,
        meta=result_meta(loop, seed=seed, split=split, settings={"n_iter": n_iter}),
    )
