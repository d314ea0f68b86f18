"""Unrolled circuit graphs: nodes (iteration, component, index, position), pruned by effect.

The looped model is unrolled into a DAG (networkx ``DiGraph``):

* state nodes ``("state", t)`` for h_t, t = 0..T, linked by residual edges h_t -> h_{t+1};
* an input node ``("input",)`` with injection edges to every component of every iteration
  (``injection=False`` for loops without input injection);
* component nodes ``(t, site, unit, position)`` (``unit`` / ``position`` = -1 when the whole
  axis is one node) with a read edge h_t -> node and a write edge node -> h_{t+1}.

Each component node carries its noising effect (exact patching through the batched engine, or AtP):
``effect`` = mean over examples of m(clean run with the node set to its corrupted value) - m(clean).
The circuit keeps the nodes with |effect| >= ``threshold`` (or the ``top_n`` largest). The
faithfulness curve F(n) = (m(C_n) - m(empty)) / (m(M) - m(empty)) patches every node *outside* the
top-n set to its corrupted value (resample ablation for token corruptions, mean / zero for
ablation corruptions); m(M) is the clean run, m(empty) has every node patched. The "same circuit
at every iteration?" question is answered by the Jaccard similarity of per-iteration node sets.

Example:
    >>> import torch
    >>> from loopscope.circuits import toys
    >>> cg = circuit_graph(toys.ShiftLoop(), torch.ones(1, 4), torch.zeros(1, 4), ["hook_state"],
    ...                    toys.first_logit, n_iter=3, top_n=3)
    >>> sorted(cg.circuit)
    [(0, 'hook_state', -1, 0), (1, 'hook_state', -1, 1), (2, 'hook_state', -1, 2)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.circuits.attribution import NODE_COLS, attribution
from loopscope.circuits.corruptions import as_corruption
from loopscope.circuits.engine import canonical_sites, site_info
from loopscope.circuits.patching import (
    _base_runs,
    _check_run_args,
    _meta,
    patch_sweep,
    resolve_metric,
    run_jobs,
)
from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, float_summary

__all__ = ["circuit_graph", "CircuitGraph", "jaccard_by_iteration"]

Node = tuple[int, str, int, int]


@dataclass(kw_only=True, repr=False)
class CircuitGraph(Result):
    """Unrolled graph, node effects, pruned circuit and faithfulness curve.

    Attributes:
        graph: the full unrolled ``nx.DiGraph`` (see module docstring); component nodes have
            ``effect``, ``abs_effect`` and ``in_circuit`` attributes, edges a ``kind``.
        nodes: node table (site, iteration, position, unit, effect, rank, in_circuit).
        circuit: the kept component nodes ``(t, site, unit, position)``.
        faithfulness: one row per circuit size n: ``size``, ``metric`` (mean over examples),
            ``faithfulness`` F(n).
        meta: effects method, ablation (corruption) type, threshold / top_n, seed ...
    """

    graph: nx.DiGraph
    nodes: pd.DataFrame
    circuit: set[Node]
    faithfulness: pd.DataFrame

    def pruned(self) -> nx.DiGraph:
        """Subgraph on the circuit nodes, the state chain and the input node."""
        keep = [v for v in self.graph if v in self.circuit or v[0] in ("state", "input")]
        return self.graph.subgraph(keep).copy()

    def iteration_jaccard(self, ignore_position: bool = False) -> pd.DataFrame:
        """Jaccard similarity of the circuit's per-iteration node sets (``[T, T]`` frame)."""
        return jaccard_by_iteration(self.circuit, self.meta["n_iter"], ignore_position)

    def same_circuit_score(self, ignore_position: bool = False) -> float:
        """Mean off-diagonal Jaccard over iteration pairs where both sets are non-empty (1 = the
        same circuit at every iteration)."""
        J = self.iteration_jaccard(ignore_position).to_numpy()
        off = J[~np.eye(len(J), dtype=bool)]
        off = off[~np.isnan(off)]
        return float(off.mean()) if len(off) else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """The node table (site, iteration, position, unit, effect, rank, in_circuit)."""
        return self.nodes.copy()

    def summary(self) -> dict[str, float]:
        """Node and circuit sizes, faithfulness of the kept circuit, same-circuit score."""
        size = len(self.circuit)
        f = self.faithfulness
        at = f.loc[f["size"] == size, "faithfulness"]
        return float_summary(
            {
                "n_nodes": len(self.nodes),
                "circuit_size": size,
                "faithfulness": float(at.iloc[0]) if len(at) else float("nan"),
                "same_circuit_score": self.same_circuit_score(),
            }
        )


