"""analysis.solvers: golden #1 (every solver returns h* of a non-normal linear map), #2 (naive
iteration step count), #3 (Type-II Anderson ≤ GMRES matvecs + 2), #12 (contraction d = 16);
per-sample masking, divergence / stall flags, unstable points, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse.linalg import LinearOperator, gmres

from loopscope import FnLoop, unroll
from loopscope.analysis import LoopMap, solve, spectrum
from loopscope.analysis.solvers import METHODS, AdamQ, Anderson, solve_map
from loopscope.core.errors import LoopscopeError

F64 = torch.float64


# small batched ops: one thread is much faster than two contended ones
pytestmark = pytest.mark.usefixtures("one_thread")


def nonnormal(case: str, n: int = 256, seed: int = 0):
    """Golden #1: A = S D S⁻¹, (a) leading pair 0.95·e^{±iπ/3}, (b) leading reals 0.95, −0.94."""
    rng = np.random.default_rng(seed)
    S = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / math.sqrt(n)
    D = np.zeros((n, n))
    if case == "a":
        r, th = 0.95, math.pi / 3
        D[:2, :2] = [[r * math.cos(th), -r * math.sin(th)], [r * math.sin(th), r * math.cos(th)]]
        D[2:, 2:] = np.diag(rng.uniform(-0.5, 0.5, n - 2))
    else:
        D = np.diag(np.concatenate([[0.95, -0.94], rng.uniform(-0.8, 0.8, n - 2)]))
    return torch.tensor(S @ D @ np.linalg.inv(S))


def linear_loop(A: torch.Tensor) -> FnLoop:
    return FnLoop(step=lambda h, x: h @ A.T + x)


# per-method options for golden #1: adam_q is the FixedPointFinder baseline, whose |dq| stop
# (tol_dq) ends it early by design; with that stop off it must reach the answer too
GOLDEN1_OPTS = {"adam_q": AdamQ(tol_dq=0.0)}


@pytest.mark.parametrize("case", ["a", "b"])
def test_golden1_every_solver_returns_hstar(case):
    A = nonnormal(case)
    n = A.shape[0]
    b = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(1))
    hstar = torch.linalg.solve(torch.eye(n, dtype=F64) - A, b[0])
    h0 = torch.zeros(1, n, dtype=F64)
    loop = linear_loop(A)
    for method in METHODS:
        r = solve(
            loop, b, h0=h0, method=GOLDEN1_OPTS.get(method, method), tol=1e-13, max_iter=3000,
        )  # fmt: skip
        err = float((r.z_best[0] - hstar).norm() / hstar.norm())
        assert r.status == ["converged"], (method, r.status, r.reason)
        assert err < 1e-10, (method, err)
        assert r.z_best.dtype == F64 and r.z_best.shape == (1, n)
    # the FPF-style |dq| stop ends Adam as 'stalled', and it is reported, not hidden
    r = solve(loop, b, h0=h0, method="adam_q", tol=1e-13, max_iter=3000)
    assert r.status == ["stalled"] and "tol_dq" in r.reason[0]


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.99])
def test_golden2_naive_step_count(rho):
    n = 64
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.concatenate([[rho], rng.uniform(0, 0.5 * rho, n - 1)])
    A = torch.tensor((Q * eig) @ Q.T)
    b = torch.tensor(rng.standard_normal((1, n)))
    hstar = torch.linalg.solve(torch.eye(n, dtype=F64) - A, b[0])
    # initial error dominated by the top eigenvector
    h0 = (hstar + 10 * torch.tensor(Q[:, 0]) + 1e-3 * torch.tensor(rng.standard_normal(n)))[None]
    r0 = float((h0 @ A.T + b - h0).norm())
    tol = 1e-8
    r = solve(linear_loop(A), b, h0=h0, method="picard", tol=tol, stop_mode="abs", max_iter=5000)
    steps = int(r.iterations[0]) - 1  # iterates z_0 .. z_steps were evaluated
    predicted = math.ceil(math.log(tol / r0) / math.log(rho))
    assert r.status == ["converged"]
    assert abs(steps - predicted) <= 2, (steps, predicted)
    assert int(r.nfe[0]) == steps + 1
    assert abs(float(r.kappa[0]) - rho) < 1e-3  # windowed contraction -> rho(J*)


