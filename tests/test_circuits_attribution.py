"""circuits attribution + circuit graphs: golden #28 (AtP saturation on tanh, exact on a linear
path), IG as the Riemann sum of the path gradient, per-firing gradients of a weight-tied hook vs
central differences, exact re-check == patch_sweep, unrolled circuit of a delay line (known
diagonal circuit, faithfulness curve, Jaccard), same circuit at every iteration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from toy_pairs import lp0, tiny_pair
from transformer_lens.hook_points import HookPoint

import loopscope as ls
from loopscope.circuits import attribution, circuit_graph, patch_sweep, toys
from loopscope.core.errors import LoopscopeError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_golden28_atp_saturates_on_tanh():
    res = attribution(
        toys.SaturatingLoop("tanh"),
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        ["hook_A"],
        toys.first_logit,
        n_iter=1,
    )
    row = res.nodes.iloc[0]
    assert row.exact == pytest.approx(math.tanh(-2.5) - math.tanh(2.5), abs=1e-12)
    assert row.exact == pytest.approx(-1.97323, abs=1e-5)
    assert row.atp == pytest.approx(-5 * (1 - math.tanh(2.5) ** 2), abs=1e-12)
    assert row.atp == pytest.approx(-0.13296, abs=1e-5)
    assert 0.06 < row.atp / row.exact < 0.07  # AtP recovers 6.7 % of the true effect
    assert bool(row.checked) and bool(row.top_k)


def test_golden28_linear_path_atp_equals_exact():
    x_clean = torch.tensor([1.0, 0.3, -2.0])
    x_corr = torch.tensor([0.0, 2.0, 5.0])
    res = attribution(
        toys.SaturatingLoop("linear", gain=3.0, bias=-1.0),
        x_clean,
        x_corr,
        ["hook_A", "hook_C"],
        toys.first_logit,
        n_iter=1,
        validate="all",
    )
    pe = res.per_example
    assert np.allclose(pe["atp"], pe["exact"], atol=1e-6, rtol=0)
    assert np.allclose(pe[pe.site == "hook_A"]["exact"], 3.0 * (x_corr - x_clean).numpy())
    assert res.agreement["max_abs_error"] < 1e-6


def test_integrated_gradients_is_the_left_riemann_sum_and_converges():
    loop = toys.SaturatingLoop("tanh")
    m = 30
    res = attribution(
        loop,
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        ["hook_A"],
        toys.first_logit,
        n_iter=1,
        method="ig",
        ig_hook="hook_A",
        ig_steps=m,
    )
    riemann = -np.mean([5 * (1 - math.tanh(5 * (k / m - 0.5)) ** 2) for k in range(m)])
    assert res.nodes.atp[0] == pytest.approx(riemann, abs=1e-12)
    fine = attribution(
        loop,
        torch.tensor([1.0]),
        torch.tensor([0.0]),
        ["hook_A"],
        toys.first_logit,
        n_iter=1,
        method="ig",
        ig_hook="hook_A",
        ig_steps=400,
    )
    assert fine.nodes.atp[0] == pytest.approx(math.tanh(-2.5) - math.tanh(2.5), abs=1e-4)
    assert res.meta["method"] == "ig" and res.meta["ig_steps"] == m


def test_per_firing_gradients_match_central_differences():
    model, clean, corrupt = tiny_pair(seed=3)
    T = 3
    site = "blocks.0.hook_mlp_out"
    res = attribution(model, clean, corrupt, [site], lp0, n_iter=T, top_k=0, validate=0)
    c = ls.unroll(model, clean, T, capture=[site])[site]
    k = ls.unroll(model, corrupt, T, capture=[site])[site]
    pe = res.per_example
    for t in range(T):  # the same weight-tied hook gets its own gradient at every iteration
        for b, p in [(0, 1), (1, 3)]:
            d = k[t, b, p] - c[t, b, p]

            def m_at(s, t=t, b=b, p=p, d=d):
                def value(x, lab):
                    out = x.clone()
                    out[:, p] = c[t, b, p] + s * d
                    return out

                tr = ls.unroll(
                    model, clean[b : b + 1], T, interventions=[ls.Patch(site, t, value=value)]
                )
                return lp0(tr.decode(), torch.tensor([0])).item()

            h = 1e-5
            fd = (m_at(h) - m_at(-h)) / (2 * h)
            atp = pe[(pe.iteration == t) & (pe.example == b) & (pe.position == p)]["atp"].item()
            assert atp == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_exact_recheck_equals_noising_sweep_and_agreement_report():
    model, clean, corrupt = tiny_pair(seed=3)
    sites = ["hook_state", "blocks.0.attn.hook_z"]
    units = {"blocks.0.attn.hook_z": 2}
    res = attribution(
        model, clean, corrupt, sites, lp0, n_iter=3, units=units, top_k=5, validate="all"
    )
    sw = patch_sweep(
        model, clean, corrupt, sites, "all", lp0, n_iter=3, units=units, direction="noise"
    ).to_frame()
    sw = sw.assign(effect=sw["metric"] - sw["clean"])
    merged = res.per_example.merge(sw, on=["site", "iteration", "position", "unit", "example"])
    assert len(merged) == len(sw) == len(res.per_example)
    assert np.array_equal(merged["exact"].to_numpy(), merged["effect"].to_numpy())
    a = res.agreement
    assert a["n_checked"] == len(res.nodes) and 0 <= a["top_k_overlap"] <= 1
    assert a["spearman"] > 0.5  # AtP ranks a smooth tiny model's nodes well
    assert res.nodes["top_k"].sum() == 5 and set(res.to_frame().columns) >= {"agreement_spearman"}
    part = attribution(
        model, clean, corrupt, sites, lp0, n_iter=3, units=units, top_k=4, validate=3, seed=1
    )
    assert part.nodes["checked"].sum() == 7 and part.nodes[part.nodes.top_k]["checked"].all()


def test_delay_line_circuit_graph():
    loop = toys.ShiftLoop()
    clean = torch.tensor([[1.0, 5, 5, 5, 5], [2.0, -1, -1, -1, -1]])
    corrupt = torch.zeros(2, 5)
    T = 4
    cg = circuit_graph(
        loop, clean, corrupt, ["hook_state"], toys.first_logit, n_iter=T, sizes=[2, 3, 4]
    )
    diag = {(t, "hook_state", -1, t) for t in range(T)}
    assert cg.circuit == diag  # default: smallest top-n set with F >= 0.9
    eff = {(r.iteration, r.position): r.effect for r in cg.nodes.itertuples()}
    for (t, p), e in eff.items():
        assert e == (-1.5 if p == t else 0.0)  # mean over the two examples of -x0
    f = cg.faithfulness.set_index("size")["faithfulness"]
    assert list(f.index) == [0, 2, 3, 4, T * 5]
    assert (f[0], f[2], f[3], f[4], f[T * 5]) == (0, 0, 0, 1, 1)
    J = cg.iteration_jaccard().to_numpy()
    assert np.array_equal(J, np.eye(T))  # a different position carries the answer each iteration
    assert cg.same_circuit_score() == 0.0 and cg.same_circuit_score(ignore_position=True) == 1.0
    G = cg.graph
    assert sum(1 for *_, k in G.edges(data="kind") if k == "residual") == T
    assert sum(1 for *_, k in G.edges(data="kind") if k == "injection") == T * 5
    assert G.nodes[(2, "hook_state", -1, 2)]["in_circuit"]
    P = cg.pruned()
    assert P.number_of_nodes() == (T + 1) + 1 + T and set(
        P.successors((1, "hook_state", -1, 1))
    ) == {("state", 2)}
    atp = circuit_graph(
        loop, clean, corrupt, ["hook_state"], toys.first_logit, n_iter=T, effects="atp", top_n=T
    )
    assert atp.circuit == diag  # a linear loop: AtP = exact


class Accumulate(ls.Loop):
    """h' = h + A (A = input, used every iteration) + 0 * B: the same circuit at every step."""

    def __init__(self):
        super().__init__()
        self.hook_A, self.hook_B = HookPoint(), HookPoint()
        self.setup()

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        return h + self.hook_A(ctx) + 0 * self.hook_B(ctx * 2)