def jaccard_by_iteration(
    nodes: Sequence[Node] | set[Node], n_iter: int, ignore_position: bool = False
) -> pd.DataFrame:
    """J[t, t'] = |S_t & S_t'| / |S_t | S_t'| with S_t = {(site, unit, position)} of iteration t
    (position dropped if ``ignore_position``); NaN where both sets are empty."""
    sets: list[set] = [set() for _ in range(n_iter)]
    for t, s, u, p in nodes:
        if 0 <= t < n_iter:
            sets[t].add((s, u) if ignore_position else (s, u, p))
    J = np.full((n_iter, n_iter), np.nan)
    for a in range(n_iter):
        for b in range(n_iter):
            union = sets[a] | sets[b]
            if union:
                J[a, b] = len(sets[a] & sets[b]) / len(union)
    return pd.DataFrame(J, index=pd.Index(range(n_iter), name="t"), columns=range(n_iter))


def _default_sizes(n: int) -> list[int]:
    sizes = {0, n}
    k = 1
    while k < n:
        sizes.add(k)
        k *= 2
    return sorted(sizes)


@did_you_mean
def circuit_graph(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    sites: Sequence[str] | str,
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    n_iter: int,
    positions: Sequence[int] | None = None,
    units: dict[str, int] | None = None,
    effects: str = "exact",
    threshold: float | None = None,
    top_n: int | None = None,
    sizes: Sequence[int] | None = None,
    injection: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    measure_at: int | None = None,
) -> CircuitGraph:
    """Unrolled circuit graph with effects, pruning and faithfulness (see module docstring).

    Args:
        loop, clean, corrupt, sites, metric, n_iter: as in :func:`~loopscope.circuits.patch_sweep`;
            so are positions, units, seed, batch_size and measure_at.
        effects: "exact" (noising patch per node, batched) or "atp" (attribution patching).
        threshold: circuit = nodes with |effect| >= threshold.
        top_n: circuit = the top_n nodes by |effect| (default, with no threshold either: the
            top-n set of the smallest size on the curve reaching faithfulness >= 0.9).
        sizes: circuit sizes of the faithfulness curve (default 0, 1, 2, 4, ..., N; 0 and N are
            always included).
        injection: add the input node and injection edges.
    """
    n_iter, read_at, batch_size = _check_run_args(n_iter, measure_at, batch_size)
    if effects not in ("exact", "atp"):
        raise LoopscopeError(f"effects must be 'exact' or 'atp', got {effects!r}")
    if threshold is not None and top_n is not None:
        raise LoopscopeError("give threshold or top_n, not both")
    metric = resolve_metric(metric, corrupt)
    names = canonical_sites(loop, sites)
    common = dict(
        n_iter=n_iter,
        positions=positions,
        units=units,
        seed=seed,
        batch_size=batch_size,
        measure_at=measure_at,
    )
    nodes = _node_effects(loop, clean, corrupt, names, metric, effects, common)
    keys: list[Node] = [
        (int(r.iteration), str(r.site), int(r.unit), int(r.position)) for r in nodes.itertuples()
    ]
    corruption = as_corruption(corrupt)
    faith = _faithfulness(
        loop, clean, corruption, names, metric, keys, sizes, units, seed, n_iter, read_at,
        batch_size,
    )  # fmt: skip
    circuit = _choose_circuit(keys, nodes["effect"], faith, threshold, top_n)
    nodes["in_circuit"] = [k in circuit for k in keys]
    G = _unrolled_graph(keys, nodes["effect"], circuit, read_at, injection)
    meta = {
        **_meta(loop, corruption, seed, n_iter, read_at),
        "effects": effects,
        "threshold": threshold,
        "top_n": top_n,
        "ablation": corruption.kind,
        "n_nodes": len(keys),
    }
    return CircuitGraph(graph=G, nodes=nodes, circuit=circuit, faithfulness=faith, meta=meta)


