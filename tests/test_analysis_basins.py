"""analysis.basins: quadrant map (golden #11), AA scores (golden #10, #12, #16), return
probability, clustering vs scipy, answer basins, divergent seeds, compare_splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage

import loopscope as ls
from loopscope.analysis.attractors import (
    EigenSeeds,
    GaussianSeeds,
    GridSeeds,
    InitSeeds,
    InterpolationSeeds,
    ShellSeeds,
    SwapSeeds,
    basins,
    compare_splits,
    path_independence,
    single_linkage,
    wilson_ci,
)
from loopscope.analysis.convergence import metrics
from loopscope.core.errors import LoopscopeError

A = 0.9575040240772688  # a = tanh(2a)


def tanh2():
    return ls.FnLoop(step=lambda h: torch.tanh(2 * h))


# -- golden #11 -----------------------------------------------------------------------------------
def test_golden11_quadrant_basins_exact():
    res = basins(
        tanh2(),
        None,
        seeds=GridSeeds(torch.zeros(2, dtype=torch.float64), resolution=201),
        n_iter=100,
        batch_size=1,
    )
    df = res.seeds
    X0 = res.seed_states[:, 0].numpy()
    E = res.end_states[:, 0].numpy()
    off = (X0[:, 0] != 0) & (X0[:, 1] != 0)
    assert off.sum() == 200 * 200
    np.testing.assert_allclose(E[off], np.sign(X0[off]) * A, rtol=0, atol=1e-15)
    att = res.attractors
    stable = att[att["stable"]]
    assert len(stable) == 4
    np.testing.assert_allclose(stable["rho"], 2 * (1 - A**2), rtol=1e-12)  # 0.166372
    # off-axis seeds: exactly a quarter per stable attractor
    counts = df[off].groupby("attractor").size()
    assert sorted(counts.index) == sorted(stable["attractor"]) and (counts == 10000).all()
    assert (counts / off.sum() == 0.25).all()
    # axis seeds end on the saddles / origin (unstable, rho = 2): 9 clusters in all
    assert len(att) == 9 and (att[~att["stable"]]["rho"] == 2.0).all()
    s = res.summary_frame()
    assert s["n_attractors"][0] == 9 and s["n_stable"][0] == 4
    # the convergence-time image inherits the map's symmetries
    img = res.grid_image(0, "time")
    assert img.shape == (201, 201) and (img >= 0).all()
    np.testing.assert_array_equal(img, img[::-1, :])
    np.testing.assert_array_equal(img, img.T)
    lab = res.grid_image(0, "attractor")
    assert len(np.unique(lab[:100, :100])) == 1 and lab[0, 0] != lab[-1, -1]


# -- golden #10, #12 ------------------------------------------------------------------------------
def test_golden10_aa_minus_one_for_opposite_attractors():
    inits = [
        0.3 * torch.ones(1, 4, dtype=torch.float64),
        -0.3 * torch.ones(1, 4, dtype=torch.float64),
    ]
    pi = path_independence(tanh2(), None, inits=inits, n_iter=100)
    assert abs(pi.aa()[0] + 1) < 1e-9
    assert abs(pi.score + 1) < 1e-9


def test_golden12_contraction_aa_one_and_tiny_residual():
    rng = np.random.default_rng(2)
    d = 16
    W = rng.standard_normal((d, d))
    W = 0.5 * W / np.linalg.norm(W, 2)
    U = rng.standard_normal((d, d))
    x = rng.standard_normal(d)
    init = 3 * rng.standard_normal(d)
    Wt, Ut = torch.as_tensor(W), torch.as_tensor(U)
    loop = ls.FnLoop(
        step=lambda h, u: torch.tanh(h @ Wt.T + u @ Ut.T),
        init_state=torch.zeros(d, dtype=torch.float64),
    )
    xin = torch.as_tensor(x).reshape(1, d)
    pi = path_independence(
        loop, xin, inits=["default", torch.as_tensor(init).reshape(1, d)], n_iter=200
    )
    assert abs(pi.aa()[0] - 1) < 1e-9
    f = pi.to_frame()
    assert (f["residual"] < 1e-12).all() and (f["ref_residual"] < 1e-12).all()


# -- golden #16 (analysis part): AA = 1 on valid inits of the hand-wired carry loop -------------
def carry_loop():
    def encode(inputs):
        a, b = inputs
        return a + b

    def step(h, s):
        c = h[..., 1]
        new = torch.zeros_like(c)
        new[:, 1:] = (s + c[:, :-1] >= 10).to(h.dtype)
        return torch.stack([1 - new, new], dim=-1)

    def init(s, gen=None):
        h = torch.zeros(s.shape[0], s.shape[1] + 1, 2, dtype=torch.float64)
        h[..., 0] = 1
        return h

    def decode(h, s):
        c = h[..., 1]
        dig = torch.cat([(s + c[:, :-1]) % 10, c[:, -1:]], dim=1).long()
        return torch.nn.functional.one_hot(dig, 10).double()

    return ls.FnLoop(step=step, init_state=init, decode=decode, encode=encode)


def digits(x: int, D: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(D)]


@pytest.mark.parametrize("D", [4, 8])
def test_golden16_carry_loop_aa_one_on_valid_inits(D):
    rng = np.random.default_rng(D)
    pairs = [(999, 1), (5555, 4445), (19, 81), (1234, 4321)] + [
        (int(rng.integers(0, 10**D)), int(rng.integers(0, 10**D))) for _ in range(8)
    ]
    a = torch.tensor([digits(x, D) for x, _ in pairs], dtype=torch.float64)
    b = torch.tensor([digits(y, D) for _, y in pairs], dtype=torch.float64)
    B = len(pairs)
    bits = torch.as_tensor(rng.integers(0, 2, size=(B, D + 1)), dtype=torch.float64)
    rand_init = torch.stack([1 - bits, bits], dim=-1)  # any valid one-hot carry state
    loop = carry_loop()
    pi = path_independence(loop, (a, b), inits=["default", rand_init, "swap"], n_iter=D + 2)
    f = pi.to_frame()
    assert np.abs(f["aa"] - 1.0).max() < 1e-12  # state and readout, whole sample and per position
    assert set(f["space"]) == {"state", "readout"} and set(f["init"]) == {"init1", "swap"}
    # the answer is right at any length (OOD for a 4-digit-trained model)
    ans = pi.runs["default"].decode().argmax(-1)
    for i, (x, y) in enumerate(pairs):
        assert ans[i].tolist() == digits(x + y, D + 1)
    # and the basins: every Gaussian seed lands on the one correct attractor per input
    targets = torch.tensor([digits(x + y, D + 1) for x, y in pairs])
    res = basins(loop, (a, b), seeds=GaussianSeeds(n=16, std=1.0), n_iter=D + 2, targets=targets)
    s = res.summary_frame()
    assert (s["n_attractors"] == 1).all() and (s["entropy"] == 0).all()
    assert (s["correct_fraction"] == 1.0).all()
    wrong = targets.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 10
    res2 = basins(loop, (a, b), seeds=GaussianSeeds(n=4), n_iter=D + 2, targets=wrong)
    assert res2.summary_frame()["correct_fraction"].tolist() == [0.0] + [1.0] * (B - 1)
    # T_conv = longest carry chain (first four pairs)
    assert metrics(pi.runs["default"]).t_conv[:4].tolist() == [3, 4, 2, 0]


# -- return probability, interpolation, swap ---------------------------------------------------
def test_return_probability_matches_quadrant_rule():
    center = torch.tensor([A, A], dtype=torch.float64)
    res = basins(
        tanh2(),
        None,
        seeds=ShellSeeds(center, radii=(0.1, 1.2, 3.0), n_per_radius=200),
        n_iter=80,
        batch_size=1,
    )
    rp = res.return_probability().set_index("radius")
    X0 = res.seed_states[:, 0].numpy()
    radius = res.seeds["radius"].to_numpy()
    for r in (0.1, 1.2, 3.0):
        sel = radius == r
        expected = np.mean(
            (X0[sel, 0] > 0) & (X0[sel, 1] > 0)
        )  # back to (a, a) iff in the quadrant
        assert rp.loc[r, "p_return"] == expected
        assert rp.loc[r, "ci_low"] <= expected <= rp.loc[r, "ci_high"]
    assert rp.loc[0.1, "p_return"] == 1.0 and rp.loc[3.0, "p_return"] < 0.6


def test_interpolation_and_swap_seeds():
    a = torch.tensor([A, A], dtype=torch.float64)
    res = basins(
        tanh2(),
        None,
        seeds=InterpolationSeeds(a, -a, alphas=np.linspace(0, 1, 21)),
        n_iter=80,
        batch_size=1,
    )
    E = res.end_states[:, 0].numpy()
    al = res.seeds["alpha"].to_numpy()
    np.testing.assert_allclose(E[al < 0.5], A, atol=1e-14)
    np.testing.assert_allclose(E[al > 0.5], -A, atol=1e-14)
    np.testing.assert_array_equal(E[al == 0.5], 0.0)  # the boundary point stays on the saddle
    states = torch.tensor([[A, A], [-A, A], [A, -A]], dtype=torch.float64)
    sw = basins(tanh2(), None, seeds=SwapSeeds(states), n_iter=10, batch_size=3, state_shape=(2,))
    assert sw.seed_states.shape == (2, 3, 2)
    np.testing.assert_array_equal(sw.seed_states[0, 0].numpy(), states[1].numpy())
    np.testing.assert_allclose(
        sw.end_states[:, 1].numpy(), sw.seed_states[:, 1].numpy(), atol=1e-15
    )


def test_eigen_and_init_seeds():
    # saddle (a, 0) of tanh(2h): J = diag(0.166, 2); ± along the unstable e2 -> (a, ±a),
    # ± along the stable e1 -> back to the saddle
    saddle = torch.tensor([A, 0.0], dtype=torch.float64)
    res = basins(
        tanh2(),
        None,
        seeds=EigenSeeds(saddle, [[1.0, 0.0], [0.0, 1.0]], scales=(0.01,)),
        n_iter=100,
        batch_size=1,
    )
    E = res.end_states[:, 0].numpy()
    d = res.seeds["direction"].to_numpy()
    sg = res.seeds["sign"].to_numpy()
    np.testing.assert_allclose(E[d == 0], [[A, 0.0], [A, 0.0]], atol=1e-14)
    np.testing.assert_allclose(E[d == 1], np.stack([[A, A * s] for s in sg[d == 1]]), atol=1e-14)
    # init-distribution seeds are reproducible from the seed and distinct between draws
    loop = ls.FnLoop(
        step=lambda h: torch.tanh(2 * h),
        init_state=lambda ctx, gen: torch.randn(
            ctx.shape[0], 2, generator=gen, dtype=torch.float64
        ),
    )
    x = torch.zeros(3, 2)
    r1 = basins(loop, x, seeds=InitSeeds(n=8), n_iter=60, seed=5)
    r2 = basins(loop, x, seeds=InitSeeds(n=8), n_iter=60, seed=5)
    assert torch.equal(r1.seed_states, r2.seed_states)
    assert len({tuple(v) for v in r1.seed_states[:, 0].tolist()}) == 8
    np.testing.assert_allclose(r1.end_states.abs().numpy(), A, atol=1e-12)


def test_divergent_seeds_flagged():
    loop = ls.FnLoop(step=lambda h: h * h)
    seeds = torch.tensor([[0.5], [2.0], [-0.5], [3.0]], dtype=torch.float64)
    res = basins(loop, None, seeds=seeds, n_iter=30, batch_size=1, state_shape=(1,))
    assert res.seeds["diverged"].tolist() == [False, True, False, True]
    assert res.seeds["attractor"].tolist() == [0, -1, 0, -1]
    s = res.summary_frame()
    assert s["diverged_fraction"][0] == 0.5 and s["n_attractors"][0] == 1
    assert abs(s["entropy"][0] - np.log(2)) < 1e-12  # attractor 0 and "diverged", half each


# -- helpers ----------------------------------------------------------------------------------------
def test_single_linkage_matches_scipy_and_wilson_values():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((6, 3)) * 5
    X = np.concatenate([c + 1e-3 * rng.standard_normal((30, 3)) for c in centers])
    X = X[rng.permutation(len(X))]
    eps = 0.05
    ours = single_linkage(X, eps)
    ref = fcluster(linkage(X, "single"), eps, criterion="distance")
    # same partition
    pairs_ours = ours[:, None] == ours[None, :]
    pairs_ref = ref[:, None] == ref[None, :]
    assert (pairs_ours == pairs_ref).all() and ours.max() == 5
    # chains: points 0.04 apart link transitively into one cluster at eps 0.05, not at 0.03
    line = np.stack([np.arange(10) * 0.04, np.zeros(10)], axis=1)
    assert single_linkage(line, 0.05).max() == 0 and single_linkage(line, 0.03).max() == 9
    lo, hi = wilson_ci(5, 10)
    assert abs(lo - 0.2365930) < 1e-6 and abs(hi - 0.7634070) < 1e-6


def test_compare_splits_and_errors():
    loop = tanh2()
    pi_id = path_independence(
        loop, None, inits=[0.3 * torch.ones(2, 3, dtype=torch.float64), "swap"], n_iter=50
    )
    tr = ls.unroll(loop, None, 30, init=0.2 * torch.ones(2, 3, dtype=torch.float64))
    m = metrics(tr)
    df = compare_splits({"id": [m, pi_id], "ood": m}).to_frame()
    assert set(df["split"]) == {"id", "ood"}
    v = df[(df.split == "ood") & (df.metric == "converged_fraction")]["value"]
    assert v.tolist() == [m.summary()["converged_fraction"]]
    assert df[(df.split == "id") & (df.metric == "aa_state")]["value"].tolist() == [pi_id.score]
    with pytest.raises(LoopscopeError, match="seed"):
        basins(loop, None, seeds="grid", batch_size=1, state_shape=(2,))
    with pytest.raises(LoopscopeError, match="n_iters"):
        basins(loop, None, n_iters=3)
    with pytest.raises(LoopscopeError, match="swap"):
        path_independence(loop, None, inits=["swap", "zeros"])
    with pytest.raises(LoopscopeError, match="at least 2"):
        path_independence(loop, None, inits=["default"])


def test_an_empty_seed_tensor_is_a_one_line_error():
    loop = ls.FnLoop(step=lambda h, x: torch.tanh(h + x))
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ls.LoopscopeError, match="seeds is empty") as e:
        ls.analysis.basins(loop, x, torch.zeros(0, 3, dtype=torch.float64), state_shape=(3,))
    assert "\n" not in str(e.value)


def test_attractors_false_keeps_every_seed_row_and_skips_the_clustering():
    # readout per coordinate: class 1 where positive
    loop = ls.FnLoop(
        step=lambda h: torch.tanh(2 * h), decode=lambda h, ctx: torch.stack([-h, h], -1)
    )
    seeds = GridSeeds(torch.zeros(2, dtype=torch.float64), resolution=11)
    kw = dict(n_iter=60, batch_size=1, targets=torch.tensor([[1, 1]]))
    full = basins(loop, None, seeds=seeds, **kw)
    lean = basins(loop, None, seeds=seeds, attractors=False, **kw)
    assert len(full.attractors) == 9 and lean.attractors.empty
    assert (lean.seeds["attractor"] == -1).all() and (full.seeds["attractor"] >= 0).all()
    for col in ("answer", "correct", "conv_time", "end_residual", "diverged"):
        assert lean.seeds[col].equals(full.seeds[col]), col
    assert lean.seeds["correct"].sum() == 25  # the open positive quadrant of the 11 x 11 grid
