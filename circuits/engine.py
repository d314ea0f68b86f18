"""Row-aware batched patching: many patches per forward, one patch (or patch set) per batch row.

The expensive part of activation patching is one forward per patch. Here the inputs are repeated
along the batch axis and every row carries its own patch *elements*: "at hook ``site``, iteration
``t``, position ``p`` (or all), unit ``u`` (or all), replace the activation by the source run's value
for this row's example". One :class:`loopscope.Patch` per site with a callable value applies every
row's elements at once with vectorised index assignment, so a forward costs the same Python
overhead however many patches it carries. Because rows never interact, each row equals the
one-patch-per-forward run (bit for bit wherever the loop's kernels are batch-invariant; on BLAS
matmuls that tile by batch size, up to float rounding).

Building blocks used by ``patch_sweep``, ``attribution`` and ``circuit_graph``:

* :class:`Source` — per-site firings ``[F, B, ...]`` of a reference run and their labels;
* :class:`SiteInfo` / :func:`site_info` — position / unit axes and iterations of a hook;
* :class:`Elements` — the element table (row, iteration, position, unit) of one site;
* :func:`run_rows` — one patched forward of a chunk of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loopscope.core.capture import attach, resolve_hooks
from loopscope.core.errors import LoopscopeError
from loopscope.core.interventions import Intervention, Patch
from loopscope.core.layout import site_position_axis
from loopscope.core.loop import Loop, select_batch
from loopscope.core.trace import Trace
from loopscope.core.unroll import unroll

__all__ = [
    "Source",
    "SiteInfo",
    "site_info",
    "Elements",
    "row_patch",
    "run_rows",
    "init_states",
    "fires_in_encode",
    "canonical_sites",
]


def canonical_sites(loop: Any, sites: Sequence[str] | str) -> list[str]:
    """Hook names resolved to canonical names (globs expanded, aliases merged, unknown rejected)."""
    if isinstance(sites, str):
        sites = [sites]
    if not sites:
        raise LoopscopeError("sites must name at least one hook")
    points, _ = resolve_hooks(loop, list(sites))
    return list(points)


@dataclass
class Source:
    """Activations to patch from: ``acts[site]`` ``[F, B, ...]`` and ``index[site][label] -> f``."""

    acts: dict[str, Tensor]
    index: dict[str, dict[tuple, int]]

    @classmethod
    def from_trace(cls, trace: Trace, sites: Sequence[str]) -> Source:
        acts, index = {}, {}
        for s in sites:
            if s == "hook_state" and "hook_state" not in trace.acts:
                acts[s] = trace.states[:-1]
                index[s] = {(t, 0): t for t in range(trace.n_iter)}
                continue
            acts[s] = trace[s]
            index[s] = {tuple(lab): i for i, lab in enumerate(trace.labels[trace._canonical(s)])}
        return cls(acts, index)

    def firing(self, site: str, label: tuple) -> Tensor:
        i = self.index[site].get(tuple(label))
        if i is None:
            raise LoopscopeError(f"the source run has no firing of {site!r} labelled {label}")
        return self.acts[site][i]


@dataclass
class SiteInfo:
    """Shape facts of one hook's activation (axes count the batch axis, as in ``pos_dim``)."""

    name: str
    iterations: list[int]
    pos_dim: int | None  # None: no position axis ([B, d] activations)
    n_pos: int
    unit_dim: int | None
    n_units: int


def site_info(loop: Any, src: Source, site: str, unit_dim: int | None = None) -> SiteInfo:
    """Position axis (the loop's ``state_axes`` for ``hook_state``; ``HookPoint.pos_dim`` if
    another activation is at least ``[B, pos, x]``), unit axis (``unit_dim``, e.g. 2 for heads of
    ``attn.hook_z``) and the iterations it fires at."""
    hp = resolve_hooks(loop, [site])[0][site]
    act = src.acts[site][0]  # [B, ...]
    # the state's positions come from the loop's declared state_axes (a stacked [B, 2, pos, d]
    # state is refused undeclared rather than patched along its stack axis)
    pos_dim = site_position_axis(loop, site, hp, tuple(act.shape))
    if unit_dim is not None:
        if not 1 <= unit_dim < act.dim() or unit_dim == pos_dim:
            raise LoopscopeError(
                f"unit axis {unit_dim} is not a free axis of {site!r} (activation shape {tuple(act.shape)})"
            )
    its = sorted({lab[0] for lab in src.index[site]})
    return SiteInfo(
        name=site,
        iterations=its,
        pos_dim=pos_dim,
        n_pos=act.shape[pos_dim] if pos_dim is not None else 1,
        unit_dim=unit_dim,
        n_units=act.shape[unit_dim] if unit_dim is not None else 1,
    )


