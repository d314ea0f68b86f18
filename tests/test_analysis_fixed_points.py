"""analysis.fixed_points: golden #4 (FixedPointFinder test RNNs n = 2, 3, 4), #9 (tanh(2h)), #15
(IFT input sensitivity vs central differences of re-solved fixed points); slow points are never
merged with fixed points; per-input-sample census; seeds; decoding; bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loopscope import FnLoop
from loopscope.analysis import find_fixed_points, input_sensitivity, solve
from loopscope.analysis.solvers import LM
from loopscope.core.errors import LoopscopeError

F64 = torch.float64


# small batched ops: one thread is much faster than two contended ones
pytestmark = pytest.mark.usefixtures("one_thread")


def fpf_rnn(n: int) -> tuple[FnLoop, torch.Tensor]:
    """Golden #4: h <- tanh(W h), row i of W = -roll(linspace(-1, 1, n), -i)."""
    W = torch.tensor(np.stack([-np.roll(np.linspace(-1, 1, n), -i) for i in range(n)]))
    return FnLoop(step=lambda h: torch.tanh(h @ W.T)), W


def grid(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=n)), dtype=F64)


def has_point(points: torch.Tensor, p, atol: float) -> bool:
    p = torch.as_tensor(p, dtype=F64)
    return bool(((points - p).abs().amax(1) < atol).any())


@pytest.mark.parametrize(("n", "n_unique", "n_stable"), [(2, 3, 2), (3, 3, 0), (4, 9, 2)])
def test_golden4_fpf_test_rnns(n, n_unique, n_stable):
    loop, W = fpf_rnn(n)
    c = find_fixed_points(loop, None, grid(n))
    df = c.to_frame()
    assert list(df["kind"]) == ["fixed"] * n_unique  # exactly the ground-truth count
    assert (c.seed_class == "fixed").all()  # every grid seed reaches a true fixed point
    assert float(df["q"].max()) <= 1e-20
    assert int(df["stable"].sum()) == n_stable
    assert int(df["multiplicity"].sum()) == 3**n
    # zero false fixed points: q recomputed independently at every seed labelled fixed
    ends = c.end_states.reshape(-1, n)
    q = 0.5 * ((torch.tanh(ends @ W.T) - ends) ** 2).sum(1)
    assert float(q[torch.as_tensor(c.seed_class.reshape(-1) == "fixed")].max()) <= 1e-20
    pts = c.points
    assert has_point(pts, [0.0] * n, 1e-12)
    rho = dict(zip(map(tuple, pts.numpy().round(4)), df["rho"], strict=True))
    if n == 2:
        a = 0.957504
        for s in (1, -1):
            assert has_point(pts, [s * a, -s * a], 1e-6)
            assert rho[(round(s * a, 4), round(-s * a, 4))] == pytest.approx(0.1664, abs=1e-4)
        assert rho[(0.0, 0.0)] == pytest.approx(2.0, abs=1e-12)
    if n == 3:
        for s in (1, -1):
            assert has_point(pts, [s * 0.9498, -s * 0.4255, -s * 0.8799], 1e-4)
        nz = df[pts.norm(dim=1).numpy() > 0.1]
        assert np.allclose(nz["rho"], 1.0064, atol=1e-4)
    if n == 4:
        for s in (1, -1):
            p = [s * 0.7755, -s * 0.7755, s * 0.7755, -s * 0.7755]
            assert has_point(pts, p, 1e-4)
        st = df[df["stable"]]
        assert np.allclose(st["rho"], 0.7516, atol=1e-4)
        stable_pts = c.points[torch.tensor(df["stable"].to_numpy())]
        assert np.allclose(stable_pts.abs(), 0.7755, atol=1e-4)


def test_golden9_tanh2h():
    loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    seeds = torch.linspace(-2, 2, 41, dtype=F64)[:, None]
    c = find_fixed_points(loop, None, seeds)
    df = c.to_frame().sort_values("norm")
    assert len(df) == 3 and set(df["kind"]) == {"fixed"}
    vals = sorted(float(v) for v in c.points.flatten())
    assert np.allclose(vals, [-0.957504, 0.0, 0.957504], atol=1e-6)
    a = 0.9575040240772688
    assert df["rho"].iloc[0] == pytest.approx(2.0, abs=1e-12) and df["unstable_dim"].iloc[0] == 1
    assert np.allclose(df["rho"].iloc[1:], 2 * (1 - a * a), atol=1e-6)
    assert np.allclose(df["rho"].iloc[1:], 0.166372, atol=1e-6)


