"""circuits: golden #26 (AND/OR denoise/noise table), #27 (single differing component recovers
exactly 1), #30 (transplant persists without injection; contracting bound with injection),
#18 (DAG metrics), #21 (subgraph df toy); batched sweep == one forward per patch."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from transformer_lens.hook_points import HookPoint

import loopscope as ls
from loopscope.circuits import (
    document_frequency,
    graph_metrics,
    logit_diff_metric,
    patch_sweep,
    state_transplant,
)
from loopscope.errors import LoopscopeError


class Gate(ls.Loop):
    """One iteration computing A, B (input bits) and C = AND/OR(A, B); logits [3C, 3(1-C)]."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.hook_A, self.hook_B, self.hook_C = HookPoint(), HookPoint(), HookPoint()
        self.setup()

    def encode(self, tokens):
        return tokens.double()

    def init_state(self, ctx, generator=None):
        return torch.zeros(ctx.shape[0], 1, dtype=torch.float64)

    def step(self, h, ctx, t=None):
        a = self.hook_A(ctx[:, 0:1])
        b = self.hook_B(ctx[:, 1:2])
        c = torch.relu(a + b - 1) if self.kind == "and" else torch.clamp(a + b, max=1)
        return self.hook_C(c)

    def decode(self, h, ctx):
        return torch.stack([3 * h, 3 * (1 - h)], -1)  # [B, 1, 2]: LD = 3C - 3(1-C)


LD = logit_diff_metric(torch.tensor([0]), torch.tensor([1]), position=0)


def table(kind, clean, corrupt):
    df = patch_sweep(
        Gate(kind),
        torch.tensor([clean]),
        torch.tensor([corrupt]),
        ["hook_A", "hook_B", "hook_C"],
        [0],
        lambda lg, i: LD(lg, torch.zeros_like(i)),
        n_iter=1,
        direction="both",
    )
    return {(r.site[-1], r.direction): r.recovery for r in df.itertuples()}


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("and", {"A": (0, 0), "B": (0, 0), "C": (1, 0)}),
        ("or", {"A": (1, 1), "B": (1, 1), "C": (1, 0)}),
    ],
)
def test_golden26_and_or(kind, expected):
    t = table(kind, [1, 1], [0, 0])
    for comp, (den, noi) in expected.items():
        assert t[(comp, "denoise")] == den and t[(comp, "noise")] == noi


def test_golden27_single_differing_component():
    t = table("and", [1, 1], [0, 1])
    assert t[("A", "denoise")] == 1.0 and t[("A", "noise")] == 0.0
    assert t[("B", "denoise")] == 0.0 and t[("B", "noise")] == 1.0
    assert t[("C", "denoise")] == 1.0 and t[("C", "noise")] == 0.0


