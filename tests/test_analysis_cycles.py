"""analysis.cycles: golden #7 (tanh(−2h) 2-cycle), #8 (h ↦ −h), analytic Floquet multipliers
(dense and ARPACK), period 3, fixed points, and classify's classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope.analysis.cycles import classify, detect_cycle
from loopscope.analysis.lyapunov_qr import lyapunov
from loopscope.core.errors import LoopscopeError

A = 0.9575040240772688  # a = tanh(2a)


def tanh_cycle_loop():
    return ls.FnLoop(step=lambda h: torch.tanh(-2 * h))


H0_8 = (torch.linspace(-0.7, 0.8, 8, dtype=torch.float64) + 0.03).reshape(1, 8)


def test_golden7_newton_refines_cycle_to_machine_precision():
    # a short, loose detection: the recorded point is still visibly off the cycle
    tr = ls.unroll(tanh_cycle_loop(), None, 10, init=H0_8)
    res = detect_cycle(tr, tol=1e-2, hits=2)
    assert res.period[0] == 2 and res.status == ["cycle(2)"]
    assert res.residual_before[0] > 1e-6
    assert res.refined[0] and res.newton_iters[0] >= 1
    assert res.residual_after[0] < 1e-15
    c = res.states[0]
    assert c.shape == (2, 8)
    np.testing.assert_allclose(c.abs().numpy(), A, rtol=0, atol=2e-16)
    np.testing.assert_array_equal(torch.sign(c[0]).numpy(), -torch.sign(c[1]).numpy())
    np.testing.assert_allclose(np.abs(res.multipliers[0]), (2 * (1 - A**2)) ** 2, atol=1e-10)
    np.testing.assert_allclose(res.multipliers[0].real, 0.0276796715828, atol=1e-10)
    assert res.stable[0]
    assert abs(res.one_step_residual[0] - 2 * A * math.sqrt(8)) < 1e-13


def test_golden7_classify_says_cycle2_never_converged():
    tr = ls.unroll(tanh_cycle_loop(), None, 200, init=torch.cat([H0_8, -0.5 * H0_8]))
    cls = classify(tr).to_frame()
    assert cls["class"].tolist() == ["cycle(2)", "cycle(2)"]
    assert (cls["final_rel_residual"] > 1.9).all()


def test_golden8_negation_period2_neutral_multipliers():
    h0 = torch.tensor([[0.3, -1.2, 2.0], [5.0, 0.1, -0.2]], dtype=torch.float64)
    res = detect_cycle((ls.FnLoop(step=lambda h: -h), None, h0), n_iter=20)
    assert res.period.tolist() == [2, 2]
    for mu in res.multipliers:
        np.testing.assert_allclose(mu, 1.0, atol=1e-14)
    assert not res.stable.any()  # neutral, not attracting


@pytest.mark.parametrize("dense_max", [1024, 0])
def test_analytic_floquet_multipliers_dense_and_arpack(dense_max):
    # per-coordinate gains g_i: each coordinate has its own 2-cycle ±a_i, a_i = tanh(g_i a_i),
    # multiplier (g_i (1 − a_i²))²
    n = 20
    g = torch.linspace(1.5, 3.0, n, dtype=torch.float64)
    loop = ls.FnLoop(step=lambda h: torch.tanh(-g * h))
    a = torch.ones(n, dtype=torch.float64)
    for _ in range(200):
        a = torch.tanh(g * a)
    mu = np.sort(((g * (1 - a**2)) ** 2).numpy())[::-1]
    res = detect_cycle(
        (loop, None, torch.full((1, n), 0.2, dtype=torch.float64)), n_iter=60, dense_max=dense_max
    )
    assert res.period[0] == 2
    got = np.abs(res.multipliers[0])
    k = len(got)
    assert k == (n if dense_max else 6)
    np.testing.assert_allclose(got, mu[:k], rtol=1e-8)


def test_period3_rotation_and_fixed_point():
    th = 2 * math.pi / 3
    R = torch.tensor(
        [[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64
    )
    res = detect_cycle(
        (ls.FnLoop(step=lambda h: h @ R.T), None, torch.tensor([[1.0, 0.5]], dtype=torch.float64)),
        n_iter=30,
    )
    assert res.period[0] == 3
    np.testing.assert_allclose(np.abs(res.multipliers[0]), 1.0, atol=1e-12)
    # a contraction: period 1 = fixed point, multipliers = eig J(h*)
    W = torch.tensor([[0.3, 0.2], [-0.1, 0.4]], dtype=torch.float64)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    loop = ls.FnLoop(
        step=lambda h, u: torch.tanh(h @ W.T + u), init_state=torch.zeros(2, dtype=torch.float64)
    )
    tr = ls.unroll(loop, x, 80)
    r1 = detect_cycle(tr)
    assert r1.period[0] == 1 and r1.status == ["fixed_point"]
    h = r1.states[0][0]
    J = torch.diag(1 - torch.tanh(W @ h + x[0]) ** 2) @ W
    ev = np.linalg.eigvals(J.numpy())
    np.testing.assert_allclose(np.sort(np.abs(r1.multipliers[0])), np.sort(np.abs(ev)), rtol=1e-10)
    assert classify(tr).to_frame()["class"].tolist() == ["convergent"]


def henon(h):
    x, y = h[:, 0], h[:, 1]
    return torch.stack([1 - 1.4 * x**2 + y, 0.3 * x], dim=1)


def test_classify_all_classes():
    # convergent (still decaying at the budget), slider, divergent, cycle, chaotic, orbit, max_iter
    slow = ls.unroll(
        ls.FnLoop(step=lambda h: 0.9 * h + 0.1),
        None,
        40,
        init=torch.zeros(1, 3, dtype=torch.float64),
    )
    assert classify(slow).to_frame()["class"].tolist() == ["convergent"]
    drift = ls.unroll(
        ls.FnLoop(step=lambda h: h + 0.5), None, 40, init=torch.zeros(1, 3, dtype=torch.float64)
    )
    assert classify(drift).to_frame()["class"].tolist() == ["slider"]
    blow = ls.unroll(
        ls.FnLoop(step=lambda h: 2 * h), None, 40, init=torch.ones(1, 3, dtype=torch.float64)
    )
    assert blow.status == ["diverged"] and classify(blow).to_frame()["class"].tolist() == [
        "divergent"
    ]
    grow = ls.unroll(
        ls.FnLoop(step=lambda h: 1.2 * h), None, 40, init=torch.ones(1, 3, dtype=torch.float64)
    )
    assert grow.status == ["max_iter"] and classify(grow).to_frame()["class"].tolist() == [
        "divergent"
    ]

    h0 = torch.zeros(1, 2, dtype=torch.float64)
    chaos = ls.unroll(ls.FnLoop(step=henon), None, 300, init=h0)
    assert detect_cycle(chaos).period[0] == 0
    assert classify(chaos).to_frame()["class"].tolist() == ["max_iter"]  # no chaos claim without λ1
    lyap = lyapunov(ls.FnLoop(step=henon), None, h0, n_steps=3000, warmup=300, mode="dense")
    c = classify(chaos, lyap=lyap).to_frame()
    assert c["class"].tolist() == ["chaotic"] and c["lambda1"][0] > 0.3

    R = torch.tensor(
        [[math.cos(1.0), -math.sin(1.0)], [math.sin(1.0), math.cos(1.0)]], dtype=torch.float64
    )
    rot = ls.FnLoop(step=lambda h: h @ R.T)
    x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    tr = ls.unroll(rot, None, 400, init=x0)
    assert classify(tr).to_frame()["class"].tolist() == ["max_iter"]  # no period ≤ 16
    ly = lyapunov(rot, None, x0, n_steps=200, warmup=10)
    assert classify(tr, lyap=ly).to_frame()["class"].tolist() == [
        "orbit"
    ]  # λ1 = 0, bounded, recurrent


def test_classify_per_token_and_errors():
    def step(h):
        return torch.stack([0.5 * h[:, 0], -h[:, 1]], dim=1)

    tr = ls.unroll(ls.FnLoop(step=step), None, 50, init=torch.ones(2, 2, 3, dtype=torch.float64))
    c = classify(tr, per_token=True).to_frame().set_index(["sample", "position"])
    assert c["class"].tolist() == ["convergent", "cycle(2)"] * 2
    assert c.index.names == ["sample", "position"]
    with pytest.raises(LoopscopeError, match="windw"):
        classify(tr, windw=3)
    with pytest.raises(LoopscopeError, match="Trace"):
        detect_cycle(torch.zeros(3))
    with pytest.raises(LoopscopeError, match="tol"):
        detect_cycle(tr, tol=-1.0)