def test_golden3_anderson_is_gmres_with_full_memory():
    A = nonnormal("a", n=128, seed=2)
    n = A.shape[0]
    b = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(4))
    rtol = 1e-10
    count = [0]

    def mv(v):
        count[0] += 1
        v = torch.as_tensor(v, dtype=F64).reshape(n)
        return (v - A @ v).numpy()

    x, info = gmres(LinearOperator((n, n), matvec=mv), b[0].numpy(), rtol=rtol, atol=0.0,
                    restart=n, maxiter=1)  # fmt: skip
    assert info == 0
    g_mv = count[0]
    loop = linear_loop(A)
    h0 = torch.zeros(1, n, dtype=F64)
    tol = rtol * float(b.norm())
    aa = solve(loop, b, h0=h0, method=Anderson(m=n), tol=tol, stop_mode="abs", max_iter=500)
    assert aa.status == ["converged"]
    assert int(aa.nfe[0]) <= g_mv + 2, (int(aa.nfe[0]), g_mv)
    assert float((aa.z_best[0] - torch.as_tensor(x)).norm() / b.norm()) < 1e-8
    # a secretly-naive solver fails the same bar
    naive = solve(loop, b, h0=h0, method="picard", tol=tol, stop_mode="abs", max_iter=2000)
    assert int(naive.nfe[0]) > g_mv + 2


def golden12():
    rng = np.random.default_rng(2)
    d = 16
    W = rng.standard_normal((d, d))
    W *= 0.5 / np.linalg.norm(W, 2)
    U = rng.standard_normal((d, d))
    x = rng.standard_normal((1, d))
    init = 3 * rng.standard_normal((1, d))
    Wt, Ut = torch.tensor(W), torch.tensor(U)
    loop = FnLoop(step=lambda h, x: torch.tanh(h @ Wt.T + x @ Ut.T))
    return loop, torch.tensor(x), torch.tensor(init)


def test_golden12_contraction_solve_and_spectrum():
    loop, x, init = golden12()
    ends = []
    for h0 in (torch.zeros_like(init), init):
        r = solve(loop, x, h0=h0, method="auto", tol=1e-14, max_iter=200)
        assert r.status == ["converged"]
        z = r.z_best
        assert float((loop.step(z, x) - z).norm()) < 1e-12
        ends.append(z)
    assert torch.allclose(ends[0], ends[1], atol=1e-12)  # path independent
    s = spectrum(loop, x, ends[0])
    assert abs(s.rho[0] - 0.1418) < 5e-5 and s.rho[0] < 0.5


def test_picard_iterates_are_the_unrolled_states():
    loop, x, init = golden12()
    r = solve(loop, x, h0=init, method="picard", tol=1e-30, max_iter=7, patience=100)
    tr = unroll(loop, x, 6, init=init.clone())
    assert r.status == ["max_iter"] and int(r.nfe[0]) == 7
    assert torch.allclose(r.z_last, tr.states[6].to(F64), atol=1e-14)


