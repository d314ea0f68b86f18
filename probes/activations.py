"""``collect``: activations of a Trace keyed by (iteration, site, position), ready for probes.

A site is ``"state"`` (``trace.states``: ``h_0 .. h_T``, iteration ``t`` = the state entering step
``t``, the ``hook_state`` convention) or any captured hook (``trace[hook]`` with its firing labels
``(t, k)``: iteration ``t``, firing ``k``). Activations are ``[B, pos, d]`` per entry; a hook
without a position axis (``[B, d]``) gets one position (0); extra middle axes (e.g. the HRM slow
state ``[B, 2, pos, d]``) become separate sites ``"state[0]"``, ``"state[1]"``. Sites of different
width are zero-padded to the widest (a constant zero feature changes no probe fit).

Example:
    >>> import torch, loopscope as ls
    >>> loop = ls.FnLoop(step=lambda h: 0.5 * h, init_state=torch.ones(3, 4))
    >>> acts = collect(ls.unroll(loop, torch.zeros(2, 1), 5))
    >>> acts.X.shape, acts.keys[1]
    (torch.Size([6, 2, 3, 4]), {'site': 'state', 'iteration': 1, 'firing': 0})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.result import Result, float_summary
from loopscope.core.trace import Trace

__all__ = ["ActivationSet", "collect"]


@dataclass(kw_only=True, repr=False)
class ActivationSet(Result):
    """Stacked activations ``X [E, B, P, d]`` with one key dict per entry.

    Attributes:
        X: activations; entry ``e`` is ``keys[e]`` = ``{"site", "iteration", "firing"}``.
        keys: entry keys; positions: original position index of each of the ``P`` positions.
        widths: true width of each entry before zero-padding.
        diverged: ``[B]`` bool, samples the trace flagged as diverged.
        meta: trace metadata (model, task, split, seed ...).
    """

    X: Tensor
    keys: list[dict[str, Any]]
    positions: list[int]
    widths: list[int] = field(default_factory=list)
    diverged: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(k["site"] for k in self.keys))

    @property
    def batch_size(self) -> int:
        return int(self.X.shape[1])

    def select(self, site: Any = None, iterations: Any = None) -> ActivationSet:
        """Entries of ``site`` (name or list) and ``iterations`` (int or iterable)."""
        sites = None if site is None else ([site] if isinstance(site, str) else list(site))
        its = None
        if iterations is not None:
            its = {iterations} if isinstance(iterations, int) else set(iterations)
        idx = [
            i
            for i, k in enumerate(self.keys)
            if (sites is None or k["site"] in sites) and (its is None or k["iteration"] in its)
        ]
        if not idx:
            raise LoopscopeError(
                f"no entries for site={site!r}, iterations={iterations!r} (sites: {self.sites})"
            )
        return ActivationSet(
            X=self.X[idx],
            keys=[self.keys[i] for i in idx],
            positions=list(self.positions),
            widths=[self.widths[i] for i in idx] if self.widths else [],
            diverged=self.diverged,
            meta=dict(self.meta),
        )

    def _pos(self, position: int) -> int:
        if position not in self.positions:
            raise LoopscopeError(f"position {position} was not collected (have {self.positions})")
        return self.positions.index(position)

    def get(self, iteration: int, site: str, position: int, firing: int = 0) -> Tensor:
        """Activation ``[B, d]`` at one (iteration, site, position)."""
        for i, k in enumerate(self.keys):
            if k["site"] == site and k["iteration"] == iteration and k["firing"] == firing:
                return self.X[i, :, self._pos(position), : (self.widths or [None] * len(self))[i]]
        raise LoopscopeError(f"no entry (iteration={iteration}, site={site!r}, firing={firing})")

    def at_position(self, position: int) -> Tensor:
        """All entries at one position: ``[E, B, d]``."""
        return self.X[:, :, self._pos(position)]

    def to_frame(self) -> pd.DataFrame:
        """One row per entry: site, iteration, firing, width."""
        df = pd.DataFrame(self.keys)
        if self.widths:
            df["width"] = self.widths
        return df

    def summary(self) -> dict[str, float]:
        """Entries, sites, samples, positions, feature width and diverged samples."""
        return float_summary(
            {
                "n_entries": len(self.keys),
                "n_sites": len(self.sites),
                "batch_size": self.batch_size,
                "n_positions": len(self.positions),
                "d": int(self.X.shape[-1]),
                "n_diverged": 0 if self.diverged is None else int(self.diverged.sum()),
            }
        )


def _state_layout(trace: Any, a: Tensor) -> Tensor:
    """States ``[n, B, ...]`` in probe layout ``[n, B, *stack, pos, d]``, read from the loop's
    declared ``state_axes`` (:mod:`loopscope.core.layout`; an undeclared ``[B, 2, pos, d]`` is
    refused, not guessed)."""
    from loopscope.core.layout import probe_layout

    if trace.loop is None and a.dim() > 4:
        raise LoopscopeError(
            f"the state has shape {tuple(a.shape[1:])} and the trace has no loop attached "
            "(loaded from disk?): set trace.loop to the Loop so its state_axes say which axis "
            "holds positions"
        )
    return probe_layout(trace.loop, a, lead=1)


def _split_components(name: str, a: Tensor) -> list[tuple[str, Tensor]]:
    """``[n, B, ...]`` -> list of (site name, ``[n, B, P, d]``)."""
    if a.dim() == 3:
        return [(name, a.unsqueeze(2))]
    if a.dim() == 4:
        return [(name, a)]
    if a.dim() < 3:
        raise LoopscopeError(f"site {name!r} has shape {tuple(a.shape)}; need [n, B, (pos,) d]")
    mid = a.shape[2:-2]
    flat = a.reshape(a.shape[0], a.shape[1], -1, *a.shape[-2:])
    out = []
    for c in range(flat.shape[2]):
        idx = torch.unravel_index(torch.tensor(c), mid)
        tag = ",".join(str(int(i)) for i in idx)
        out.append((f"{name}[{tag}]", flat[:, :, c]))
    return out


_Site = tuple[str, Tensor, list[tuple]]  # (site name, [n, B, P, d], label of each firing)


def _labelled_sites(trace: Trace, names: list[str]) -> list[_Site]:
    """Every requested site as ``[n, B, P, d]`` with its firing labels (components split)."""
    raw: list[_Site] = []
    for name in names:
        if name == "state":
            a = _state_layout(trace, trace.states)  # positions from the loop's state_axes
            labels = [(t, 0) for t in range(a.shape[0])]
        else:
            a = trace[name]  # raises UnknownHookError with suggestions
            if name == "hook_state":
                a = _state_layout(trace, a)
            labels = trace.labels.get(name) or trace.labels.get(trace.aliases.get(name, ""))
            labels = labels or [(t, 0) for t in range(a.shape[0])]
        for site, arr in _split_components(name, a.detach()):
            raw.append((site, arr, [tuple(lab) for lab in labels]))
    return raw


def _positions(raw: list[_Site], positions: Any) -> list[int]:
    """The requested positions as indices ``0..P-1`` (every site must have the same ``P``)."""
    P = raw[0][1].shape[2]
    for site, arr, _ in raw:
        if arr.shape[2] != P:
            raise LoopscopeError(
                f"site {site!r} has {arr.shape[2]} positions but {raw[0][0]!r} has {P}; "
                "collect sites with different position axes separately"
            )
    pos = list(range(P)) if positions is None else [int(p) for p in positions]
    for p in pos:
        if not -P <= p < P:
            raise LoopscopeError(f"position {p} out of range for {P} positions")
    return [p % P for p in pos]


def _select(
    raw: list[_Site], pos: list[int], its: set[int] | None
) -> tuple[list[Tensor], list[dict[str, Any]], list[int]]:
    """The kept firings of every site at ``pos``, zero-padded to the widest site, with keys."""
    d_max = max(arr.shape[-1] for _, arr, _ in raw)
    chunks, keys, widths = [], [], []
    for site, arr, labels in raw:
        keep = [i for i, lab in enumerate(labels) if its is None or lab[0] in its]
        if not keep:
            continue
        sub = arr[keep][:, :, pos]
        if sub.shape[-1] < d_max:
            sub = torch.nn.functional.pad(sub, (0, d_max - sub.shape[-1]))
        chunks.append(sub)
        for i in keep:
            lab = labels[i]
            firing = int(lab[1]) if len(lab) > 1 else 0
            keys.append({"site": site, "iteration": int(lab[0]), "firing": firing})
            widths.append(int(arr.shape[-1]))
    return chunks, keys, widths


@did_you_mean
def collect(
    trace: Trace, sites: Any = None, positions: Any = None, iterations: Any = None
) -> ActivationSet:
    """Collect activations of ``trace`` keyed by (iteration, site, position).

    Args:
        trace: a :class:`loopscope.Trace`.
        sites: ``"state"`` and/or captured hook names (default: ``"state"`` + every captured hook).
        positions: position indices to keep (default: all; negative indices count from the end).
        iterations: iterations to keep (int or iterable of ints; default: all).

    Returns:
        :class:`ActivationSet` with ``X [E, B, P, d]`` (E = sites x iterations x firings).
    """
    if not hasattr(trace, "states"):
        raise LoopscopeError(f"collect needs a loopscope Trace, got {type(trace).__name__}")
    names = ["state", *trace.keys()] if sites is None else sites
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise LoopscopeError("collect: sites is empty")
    raw = _labelled_sites(trace, names)
    pos = _positions(raw, positions)
    its = None
    if iterations is not None:
        its = {iterations} if isinstance(iterations, int) else {int(i) for i in iterations}
    chunks, keys, widths = _select(raw, pos, its)
    if not chunks:
        raise LoopscopeError(f"no activations for iterations={iterations!r}")
    dtype = torch.promote_types(chunks[0].dtype, torch.float32)
    X = torch.cat([c.to(dtype) for c in chunks])
    diverged = None
    if getattr(trace, "diverged_at", None) is not None:
        diverged = torch.as_tensor(trace.diverged_at) >= 0
    meta = dict(getattr(trace, "meta", {}) or {})
    return ActivationSet(X=X, keys=keys, positions=pos, widths=widths, diverged=diverged, meta=meta)