def ghost_loop(eps: float = 1e-5) -> FnLoop:
    """f(h) = h - 0.5 g(h), g(h) = (h + 1)((h - 1)^2 + eps): a true fixed point at h = -1 and
    a ghost (slow point, q > 0) near h = 1."""
    return FnLoop(step=lambda h: h - 0.5 * (h + 1) * ((h - 1) ** 2 + eps))


def test_slow_points_are_never_merged_with_fixed_points():
    seeds = torch.linspace(-1.6, 1.6, 33, dtype=F64)[:, None]
    c = find_fixed_points(ghost_loop(), None, seeds)
    df = c.to_frame()
    assert sorted(df["kind"]) == ["fixed", "slow"]
    fixed = df[df["kind"] == "fixed"].iloc[0]
    slow = df[df["kind"] == "slow"].iloc[0]
    assert abs(float(c.points[int(fixed["point"]), 0]) + 1) < 1e-12 and fixed["q"] < 1e-20
    assert abs(float(c.points[int(slow["point"]), 0]) - 1) < 1e-3
    assert 1e-10 < slow["r_rel"] < 1e-3
    # the ghost is a local minimum of q: vanishing relative gradient at its seeds' end points
    sf = c.seeds_frame()
    assert (sf[sf["class"] == "slow"]["rel_grad"] < 1e-4).all()
    rg = sf[sf["class"] == "fixed"]["rel_grad"]
    assert (rg.isna() | (rg > 0.1)).all()  # O(1) away from a minimum (NaN where g = 0 exactly)
    assert set(sf["class"]) == {"fixed", "slow"}
    counts = c.counts().iloc[0]
    assert counts["unique_fixed"] == 1 and counts["unique_slow"] == 1
    # a stricter slow band turns the ghost into non-converged, never into a fixed point
    c2 = find_fixed_points(ghost_loop(), None, seeds, q_tol_rel=1e-10, slow_tol_rel=1e-8)
    assert list(c2.to_frame()["kind"]) == ["fixed"]
    assert (c2.seed_class[c.seed_class == "slow"] == "non-converged").all()


def contraction(B: int = 3, d: int = 8, seed: int = 5):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d, d))
    W *= 0.6 / np.linalg.norm(W, 2)
    U = rng.standard_normal((d, d)) / np.sqrt(d)
    Wt, Ut = torch.tensor(W), torch.tensor(U)
    x = torch.tensor(rng.standard_normal((B, d)))
    readout = torch.tensor(rng.standard_normal((d, 5)))
    loop = FnLoop(
        step=lambda h, x: torch.tanh(h @ Wt.T + x @ Ut.T),
        init_state=lambda ctx, g: torch.randn(ctx.shape, generator=g, dtype=ctx.dtype),
        decode=lambda h, ctx: h @ readout,
    )
    return loop, x, readout