def hetero_batch(B=6, n=32, seed=0):
    rng = np.random.default_rng(seed)
    rhos = np.linspace(0.3, 0.95, B)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    base = rng.uniform(0, 1, n)
    base[0] = 1
    As = torch.tensor(np.stack([(Q * (r * base)) @ Q.T for r in rhos]))
    b = torch.tensor(rng.standard_normal((B, n)))
    loop = FnLoop(step=lambda h, ctx: torch.einsum("bij,bj->bi", ctx[0], h) + ctx[1])
    return loop, (As, b)


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden", "lm", "newton_krylov"])
def test_per_sample_masking_costs_what_each_sample_costs_alone(method):
    loop, (As, b) = hetero_batch()
    B, n = b.shape
    h0 = torch.zeros(B, n, dtype=F64)
    r = solve(loop, (As, b), h0=h0, method=method, tol=1e-10, max_iter=500)
    assert all(s == "converged" for s in r.status)
    for i in range(B):
        ri = solve(loop, (As[i : i + 1], b[i : i + 1]), h0=h0[i : i + 1], method=method,
                   tol=1e-10, max_iter=500)  # fmt: skip
        if method == "broyden":
            # many rank-one updates amplify the round-off of batched vs single reductions
            # (traces agree to ~1e-8 relative, then drift): same cost up to a few steps
            assert abs(int(r.nfe[i]) - int(ri.nfe[0])) <= 3
        else:
            assert int(r.nfe[i]) == int(ri.nfe[0]) and int(r.n_jvp[i]) == int(ri.n_jvp[0])
        assert torch.allclose(r.z_best[i], ri.z_best[0], atol=1e-8)
    if method == "picard":  # slower contraction costs more: masking is not batch-max stopping
        assert r.nfe[0] < r.nfe[-1]


def test_diverged_and_stalled_samples_are_flagged_without_crashing_the_batch():
    # sample 0: contraction; sample 1: NaN from the step; sample 2: linear blow-up (rho = 2)
    def step(h, x):
        out = x[:, :1] * h + x[:, 1:]
        return torch.where(x[:, :1] < 0, out + torch.nan, out)

    x = torch.tensor([[0.5, 1.0], [-1.0, 1.0], [2.0, 1.0]], dtype=F64)
    loop = FnLoop(step=step)
    h0 = torch.ones(3, 1, dtype=F64)
    r = solve(loop, x, h0=h0, method="picard", tol=1e-10, max_iter=200)
    assert r.status == ["converged", "diverged", "diverged"]
    assert "non-finite" in r.reason[1] and "blew up" in r.reason[2]
    assert int(r.nfe[1]) == 1  # flagged at once, then masked out
    # a 2-cycle h -> -h never converges and never improves: stalled after `patience`
    r2 = solve(FnLoop(step=lambda h: -h), None, h0=torch.ones(1, 3, dtype=F64),
               method="picard", patience=10)  # fmt: skip
    assert r2.status == ["stalled"] and int(r2.nfe[0]) == 12


def test_best_vs_last_and_residual_traces():
    loop, x, init = golden12()
    r = solve(loop, x, h0=init, method="anderson", tol=1e-12, max_iter=100)
    tr = r.residuals[0]
    assert len(tr) == int(r.iterations[0]) == int(r.nfe[0])
    assert float(r.r_rel[0]) == pytest.approx(tr.min(), rel=0, abs=0)
    assert bool(r.best_is_last[0]) == (int(np.argmin(tr)) == len(tr) - 1)
    z = r.z_best
    fz = loop.step(z, x)
    assert float((fz - z).norm() / (fz.norm() + 1e-9)) == pytest.approx(float(r.r_rel[0]))
    df = r.to_frame()
    assert {"status", "nfe", "n_jvp", "n_vjp", "r_rel", "kappa", "best_is_last"} <= set(df)
    assert len(r.trace_frame()) == len(tr)


def test_newton_krylov_and_lm_find_unstable_fixed_points():
    loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    h0 = torch.full((1, 3), 0.1, dtype=F64)
    picard = solve(loop, None, h0=h0, method="picard", tol=1e-12, max_iter=500)
    assert torch.allclose(picard.z_best, torch.full((1, 3), 0.9575040240772688, dtype=F64))
    for method in ("newton_krylov", "lm"):
        r = solve(loop, None, h0=h0, method=method, tol=1e-12)
        assert r.status == ["converged"] and float(r.z_best.abs().max()) < 1e-12
        assert spectrum(loop, None, r.z_best).unstable == [3]


