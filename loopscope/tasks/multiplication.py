"""Multi-digit multiplication with its computation graph (Faith and Fate primitives).

Tokens: ``x`` digits LSB-first, SEP, ``y`` digits LSB-first, SEP, then ``n1 + n2`` answer slots;
targets are the product digits (LSB-first) at the answer slots, -100 elsewhere. Operands are digit
strings of fixed width (leading zeros allowed), so one split has one token length.

Splits: all 2x2-digit pairs (10 000) are divided 80/20 by a fixed seeded permutation into
``train`` and ``id`` (disjoint); ``ood`` = 3x3 digits, ``ood_3x2`` = 3x2 digits.

Graph builder convention (``multiplication_graph``; long multiplication, value-dependent):
for each ``y_j`` and each ``x_i``: a ``multiply`` node ``x_i * y_j`` (type product); if a carry
enters, an ``add`` node (type product) adds it; if the value is >= 10 a ``mod10`` split gives a
residual digit (attr ``part="residual"``) and a carry (``part="carry"``), else the value is the
residual itself. The digits of row ``j`` (plus its final carry) are joined by ``concat`` (type
partial), shifted by ``exp`` (x 10^j) and all rows summed by ``exp_add``; the sink ``output`` node
holds ``x * y``. Every node has ``op``, ``type``, ``value`` and ``rank`` (decimal position); edges
carry ``arg`` (argument index).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.tasks.base import Batch, Task

__all__ = ["MultiplicationTask", "multiplication_graph", "evaluate_graph", "digits_of"]

SEP, SLOT = 10, 11


def digits_of(v: int, width: int) -> list[int]:
    """LSB-first digits of ``v`` padded to ``width``."""
    return [(v // 10**k) % 10 for k in range(width)]


def multiplication_graph(
    x: int, y: int, n1: int | None = None, n2: int | None = None
) -> nx.DiGraph:
    """Computation graph of ``x * y`` by long multiplication (see module docstring)."""
    n1 = n1 or max(1, len(str(x)))
    n2 = n2 or max(1, len(str(y)))
    xd, yd = digits_of(x, n1), digits_of(y, n2)
    G = nx.DiGraph()

    def node(
        name: str, op: str, typ: str, value: int, rank: int, args: list[str] = (), **attrs
    ) -> str:
        G.add_node(name, op=op, type=typ, value=int(value), rank=int(rank), **attrs)
        for k, a in enumerate(args):
            G.add_edge(a, name, arg=k)
        return name

    for i, d in enumerate(xd):
        node(f"x{i}", "input", "input", d, i)
    for j, d in enumerate(yd):
        node(f"y{j}", "input", "input", d, j)
    shifted = []
    for j in range(n2):
        carry: str | None = None
        digits: list[str] = []
        for i in range(n1):
            p = node(f"p{i}_{j}", "multiply", "product", xd[i] * yd[j], i + j, [f"x{i}", f"y{j}"])
            v_name, v = p, xd[i] * yd[j]
            if carry is not None:
                v = v + G.nodes[carry]["value"]
                v_name = node(f"s{i}_{j}", "add", "product", v, i + j, [p, carry])
            if v >= 10:
                digits.append(
                    node(f"r{i}_{j}", "mod10", "residual", v % 10, i + j, [v_name], part="residual")
                )
                carry = node(
                    f"c{i}_{j}", "mod10", "carry", v // 10, i + j + 1, [v_name], part="carry"
                )
            else:
                digits.append(v_name)
                carry = None
        if carry is not None:
            digits.append(carry)
        val = sum(G.nodes[d]["value"] * 10**k for k, d in enumerate(digits))
        row = node(f"row{j}", "concat", "partial", val, j, digits)
        shifted.append(node(f"shift{j}", "exp", "partial", val * 10**j, j, [row], k=j))
    total = node("sum", "exp_add", "partial", x * y, 0, shifted)
    node("out", "output", "output", x * y, 0, [total])
    return G


def evaluate_graph(G: nx.DiGraph) -> dict[str, int]:
    """Recompute every node's value from its inputs in topological order (checks a builder)."""
    val: dict[str, int] = {}
    for v in nx.topological_sort(G):
        a = G.nodes[v]
        args = [u for u, _ in sorted(G.in_edges(v), key=lambda e: G.edges[e]["arg"])]
        xs = [val[u] for u in args]
        op = a["op"]
        if op == "input":
            val[v] = a["value"]
        elif op == "multiply":
            val[v] = xs[0] * xs[1]
        elif op in ("add", "exp_add"):
            val[v] = sum(xs)
        elif op == "mod10":
            val[v] = xs[0] % 10 if a.get("part") == "residual" else xs[0] // 10
        elif op == "concat":
            val[v] = sum(d * 10**k for k, d in enumerate(xs))
        elif op == "exp":
            val[v] = xs[0] * 10 ** a["k"]
        elif op == "output":
            val[v] = xs[0]
        else:  # pragma: no cover
            raise LoopscopeError(f"unknown op {op!r}")
    return val


class MultiplicationTask(Task):
    """x * y with one computation graph per example (the memorization-analysis task)."""

    name = "multiplication"
    vocab_size = 12
    n_classes = 10
    causal = False
    grid = False

    def __init__(self, train_digits: int = 2, id_fraction: float = 0.2) -> None:
        if train_digits not in (1, 2):
            raise LoopscopeError(f"train_digits must be 1 or 2, got {train_digits!r}")
        self.nd = int(train_digits)
        N = 10**self.nd
        perm = np.random.default_rng(1234).permutation(N * N)
        cut = int(round(len(perm) * (1 - id_fraction)))
        self.pairs = {"train": perm[:cut], "id": perm[cut:]}
        self.splits = ("train", "id", "ood", "ood_3x2")
        self.sizes = {
            "train": (self.nd, self.nd),
            "id": (self.nd, self.nd),
            "ood": (3, 3),
            "ood_3x2": (3, 2),
        }

    def _sample(self, n: int, split: str, rng: np.random.Generator) -> Batch:
        n1, n2 = self.sizes[split]
        if split in self.pairs:
            pick = self.pairs[split][rng.integers(0, len(self.pairs[split]), size=n)]
            xs, ys = pick // 10**self.nd, pick % 10**self.nd
        else:
            xs = rng.integers(10 ** (n1 - 1), 10**n1, size=n)
            ys = rng.integers(10 ** (n2 - 1), 10**n2, size=n)
        L = n1 + 1 + n2 + 1 + n1 + n2
        toks = np.full((n, L), SLOT, dtype=np.int64)
        tg = np.full((n, L), -100, dtype=np.int64)
        for k, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
            toks[k, :n1] = digits_of(x, n1)
            toks[k, n1] = SEP
            toks[k, n1 + 1 : n1 + 1 + n2] = digits_of(y, n2)
            toks[k, n1 + 1 + n2] = SEP
            tg[k, n1 + n2 + 2 :] = digits_of(x * y, n1 + n2)
        graphs = [multiplication_graph(int(x), int(y), n1, n2) for x, y in zip(xs, ys, strict=True)]
        return Batch(
            tokens=torch.from_numpy(toks).long(),
            targets=torch.from_numpy(tg).long(),
            intermediates={},
            meta={
                "x": torch.as_tensor(xs),
                "y": torch.as_tensor(ys),
                "n_digits": (n1, n2),
                "length": L,
                "split": split,
            },
            graphs=graphs,
        )