def _node_effects(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    names: list[str],
    metric: Callable,
    effects: str,
    common: dict[str, Any],
) -> pd.DataFrame:
    """Node table ``NODE_COLS + effect + rank``, sorted by rank (|effect| descending)."""
    if effects == "exact":
        sw = patch_sweep(loop, clean, corrupt, names, "all", metric, direction="noise", **common)
        sw = sw.frame.assign(effect=sw.frame["metric"] - sw.frame["clean"])
        nodes = sw.groupby(NODE_COLS, sort=False, as_index=False)["effect"].mean()
    else:
        res = attribution(loop, clean, corrupt, names, metric, top_k=0, validate=0, **common)
        nodes = res.nodes[NODE_COLS + ["atp"]].rename(columns={"atp": "effect"})
    nodes["rank"] = nodes["effect"].abs().rank(ascending=False, method="first").astype(int)
    return nodes.sort_values("rank", ignore_index=True)


def _faithfulness(
    loop: Loop,
    clean: Any,
    corruption: Any,
    names: list[str],
    metric: Callable,
    keys: list[Node],
    sizes: Sequence[int] | None,
    units: dict[str, int] | None,
    seed: int,
    n_iter: int,
    read_at: int,
    batch_size: int,
) -> pd.DataFrame:
    """F(n): keep the top-n nodes clean, patch the rest to their corrupted values."""
    base = _base_runs(loop, clean, corruption, names, n_iter, seed, read_at)
    base["clean_inputs"] = clean
    infos = {s: site_info(loop, base["src_clean"], s, (units or {}).get(s)) for s in names}
    N = len(keys)
    sizes = _default_sizes(N) if sizes is None else sorted({0, N, *(int(n) for n in sizes)})
    if any(not 0 <= n <= N for n in sizes):
        raise LoopscopeError(f"sizes must lie in 0..{N}, got {sizes}")
    B = base["B"]
    jobs = [(b, [(s, t, p, u) for (t, s, u, p) in keys[n:]]) for n in sizes for b in range(B)]
    cols = run_jobs(
        loop, base, corruption, "noise", jobs, infos, metric, n_iter, read_at, batch_size
    )
    m = cols["metric"].reshape(len(sizes), B).mean(1)
    m_full = float(torch.as_tensor(metric(base["lg_clean"], torch.arange(B))).double().mean())
    m_empty = float(m[0])  # sizes always start at 0 (every node patched)
    den = m_full - m_empty
    faith = pd.DataFrame(
        {
            "size": sizes,
            "metric": m,
            "faithfulness": (m - m_empty) / den if abs(den) > 1e-12 else np.nan,
        }
    )
    faith.attrs.update(m_full=m_full, m_empty=m_empty)
    return faith


def _choose_circuit(
    keys: list[Node], effect: pd.Series, faith: pd.DataFrame, threshold: Any, top_n: Any
) -> set[Node]:
    """The kept nodes: by threshold, by top_n, or the smallest set reaching F >= 0.9."""
    N = len(keys)
    if threshold is not None:
        return {k for k, e in zip(keys, effect, strict=True) if abs(e) >= threshold}
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= N:
            raise LoopscopeError(f"top_n must be an int in 0..{N}, got {top_n!r}")
        return set(keys[:top_n])
    ok = faith[faith["faithfulness"] >= 0.9]
    return set(keys[: int(ok["size"].min())]) if len(ok) else set(keys)


def _unrolled_graph(
    keys: list[Node], effect: pd.Series, circuit: set[Node], read_at: int, injection: bool
) -> nx.DiGraph:
    """State chain h_0..h_T, the input node and one component node per key (module docstring)."""
    G = nx.DiGraph()
    for t in range(read_at + 1):
        G.add_node(("state", t), kind="state", iteration=t)
        if t:
            G.add_edge(("state", t - 1), ("state", t), kind="residual")
    if injection:
        G.add_node(("input",), kind="input")
    for k, e in zip(keys, effect, strict=True):
        t = k[0]
        G.add_node(
            k,
            kind="component",
            iteration=t,
            site=k[1],
            unit=k[2],
            position=k[3],
            effect=float(e),
            abs_effect=abs(float(e)),
            in_circuit=k in circuit,
        )
        G.add_edge(("state", t), k, kind="read")
        G.add_edge(k, ("state", t + 1), kind="write")
        if injection:
            G.add_edge(("input",), k, kind="injection")
    return G