def test_batched_sweep_equals_one_forward_per_patch():
    from loopscope.models import build, preset

    torch.manual_seed(0)
    model = (
        build(preset("fprm", vocab_size=7, n_classes=6, d_model=16, n_heads=2, d_mlp=32))
        .double()
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 7, (2, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % 7
    metric = lambda lg, i: lg[:, -1].log_softmax(-1)[torch.arange(len(i)), 0]  # noqa: E731
    site = "core.blocks.0.hook_resid_pre"
    fast = patch_sweep(model, clean, corrupt, [site], [0, 2], metric, n_iter=4, chunk=7, seed=3)
    ref_clean = ls.unroll(model, clean, 4, capture=[site], seed=3)
    for r in fast.itertuples():
        h0 = model.init_state(model.encode(corrupt), torch.Generator().manual_seed(3))[
            r.example : r.example + 1
        ]
        src = ref_clean[site][r.iteration][r.example : r.example + 1, r.position]

        def value(x, lab, src=src, p=r.position):
            out = x.clone()
            out[:, p] = src
            return out

        one = ls.unroll(
            model,
            corrupt[r.example : r.example + 1],
            4,
            init=h0,
            decode=True,
            interventions=[ls.Patch(site, r.iteration, value=value)],
        )
        # equal up to float64 rounding of batched vs single-row matmuls (about 1 ulp)
        assert abs(metric(one.logits[-1], torch.tensor([r.example])).item() - r.metric) <= 1e-12 * max(1.0, abs(r.metric))
    assert len(fast) == 2 * 5 * 2


def test_golden30_transplant_persists_without_injection_and_decays_with_it():
    d = 6
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)  # Lipschitz 0.5
    dec = lambda h, x: h.unsqueeze(1)  # noqa: E731  logits [B, 1, d]
    metric = lambda lg, i: lg[:, 0, 0] - lg[:, 0, 1]  # noqa: E731
    free = ls.FnLoop(
        step=lambda h, x: h if x is None else torch.tanh(h), decode=dec
    )  # autonomous identity-like
    clean, corrupt = (
        torch.randn(3, d, generator=g, dtype=torch.float64),
        torch.randn(3, d, generator=g, dtype=torch.float64),
    )
    no_inj = ls.FnLoop(
        step=lambda h, x: torch.tanh(h @ W.T) * 0 + h,
        init_state=lambda x, gen: x.clone(),
        decode=dec,
    )
    rec = state_transplant(no_inj, clean, corrupt, metric, n_iter=5)
    assert np.allclose(rec["recovery"], 1.0)
    inj = ls.FnLoop(
        step=lambda h, x: torch.tanh(h @ W.T + x),
        init_state=lambda x, gen: torch.zeros_like(x),
        decode=dec,
    )
    T = 12
    c = ls.unroll(inj, clean, T)
    k = ls.unroll(inj, corrupt, T)
    for t in (2, 6):
        tr = ls.unroll(inj, corrupt, T, interventions=[ls.Transplant(iteration=t, source=c)])
        gap0 = (c.states[t] - k.states[t]).norm(dim=1)
        assert ((tr.states[T] - k.states[T]).norm(dim=1) <= 0.5 ** (T - t) * gap0 + 1e-12).all()
    del free


def test_golden18_dag_metrics():
    G = nx.DiGraph([("a", "s"), ("b", "s"), ("s", "o"), ("c", "o")])
    m = graph_metrics(G)
    assert m["layers"] == {"a": 0, "b": 0, "c": 0, "s": 1, "o": 2}
    assert (m["depth"], m["width"], m["avg_parallelism"], m["longest_path_nodes"]) == (2, 3, 2.5, 3)


def _toy(a, b, c, with_mult=True):
    G = nx.DiGraph()
    G.add_node("a", op="input", value=a)
    G.add_node("b", op="input", value=b)
    G.add_node("s", op="add", value=a + b)
    G.add_edge("a", "s", arg=0)
    G.add_edge("b", "s", arg=1)
    if with_mult:
        G.add_node("c", op="input", value=c)
        G.add_node("o", op="multiply", value=(a + b) * c)
        G.add_edge("s", "o", arg=0)
        G.add_edge("c", "o", arg=1)
    return G


def test_golden21_subgraph_document_frequency():
    train = [_toy(2, 3, 4), _toy(2, 3, None, with_mult=False)]
    df4 = document_frequency(_toy(2, 3, 4), train)
    df7 = document_frequency(_toy(2, 3, 7), train)
    assert (df4["s"], df4["o"]) == (2, 1)
    assert (df7["s"], df7["o"]) == (2, 0)


def test_bad_sweep_inputs():
    with pytest.raises(LoopscopeError, match="same shape"):
        patch_sweep(
            Gate("and"),
            torch.tensor([[1, 1]]),
            torch.tensor([[1, 1, 0]]),
            ["hook_A"],
            [0],
            LD,
            n_iter=1,
        )
    with pytest.raises(LoopscopeError, match="out of range"):
        patch_sweep(
            Gate("and"),
            torch.tensor([[1, 1]]),
            torch.tensor([[0, 0]]),
            ["hook_A"],
            [3],
            LD,
            n_iter=1,
        )
