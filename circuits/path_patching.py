"""Path patching across iterations (Wang et al. 2022; Goldowsky-Dill et al. 2023) on the unrolled loop.

Activation patching (:func:`~loopscope.circuits.patch_sweep`) measures the *total* effect of a node:
every route from it to the readout. Path patching measures the effect carried along chosen routes
only. In a looped model the routes run through later iterations, so the unrolled graph is the one
to cut.

**Nodes** are firings of the unrolled loop, ``(site, iteration[, position[, unit]])``: ``site`` a
hook name, ``iteration`` the loop iteration t (the label's first field), ``position`` an index on
the hook's position axis (omitted / None = the whole activation), ``unit`` an index on the unit
axis declared in ``units={site: axis}`` (a head of ``attn.hook_z``, a neuron of ``mlp.hook_post``;
omitted / None = every unit). In the output frame a whole axis is written ``-1``, as in
``patch_sweep``.

**Runs.** "denoise": the *base* run is the corrupted input and the *source* run the clean input;
"noise": base = clean, source = corrupted; "both" does both (they are not mirror images).

**Algorithm** for a sender node s at iteration t_s and a receiver set R (nodes at iterations t_r >=
t_s; a receiver at t_s must fire later in the step than the sender):

``freeze`` lists hook names / globs of components, typically every head and neuron output of the
core: ``["core.blocks.*.attn.hook_z", "core.blocks.*.mlp.hook_post"]``.

1. *Pass 1*: the base input with s set to its source value and every firing of a ``freeze`` site
   at iterations t_s .. max(t_r) set to its base value, except the receivers' own slices, which
   stay live. The receivers' values are recorded. (Freeze firings that precede the sender already
   equal their base values, so only those after it change anything.)
2. *Pass 2*: the base input with only the receivers set to their pass-1 values; the metric is read
   at ``measure_at`` (default ``n_iter``).

So the effect is carried from s to R *only through what is not frozen* (the state / residual
stream, plus any component left out of ``freeze``), and from R to the readout through the whole
model. Receivers stay live in pass 1, so a route through several receivers counts once (at the
last one it reaches). As in ``patch_sweep``, a node is every firing of its site in that iteration
(hooks that fire several times per step are patched / frozen together). ``receivers="readout"`` (alias ``"state"``) is the path from s to the readout at
``measure_at`` through the unfrozen stream only: every freeze site is frozen from t_s to
``measure_at - 1`` and the metric is read in pass 1 (no pass 2). With ``freeze=[]`` this is ordinary
activation patching of s. ``hook_state`` cannot be frozen (it would cut every route).

**Output**: a :class:`~loopscope.circuits.SweepResult`, one row per (direction, sender, receiver
set, example): ``site, iteration, position, unit`` (the sender, as in ``patch_sweep``),
``receiver`` (``"readout"`` or ``"site@t[:pP][:uU]"`` joined by ``" + "``), ``receiver_iteration``
(latest receiver iteration, or ``measure_at``), ``example``, ``metric``, ``clean``, ``corrupt``,
``recovery`` = (m - m_corrupt) / (m_clean - m_corrupt) (as ``patch_sweep``, both directions),
``effect`` = (m - m_base) / (m_source - m_base) (the share of the clean-vs-corrupt gap moved by the
path: equals ``recovery`` when denoising and ``1 - recovery`` when noising), ``diverged``, and the
metric's companion columns (KL; log-prob, accuracy ... for an ``AnswerMetric``).

**Batching**: rows (sender, receiver set, example) are evaluated ``batch_size`` at a time along the
batch axis, each row with its own patches (:mod:`loopscope.circuits.engine`); a row whose sender is
at t_s starts from the base run's state h_{t_s} (``reuse_prefix``). Rows never interact, so a row
equals the one-path-per-forward run (bit for bit on batch-invariant loops).

Shapes: ``clean`` / ``corrupt`` ``[B, ...]``; ``metric(readout [R, ...], example_idx [R]) -> [R]``;
the frame has ``2 (both) x n_senders x n_receiver_sets x B`` rows.

Example (the linear loop h' = h / 2 + x; with nothing frozen, the path from h_1 to the readout is
ordinary patching: h_3 = 0.25 against 1.75 clean and 0 corrupted):

    >>> import torch
    >>> from loopscope import FnLoop
    >>> from loopscope.circuits.toys import first_logit
    >>> loop = FnLoop(step=lambda h, x: 0.5 * h + x, init_state=lambda x, g: torch.zeros_like(x))
    >>> df = path_patch(loop, torch.ones(1, 1), torch.zeros(1, 1), ("hook_state", 1),
    ...                 "readout", first_logit, n_iter=3, freeze=[])
    >>> df[["receiver", "metric", "recovery"]].values.tolist()
    [['readout', 0.25, 0.14285714285714285]]

See :func:`path_patch` (one sender spec, one receiver set), :func:`path_patch_sweep` (many of each)
and :func:`path_traces` (the pass-1 / pass-2 traces of one path, for inspection).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.circuits.corruptions import STRPairs, as_corruption
from loopscope.circuits.engine import (
    Elements,
    SiteInfo,
    Source,
    _as_tuple,
    _index_plan,
    _Shifted,
    canonical_sites,
    fires_in_encode,
    row_patch,
    site_info,
)
from loopscope.circuits.metrics import normalised
from loopscope.circuits.patching import (
    SweepResult,
    _base_runs,
    _iterations,
    _meta,
    _metric_columns,
    resolve_metric,
)
from loopscope.core.capture import attach, resolve_hooks
from loopscope.core.errors import (
    LoopscopeError,
    UnknownHookError,
    check_positive_int,
    did_you_mean,
)
from loopscope.core.interventions import Intervention, Patch
from loopscope.core.loop import Loop, select_batch
from loopscope.core.result import Result
from loopscope.core.trace import Trace
from loopscope.core.unroll import unroll

__all__ = ["path_patch", "path_patch_sweep", "path_traces", "PathNode", "PathTraces"]

_READOUT = ("readout", "state")


@dataclass(frozen=True)
class PathNode:
    """One node of the unrolled loop: a hook firing at ``iteration``, optionally one ``position``
    and one ``unit`` of it (-1 = the whole axis)."""

    site: str
    iteration: int
    position: int = -1
    unit: int = -1

    @property
    def label(self) -> str:
        p = f":p{self.position}" if self.position >= 0 else ""
        u = f":u{self.unit}" if self.unit >= 0 else ""
        return f"{self.site}@{self.iteration}{p}{u}"


Receivers = tuple[PathNode, ...]  # () = the readout


@dataclass(kw_only=True, repr=False)
class PathTraces(Result):
    """The runs of one path (see :func:`path_traces`): ``base`` and ``source`` reference runs,
    ``pass1`` (sender patched, freeze sites frozen) and ``pass2`` (receivers patched; None for
    the readout receiver)."""

    base: Trace
    source: Trace
    pass1: Trace
    pass2: Trace | None

    def runs(self) -> dict[str, Trace]:
        """The traces by name (``pass2`` left out when there is none)."""
        out = {"base": self.base, "source": self.source, "pass1": self.pass1}
        return out if self.pass2 is None else {**out, "pass2": self.pass2}

    def to_frame(self) -> pd.DataFrame:
        """One row per (run, sample, iteration): ``state_norm`` and, for the patched runs,
        ``dist_base`` (distance of the state to the base run's)."""
        frames = []
        ref = self.base.states
        for name, tr in self.runs().items():
            T1, B = tr.states.shape[:2]
            h = tr.states.reshape(T1, B, -1).double()
            dist = (h - ref.reshape(T1, B, -1).double()).norm(dim=-1)
            frames.append(
                pd.DataFrame(
                    {
                        "run": name,
                        "sample": np.tile(np.arange(B), T1),
                        "iteration": np.repeat(np.arange(T1), B),
                        "state_norm": h.norm(dim=-1).reshape(-1).numpy(),
                        "dist_base": dist.reshape(-1).numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict[str, float]:
        """Final-iteration mean distance of each patched run's state to the base run's."""
        f = self.to_frame()
        last = f[f["iteration"] == f["iteration"].max()]
        return {
            f"final_dist_{name}": float(g["dist_base"].mean())
            for name, g in last.groupby("run", sort=False)
            if name != "base"
        }


# -- parsing ------------------------------------------------------------------------------------


def _node_parts(spec: Any, what: str) -> tuple[str, Any, Any, Any]:
    if isinstance(spec, (tuple, list)) and 2 <= len(spec) <= 4 and isinstance(spec[0], str):
        site, t, *rest = spec
        return site, t, rest[0] if rest else None, rest[1] if len(rest) > 1 else None
    raise LoopscopeError(
        f"{what} must be a node (site, iteration[, position[, unit]]), got {spec!r}"
    )


def _receiver_specs(spec: Any) -> list[tuple[str, Any, Any, Any]]:
    """One receiver set: [] for the readout, else its nodes' parts."""
    if isinstance(spec, str):
        if spec in _READOUT:
            return []
        raise LoopscopeError(
            f"receivers must be 'readout', 'state', a node (site, iteration[, position[, unit]]) "
            f"or a list of nodes, got {spec!r}"
        )
    if isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str):
        return [_node_parts(spec, "a receiver")]
    if isinstance(spec, (tuple, list)) and spec:
        return [_node_parts(s, "a receiver") for s in spec]
    raise LoopscopeError(
        f"receivers must be 'readout', 'state', a node or a non-empty list of nodes, got {spec!r}"
    )


def _one_site(loop: Any, site: str) -> str:
    names = canonical_sites(loop, [site])
    if len(names) != 1:
        raise LoopscopeError(f"receiver site {site!r} matches {len(names)} hooks; name one hook")
    return names[0]


def _axis_items(v: Any, n: int, has_axis: bool, what: str, node: str, allow_all: bool) -> list:
    """Position / unit selector -> indices (-1 = whole axis)."""
    if v is None:
        return [-1]
    if isinstance(v, str):
        if v != "all" or not allow_all:
            raise LoopscopeError(f"{what} of {node} must be an int or None, got {v!r}")
        return list(range(n)) if has_axis else [-1]
    if not has_axis:
        raise LoopscopeError(
            f"{node} has no {what} axis"
            + ("; pass units={site: axis}" if what == "unit" else "; leave the position None")
        )
    items = [v] if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
    if not allow_all and not (isinstance(v, (int, np.integer)) and not isinstance(v, bool)):
        raise LoopscopeError(f"{what} of {node} must be an int or None, got {v!r}")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise LoopscopeError(f"{what} of {node} must be ints, got {i!r}")
        if not -n <= int(i) < n:
            raise LoopscopeError(f"{what} {int(i)} out of range for {node} ({n} {what}s)")
        out.append(int(i) % n)
    return out


def _expand(
    site: str, t: Any, p: Any, u: Any, info: SiteInfo, n_iter: int, read_at: int, sender: bool
) -> list[PathNode]:
    """Nodes of one spec; a sender spec may use "all" / lists for iteration, position and unit."""
    what = "sender" if sender else "receiver"
    if not sender and (isinstance(t, bool) or not isinstance(t, (int, np.integer))):
        raise LoopscopeError(f"receiver iteration must be an int, got {t!r} for {site!r}")
    its = _iterations(t, n_iter)
    its = [i for i in info.iterations if i < read_at] if its is None else its
    missing = sorted(set(its) - set(info.iterations))
    if missing:
        raise LoopscopeError(f"site {site!r} does not fire at iterations {missing}")
    late = [i for i in its if i >= read_at]
    if late:
        raise LoopscopeError(
            f"{what} {site!r} at iteration {late[0]} is at or after measure_at = {read_at}; it "
            "cannot reach the readout"
        )
    pos = _axis_items(p, info.n_pos, info.pos_dim is not None, "position", repr(site), sender)
    uns = _axis_items(u, info.n_units, info.unit_dim is not None, "unit", repr(site), sender)
    return [PathNode(site, tt, pp, uu) for tt, pp, uu in itertools.product(its, pos, uns)]


def _canonical_units(loop: Any, units: dict | None) -> dict[str, int]:
    out = {}
    for k, v in (units or {}).items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise LoopscopeError(f"units[{k!r}] must be an int axis, got {v!r}")
        out[_one_site(loop, k)] = v
    return out


def _freeze_sites(loop: Any, freeze: Any) -> list[str]:
    if freeze is None:
        raise LoopscopeError(
            "freeze is required: the hook names / globs of the components whose later firings "
            "are held at their base values (freeze=[] is plain activation patching)"
        )
    items = [freeze] if isinstance(freeze, str) else list(freeze)
    names = list(resolve_hooks(loop, items)[0]) if items else []
    if "hook_state" in names:
        raise LoopscopeError(
            "freeze must not contain hook_state: freezing the state cuts every path; freeze the "
            "components (attn.hook_z, mlp.hook_post ...) instead"
        )
    return names


# -- firing order -------------------------------------------------------------------------------


def _firing_spans(
    loop: Any, inputs: Any, B: int, h0: Tensor, sites: list[str], n_run: int
) -> dict[str, dict[int, tuple[int, int]]]:
    """``{site: {iteration: (first, last)}}``: positions of the site's firings in the run's
    global firing order (one example of the base input)."""
    points, _ = resolve_hooks(loop, sites)
    seq: list[str] = []

    def make(name: str) -> Callable:
        def fn(x: Tensor, hook: Any) -> None:
            seq.append(name)

        return fn

    one = torch.tensor([0])
    with attach((hp, make(n)) for n, hp in points.items()):
        tr = unroll(loop, select_batch(inputs, one, B), n_run, capture=sites, init=h0[one])
    seen = dict.fromkeys(points, 0)
    spans: dict[str, dict[int, tuple[int, int]]] = {n: {} for n in points}
    for i, name in enumerate(seq):
        t = tr.labels[name][seen[name]][0]
        seen[name] += 1
        first, _ = spans[name].get(t, (i, i))
        spans[name][t] = (first, i)
    return spans


def _check_pairs(
    senders: list[PathNode], rsets: list[Receivers], order: Callable[[], dict]
) -> None:
    same: list[tuple[PathNode, PathNode]] = []
    for s, rs in itertools.product(senders, rsets):
        for r in rs:
            if r.iteration < s.iteration:
                raise LoopscopeError(
                    f"receiver {r.label} is at iteration {r.iteration}, before the sender "
                    f"{s.label} (iteration {s.iteration}); receivers must not precede the sender"
                )
            if r.iteration == s.iteration:
                same.append((s, r))
    if not same:
        return
    spans = order()
    for s, r in same:
        t = s.iteration
        if spans[r.site][t][0] <= spans[s.site][t][1]:
            raise LoopscopeError(
                f"receiver {r.label} does not fire after the sender {s.label} within iteration "
                f"{t}; a receiver at the sender's iteration must fire later in the step"
            )


# -- interventions ------------------------------------------------------------------------------


def _freeze_patch(
    site: str,
    lo: Tensor,
    hi: Tensor,
    keep: Elements,
    ex: Tensor,
    base_src: Source,
    info: SiteInfo,
    offset: int,
) -> Patch | None:
    """Rows r frozen to the base run at every firing of ``site`` with lo[r] <= t <= hi[r], except
    the ``keep`` slices (receivers), which stay live."""
    its = sorted(
        {
            t
            for a, b in zip(lo.tolist(), hi.tolist(), strict=True)
            for t in range(max(a, offset), b + 1)
        }
    )
    if not its:
        return None
    plan = _index_plan(keep, ex, info) if len(keep) else {}

    def value(x: Tensor, label: tuple) -> Tensor:
        t = label[0] + offset
        frozen = (lo <= t) & (t <= hi)
        if not bool(frozen.any()):
            return x
        b = base_src.firing(site, (t, *label[1:]))[ex].to(device=x.device, dtype=x.dtype)
        live = (~frozen).to(x.device).view(-1, *([1] * (x.dim() - 1))).expand_as(x).clone()
        for out_ix, _ in plan.get(t, []):
            live[_as_tuple(out_ix, x.dim())] = True
        return torch.where(live, x, b)

    return Patch(site, [t - offset for t in its], value=value)


def _pass1_ivs(
    prs: list[tuple[PathNode, Receivers]],
    ex: Tensor,
    src: Source,
    base_src: Source,
    infos: dict[str, SiteInfo],
    freeze: list[str],
    read_at: int,
    offset: int,
) -> list[Intervention]:
    """Freeze patches, then the sender patches (so a sender slice wins over a freeze)."""
    ivs: list[Intervention] = []
    lo = torch.as_tensor([s.iteration for s, _ in prs], dtype=torch.long)
    hi = torch.as_tensor(
        [max(r.iteration for r in rs) if rs else read_at - 1 for _, rs in prs], dtype=torch.long
    )
    for f in freeze:
        keep = Elements()
        for row, (_, rs) in enumerate(prs):
            for r in rs:
                if r.site == f:
                    keep.add(row, r.iteration, r.position, r.unit)
        p = _freeze_patch(f, lo, hi, keep, ex, base_src, infos[f], offset)
        if p is not None:
            ivs.append(p)
    sends: dict[str, Elements] = {}
    for row, (s, _) in enumerate(prs):
        sends.setdefault(s.site, Elements()).add(row, s.iteration, s.position, s.unit)
    ivs += [row_patch(site, el, ex, src, infos[site], offset) for site, el in sends.items()]
    return ivs


def _pass2_ivs(
    rsets: list[Receivers], rec_src: Source, infos: dict[str, SiteInfo], offset: int
) -> list[Intervention]:
    """Receivers set to their pass-1 values (``rec_src`` rows are the pass-2 rows)."""
    els: dict[str, Elements] = {}
    for row, rs in enumerate(rsets):
        for r in rs:
            els.setdefault(r.site, Elements()).add(row, r.iteration, r.position, r.unit)
    rows = torch.arange(len(rsets))
    return [row_patch(site, el, rows, rec_src, infos[site], offset) for site, el in els.items()]


def _receiver_source(tr: Trace, sites: list[str], rows: Tensor, offset: int) -> Source:
    acts = {s: tr[s][:, rows] for s in sites}
    index = {
        s: {(lab[0] + offset, *lab[1:]): i for i, lab in enumerate(tr.labels[s])} for s in sites
    }
    return Source(acts, index)


def _run(
    loop: Any,
    inputs: Any,
    B: int,
    ex: Tensor,
    h0: Tensor,
    states: Tensor,
    start: int,
    n_abs: int,
    ivs: list[Intervention],
    capture: list[str] | None = None,
) -> Trace:
    """Rows ``ex`` of the base input, iterations start .. n_abs - 1 (from the base state h_start)."""
    runner, init = (_Shifted(loop, start), states[start][ex]) if start else (loop, h0[ex])
    rows_in = select_batch(inputs, ex, B)
    return unroll(runner, rows_in, n_abs - start, capture=capture, interventions=ivs, init=init)


# -- setup --------------------------------------------------------------------------------------


@dataclass
class _Setup:
    loop: Any
    clean: Any
    corruption: Any
    metric: Callable
    base: dict[str, Any]
    senders: list[PathNode]
    rsets: list[Receivers]
    freeze: list[str]
    infos: dict[str, SiteInfo]
    sites: list[str]
    n_iter: int
    read_at: int
    seed: int

    def runs(self, direction: str) -> dict[str, Any]:
        """Base / source of a direction: inputs, initial states, sources, extra interventions."""
        b, c = self.base, self.corruption
        if direction == "denoise":
            return dict(
                inputs=c.inputs,
                h0=b["h0_corrupt"],
                src=b["src_clean"],
                base_src=b["src_corrupt"],
                extra=c.interventions,
                run=b["corrupt"],
            )
        return dict(
            inputs=self.clean,
            h0=b["h0_clean"],
            src=b["src_corrupt"],
            base_src=b["src_clean"],
            extra=None,
            run=b["clean"],
        )


def _setup(
    loop: Any,
    clean: Any,
    corrupt: Any,
    senders: Sequence[Any],
    receiver_sets: Sequence[Any],
    metric: Any,
    n_iter: Any,
    freeze: Any,
    measure_at: Any,
    units: Any,
    seed: int,
    need_metric: bool = True,
) -> _Setup:
    n_iter = check_positive_int("n_iter", n_iter)
    read_at = n_iter if measure_at is None else check_positive_int("measure_at", measure_at)
    metric = resolve_metric(metric, corrupt) if need_metric else metric
    corruption = as_corruption(corrupt)
    if isinstance(corrupt, STRPairs) and isinstance(clean, Tensor):
        if not torch.equal(clean, corrupt.clean):
            raise LoopscopeError("clean inputs differ from the STR pairs' clean tokens")
    send_specs = []
    for spec in senders:
        site, t, p, u = _node_parts(spec, "a sender")
        send_specs += [(s, t, p, u) for s in canonical_sites(loop, [site])]
    recv_specs = [
        [(_one_site(loop, s), t, p, u) for s, t, p, u in _receiver_specs(rs)]
        for rs in receiver_sets
    ]
    freeze_sites = _freeze_sites(loop, freeze)
    units = _canonical_units(loop, units)
    sites = list(
        dict.fromkeys(
            [s[0] for s in send_specs] + [r[0] for rs in recv_specs for r in rs] + freeze_sites
        )
    )
    for s in units:
        if s not in sites:
            raise LoopscopeError(f"units names site {s!r}, which is not among the path sites")
    try:
        base = _base_runs(loop, clean, corruption, sites, n_iter, seed, read_at)
    except UnknownHookError as e:
        raise LoopscopeError(
            f"{e}: path nodes and freeze sites must fire while the loop iterates"
        ) from None
    base["clean_inputs"] = clean
    infos = {s: site_info(loop, base["src_clean"], s, units.get(s)) for s in sites}
    nodes = [
        n for s, t, p, u in send_specs for n in _expand(s, t, p, u, infos[s], n_iter, read_at, True)
    ]
    if not nodes:
        raise LoopscopeError("the sender specs name no node before measure_at")
    rsets = [
        tuple(n for s, t, p, u in rs for n in _expand(s, t, p, u, infos[s], n_iter, read_at, False))
        for rs in recv_specs
    ]
    setup = _Setup(
        loop, clean, corruption, metric, base, nodes, rsets, freeze_sites, infos, sites,
        n_iter, read_at, seed,
    )  # fmt: skip

    def order() -> dict:
        t_max = max(s.iteration for s in nodes)
        return _firing_spans(
            loop, corruption.inputs, base["B"], base["h0_corrupt"], sites, t_max + 1
        )

    _check_pairs(nodes, rsets, order)
    return setup


# -- evaluation ---------------------------------------------------------------------------------


def _evaluate(
    st: _Setup,
    direction: str,
    rows: list[tuple[int, int, int]],
    batch_size: int,
    reuse_prefix: bool,
) -> dict[str, np.ndarray]:
    """Metric columns of rows ``(sender, receiver set, example)`` in one direction."""
    d = st.runs(direction)
    bad = (d["run"].diverged_at >= 0).numpy()  # diverged base examples are replayed in full
    shift = (
        reuse_prefix and d["extra"] is None and not fires_in_encode(st.loop, d["inputs"], st.sites)
    )
    starts = np.array(
        [st.senders[si].iteration if shift and not bad[b] else 0 for si, _, b in rows]
    )
    order = np.argsort(starts, kind="stable")
    groups = [order[starts[order] == s] for s in np.unique(starts)]
    chunks = [g[c0 : c0 + batch_size] for g in groups for c0 in range(0, len(g), batch_size)]
    cols: dict[str, np.ndarray] = {}
    for part in chunks:
        ex = torch.as_tensor([rows[j][2] for j in part], dtype=torch.long)
        prs = [(st.senders[rows[j][0]], st.rsets[rows[j][1]]) for j in part]
        lg, div = _evaluate_chunk(st, d, ex, prs, int(starts[part].min()), shift, bad)
        vals = _metric_columns(
            st.metric, lg, ex, st.base["lg_clean"], st.base["lg_corrupt"], direction
        )
        vals["diverged"] = div.double()
        for k, v in vals.items():
            if k not in cols:
                cols[k] = np.full(len(rows), np.nan)
            cols[k][part] = v.numpy()
    return cols


def _evaluate_chunk(
    st: _Setup,
    d: dict[str, Any],
    ex: Tensor,
    prs: list[tuple[PathNode, Receivers]],
    s1: int,
    shift: bool,
    bad: np.ndarray,
) -> tuple[Tensor, Tensor]:
    """Pass 1 for every row, pass 2 for the rows with receiver nodes; readouts ``[R, ...]``."""
    B, read_at, extra = st.base["B"], st.read_at, d["extra"]
    is_node = np.array([len(rs) > 0 for _, rs in prs])
    n1 = read_at if not is_node.all() else max(r.iteration for _, rs in prs for r in rs) + 1
    cap = sorted({r.site for _, rs in prs for r in rs})
    ivs = list(extra(ex)) if extra is not None else []
    ivs += _pass1_ivs(prs, ex, d["src"], d["base_src"], st.infos, st.freeze, read_at, s1)
    tr1 = _run(st.loop, d["inputs"], B, ex, d["h0"], d["run"].states, s1, n1, ivs, cap)
    div = tr1.diverged_at >= 0
    lg = tr1.decode(read_at - s1) if not is_node.all() else None
    nodes = torch.as_tensor(np.flatnonzero(is_node), dtype=torch.long)
    if len(nodes):
        ex2 = ex[nodes]
        rsets = [prs[j][1] for j in nodes.tolist()]
        s2 = min(r.iteration for rs in rsets for r in rs)
        s2 = s2 if shift and not bad[ex2.numpy()].any() else 0
        rec_src = _receiver_source(tr1, cap, nodes, s1)
        ivs2 = list(extra(ex2)) if extra is not None else []
        ivs2 += _pass2_ivs(rsets, rec_src, st.infos, s2)
        tr2 = _run(st.loop, d["inputs"], B, ex2, d["h0"], d["run"].states, s2, read_at, ivs2)
        lg2 = tr2.decode(read_at - s2)
        lg = lg2.new_zeros((len(ex), *lg2.shape[1:])) if lg is None else lg.clone()
        lg[nodes] = lg2
        div[nodes] = div[nodes] | (tr2.diverged_at >= 0)
    return lg, div


def _frame(st: _Setup, direction: str, rows: list, cols: dict, m_cl, m_co) -> pd.DataFrame:
    snd = [st.senders[si] for si, _, _ in rows]
    rcv = [st.rsets[ri] for _, ri, _ in rows]
    ex = np.array([b for _, _, b in rows], dtype=np.int64)
    f = pd.DataFrame(
        {
            "direction": direction,
            "site": [s.site for s in snd],
            "iteration": np.array([s.iteration for s in snd], dtype=np.int64),
            "position": np.array([s.position for s in snd], dtype=np.int64),
            "unit": np.array([s.unit for s in snd], dtype=np.int64),
            "receiver": [" + ".join(r.label for r in rs) if rs else "readout" for rs in rcv],
            "receiver_iteration": np.array(
                [max(r.iteration for r in rs) if rs else st.read_at for rs in rcv],
                dtype=np.int64,
            ),
            "example": ex,
        }
    )
    f["metric"] = cols.pop("metric")
    f["clean"] = m_cl[ex]
    f["corrupt"] = m_co[ex]
    f["recovery"] = normalised(f["metric"], f["clean"], f["corrupt"])
    src, base = (f["clean"], f["corrupt"]) if direction == "denoise" else (f["corrupt"], f["clean"])
    f["effect"] = normalised(f["metric"], src, base)
    f["diverged"] = cols.pop("diverged").astype(bool)
    for k, v in cols.items():
        f[k] = v
    return f


def _sweep(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    senders: Sequence[Any],
    receiver_sets: Sequence[Any],
    metric: Any,
    n_iter: Any,
    freeze: Any,
    run: _RunOptions,
) -> SweepResult:
    """Every (sender, receiver set, example) row, for one or both directions."""
    if run.direction not in ("denoise", "noise", "both"):
        raise LoopscopeError(
            f"direction must be 'denoise', 'noise' or 'both', got {run.direction!r}"
        )
    batch_size = check_positive_int("batch_size", run.batch_size)
    st = _setup(
        loop, clean, corrupt, senders, receiver_sets, metric, n_iter, freeze,
        run.measure_at, run.units, run.seed,
    )  # fmt: skip
    B = st.base["B"]
    rows = list(itertools.product(range(len(st.senders)), range(len(st.rsets)), range(B)))
    every = torch.arange(B)
    m_cl, m_co = (
        _metric_columns(st.metric, lg, every, st.base["lg_clean"], st.base["lg_corrupt"])[
            "metric"
        ].numpy()
        for lg in (st.base["lg_clean"], st.base["lg_corrupt"])
    )
    frames = []
    for d in ["denoise", "noise"] if run.direction == "both" else [run.direction]:
        cols = _evaluate(st, d, rows, batch_size, bool(run.reuse_prefix))
        frames.append(_frame(st, d, rows, cols, m_cl, m_co))
    meta = _meta(loop, st.corruption, run.seed, st.n_iter, st.read_at)
    meta["freeze"] = list(st.freeze)
    return SweepResult(frame=pd.concat(frames, ignore_index=True), meta=meta)


@dataclass(frozen=True)
class _RunOptions:
    """The options :func:`path_patch` and :func:`path_patch_sweep` share."""

    direction: str = "denoise"
    measure_at: int | None = None
    units: dict[str, int] | None = None
    batch_size: int = 256
    seed: int = 0
    reuse_prefix: bool = True


# -- public API ---------------------------------------------------------------------------------


@did_you_mean
def path_patch(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    sender: Any,
    receivers: Any = "readout",
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    n_iter: int,
    freeze: Sequence[str] | str | None = None,
    direction: str = "denoise",
    measure_at: int | None = None,
    units: dict[str, int] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    reuse_prefix: bool = True,
) -> SweepResult:
    """Path-patched effect of ``sender`` on the readout through ``receivers`` (module docstring).

    Args:
        loop: a Loop. clean: clean inputs ``[B, ...]``. corrupt: corrupted inputs of the same shape,
            a :class:`~loopscope.circuits.corruptions.Corruption` or
            :class:`~loopscope.circuits.corruptions.STRPairs`.
        sender: a node ``(site, iteration[, position[, unit]])``; iteration / position / unit may be
            "all" or lists (one row per expanded sender), the site a glob.
        receivers: ``"readout"`` / ``"state"`` (the path through the unfrozen stream straight to
            the readout), one node, or a list of nodes patched together as one receiver set.
        metric: ``fn(readout [R, ...], example_idx [R]) -> [R]`` as in ``patch_sweep`` (an
            ``AnswerMetric`` adds its columns; None takes the STR pairs' metric).
        n_iter: loop iterations T.
        freeze: hook names / globs of the components held at their base values after the sender
            (e.g. ``["core.blocks.*.attn.hook_z", "core.blocks.*.mlp.hook_post"]``); ``[]`` freezes
            nothing (ordinary patching for the readout receiver).
        direction: "denoise", "noise" or "both".
        measure_at: readout iteration (default T).
        units: ``{site: axis}`` for unit-level nodes.
        batch_size: rows per forward.
        seed: seed of the initial states.
        reuse_prefix: start rows from the unpatched run's state at the first patched iteration.

    Returns:
        :class:`~loopscope.circuits.SweepResult`, one row per (direction, sender, example).
    """
    run = _RunOptions(direction, measure_at, units, batch_size, seed, reuse_prefix)
    return _sweep(loop, clean, corrupt, [sender], [receivers], metric, n_iter, freeze, run)


@did_you_mean
def path_patch_sweep(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    senders: Sequence[Any],
    receiver_sets: Sequence[Any] | str = ("readout",),
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    n_iter: int,
    freeze: Sequence[str] | str | None = None,
    direction: str = "denoise",
    measure_at: int | None = None,
    units: dict[str, int] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    reuse_prefix: bool = True,
) -> SweepResult:
    """Many senders x many receiver sets, batched (the parameters are :func:`path_patch`'s).

    Args:
        loop, clean, corrupt, metric, n_iter, freeze: as in :func:`path_patch`.
        senders: a list of sender specs (or one spec).
        receiver_sets: a list whose entries are each one receiver set (``"readout"``, a node, or
            a list of nodes).
        direction, measure_at, units, batch_size, seed, reuse_prefix: as in :func:`path_patch`.

    Returns:
        :class:`~loopscope.circuits.SweepResult`, one row per (direction, sender, receiver set,
        example), in that order.
    """
    if isinstance(senders, tuple) and senders and isinstance(senders[0], str):
        senders = [senders]
    if isinstance(receiver_sets, str):
        receiver_sets = [receiver_sets]
    if not senders or not receiver_sets:
        raise LoopscopeError("path_patch_sweep needs at least one sender and one receiver set")
    run = _RunOptions(direction, measure_at, units, batch_size, seed, reuse_prefix)
    return _sweep(
        loop, clean, corrupt, list(senders), list(receiver_sets), metric, n_iter, freeze, run
    )


@did_you_mean
def path_traces(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    sender: Any,
    receivers: Any = "readout",
    *,
    n_iter: int,
    freeze: Sequence[str] | str | None = None,
    capture: Any = None,
    direction: str = "denoise",
    measure_at: int | None = None,
    units: dict[str, int] | None = None,
    seed: int = 0,
) -> PathTraces:
    """The runs of one path for inspection: every example, from iteration 0, capturing ``capture``
    (plus the receivers) for max(T, measure_at) iterations, with the same interventions as
    :func:`path_patch`. ``sender`` must name exactly one node.

    Args:
        loop, clean, corrupt, sender, receivers, n_iter, freeze: as in :func:`path_patch`.
        capture: hook names / globs to capture in every run (the receivers are always captured).
        direction: "denoise" or "noise" (one direction: these are runs, not a sweep).
        measure_at, units, seed: as in :func:`path_patch`.

    Returns:
        :class:`PathTraces` (``base``, ``source``, ``pass1``, ``pass2`` traces).
    """
    if direction not in ("denoise", "noise"):
        raise LoopscopeError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    st = _setup(
        loop, clean, corrupt, [sender], [receivers], None, n_iter, freeze,
        measure_at, units, seed, need_metric=False,
    )  # fmt: skip
    if len(st.senders) != 1:
        raise LoopscopeError(
            f"path_traces needs one sender node, {sender!r} names {len(st.senders)}"
        )
    d = st.runs(direction)
    B, T = st.base["B"], max(st.n_iter, st.read_at)
    ex = torch.arange(B)
    rs = st.rsets[0]
    cap = list(resolve_hooks(loop, capture)[0]) if capture is not None else []
    cap = list(dict.fromkeys(cap + sorted({r.site for r in rs})))
    prs = [(st.senders[0], rs)] * B
    extra = d["extra"]

    def extras(rows: Tensor) -> list[Intervention]:
        return list(extra(rows)) if extra is not None else []

    # the reference runs again, capturing what the caller asked for
    base = _run(loop, d["inputs"], B, ex, d["h0"], d["run"].states, 0, T, extras(ex), cap)
    c = st.corruption
    src_in, src_h0, src_extra = (
        (clean, st.base["h0_clean"], None)
        if direction == "denoise"
        else (c.inputs, st.base["h0_corrupt"], c.interventions)
    )
    src_ivs = list(src_extra(ex)) if src_extra is not None else []
    source = _run(loop, src_in, B, ex, src_h0, d["run"].states, 0, T, src_ivs, cap)
    ivs = extras(ex)
    ivs += _pass1_ivs(prs, ex, d["src"], d["base_src"], st.infos, st.freeze, st.read_at, 0)
    tr1 = _run(loop, d["inputs"], B, ex, d["h0"], d["run"].states, 0, T, ivs, cap)
    tr2 = None
    if rs:
        rec_src = _receiver_source(tr1, sorted({r.site for r in rs}), ex, 0)
        ivs2 = extras(ex) + _pass2_ivs([rs] * B, rec_src, st.infos, 0)
        tr2 = _run(loop, d["inputs"], B, ex, d["h0"], d["run"].states, 0, T, ivs2, cap)
    return PathTraces(base=base, source=source, pass1=tr1, pass2=tr2)