def test_census_runs_per_input_sample_with_shared_per_sample_and_int_seeds():
    loop, x, readout = contraction()
    B, d = x.shape
    ref = solve(loop, x, h0=torch.zeros(B, d, dtype=F64), tol=1e-14, max_iter=200).z_best
    shared = torch.randn(6, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    per = torch.randn(B, 4, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    for seeds, S in ((shared, 6), (per, 4), (10, 10)):
        c = find_fixed_points(loop, x, seeds)
        df = c.to_frame()
        assert c.seed_class.shape == (B, S) and (c.seed_class == "fixed").all()
        assert list(df["sample"]) == list(range(B))  # one unique attractor per input sample
        assert list(df["multiplicity"]) == [S] * B
        assert torch.allclose(c.points, ref, atol=1e-10)
        assert df["stable"].all()
        assert torch.allclose(c.decoded, c.points @ readout)  # decoded output at each point
        assert list(df["answer"]) == (c.points @ readout).argmax(1).tolist()
    # int seeds are deterministic given seed=
    a = find_fixed_points(loop, x, 5, seed=3).end_states
    b = find_fixed_points(loop, x, 5, seed=3).end_states
    assert torch.equal(a, b)


def test_dedupe_many_seeds_by_kdtree():
    loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    g = torch.Generator().manual_seed(0)
    seeds = 2 * torch.rand(600, 2, generator=g, dtype=F64) - 1
    c = find_fixed_points(loop, None, seeds, spectra=False)
    assert len(c.kind) == 9  # {-a, 0, a}^2
    assert int(c.multiplicity.sum()) == 600
    assert (c.seed_point >= 0).all()
    # each seed points at the representative it converged to
    ends = c.end_states[0]
    rep = c.points[torch.as_tensor(c.seed_point[0])]
    assert float((ends - rep).abs().max()) < 1e-9


def golden12_map():
    rng = np.random.default_rng(2)
    d = 16
    W = rng.standard_normal((d, d))
    W *= 0.5 / np.linalg.norm(W, 2)
    U = rng.standard_normal((d, d))
    x = rng.standard_normal((1, d))
    Wt, Ut = torch.tensor(W), torch.tensor(U)
    return FnLoop(step=lambda h, x: torch.tanh(h @ Wt.T + x @ Ut.T)), torch.tensor(x)


def _fp(loop, x):
    return solve(loop, x, h0=torch.zeros_like(x), method="auto", tol=1e-15, max_iter=300).z_best


@pytest.mark.parametrize("method", ["dense", "gmres"])
def test_golden15_ift_matches_central_differences(method):
    loop, x = golden12_map()
    d = x.shape[1]
    hs = _fp(loop, x)
    S = input_sensitivity(loop, x, hs, method=method).dh_dx  # [1, d, d]
    assert S.shape == (1, d, d)
    eps = 1e-5
    fd = torch.zeros(d, d, dtype=F64)
    for j in range(d):
        e = torch.zeros_like(x)
        e[0, j] = eps
        fd[:, j] = (_fp(loop, x + e) - _fp(loop, x - e))[0] / (2 * eps)
    rel = float((S[0] - fd).norm() / fd.norm())
    assert rel < 1e-6, rel
    # directional mode = the full Jacobian applied to the direction
    v = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    Sv = input_sensitivity(loop, x, hs, direction=v, method=method).dh_dx
    assert torch.allclose(Sv[0], S[0] @ v[0], atol=1e-10)


def test_ift_batched_dict_context_and_census_sensitivity():
    loop, x, _ = contraction(B=2, d=6)
    step = loop._fns["step"]
    dloop = FnLoop(step=lambda h, ctx: step(h, ctx["x"]), decode=lambda h, ctx: h)
    ctx = {"x": x, "tag": "not a tensor"}
    hs = solve(dloop, ctx, h0=torch.zeros(2, 6, dtype=F64), tol=1e-15, max_iter=300).z_best
    S = input_sensitivity(dloop, ctx, hs, wrt="x").dh_dx
    assert S.shape == (2, 6, 6)
    # sample b's fixed point depends on its own x only: compare with the one-sample answer
    for b in range(2):
        Sb = input_sensitivity(dloop, {"x": x[b : b + 1]}, hs[b : b + 1], wrt="x").dh_dx
        assert torch.allclose(S[b], Sb[0], atol=1e-12)
    c = find_fixed_points(
        dloop, ctx, hs[:, None] + 1e-3, sensitivity=True, wrt="x", state_shape=(6,)
    )
    assert c.seed_class.shape == (2, 1)
    assert np.allclose(c.sensitivity, S.reshape(2, -1).norm(dim=1).numpy(), rtol=1e-8)
    with pytest.raises(LoopscopeError, match="not one tensor: pass wrt="):
        input_sensitivity(dloop, ctx, hs)
    with pytest.raises(LoopscopeError, match="wrt='tag' must name a floating-point tensor"):
        input_sensitivity(dloop, ctx, hs, wrt="tag")
    with pytest.raises(LoopscopeError, match="h_star is not a fixed point"):
        input_sensitivity(dloop, ctx, hs + 0.1, wrt="x")


def test_bad_input_is_rejected():
    loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    seeds = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(LoopscopeError, match="unknown option 'q_tol'"):
        find_fixed_points(loop, None, seeds, q_tol=1e-3)
    with pytest.raises(LoopscopeError, match="slow_tol_rel"):
        find_fixed_points(loop, None, seeds, q_tol_rel=1e-3, slow_tol_rel=1e-6)
    with pytest.raises(LoopscopeError, match="seeds=int needs loop.init_state"):
        find_fixed_points(loop, None, 5)
    with pytest.raises(LoopscopeError, match="unknown solver method"):
        find_fixed_points(loop, None, seeds, method="fpf")
    with pytest.raises(LoopscopeError, match="unknown option 'memory'"):
        find_fixed_points(loop, None, seeds, method=LM(memory=3))  # LM has no memory
    loop2, x, _ = contraction(B=2, d=4)
    with pytest.raises(LoopscopeError, match="match neither"):
        find_fixed_points(loop2, x, torch.zeros(3, 5, dtype=F64))