@dataclass
class Elements:
    """Patch elements of one site: row ``row[j]`` patched at iteration ``t[j]``, position
    ``pos[j]`` (-1 = every position) and unit ``unit[j]`` (-1 = every unit)."""

    row: list[int] = field(default_factory=list)
    t: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    unit: list[int] = field(default_factory=list)

    def add(self, row: int, t: int, pos: int = -1, unit: int = -1) -> None:
        self.row.append(row)
        self.t.append(t)
        self.pos.append(pos)
        self.unit.append(unit)

    def __len__(self) -> int:
        return len(self.row)


def _index_plan(el: Elements, ex: Tensor, info: SiteInfo) -> dict[int, list[tuple[tuple, tuple]]]:
    """Per iteration: (out_index, src_index) pairs for vectorised assignment."""
    row = torch.as_tensor(el.row, dtype=torch.long)
    t = torch.as_tensor(el.t, dtype=torch.long)
    pos = torch.as_tensor(el.pos, dtype=torch.long)
    unit = torch.as_tensor(el.unit, dtype=torch.long)
    if (pos >= 0).any() and info.pos_dim is None:
        raise LoopscopeError(f"site {info.name!r} has no position axis; patch it whole")
    if (unit >= 0).any() and info.unit_dim is None:
        raise LoopscopeError(f"site {info.name!r} has no unit axis configured")
    plan: dict[int, list[tuple[tuple, tuple]]] = {}
    for tt in torch.unique(t).tolist():
        items = []
        for has_p in (False, True):
            for has_u in (False, True):
                m = (t == tt) & ((pos >= 0) == has_p) & ((unit >= 0) == has_u)
                if not bool(m.any()):
                    continue
                r = row[m]
                out_ix: dict[int, Any] = {0: r}
                src_ix: dict[int, Any] = {0: ex[r]}
                if has_p:
                    out_ix[info.pos_dim] = src_ix[info.pos_dim] = pos[m]
                if has_u:
                    out_ix[info.unit_dim] = src_ix[info.unit_dim] = unit[m]
                items.append((out_ix, src_ix))
        plan[tt] = items
    return plan


def _as_tuple(ix: dict[int, Any], ndim: int) -> tuple:
    full: list[Any] = [slice(None)] * ndim
    for k, v in ix.items():
        full[k] = v
    return tuple(full)


def row_patch(
    site: str, el: Elements, ex: Tensor, src: Source, info: SiteInfo, offset: int = 0
) -> Patch:
    """One :class:`loopscope.Patch` on ``site`` applying every row's elements at its firing.

    ``offset``: the run starts at iteration ``offset`` (its labels count from 0), so a firing
    labelled (t, k) is iteration t + offset of the reference run.
    """
    plan = _index_plan(el, ex, info)

    def value(x: Tensor, label: tuple) -> Tensor:
        label = (label[0] + offset, *label[1:])
        items = plan.get(label[0])
        if not items:
            return x
        s = src.firing(site, label)
        out = x.clone()
        for out_ix, src_ix in items:
            out[_as_tuple(out_ix, x.dim())] = s[_as_tuple(src_ix, x.dim())].to(
                device=x.device, dtype=x.dtype
            )
        return out

    return Patch(site, [t - offset for t in sorted(plan)], value=value)


