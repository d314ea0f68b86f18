"""Probes on a Trace: one batched fit over every (iteration, site, position).

``fit_trace(trace, targets)`` (also reached as ``fit_probes(trace, targets)``) collects the
activations (:func:`collect`), stacks iterations x sites (x positions) on the probe axis and fits
them all in one :func:`fit_probes` call. ``targets [B, pos]`` use ``-100`` for "no label".

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

from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope.core.errors import LoopscopeError, reject_unknown_kwargs
from loopscope.probes.activations import ActivationSet, collect
from loopscope.probes.fit import FIT_OPTIONS, ProbeResult, fit_probes

__all__ = ["fit_trace", "probe_trace"]

_TRACE_OPTIONS = ("sites", "positions", "iterations", "pooled", "exclude_diverged")
_META_KEYS = ("model", "task", "split", "seed")


def fit_trace(trace: Any, targets: Any, **options: Any) -> ProbeResult:
    """Fit probes for a ``[B, pos]`` (or ``[B]``) target at every (iteration, site, position).

    Keyword options: ``sites``, ``positions``, ``iterations`` (see :func:`collect`), ``pooled``
    (default False), ``exclude_diverged`` (default True), and every :func:`fit_probes` option
    except ``groups`` / ``mask`` / ``site_labels`` (set here).
    """
    fit_allowed = [k for k in FIT_OPTIONS if k not in ("groups", "site_labels")]
    reject_unknown_kwargs("fit_probes", options, [*_TRACE_OPTIONS, *fit_allowed])
    tro = {k: options.pop(k) for k in _TRACE_OPTIONS if k in options}
    extra_mask = options.pop("mask", None)
    if isinstance(trace, ActivationSet):
        aset = trace
        if tro.get("sites") is not None or tro.get("iterations") is not None:
            aset = aset.select(tro.get("sites"), tro.get("iterations"))
        if tro.get("positions") is not None:
            idx = [aset._pos(int(p)) for p in tro["positions"]]
            aset = ActivationSet(
                aset.X[:, :, idx],
                aset.keys,
                [aset.positions[i] for i in idx],
                aset.widths,
                aset.diverged,
                aset.meta,
            )
    else:
        aset = collect(trace, tro.get("sites"), tro.get("positions"), tro.get("iterations"))
    E, B, P, d = aset.X.shape
    tg = torch.as_tensor(np.asarray(targets.cpu() if torch.is_tensor(targets) else targets))
    if tg.dim() == 1:
        tg = tg.unsqueeze(1).expand(B, max(aset.positions) + 1)
    if tg.dim() != 2 or tg.shape[0] != B or tg.shape[1] <= max(aset.positions):
        raise LoopscopeError(
            f"targets must be [B, pos] = [{B}, >{max(aset.positions)}] (or [B]), got {tuple(tg.shape)}"
        )
    tg = tg.long().clone()
    if extra_mask is not None:
        m = torch.as_tensor(np.asarray(extra_mask))
        if m.shape != tg.shape or m.dtype != torch.bool:
            raise LoopscopeError(f"mask must be bool {tuple(tg.shape)}, got {tuple(m.shape)}")
        tg[~m] = -100
    tg = tg[:, aset.positions]  # [B, P]
    keep = torch.ones(B, dtype=torch.bool)
    n_div = 0
    if tro.get("exclude_diverged", True) and aset.diverged is not None:
        keep = ~aset.diverged
        n_div = int(aset.diverged.sum())
    show_firing = any(k["firing"] for k in aset.keys)
    base = [{k: v for k, v in key.items() if k != "firing" or show_firing} for key in aset.keys]
    meta = {k: aset.meta[k] for k in _META_KEYS if k in aset.meta and k != "seed"}
    meta["n_diverged_excluded"] = n_div
    if tro.get("pooled", False):
        b_idx, p_idx = torch.nonzero((tg != -100) & keep.unsqueeze(1), as_tuple=True)
        if b_idx.numel() == 0:
            raise LoopscopeError("no labelled (non -100) targets at the collected positions")
        X = aset.X[:, b_idx, p_idx]
        labels = [{**k, "position": -1} for k in base]
        return fit_probes(
            X, tg[b_idx, p_idx], groups=b_idx.numpy(), site_labels=labels, meta=meta, **options
        )
    X = aset.X.permute(0, 2, 1, 3).reshape(E * P, B, d)
    y = tg.T.unsqueeze(0).expand(E, P, B).reshape(E * P, B)
    y = torch.where(keep.unsqueeze(0), y, torch.full_like(y, -100))
    labels = [{**k, "position": p} for k in base for p in aset.positions]
    return fit_probes(X, y, site_labels=labels, meta=meta, **options)


def probe_trace(
    trace: Any,
    targets: Any,
    *,
    site: str = "state",
    positions: Any = None,
    mask: Any = None,
    seed: int = 0,
    alpha: float = 1.0,
    pooled: bool = True,
    probe: str = "ridge",
) -> tuple[ProbeResult, pd.DataFrame]:
    """Probe one site at iterations ``1..T`` (the states after each step) — the quick path
    used by the CLI and the paper figures.

    Returns the fit and a per-(iteration, position) frame averaged over folds; positions with
    fewer than 8 labelled sequences or a single class are left out (nothing to probe).
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
        P = tg.shape[1]
        pos = range(P) if positions is None else positions
        good = []
        for p in pos:
            if not -P <= p < P:
                raise LoopscopeError(f"position {p} out of range 0..{P - 1}")
            col = tg[:, p][tg[:, p] != -100]
            if col.numel() >= 8 and col.unique().numel() >= 2:
                good.append(p % P)
        if not good:
            raise LoopscopeError("no position has >= 8 labelled sequences with 2+ classes")
        positions = good
    res = fit_trace(
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
    return res, df[df["n_test"] > 0].reset_index(drop=True)
