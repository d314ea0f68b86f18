"""Computation-graph memorization statistics (Faith and Fate, Dziri et al. 2023).

Graph convention: a networkx ``DiGraph`` per example; nodes carry ``op`` (``"input"`` for
sources), ``value`` and optionally ``type`` / ``rank``; edges carry ``arg`` (argument index). The
multiplication builder of :mod:`loopscope.tasks` follows it.

* :func:`graph_metrics` — layer (longest path from a source, in edges), depth, width (largest
  layer), |V|/depth and the repo's |V|/longest-path-in-nodes convention (both exposed, named).
* :func:`node_taxonomy` / :func:`taxonomy_frame` / :func:`taxonomy_by_layer` — correct / local /
  propagation / restoration labels of predicted values (the repo's operational definitions).
* :class:`SubgraphIndex` / :func:`document_frequency` — structural df: key of a node = WL hash of
  its ancestral subgraph (node label ``"{op}|{value}"``, edge label = argument index), confirmed by
  an attributed isomorphism check (hashes can collide); df = number of training graphs holding it.
* :func:`num_hit` — the repo's step-pattern variant (intersection of parents' hit sets).
* :func:`digit_df` — fast df for multiplication digits (digit k depends on x, y mod 10^(k+1)).
* :func:`relative_ig` / :func:`relative_ig_table` — RelativeIG(Y; X) = (H(Y) - H(Y|X)) / H(Y)
  with plug-in entropies (bits), over singletons, adjacent pairs and triples of inputs.
* :func:`logistic_slope` — correctness ~ 1 + log1p(df) + depth (+ op dummies) by maximum
  likelihood (scipy), slope with a Wald CI (statsmodels is not a dependency).
* :func:`null_model` / :class:`NullModel` — error accumulation: (1 - eps)^n, and the fitted
  prediction prod_v (1 - eps_op(v)) from per-op local error rates.

Example:
    >>> import networkx as nx
    >>> G = nx.DiGraph([("a", "s"), ("b", "s"), ("s", "o"), ("c", "o")])
    >>> m = graph_metrics(G)
    >>> m["depth"], m["width"], m["avg_parallelism"], m["longest_path_nodes"]
    (2, 3, 2.5, 3)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
from scipy import optimize

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.result import Result, float_summary, result_meta

__all__ = [
    "graph_metrics",
    "OPS",
    "apply_op",
    "node_taxonomy",
    "taxonomy_frame",
    "taxonomy_by_layer",
    "subgraph_keys",
    "SubgraphIndex",
    "document_frequency",
    "num_hit",
    "digit_df",
    "entropy",
    "relative_ig",
    "relative_ig_table",
    "logistic_slope",
    "SlopeFit",
    "null_model",
    "NullModel",
]

LABELS = ("correct", "local", "propagation", "restoration")


# -- complexity metrics --------------------------------------------------------------------------


def _layers(G: nx.DiGraph) -> dict:
    if not nx.is_directed_acyclic_graph(G):
        raise LoopscopeError("computation graph must be a DAG")
    layer: dict = {}
    for v in nx.topological_sort(G):
        preds = list(G.predecessors(v))
        layer[v] = 0 if not preds else 1 + max(layer[u] for u in preds)
    return layer


def graph_metrics(G: nx.DiGraph) -> dict[str, Any]:
    """Layers, depth (edges), width (largest layer), |V|/depth and the repo's |V|/(depth + 1).

    Returns a dict: ``layers`` (node -> layer), ``n_nodes``, ``depth``, ``width``,
    ``avg_parallelism`` (|V|/depth, inf for depth 0), ``longest_path_nodes`` (= depth + 1, the
    repo's ``longest_path``) and ``repo_avg_parallelism`` (|V|/longest_path_nodes).
    """
    layer = _layers(G)
    depth = max(layer.values()) if layer else 0
    counts = np.bincount(list(layer.values())) if layer else np.array([0])
    n = G.number_of_nodes()
    return {
        "layers": layer,
        "n_nodes": n,
        "depth": depth,
        "width": int(counts.max()),
        "avg_parallelism": n / depth if depth else float("inf"),
        "longest_path_nodes": depth + 1,
        "repo_avg_parallelism": n / (depth + 1),
    }


# -- node error taxonomy -------------------------------------------------------------------------


def _concat(xs: Sequence[int], attrs: Mapping) -> int:
    return sum(int(d) * 10**k for k, d in enumerate(xs))


#: primitive evaluators ``fn(args, node_attrs) -> value`` by ``op`` name (extend with ``ops=``)
OPS: dict[str, Callable[[Sequence[Any], Mapping], Any]] = {
    "add": lambda xs, a: sum(xs),
    "exp_add": lambda xs, a: sum(xs),
    "sub": lambda xs, a: xs[0] - xs[1],
    "multiply": lambda xs, a: xs[0] * xs[1],
    "max": lambda xs, a: max(xs),
    "min": lambda xs, a: min(xs),
    "mod10": lambda xs, a: xs[0] % 10 if a.get("part", "residual") == "residual" else xs[0] // 10,
    "concat": _concat,
    "exp": lambda xs, a: xs[0] * 10 ** int(a["k"]),
    "output": lambda xs, a: xs[0],
    "identity": lambda xs, a: xs[0],
}


def _parents(G: nx.DiGraph, v: Any) -> list:
    return [u for u, _ in sorted(G.in_edges(v), key=lambda e: G.edges[e].get("arg", 0))]


def apply_op(G: nx.DiGraph, v: Any, args: Sequence[Any], ops: Mapping | None = None) -> Any:
    """``op(v)`` applied to ``args`` (values of v's parents in argument order)."""
    table = {**OPS, **(ops or {})}
    op = G.nodes[v].get("op")
    if op not in table:
        raise LoopscopeError(
            f"unknown op {op!r} at node {v!r}; pass ops={{{op!r}: fn(args, attrs)}}"
        )
    return table[op](list(args), G.nodes[v])


def node_taxonomy(
    G: nx.DiGraph, predicted: Mapping[Any, Any], ops: Mapping | None = None
) -> dict[Any, str]:
    """Label every node of ``G`` given predicted values ``predicted[node]`` (sources optional).

    In topological order: sources are ``correct``; a node is ``correct`` if all parents are
    correct and its value matches; ``restoration`` if its value matches although a parent is not
    correct; ``propagation`` if the value is wrong but equals op(v) of the predicted parents;
    ``local`` otherwise (the step itself is wrong).
    """
    labels: dict[Any, str] = {}
    pred: dict[Any, Any] = {}
    for v in nx.topological_sort(G):
        ps = _parents(G, v)
        true = G.nodes[v]["value"]
        if not ps:
            labels[v] = "correct"
            pred[v] = true
            continue
        if v not in predicted:
            raise LoopscopeError(f"no predicted value for node {v!r}")
        pred[v] = predicted[v]
        parents_ok = all(labels[u] == "correct" for u in ps)
        if pred[v] == true:
            labels[v] = "correct" if parents_ok else "restoration"
        elif pred[v] == apply_op(G, v, [pred[u] for u in ps], ops):
            labels[v] = "propagation"
        else:
            labels[v] = "local"
    return labels


def taxonomy_frame(
    graphs: Sequence[nx.DiGraph],
    predictions: Sequence[Mapping[Any, Any]],
    ops: Mapping | None = None,
    df: Sequence[Mapping[Any, int]] | None = None,
) -> pd.DataFrame:
    """One row per (example, non-source node): layer, op, label, node correctness, optional df,
    and the example's |V|/depth and full correctness."""
    if len(graphs) != len(predictions):
        raise LoopscopeError(f"{len(graphs)} graphs but {len(predictions)} predictions")
    rows = []
    for i, (G, p) in enumerate(zip(graphs, predictions, strict=True)):
        lab = node_taxonomy(G, p, ops)
        m = graph_metrics(G)
        all_ok = all(v == "correct" for v in lab.values())
        for v in G.nodes:
            if G.in_degree(v) == 0:
                continue
            r = {
                "example": i,
                "node": v,
                "layer": m["layers"][v],
                "op": G.nodes[v].get("op"),
                "label": lab[v],
                "correct": lab[v] == "correct",
                "depth": m["depth"],
                "avg_parallelism": m["avg_parallelism"],
                "example_correct": all_ok,
            }
            if df is not None:
                r["df"] = int(df[i].get(v, 0))
            rows.append(r)
    return pd.DataFrame(rows)


def taxonomy_by_layer(frame: pd.DataFrame) -> pd.DataFrame:
    """Fraction of each label per graph layer (rows: layer; columns: the four labels)."""
    tab = pd.crosstab(frame["layer"], frame["label"], normalize="index")
    return tab.reindex(columns=list(LABELS), fill_value=0.0)


# -- subgraph document frequency -----------------------------------------------------------------


def _ancestral(G: nx.DiGraph, v: Any) -> nx.DiGraph:
    sub = G.subgraph(nx.ancestors(G, v) | {v}).copy()
    for u in sub.nodes:
        sub.nodes[u]["wl"] = f"{sub.nodes[u].get('op')}|{sub.nodes[u].get('value')}"
    for e in sub.edges:
        sub.edges[e]["wl"] = str(sub.edges[e].get("arg", ""))
    return sub


def _wl(sub: nx.DiGraph, iterations: int) -> str:
    with (
        warnings.catch_warnings()
    ):  # networkx >= 3.5 notes a changed directed hash; we only compare
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(
            sub, node_attr="wl", edge_attr="wl", iterations=iterations
        )


def _same(a: nx.DiGraph, b: nx.DiGraph) -> bool:
    if a.number_of_nodes() != b.number_of_nodes() or a.number_of_edges() != b.number_of_edges():
        return False
    return nx.is_isomorphic(
        a,
        b,
        node_match=lambda x, y: x["wl"] == y["wl"],
        edge_match=lambda x, y: x["wl"] == y["wl"],
    )


def subgraph_keys(G: nx.DiGraph, iterations: int = 3) -> dict:
    """Node -> WL hash of its ancestral subgraph (labels ``op|value``, edge label ``arg``)."""
    return {v: _wl(_ancestral(G, v), iterations) for v in G.nodes}


@dataclass
class SubgraphIndex:
    """Training-set index of ancestral subgraphs, built once: WL hash buckets of isomorphism
    classes, each with the set of training examples that contain it.

    Example:
        >>> idx = SubgraphIndex([G1, G2])        # doctest: +SKIP
        >>> idx.df(G_test)["o"]                  # doctest: +SKIP
    """

    graphs: Sequence[nx.DiGraph] = ()
    iterations: int = 3
    buckets: dict[str, list[tuple[nx.DiGraph, set[int]]]] = field(default_factory=dict)
    n_collisions: int = 0

    def __post_init__(self) -> None:
        for i, G in enumerate(self.graphs):
            self.add(G, i)

    def _find(self, sub: nx.DiGraph, key: str) -> tuple[nx.DiGraph, set[int]] | None:
        for rep in self.buckets.get(key, []):
            if _same(rep[0], sub):
                return rep
        return None

    def add(self, G: nx.DiGraph, example: int) -> None:
        """Index every node's ancestral subgraph of training graph ``example``."""
        for v in G.nodes:
            sub = _ancestral(G, v)
            key = _wl(sub, self.iterations)
            rep = self._find(sub, key)
            if rep is None:
                if key in self.buckets:
                    self.n_collisions += 1  # same hash, different labelled graph
                self.buckets.setdefault(key, []).append((sub, {example}))
            else:
                rep[1].add(example)

    def df(self, G: nx.DiGraph) -> dict[Any, int]:
        """Document frequency of each node's ancestral subgraph of ``G``."""
        out = {}
        for v in G.nodes:
            sub = _ancestral(G, v)
            rep = self._find(sub, _wl(sub, self.iterations))
            out[v] = 0 if rep is None else len(rep[1])
        return out


def document_frequency(test: nx.DiGraph, train: Iterable[nx.DiGraph] | SubgraphIndex) -> dict:
    """df of each node of ``test``: number of training graphs that contain its ancestral subgraph
    (WL hash + attributed isomorphism check). Pass a :class:`SubgraphIndex` to reuse it."""
    index = train if isinstance(train, SubgraphIndex) else SubgraphIndex(list(train))
    return index.df(test)


def _pattern(G: nx.DiGraph, v: Any) -> tuple:
    ps = _parents(G, v)
    return (G.nodes[v].get("op"), tuple(G.nodes[u]["value"] for u in ps), G.nodes[v]["value"])


def num_hit(test: nx.DiGraph, train: Sequence[nx.DiGraph]) -> dict[Any, int]:
    """The repo's num_hit: idx(source) = all training examples; idx(v) = examples in the
    intersection of the parents' idx that contain v's step pattern (op, argument values, value);
    num_hit(v) = |idx(v)|."""
    pats = [{_pattern(G, v) for v in G.nodes if G.in_degree(v) > 0} for G in train]
    every = set(range(len(train)))
    idx: dict[Any, set[int]] = {}
    for v in nx.topological_sort(test):
        ps = _parents(test, v)
        if not ps:
            idx[v] = set(every)
            continue
        cand = set.intersection(*(idx[u] for u in ps))
        pv = _pattern(test, v)
        idx[v] = {i for i in cand if pv in pats[i]}
    return {v: len(s) for v, s in idx.items()}


def digit_df(
    x: Sequence[int],
    y: Sequence[int],
    n_digits: int,
    train_x: Sequence[int],
    train_y: Sequence[int],
) -> np.ndarray:
    """``[N, n_digits]`` df of each product digit's computation over the training pairs: digit k
    of x*y is fully determined by (x mod 10^(k+1), y mod 10^(k+1)) (its whole ancestral
    computation), so df = number of training pairs that share them."""
    tx, ty = np.asarray(train_x), np.asarray(train_y)
    out = np.zeros((len(x), n_digits), dtype=np.int64)
    for k in range(n_digits):
        mod = 10 ** (k + 1)
        keys, counts = np.unique(np.stack([tx % mod, ty % mod], 1), axis=0, return_counts=True)
        table = {tuple(kk): c for kk, c in zip(keys.tolist(), counts.tolist(), strict=True)}
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            out[i, k] = table.get((int(a) % mod, int(b) % mod), 0)
    return out


# -- relative information gain -------------------------------------------------------------------


def _codes(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 1:
        return np.unique(x, return_inverse=True)[1].reshape(-1)
    return np.unique(x.reshape(len(x), -1), axis=0, return_inverse=True)[1].reshape(-1)


def entropy(y: np.ndarray) -> float:
    """Plug-in entropy in bits of a discrete variable (rows of a 2-D array are joint values)."""
    _, counts = np.unique(_codes(y), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def relative_ig(y: np.ndarray, x: np.ndarray) -> float:
    """RelativeIG(Y; X) = (H(Y) - H(Y|X)) / H(Y); ``x`` ``[N]`` or ``[N, k]`` (joint)."""
    y, x = np.asarray(y), np.asarray(x)
    if len(y) != len(x):
        raise LoopscopeError(f"y and x need the same number of rows, got {len(y)} vs {len(x)}")
    hy = entropy(y)
    if hy == 0:
        return float("nan")
    cy, cx = _codes(y), _codes(x)
    h_joint = entropy(np.stack([cx, cy], 1))
    h_cond = h_joint - entropy(cx)
    return (hy - h_cond) / hy


def relative_ig_table(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], max_order: int = 3
) -> pd.DataFrame:
    """RelativeIG of every output element given singletons, adjacent pairs and adjacent triples
    (up to ``max_order``) of the input elements, in the order given. Columns: output, inputs,
    order, relative_ig, H_output (bits)."""
    names = list(inputs)
    rows = []
    for out_name, yv in outputs.items():
        hy = entropy(yv)
        for order in range(1, max_order + 1):
            for s in range(len(names) - order + 1):
                group = names[s : s + order]
                X = np.stack([np.asarray(inputs[g]) for g in group], 1)
                rows.append(
                    {
                        "output": out_name,
                        "inputs": ",".join(group),
                        "order": order,
                        "relative_ig": relative_ig(yv, X),
                        "H_output": hy,
                    }
                )
    return pd.DataFrame(rows)


# -- correctness vs df ---------------------------------------------------------------------------


@dataclass(kw_only=True, repr=False)
class SlopeFit(Result):
    """A :func:`logistic_slope` fit: the slope on log1p(df) with its 95 % Wald CI.

    Attributes:
        slope, ci_low, ci_high, se: the log1p(df) coefficient, its CI and standard error
            (NaN when the outcome has one class).
        intercept: the constant term. depth_coef: the depth coefficient (NaN without depth).
        n: observations.
    """

    slope: float
    ci_low: float
    ci_high: float
    se: float = float("nan")
    intercept: float = float("nan")
    depth_coef: float = float("nan")
    n: int = 0

    def summary(self) -> dict[str, float]:
        names = ("slope", "ci_low", "ci_high", "se", "intercept", "depth_coef", "n")
        return float_summary({k: getattr(self, k) for k in names})

    def to_frame(self) -> pd.DataFrame:
        """One row: the summary's numbers."""
        return pd.DataFrame([self.summary()])


@did_you_mean
def logistic_slope(
    correct: np.ndarray,
    df: np.ndarray,
    depth: np.ndarray | None,
    op: Sequence[Any] | None = None,
    l2: float = 1e-6,
) -> SlopeFit:
    """Logistic regression correct ~ 1 + log1p(df) + depth (+ one dummy per op but the first) by
    maximum likelihood (L-BFGS, a negligible ``l2`` for separable data); slope on log1p(df) with
    a 95 % Wald CI from the observed information.

    ``depth`` enters linearly; pass ``depth=None`` and the control as ``op`` when its effect need
    not be monotone (e.g. the digit position of a product, whose accuracy can be high at both
    ends): a linear term would then leave the contrast to df, and a df that differs between the
    positions would pick up a spurious slope. ``depth_coef`` is NaN when ``depth`` is None.

    Args:
        correct: ``[n]`` 1/0 outcomes. df: ``[n]`` document frequencies.
        depth: ``[n]`` linear control, or None.
        op: ``[n]`` categorical control (one dummy per level but the first), or None.
        l2: ridge penalty that keeps separable data finite.

    Example:
        >>> fit = logistic_slope(correct, df, None, op=digit)  # doctest: +SKIP
        >>> fit.slope, fit.ci_low, fit.ci_high  # doctest: +SKIP
    """
    yv = np.asarray(correct, dtype=float).ravel()
    cols = [np.ones_like(yv), np.log1p(np.asarray(df, dtype=float).ravel())]
    if depth is not None:
        cols.append(np.asarray(depth, dtype=float).ravel())
    if op is not None:
        ops = np.asarray(op).ravel()
        for level in sorted(set(ops.tolist()), key=str)[1:]:
            cols.append((ops == level).astype(float))
    X = np.stack(cols, 1)
    meta = result_meta(settings={"l2": l2, "depth": depth is not None, "op": op is not None})
    if len(np.unique(yv)) < 2:
        nan = float("nan")
        return SlopeFit(slope=nan, ci_low=nan, ci_high=nan, n=len(yv), meta=meta)

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ w
        p = 1 / (1 + np.exp(-z))
        loss = np.sum(np.logaddexp(0, z) - yv * z) + 0.5 * l2 * w @ w
        return loss, X.T @ (p - yv) + l2 * w

    w = optimize.minimize(
        nll, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}
    ).x
    p = 1 / (1 + np.exp(-(X @ w)))
    H = X.T @ (X * (p * (1 - p))[:, None]) + l2 * np.eye(X.shape[1])
    se = float(np.sqrt(np.linalg.pinv(H)[1, 1]))
    return SlopeFit(
        slope=float(w[1]),
        ci_low=float(w[1] - 1.96 * se),
        ci_high=float(w[1] + 1.96 * se),
        se=se,
        intercept=float(w[0]),
        depth_coef=float(w[2]) if depth is not None else float("nan"),
        n=len(yv),
        meta=meta,
    )


# -- error-accumulation null model ---------------------------------------------------------------


def null_model(eps: float | np.ndarray, n: int | np.ndarray) -> np.ndarray | float:
    """P(all n independent steps correct) = (1 - eps)^n."""
    eps = np.asarray(eps, dtype=float)
    if np.any((eps < 0) | (eps > 1)):
        raise LoopscopeError(f"eps must lie in [0, 1], got {eps}")
    out = (1 - eps) ** np.asarray(n, dtype=float)
    return float(out) if out.ndim == 0 else out


@dataclass(kw_only=True, repr=False)
class NullModel(Result):
    """Per-op local error rates eps_op (fitted, not hard-coded) and the predicted accuracy
    prod_v (1 - eps_op(v)) over the non-source nodes of a graph."""

    eps: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, frame: pd.DataFrame) -> NullModel:
        """eps_op = fraction of ``local`` labels among the nodes with that op
        (``frame`` from :func:`taxonomy_frame`)."""
        rates = frame.assign(local=frame["label"] == "local").groupby("op")["local"].mean()
        return cls(eps={str(k): float(v) for k, v in rates.items()})

    def predict(self, G: nx.DiGraph) -> float:
        p = 1.0
        for v in G.nodes:
            if G.in_degree(v) == 0:
                continue
            op = str(G.nodes[v].get("op"))
            if op not in self.eps:
                raise LoopscopeError(f"no fitted error rate for op {op!r}")
            p *= 1 - self.eps[op]
        return p

    def to_frame(self) -> pd.DataFrame:
        """One row per op: op, eps."""
        return pd.DataFrame({"op": list(self.eps), "eps": list(self.eps.values())})

    def summary(self) -> dict[str, float]:
        """Number of ops and their mean error rate."""
        eps = list(self.eps.values())
        return float_summary(
            {"n_ops": len(eps), "mean_eps": float(np.mean(eps)) if eps else float("nan")}
        )