def run_rows(
    loop: Any,
    inputs: Any,
    ex: Tensor,
    n_iter: int,
    h0: Tensor,
    patches: dict[str, Elements],
    src: Source,
    infos: dict[str, SiteInfo],
    read_at: Sequence[int],
    extra: Callable[[Tensor], list[Intervention]] | None = None,
    start: int = 0,
    start_states: Tensor | None = None,
) -> dict[Any, Tensor]:
    """Run the rows ``ex`` (example of each row) with their patches; readouts at ``read_at``
    (``{t: [R, ...]}``) plus ``"diverged"`` (``[R]`` bool, from the run's per-sample flags).

    ``h0`` is the full batch's initial state (rows take ``h0[ex]`` so random inits stay paired
    with the reference runs); ``extra(ex)`` adds per-row interventions applied before the patches
    (a corruption such as mean ablation or embedding noise).

    ``start > 0`` reuses the prefix: every patch of these rows is at iteration >= ``start``, and
    iterations before a patch are identical to the unpatched run, so the rows start from that
    run's state ``start_states[start]`` (``[T+1, B, ...]``) and only iterate from ``start`` on
    (the step still sees absolute iteration indices).
    """
    B = h0.shape[0]
    rows_in = select_batch(inputs, ex, B)
    ivs: list[Intervention] = list(extra(ex)) if extra is not None else []
    if start and extra is not None:
        raise LoopscopeError("prefix reuse cannot shift the labels of extra interventions")
    for site, el in patches.items():
        if len(el):
            ivs.append(row_patch(site, el, ex, src, infos[site], offset=start))
    if start:
        if start_states is None:
            raise LoopscopeError("start > 0 needs the reference run's states")
        runner: Any = _Shifted(loop, start)
        init = start_states[start][ex]
    else:
        runner, init = loop, h0[ex]
    tr = unroll(runner, rows_in, max(n_iter, *read_at) - start, interventions=ivs, init=init)
    out: dict[Any, Tensor] = {t: tr.decode(t - start) for t in read_at}
    out["diverged"] = tr.diverged_at >= 0  # per row: NaN / inf / blow-up, flagged not raised
    return out


def fires_in_encode(loop: Any, inputs: Any, sites: Sequence[str]) -> set[str]:
    """The sites among ``sites`` that fire while ``loop.encode`` runs (outside the iterations)."""
    points, _ = resolve_hooks(loop, list(sites))
    fired: set[str] = set()

    def make(name: str) -> Callable:
        def fn(x: Tensor, hook: Any) -> None:
            fired.add(name)

        return fn

    with torch.no_grad(), attach((hp, make(n)) for n, hp in points.items()):
        loop.encode(inputs)
    return fired


class _Shifted(Loop):
    """``loop`` seen from iteration ``offset`` on: same hook points (same names), the step gets
    absolute iteration indices, labels count from 0 (patches translate them back)."""

    def __init__(self, loop: Any, offset: int) -> None:
        super().__init__()
        self.__dict__["_inner"] = loop  # not a submodule: hook names stay the inner loop's
        self.__dict__["_offset"] = int(offset)
        self.hook_state = loop.hook_state
        self.state_axes = getattr(loop, "state_axes", None)
        self.hook_dict = loop.hook_dict
        self.mod_dict = getattr(loop, "mod_dict", {})

    def encode(self, inputs: Any) -> Any:
        return self._inner.encode(inputs)

    def step(self, h: Tensor, ctx: Any, t: int | None = None) -> Tensor:
        return self._inner.step(h, ctx, None if t is None else t + self._offset)

    def decode(self, h: Tensor, ctx: Any) -> Tensor:
        return self._inner.decode(h, ctx)

    def batch_size(self, ctx: Any) -> int:
        return self._inner.batch_size(ctx)

    def select(self, ctx: Any, index: Tensor) -> Any:
        return self._inner.select(ctx, index)


def init_states(loop: Any, inputs: Any, seed: int) -> Tensor:
    """``loop.init_state`` of the whole batch from a fresh generator seeded with ``seed``."""
    with torch.no_grad():
        ctx = loop.encode(inputs)
        return loop.init_state(ctx, torch.Generator().manual_seed(int(seed)))
