"""From a Trace to a probe design: activations and targets stacked on the probe axis.

:func:`fit_probes` on a :class:`~loopscope.Trace` (or an :class:`ActivationSet`) first calls
:func:`trace_design`, which collects the activations (:func:`collect`), stacks iterations x sites
(x positions) on the probe axis and lines the ``[B, pos]`` targets up with them; the fit itself
is then the same batched solve as on an array.

* per position (default): one probe per (iteration, site, position), examples = sequences;
* ``pooled=True``: one probe per (iteration, site) on every labelled token, split by sequence
  (``groups`` = sequence id), ``position = -1`` in the site labels.

Samples the trace flagged as diverged are unlabelled (``exclude_diverged``) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError
from loopscope.core.trace import Trace
from loopscope.probes.activations import ActivationSet, collect

__all__ = ["TraceDesign", "trace_design"]

_META_KEYS = ("model", "task", "split")


@dataclass(frozen=True)
class TraceDesign:
    """What :func:`fit_probes` needs from a trace.

    Attributes:
        X: ``[S, N, d]`` activations, one probe site per row of the first axis.
        y: ``[S, N]`` (or ``[N]`` shared by every site) class labels, ``-100`` = unlabelled.
        groups: ``[N]`` sequence id of each example when tokens are pooled, else None.
        site_labels: one dict per site (site, iteration, (firing,) position).
        meta: the trace's model / task / split and ``n_diverged_excluded``.
    """

    X: Tensor
    y: Tensor
    groups: np.ndarray | None
    site_labels: list[dict[str, Any]]
    meta: dict[str, Any]


def _activations(
    trace: Trace | ActivationSet, sites: Any, positions: Any, iterations: Any
) -> ActivationSet:
    if not isinstance(trace, ActivationSet):
        return collect(trace, sites, positions, iterations)
    aset = trace
    if sites is not None or iterations is not None:
        aset = aset.select(sites, iterations)
    if positions is not None:
        idx = [aset._pos(int(p)) for p in positions]
        aset = ActivationSet(
            X=aset.X[:, :, idx],
            keys=aset.keys,
            positions=[aset.positions[i] for i in idx],
            widths=aset.widths,
            diverged=aset.diverged,
            meta=aset.meta,
        )
    return aset


def _targets(targets: Any, aset: ActivationSet, mask: Any, n_pos: int | None = None) -> Tensor:
    """``[B, P]`` labels at the collected positions (``-100`` where ``mask`` is False).

    ``n_pos``: the trace's number of positions when every one was collected; targets of another
    length (another batch's longer sequences) are refused instead of read misaligned."""
    B = aset.batch_size
    last = max(aset.positions)
    tg = torch.as_tensor(np.asarray(targets.cpu() if torch.is_tensor(targets) else targets))
    if tg.dim() == 1:  # one label per sequence: the same at every position
        tg = tg.unsqueeze(1).expand(B, last + 1 if n_pos is None else n_pos)
    want = f"{n_pos}" if n_pos is not None else f">{last}"
    if (
        tg.dim() != 2
        or tg.shape[0] != B
        or tg.shape[1] <= last
        or (n_pos is not None and tg.shape[1] != n_pos)
    ):
        raise LoopscopeError(
            f"targets must be [B, pos] = [{B}, {want}] (or [B]) to line up with the trace's "
            f"positions, got shape {tuple(tg.shape)}"
        )
    tg = tg.long().clone()
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask))
        if m.shape != tg.shape or m.dtype != torch.bool:
            raise LoopscopeError(f"mask must be bool {tuple(tg.shape)}, got {tuple(m.shape)}")
        tg[~m] = -100
    return tg[:, aset.positions]


def trace_design(
    trace: Trace | ActivationSet,
    targets: Any,
    *,
    sites: Any = None,
    positions: Any = None,
    iterations: Any = None,
    pooled: bool = False,
    exclude_diverged: bool = True,
    mask: Any = None,
) -> TraceDesign:
    """Stack the activations of ``trace`` for probing ``targets [B, pos]`` (or ``[B]``).

    Args:
        trace: a :class:`~loopscope.Trace` or an :class:`ActivationSet` from :func:`collect`.
        targets: ``[B, pos]`` labels (``-100`` = no label), or ``[B]`` for every position.
        sites: ``"state"`` and/or captured hook names (default: the state and every hook).
        positions: positions to probe (default: all). iterations: iterations (default: all).
        pooled: one probe per (iteration, site) over all labelled tokens, grouped by sequence.
        exclude_diverged: leave out the samples the trace flagged as diverged.
        mask: ``[B, pos]`` bool, False = leave that token out.
    """
    aset = _activations(trace, sites, positions, iterations)
    E, B, P, d = aset.X.shape
    every = positions is None and not isinstance(trace, ActivationSet)
    tg = _targets(targets, aset, mask, n_pos=len(aset.positions) if every else None)  # [B, P]
    keep = torch.ones(B, dtype=torch.bool)
    meta = {k: aset.meta[k] for k in _META_KEYS if k in aset.meta}
    meta["n_diverged_excluded"] = 0
    if exclude_diverged and aset.diverged is not None:
        keep = ~aset.diverged
        meta["n_diverged_excluded"] = int(aset.diverged.sum())
    show_firing = any(k["firing"] for k in aset.keys)
    base = [{k: v for k, v in key.items() if k != "firing" or show_firing} for key in aset.keys]
    if pooled:
        b_idx, p_idx = torch.nonzero((tg != -100) & keep.unsqueeze(1), as_tuple=True)
        if b_idx.numel() == 0:
            raise LoopscopeError("no labelled (non -100) targets at the collected positions")
        labels = [{**k, "position": -1} for k in base]
        return TraceDesign(aset.X[:, b_idx, p_idx], tg[b_idx, p_idx], b_idx.numpy(), labels, meta)
    X = aset.X.permute(0, 2, 1, 3).reshape(E * P, B, d)
    y = tg.T.unsqueeze(0).expand(E, P, B).reshape(E * P, B)
    y = torch.where(keep.unsqueeze(0), y, torch.full_like(y, -100))
    labels = [{**k, "position": p} for k in base for p in aset.positions]
    return TraceDesign(X, y, None, labels, meta)
