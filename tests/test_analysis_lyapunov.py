"""analysis.lyapunov: Hénon (golden #5), linear non-normal map (golden #6), spectrum at a stable
fixed point = ln|eig J*|, jvp == dense, two-trajectory cross-check, per-sample divergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope.analysis.lyapunov_qr import kaplan_yorke, lyapunov
from loopscope.core.errors import LoopscopeError


def henon(h):
    x, y = h[:, 0], h[:, 1]
    return torch.stack([1 - 1.4 * x**2 + y, 0.3 * x], dim=1)


H0 = torch.zeros(1, 2, dtype=torch.float64)


def test_golden5_henon_spectrum_1e5_steps():
    res = lyapunov(
        ls.FnLoop(step=henon),
        None,
        H0,
        n_steps=100_000,
        warmup=1000,
        mode="dense",
        two_trajectory=False,
    )
    lam = res.exponents[0]
    assert abs(lam[0] - 0.4192) < 2e-3 and abs(lam[1] + 1.6232) < 2e-3
    # det J = -0.3 everywhere: the sum is exact up to rounding
    assert abs(lam.sum() - math.log(0.3)) < 1e-10
    # the reference values lie inside the bootstrap CIs (B4 pass bar)
    assert res.ci_low[0, 0] < 0.4192 < res.ci_high[0, 0]
    assert res.ci_low[0, 1] < -1.6232 < res.ci_high[0, 1]
    np.testing.assert_allclose(res.kaplan_yorke[0], 1 + lam[0] / abs(lam[1]), rtol=1e-12)
    assert 1.25 < res.kaplan_yorke[0] < 1.27
    np.testing.assert_allclose(res.bits[0], lam / math.log(2))
    run = res.running()
    assert run.shape == (100_000, 1, 2) and abs(run[-1, 0, 0] - lam[0]) < 1e-12


def test_henon_jvp_equals_dense_and_two_trajectory_cross_check():
    loop = ls.FnLoop(step=henon)
    d = lyapunov(loop, None, H0, n_steps=1500, warmup=200, mode="dense", bootstrap=0)
    j = lyapunov(loop, None, H0, n_steps=1500, warmup=200, mode="jvp", bootstrap=0)
    np.testing.assert_allclose(d.exponents, j.exponents, atol=1e-10)
    np.testing.assert_allclose(d.local, j.local, atol=1e-8)
    long = lyapunov(loop, None, H0, n_steps=20_000, warmup=500, mode="dense", bootstrap=0)
    assert abs(long.lambda1_two_traj[0] - long.exponents[0, 0]) < 2e-3
    assert abs(long.lambda1_two_traj[0] - 0.4192) < 1e-2


def nonnormal(eigs, seed=0):
    rng = np.random.default_rng(seed)
    n = len(eigs)
    S = np.eye(n) + 0.4 * rng.standard_normal((n, n))  # well conditioned, far from orthogonal
    A = S @ np.diag(eigs) @ np.linalg.inv(S)
    return torch.as_tensor(A)


@pytest.mark.parametrize("mode", ["jvp", "dense"])
def test_golden6_linear_nonnormal_exponents_exact(mode):
    eigs = [1.1, 0.9, 0.5, -0.3, 0.2, 0.1]
    A = nonnormal(eigs)
    loop = ls.FnLoop(step=lambda h: h @ A.T)
    res = lyapunov(
        loop,
        None,
        torch.zeros(1, 6, dtype=torch.float64),
        n_steps=400,
        warmup=200,
        mode=mode,
        bootstrap=50,
    )
    np.testing.assert_allclose(res.exponents[0], np.log(np.abs(eigs)), atol=1e-8)
    assert res.kaplan_yorke[0] > 1  # λ1 > 0
    # re-orthonormalising every 4 steps books the same growth
    res4 = lyapunov(
        loop,
        None,
        torch.zeros(1, 6, dtype=torch.float64),
        n_steps=400,
        warmup=200,
        mode=mode,
        bootstrap=0,
        t_ons=4,
    )
    np.testing.assert_allclose(res4.exponents[0], np.log(np.abs(eigs)), atol=1e-8)


def test_stable_fixed_point_spectrum_equals_log_eigenvalues():
    rng = np.random.default_rng(3)
    n = 6
    G = rng.standard_normal((n, n))
    W = torch.as_tensor(G + G.T)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)
    b = torch.as_tensor(rng.standard_normal(n))
    loop = ls.FnLoop(step=lambda h: torch.tanh(h @ W.T + b))
    h = torch.zeros(1, n, dtype=torch.float64)
    for _ in range(400):
        h = torch.tanh(h @ W.T + b)
    J = torch.diag(1 - torch.tanh(h[0] @ W.T + b) ** 2) @ W  # similar to a symmetric matrix
    ev = np.sort(np.log(np.abs(np.linalg.eigvals(J.numpy()).real)))[::-1]
    res = lyapunov(loop, None, h, n_steps=300, warmup=300, bootstrap=0)
    np.testing.assert_allclose(res.exponents[0], ev, atol=1e-8)
    assert res.kaplan_yorke[0] == 0.0  # all negative
    # k < n: the k largest
    res3 = lyapunov(loop, None, h, n_steps=300, warmup=300, k=3, bootstrap=0)
    np.testing.assert_allclose(res3.exponents[0], ev[:3], atol=1e-8)


def test_diverging_sample_flagged_not_crashing():
    scale = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    loop = ls.FnLoop(step=lambda h, x: x * h)
    res = lyapunov(
        loop, scale, torch.ones(2, 2, dtype=torch.float64), n_steps=100, warmup=10, bootstrap=20
    )
    assert res.diverged.tolist() == [False, True]
    assert res.diverged_at[1] == 17  # 3^17 > 1e8 * ||h0|| (= 1.41e8) first at 17 steps
    np.testing.assert_allclose(res.exponents[0], math.log(0.5), atol=1e-12)
    assert np.isnan(res.exponents[1]).all() and np.isnan(res.lambda1_two_traj[1])
    df = res.to_frame()
    assert len(df) == 4 and df["diverged"].tolist() == [False, False, True, True]
    # without the blow-up guard an expanding linear map is fine: exponent ln 3
    ok = lyapunov(
        loop,
        scale,
        torch.ones(2, 2, dtype=torch.float64),
        n_steps=100,
        warmup=10,
        bootstrap=0,
        blowup=None,
    )
    np.testing.assert_allclose(ok.exponents[1], math.log(3.0), atol=1e-12)


def test_kaplan_yorke_formula_and_errors():
    assert kaplan_yorke(np.array([[0.5, -0.2, -1.0]]))[0] == pytest.approx(2 + 0.3 / 1.0)
    assert kaplan_yorke(np.array([[0.1, 0.2]]))[0] == 2.0
    loop = ls.FnLoop(step=henon)
    with pytest.raises(LoopscopeError, match="mode"):
        lyapunov(loop, None, H0, n_steps=10, mode="qr")
    with pytest.raises(LoopscopeError, match="k=3"):
        lyapunov(loop, None, H0, n_steps=10, k=3)
    with pytest.raises(LoopscopeError, match="n_step"):
        lyapunov(loop, None, H0, n_step=10)
    with pytest.raises(LoopscopeError, match="n_steps"):
        lyapunov(loop, None, H0, n_steps=0)
