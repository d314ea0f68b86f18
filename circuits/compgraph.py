"""Computation-graph memorization statistics (Faith and Fate), structural variant.

* :func:`graph_metrics` — layer (longest path from a source, in edges), depth, width, |V|/depth
  and the repo's longest-path-in-nodes convention.
* :func:`subgraph_keys` — a key per node for its ancestral subgraph: Weisfeiler-Lehman hash of
  the induced subgraph on ancestors(v) ∪ {v} with node label ``"{op}|{value}"`` and edge label
  the argument index.
* :func:`document_frequency` — df of each test node = number of training graphs containing that
  key.
* :func:`digit_df` — for multiplication, digit k of x*y is fully determined by ``x mod 10^(k+1)``
  and ``y mod 10^(k+1)`` (its whole ancestral computation); df = number of training pairs that
  share them.
* :func:`logistic_slope` — correctness ~ 1 + log1p(df) + depth by maximum likelihood (scipy),
  slope with a Wald CI.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import networkx as nx
import numpy as np
from scipy import optimize

from loopscope.errors import LoopscopeError

__all__ = ["graph_metrics", "subgraph_keys", "document_frequency", "digit_df", "logistic_slope"]


def graph_metrics(G: nx.DiGraph) -> dict[str, float]:
    """Layers, depth (edges), width, |V|/depth and the repo's |V|/longest-path-nodes."""
    if not nx.is_directed_acyclic_graph(G):
        raise LoopscopeError("computation graph must be a DAG")
    layer: dict = {}
    for v in nx.topological_sort(G):
        preds = list(G.predecessors(v))
        layer[v] = 0 if not preds else 1 + max(layer[u] for u in preds)
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


def subgraph_keys(G: nx.DiGraph, iterations: int = 3) -> dict:
    """Node -> WL hash of its ancestral subgraph (labels ``op|value``, edge label ``arg``)."""
    keys = {}
    for v in G.nodes:
        sub = G.subgraph(nx.ancestors(G, v) | {v}).copy()
        for u in sub.nodes:
            sub.nodes[u]["wl"] = f"{sub.nodes[u].get('op')}|{sub.nodes[u].get('value')}"
        for e in sub.edges:
            sub.edges[e]["wl"] = str(sub.edges[e].get("arg", ""))
        keys[v] = nx.weisfeiler_lehman_graph_hash(
            sub, node_attr="wl", edge_attr="wl", iterations=iterations
        )
    return keys


def document_frequency(test: nx.DiGraph, train: Iterable[nx.DiGraph]) -> dict:
    """df of each node of ``test``: number of training graphs whose key set holds its key."""
    train_sets = [set(subgraph_keys(g).values()) for g in train]
    return {v: sum(k in s for s in train_sets) for v, k in subgraph_keys(test).items()}


def digit_df(
    x: Sequence[int],
    y: Sequence[int],
    n_digits: int,
    train_x: Sequence[int],
    train_y: Sequence[int],
) -> np.ndarray:
    """``[N, n_digits]`` df of each product digit's computation over the training pairs."""
    tx, ty = np.asarray(train_x), np.asarray(train_y)
    out = np.zeros((len(x), n_digits), dtype=np.int64)
    for k in range(n_digits):
        mod = 10 ** (k + 1)
        keys, counts = np.unique(np.stack([tx % mod, ty % mod], 1), axis=0, return_counts=True)
        table = {tuple(kk): c for kk, c in zip(keys.tolist(), counts.tolist(), strict=True)}
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            out[i, k] = table.get((int(a) % mod, int(b) % mod), 0)
    return out


def logistic_slope(correct: np.ndarray, df: np.ndarray, depth: np.ndarray) -> dict[str, float]:
    """Logistic regression correct ~ 1 + log1p(df) + depth; slope on log1p(df) with a 95% Wald CI."""
    yv = np.asarray(correct, dtype=float).ravel()
    X = np.stack(
        [
            np.ones_like(yv),
            np.log1p(np.asarray(df, dtype=float).ravel()),
            np.asarray(depth, dtype=float).ravel(),
        ],
        1,
    )
    if len(np.unique(yv)) < 2:
        return {
            "slope": float("nan"),
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "n": len(yv),
        }
    l2 = 1e-6

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ w
        p = 1 / (1 + np.exp(-z))
        loss = np.sum(np.logaddexp(0, z) - yv * z) + 0.5 * l2 * w @ w
        return loss, X.T @ (p - yv) + l2 * w

    w = optimize.minimize(nll, np.zeros(3), jac=True, method="L-BFGS-B").x
    p = 1 / (1 + np.exp(-(X @ w)))
    H = X.T @ (X * (p * (1 - p))[:, None]) + l2 * np.eye(3)
    se = float(np.sqrt(np.linalg.pinv(H)[1, 1]))
    return {
        "slope": float(w[1]),
        "ci_low": float(w[1] - 1.96 * se),
        "ci_high": float(w[1] + 1.96 * se),
        "depth_coef": float(w[2]),
        "n": len(yv),
    }
