"""Probes on a Trace: one batched fit over every (iteration, site, position).

``fit_trace(trace, targets)`` (the same as ``fit_probes(trace, targets)``) collects the
activations (:func:`collect`), stacks iterations x sites (x positions) on the probe axis
(:func:`loopscope.probes.design.trace_design`) and fits them all in one :func:`fit_probes` call.
``targets [B, pos]`` use ``-100`` for "no label".

* per position (default): one probe per (iteration, site, position), examples = sequences;
* ``pooled=True``: one probe per (iteration, site) on every labelled token, split by sequence
  (``groups`` = sequence id), ``position = -1`` in the frame.

Samples the trace flagged as diverged are excluded (``exclude_diverged``) and counted.

Cost and interruption: a probe sweep over every (iteration, site, position) is ONE batched solve
(ridge: one batched linear solve per fold; e.g. 40 probes on 256 sequences of s3_fprm in ~0.05 s
on one CPU core), so it is not chunked or checkpointed; ``loopscope probe`` writes its outputs
atomically (``*.tmp`` then ``os.replace``) once every split is done, and a rerun redoes it.

Example:
    >>> import torch, loopscope as ls
    >>> g = torch.Generator().manual_seed(0)
    >>> bits = torch.randint(0, 2, (64, 1), generator=g)
    >>> step = lambda h, x: h + (2 * x - 1).unsqueeze(-1).double()   # h_t = t * (2 bit - 1)
    >>> loop = ls.FnLoop(step=step, init_state=torch.zeros(1, 1, dtype=torch.float64))
    >>> res = fit_probes(ls.unroll(loop, bits, 3), bits)
    >>> res.to_frame(aggregate=True)[["iteration", "test_acc"]].values.tolist()[1]
    [1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.result import Result, float_summary
from loopscope.core.trace import Trace
from loopscope.probes.activations import ActivationSet
from loopscope.probes.fit import ProbeResult, fit_probes

__all__ = ["fit_trace", "probe_trace", "TraceProbeResult"]


@did_you_mean
def fit_trace(
    trace: Trace | ActivationSet,
    targets: Any,
    *,
    sites: Any = None,
    positions: Any = None,
    iterations: Any = None,
    pooled: bool = False,
    exclude_diverged: bool = True,
    mask: Any = None,
    probe: str = "logistic",
    C: float = 1.0,
    alpha: float = 1.0,
    rank: int | None = None,
    hidden: int = 256,
    weight_decay: float = 1e-4,
    lr: float = 3e-3,
    epochs: int = 50,
    batch_size: int = 256,
    max_iter: int = 1000,
    tol: float = 1e-4,
    dtype: str = "float64",
    solver: str = "lbfgs",
    folds: int | None = None,
    split: Any = "random",
    test_frac: float = 0.25,
    classes: Any = None,
    standardize: bool = True,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> ProbeResult:
    """Fit probes for a ``[B, pos]`` (or ``[B]``) target at every (iteration, site, position).

    Args:
        trace: a :class:`~loopscope.Trace`, or an :class:`ActivationSet` from :func:`collect`.
        targets: ``[B, pos]`` labels (``-100`` = no label), or ``[B]`` for every position.
        sites: ``"state"`` and/or captured hook names (default: the state and every hook).
        positions: positions to probe (default: all; negative counts from the end).
        iterations: iterations to probe (default: all).
        pooled: one probe per (iteration, site) over every labelled token, split by sequence
            (``position = -1`` in the frame), instead of one per position.
        exclude_diverged: leave out the samples the trace flagged as diverged (counted in
            ``meta["n_diverged_excluded"]``).
        mask: ``[B, pos]`` bool, False = leave that token out.
        probe: probe family: ``"logistic"``, ``"ridge"``, ``"lowrank"`` or ``"mlp"``.
        C: inverse L2 strength (logistic, lowrank).
        alpha: L2 strength (ridge).
        rank: rank of the lowrank probe.
        hidden: hidden units (mlp).
        weight_decay: L2 strength (mlp).
        lr: learning rate (mlp).
        epochs: passes over the data (mlp).
        batch_size: minibatch size (mlp).
        max_iter: iteration cap (logistic, lowrank).
        tol: gradient tolerance (logistic, lowrank).
        dtype: precision the probes are solved in, ``"float64"`` or ``"float32"``.
        solver: logistic solver, ``"lbfgs"`` or ``"newton"``.
        folds: k-fold cross-validation over sequences (overrides ``split``).
        split: ``"random"`` (``test_frac`` of the sequences held out), ``"all"``, explicit.
        test_frac: held-out fraction for ``split="random"``.
        classes: the label set (default: the labels observed).
        standardize: z-score every site with its training-fold statistics.
        seed: split and initialisation seed.
        meta: extra entries for the result's ``meta``.

    Returns:
        :class:`ProbeResult` whose frame has ``site``, ``iteration`` and ``position`` columns.
    """
    return fit_probes(
        trace,
        targets,
        sites=sites,
        positions=positions,
        iterations=iterations,
        pooled=pooled,
        exclude_diverged=exclude_diverged,
        mask=mask,
        probe=probe,
        C=C,
        alpha=alpha,
        rank=rank,
        hidden=hidden,
        weight_decay=weight_decay,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_iter=max_iter,
        tol=tol,
        dtype=dtype,
        solver=solver,
        folds=folds,
        split=split,
        test_frac=test_frac,
        classes=classes,
        standardize=standardize,
        seed=seed,
        meta=meta,
    )


@dataclass(kw_only=True, repr=False)
class TraceProbeResult(Result):
    """:func:`probe_trace`'s answer: the fit and its per-(iteration, position) table.

    Attributes:
        fit: the :class:`ProbeResult` over every (iteration, position) probe.
        frame: one row per probe, averaged over folds (``fold = -1``), probes without held-out
            rows left out: site, iteration, position, train_acc, test_acc, n_train, n_test ...
    """

    fit: ProbeResult
    frame: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        """Probes, mean and best held-out accuracy, first iteration reaching the best - 0.01."""
        acc = self.frame["test_acc"].to_numpy(dtype=float)
        best = float(np.nanmax(acc)) if np.isfinite(acc).any() else float("nan")
        near = self.frame["iteration"][acc >= best - 0.01] if np.isfinite(best) else []
        return float_summary(
            {
                "n_probes": len(self.frame),
                "mean_test_acc": float(np.nanmean(acc)) if np.isfinite(acc).any() else None,
                "max_test_acc": best,
                "first_iteration_near_max": int(near.min()) if len(near) else None,
            }
        )


@did_you_mean
def probe_trace(
    trace: Trace,
    targets: Any,
    *,
    site: str = "state",
    positions: Any = None,
    mask: Any = None,
    seed: int = 0,
    alpha: float = 1.0,
    pooled: bool = True,
    probe: str = "ridge",
) -> TraceProbeResult:
    """Probe one site at iterations ``1..T`` (the states after each step) — the quick path
    used by the CLI and the paper figures.

    Args:
        trace: a :class:`~loopscope.Trace` (with ``site`` captured unless it is ``"state"``).
        targets: ``[B, pos]`` labels (``-100`` = none) or ``[B]`` (the same at every position).
        site: ``"state"`` (h_1 .. h_T) or a captured hook name (every firing).
        positions: positions to probe (default: all).
        mask: ``[B, pos]`` bool, False = unlabel that token.
        seed: split seed.
        alpha: L2 strength of the ridge probe.
        pooled: one probe per iteration over every position (else one per position; positions
            with fewer than 8 labelled sequences or a single class are left out).
        probe: probe family (see :func:`fit_probes`).

    Returns:
        :class:`TraceProbeResult`: ``.to_frame()`` is one row per (iteration, position) probe,
        averaged over folds; ``.fit`` the :class:`ProbeResult`.
    """
    T = trace.n_iter
    its = range(1, T + 1) if site == "state" else None
    tg = torch.as_tensor(targets).long().clone()
    if tg.dim() == 1:  # one label per sequence (e.g. a stored item): the same at every position
        src = trace.states if site == "state" else trace[site]
        tg = tg.unsqueeze(1).expand(-1, src.shape[-2]).clone()
    if mask is not None:
        tg[~torch.as_tensor(mask)] = -100
    if not pooled:
        positions = _probeable_positions(tg, positions)
    res = fit_probes(
        trace,
        tg,
        sites=[site],
        positions=positions,
        iterations=its,
        pooled=pooled,
        probe=probe,
        alpha=alpha,
        seed=seed,
    )
    df = res.to_frame(aggregate=True)
    return TraceProbeResult(
        fit=res, frame=df[df["n_test"] > 0].reset_index(drop=True), meta=dict(res.meta)
    )


def _probeable_positions(tg: torch.Tensor, positions: Any) -> list[int]:
    """Positions with >= 8 labelled sequences of 2+ classes (the rest have nothing to probe)."""
    P = tg.shape[1]
    good = []
    for p in range(P) if positions is None else positions:
        if not -P <= p < P:
            raise LoopscopeError(f"position {p} out of range 0..{P - 1}")
        col = tg[:, p][tg[:, p] != -100]
        if col.numel() >= 8 and col.unique().numel() >= 2:
            good.append(p % P)
    if not good:
        raise LoopscopeError("no position has >= 8 labelled sequences with 2+ classes")
    return good