def test_same_circuit_at_every_iteration():
    T = 4
    cg = circuit_graph(
        Accumulate(),
        torch.ones(3, 1),
        torch.zeros(3, 1),
        ["hook_A", "hook_B"],
        toys.first_logit,
        n_iter=T,
        threshold=1e-9,
        injection=False,
    )
    assert cg.circuit == {(t, "hook_A", -1, -1) for t in range(T)}
    assert cg.same_circuit_score() == 1.0 and ("input",) not in cg.graph
    f = cg.faithfulness.set_index("size")["faithfulness"]
    assert np.allclose(f.to_numpy(), np.minimum(f.index.to_numpy(), T) / T)  # each A adds 1/T


def test_bad_inputs():
    loop = toys.SaturatingLoop()
    x, y = torch.tensor([1.0]), torch.tensor([0.0])
    with pytest.raises(LoopscopeError, match="method"):
        attribution(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, method="eap")
    with pytest.raises(LoopscopeError, match="ig_hook"):
        attribution(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, method="ig")
    with pytest.raises(LoopscopeError, match="validate"):
        attribution(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, validate="some")
    with pytest.raises(LoopscopeError, match="unknown option"):
        attribution(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, topk=3)
    with pytest.raises(LoopscopeError, match="not both"):
        circuit_graph(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, threshold=0.1, top_n=1)
    with pytest.raises(LoopscopeError, match="effects"):
        circuit_graph(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, effects="acdc")
    with pytest.raises(LoopscopeError, match="top_n"):
        circuit_graph(loop, x, y, ["hook_A"], toys.first_logit, n_iter=1, top_n=5)