def test_lm_stops_at_a_slow_point():
    eps = 1e-5  # g(h) = (h - 1)^2 + eps > 0: a ghost of a saddle-node at h = 1
    loop = FnLoop(step=lambda h: h + (h - 1) ** 2 + eps)
    r = solve(loop, None, h0=torch.full((1, 1), 1.7, dtype=F64), method="lm", tol=1e-12)
    assert r.status == ["stalled"]
    assert abs(float(r.z_best[0, 0]) - 1) < 1e-3
    assert float(r.r_abs[0]) == pytest.approx(eps, rel=1e-3)


def test_user_model_is_not_mutated():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).float()
    loop = FnLoop(step=torch.nn.Sequential(lin, torch.nn.Tanh()))  # registered submodule
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    r = solve(loop, None, h0=torch.zeros(2, 4), method="lm", tol=1e-12)
    assert all(s == "converged" for s in r.status) and r.z_best.dtype == F64
    assert lin.weight.dtype == torch.float32 and lin.weight.requires_grad
    assert all(torch.equal(before[k], v) for k, v in lin.state_dict().items())


def test_solve_map_counts_and_index_subsets():
    loop, (As, b) = hetero_batch(B=3, n=8)
    m = LoopMap(loop, (As, b), state_shape=(8,), batch_size=3)
    r = solve_map(m, torch.zeros(3, 8, dtype=F64), "anderson", 1e-10, 100)
    assert torch.equal(r.nfe, m.nfe) and bool((r.nfe > 0).all())


def test_bad_input_is_rejected():
    loop = FnLoop(step=lambda h: 0.5 * h)
    h0 = torch.zeros(1, 3, dtype=F64)
    with pytest.raises(LoopscopeError, match="unknown option 'mem'"):
        solve(loop, None, h0=h0, method="broyden", mem=3)
    with pytest.raises(LoopscopeError, match="unknown option 'm'"):
        solve(loop, None, h0=h0, method="picard", m=3)  # an Anderson option on Picard
    with pytest.raises(LoopscopeError, match="unknown solver method 'andersen'"):
        solve(loop, None, h0=h0, method="andersen")
    with pytest.raises(LoopscopeError, match="tol must be a positive number"):
        solve(loop, None, h0=h0, tol=-1)
    with pytest.raises(LoopscopeError, match="max_iter must be a positive integer"):
        solve(loop, None, h0=h0, max_iter=0)
    with pytest.raises(LoopscopeError, match="stop_mode"):
        solve(loop, None, h0=h0, stop_mode="relative")
    with pytest.raises(LoopscopeError, match="h0 has batch 1 but the inputs have batch 2"):
        solve(FnLoop(step=lambda h, x: h + x), torch.zeros(2, 3), h0=h0)


@settings(max_examples=5, deadline=None)
@given(
    d=st.integers(2, 6),
    B=st.integers(1, 3),
    gain=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
)
def test_status_is_honest_on_random_contractions(d, B, gain, seed):
    """Property: 'converged' always means the recomputed r_rel of z_best is below tol, on any
    state shape ([B, 2, d] here), and the counters add up."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2 * d, 2 * d, generator=g, dtype=F64)
    W *= gain / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(B, 2, d, generator=g, dtype=F64)
    loop = FnLoop(step=lambda h, x: torch.tanh((h.reshape(len(h), -1) @ W.T).reshape(h.shape) + x))
    h0 = torch.randn(B, 2, d, generator=g, dtype=F64)
    for method in ("picard", "anderson", "broyden", "newton_krylov", "lm", "auto"):
        r = solve(loop, x, h0=h0, method=method, tol=1e-11, max_iter=300)
        assert r.z_best.shape == (B, 2, d)
        assert r.status == ["converged"] * B, (method, r.reason)
        fz = loop.step(r.z_best, x)
        rel = (fz - r.z_best).flatten(1).norm(dim=1) / (fz.flatten(1).norm(dim=1) + 1e-9)
        assert bool((rel < 1e-11).all())
        assert bool((r.iterations >= 1).all()) and bool((r.nfe + r.n_vjp >= r.iterations).all())
