"""Hierarchical-loop analysis: fast fixed points / spectra per slow cycle against a linear fast map
with known answers, participation ratios of constructed clouds, sudoku4_hrm and a tiny HRM-Text
against hand computations from ``unroll``, per-sample flags, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope import FnLoop, Loop
from loopscope.analysis import HierarchicalResult, hierarchical, participation_ratio

D, L = 4, 3
CYCLE_COLUMNS = {
    "cycle",
    "sample",
    "state_finite",
    "status",
    "converged",
    "iterations",
    "nfe",
    "r_rel",
    "dist_start_rel",
    "dist_end",
    "dist_end_rel",
    "inner_residual",
    "reached",
    "contraction",
    "step_kappa",
    "rho",
    "unstable",
}
RESIDUAL_COLUMNS = {
    "loop",
    "state",
    "cycle",
    "step",
    "sample",
    "change",
    "rel_change",
    "dist_fp_rel",
    "in_model",
}


class LinearHier(Loop):
    """Toy hierarchical loop: ``L`` fast steps ``z_L <- A z_L + Bm z_H + c``, then
    ``z_H <- tanh(W z_H + z_L + x)``; state ``[B, 2, D]`` = (z_H, z_L), h_0 = (x, 0)."""

    def __init__(self, A, Bm, c, W, inner=L):
        super().__init__()
        for name, v in (("A", A), ("Bm", Bm), ("c", c), ("W", W)):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float64))
        self.L_cycles = inner
        self.setup()

    def encode(self, x):
        return {"x": x}

    def init_state(self, ctx, generator=None):
        x = ctx["x"]
        return torch.stack([x, torch.zeros_like(x)], dim=1)

    def l_step(self, zL, zH):
        return zL @ self.A.T + zH @ self.Bm.T + self.c

    def step(self, h, ctx, t=None):
        zH, zL = h[:, 0], h[:, 1]
        for _ in range(self.L_cycles):
            zL = self.l_step(zL, zH)
        zH = torch.tanh(zH @ self.W.T + zL + ctx["x"])
        return torch.stack([zH, zL], dim=1)

    def fast_loop(self, z_H):
        # z_H lives in the context so that the solver's per-sample subsets select it
        return FnLoop(
            step=lambda zl, ctx: self.l_step(zl, ctx["z_H"]),
            encode=lambda x: {"x": x, "z_H": z_H},
        )


def _toy(A, seed=0):
    g = np.random.default_rng(seed)
    Bm = g.standard_normal((D, D)) * 0.5
    c = g.standard_normal(D) * 0.3
    W = g.standard_normal((D, D)) * 0.8
    x = torch.as_tensor(g.standard_normal((3, D)), dtype=torch.float64)
    return LinearHier(A, Bm, c, W), x, Bm, c


def _hand_states(A, Bm, c, W, x, N):
    """z_H^c, z_L^c, and the inner iterates of every cycle, in numpy."""
    zH, zL = x.numpy().copy(), np.zeros_like(x.numpy())
    out = []
    for _ in range(N):
        inner = [zL]
        for _ in range(L):
            inner.append(inner[-1] @ A.T + zH @ Bm.T + c)
        out.append((zH, inner))
        zL = inner[-1]
        zH = np.tanh(zH @ W.T + zL + x.numpy())
    return out


def _sel(df, **eq):
    mask = np.ones(len(df), dtype=bool)
    for k, v in eq.items():
        mask &= (df[k] == v).to_numpy()
    return df[mask]


def _rot(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def test_linear_fast_map_fixed_point_and_spectrum_match_analytic_per_cycle():
    # non-normal A with a complex leading pair: eig(A) = 0.5 ± 0.4i, 0.3, -0.2
    P = np.eye(D) + 0.3 * np.random.default_rng(1).standard_normal((D, D))
    core = np.zeros((D, D))
    core[:2, :2] = [[0.5, -0.4], [0.4, 0.5]]
    core[2, 2], core[3, 3] = 0.3, -0.2
    A = P @ core @ np.linalg.inv(P)
    model, x, Bm, c = _toy(A)
    N = 4
    res = hierarchical(model, x, N, tol=1e-13, k=D)
    assert isinstance(res, HierarchicalResult)
    assert res.meta["inner_steps"] == L and res.meta["n_cycles"] == N
    hand = _hand_states(A, Bm, c, model.W.numpy(), x, N)
    moduli = np.sort(np.abs(np.linalg.eigvals(A)))[::-1]
    assert abs(moduli[0] - np.sqrt(0.41)) < 1e-12
    for cyc, (zH, inner) in enumerate(hand):
        zstar = np.linalg.solve(np.eye(D) - A, (zH @ Bm.T + c).T).T  # (I - A)^-1 (B z_H + c)
        assert np.abs(res.fixed_points[cyc].numpy() - zstar).max() < 1e-8, cyc
        assert np.abs(res.states[cyc, :, 0].numpy() - zH).max() < 1e-12
        rows = res.cycles[res.cycles["cycle"] == cyc]
        assert (rows["status"] == "converged").all()
        assert np.abs(rows["rho"].to_numpy() - moduli[0]).max() < 1e-8
        assert (rows["unstable"] == 0).all()
        for b in range(x.shape[0]):
            ev = _sel(res.spectra, cycle=cyc, sample=b).sort_values("rank")
            assert np.abs(ev["modulus"].to_numpy() - moduli).max() < 1e-8
            d_end = np.linalg.norm(inner[L][b] - zstar[b])
            assert abs(rows["dist_end"].iloc[b] - d_end) < 1e-8
            assert abs(rows["dist_end_rel"].iloc[b] - d_end / np.linalg.norm(zstar[b])) < 1e-8
            d0 = np.linalg.norm(inner[0][b] - zstar[b])
            assert abs(rows["contraction"].iloc[b] - (d_end / d0) ** (1 / L)) < 1e-8


def test_contraction_rate_of_a_scaled_rotation_is_its_scale():
    A = np.zeros((D, D))
    A[:2, :2], A[2:, 2:] = 0.6 * _rot(0.7), 0.6 * _rot(-1.9)  # ‖A v‖ = 0.6 ‖v‖ for every v
    model, x, _, _ = _toy(A, seed=2)
    res = hierarchical(model, x, 3, tol=1e-13, fast_steps=6, reach_tol=0.1)
    cyc = res.cycles
    assert np.abs(cyc["contraction"] - 0.6).max() < 1e-8
    assert np.abs(cyc["step_kappa"] - 0.6).max() < 1e-8
    assert np.abs(cyc["rho"] - 0.6).max() < 1e-8
    # distance to z_L* shrinks by exactly 0.6 per fast step, past the model's L steps too
    fast = res.residuals[res.residuals["loop"] == "fast"].merge(
        cyc[["cycle", "sample", "dist_start_rel"]], on=["cycle", "sample"]
    )
    assert set(fast["step"]) == set(range(1, 7))
    assert (fast["in_model"] == (fast["step"] <= L)).all()
    expect = fast["dist_start_rel"] * 0.6 ** fast["step"]
    assert np.abs(fast["dist_fp_rel"] - expect).max() < 1e-8
    assert (cyc["reached"] == (cyc["dist_end_rel"] <= 0.1)).all()
    assert cyc["reached"].any() and not cyc["reached"].all()


def test_participation_ratio_isotropic_rank1_and_eigen_definition():
    d = 7
    iso = torch.cat([torch.eye(d), -torch.eye(d)]) * 3.0  # covariance ∝ I
    assert abs(participation_ratio(iso) - d) < 1e-12
    v = torch.randn(d, dtype=torch.float64)
    rank1 = torch.randn(50, 1, dtype=torch.float64) * v + 2.0  # one direction plus an offset
    assert abs(participation_ratio(rank1) - 1.0) < 1e-12
    X = torch.randn(40, d, dtype=torch.float64) * torch.linspace(0.1, 2.0, d, dtype=torch.float64)
    ev = np.linalg.eigvalsh(np.cov(X.numpy().T))
    assert abs(participation_ratio(X) - ev.sum() ** 2 / (ev**2).sum()) < 1e-10
    wide = torch.randn(5, 30, dtype=torch.float64)  # N < d: the Gram product path
    ev = np.linalg.eigvalsh(np.cov(wide.numpy().T))
    assert abs(participation_ratio(wide) - ev.sum() ** 2 / (ev**2).sum()) < 1e-10
    assert np.isnan(participation_ratio(torch.ones(1, d)))
    assert np.isnan(participation_ratio(torch.ones(4, d)))  # zero covariance
    with pytest.raises(ls.LoopscopeError, match="matrix"):
        participation_ratio(torch.ones(d))


def test_nonfinite_sample_is_flagged_and_the_rest_is_unchanged():
    A = 0.5 * np.eye(D)
    model, x, _, _ = _toy(A)
    bad = x.clone()
    bad[1, 0] = float("nan")
    res = hierarchical(model, bad, 3, tol=1e-12)
    ref = hierarchical(model, x[[0, 2]], 3, tol=1e-12)
    cyc = res.cycles
    assert (~cyc.loc[cyc["sample"] == 1, "state_finite"]).all()
    assert (cyc.loc[cyc["sample"] == 1, "status"] == "diverged").all()
    assert cyc.loc[cyc["sample"] == 1, ["rho", "dist_end_rel"]].isna().all().all()
    good = cyc[cyc["sample"] != 1].reset_index(drop=True)
    assert (good["status"] == "converged").all()
    np.testing.assert_allclose(good["rho"], ref.cycles["rho"], atol=1e-12)
    np.testing.assert_allclose(good["dist_end_rel"], ref.cycles["dist_end_rel"], atol=1e-12)
    pr = res.participation.set_index(["cycle", "state"])["participation_ratio"]
    pr_ref = ref.participation.set_index(["cycle", "state"])["participation_ratio"]
    np.testing.assert_allclose(pr.to_numpy(), pr_ref.to_numpy(), atol=1e-10)


def test_bad_input_raises_loopscope_errors():
    model, x, _, _ = _toy(0.5 * np.eye(D))
    plain = FnLoop(step=lambda h: 0.5 * h, init_state=torch.zeros(2, D, dtype=torch.float64))
    with pytest.raises(ls.LoopscopeError, match="hierarchical model"):
        hierarchical(plain, x, 2)
    with pytest.raises(ls.LoopscopeError, match="hierarchical model"):
        hierarchical(object(), x, 2)
    for bad in (0, -1, 1.5):
        with pytest.raises(ls.LoopscopeError, match="n_cycles"):
            hierarchical(model, x, bad)
    with pytest.raises(ls.LoopscopeError, match="unknown option 'fast_step'.*fast_steps"):
        hierarchical(model, x, 2, fast_step=3)
    with pytest.raises(ls.LoopscopeError, match="spectrum"):
        hierarchical(model, x, 2, spectrum="eig")
    with pytest.raises(ls.LoopscopeError, match="method"):
        hierarchical(model, x, 2, method="bisect")
    with pytest.raises(ls.LoopscopeError, match=r"\[B, 2"):
        hierarchical(model, x, 2, init=torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ls.LoopscopeError, match="batch"):
        hierarchical(model, x, 2, init=torch.zeros(2, 2, D, dtype=torch.float64))
    with pytest.raises(ls.LoopscopeError, match="inner_steps"):  # the model takes L = 3
        hierarchical(model, x, 2, inner_steps=2)


@pytest.fixture(scope="module")
def sudoku():
    from loopscope import tasks, zoo

    model = zoo.load("sudoku4_hrm")
    tokens = tasks.get("sudoku4").sample(2, "id", seed=0).tokens
    N = 2
    res = hierarchical(model, tokens, N, fast_steps=3, spectrum="arpack", k=3)
    return model, tokens, N, res


def test_sudoku4_hrm_runs_finite_with_the_documented_frames(sudoku):
    model, tokens, N, res = sudoku
    B, Lm = tokens.shape[0], model.cfg.L_cycles
    assert model.dtype == torch.float32  # the user's model is not converted in place
    assert res.meta["model"] == "sudoku4_hrm" and res.meta["inner_steps"] == Lm
    assert CYCLE_COLUMNS <= set(res.cycles.columns) and len(res.cycles) == N * B
    assert RESIDUAL_COLUMNS <= set(res.residuals.columns)
    assert len(res.residuals) == 2 * N * B + N * 3 * B
    assert res.states.shape == (N + 1, B, 2, tokens.shape[1], model.cfg.d_model)
    assert res.states.dtype == torch.float64
    cyc = res.cycles
    assert cyc["state_finite"].all() and np.isfinite(cyc["rho"]).all()
    for col in ("dist_end_rel", "inner_residual", "contraction", "zstar_norm"):
        assert np.isfinite(cyc[col]).all(), col
    assert (res.spectra.groupby(["cycle", "sample"]).size() == 3).all()
    pr = res.participation
    assert set(pr["state"]) == {"z_H", "z_L", "z_L*"}
    later = pr[pr["cycle"] >= 1]  # cycle 0 is the fixed init: zero covariance -> NaN
    assert ((later["participation_ratio"] >= 1) & (later["participation_ratio"] <= 64)).all()
    summ = res.per_cycle()
    assert len(summ) == N and {"rho_median", "frac_reached", "pr_z_H", "pr_z_L"} <= set(summ)
    # a converged z_L* is a fixed point of the model's own fast loop (z_H held at its cycle value)
    m64 = copy.deepcopy(model).double()
    for c in range(N):
        ok = torch.tensor(cyc.loc[cyc["cycle"] == c, "converged"].to_list())
        assert ok.any()
        fast = m64.fast_loop(res.states[c, :, 0])
        fctx = fast.encode(tokens)
        with torch.no_grad():
            z = res.fixed_points[c]
            r = (fast.step(z, fctx) - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
        assert (r[ok] < 1e-9).all()


def test_sudoku4_hrm_residual_curves_equal_hand_computation_from_unroll(sudoku):
    model, tokens, N, res = sudoku
    Lm = model.cfg.L_cycles
    tr = ls.unroll(copy.deepcopy(model).double(), tokens, N, capture=["L.hook_out"])
    S = tr.states  # [N+1, B, 2, P, d]
    assert (res.states - S).abs().max() < 1e-12

    def rel(a, b):  # ‖a − b‖ / ‖a‖ per sample
        return ((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).numpy()

    r = res.residuals
    for c in range(N):
        for k, state in enumerate(("z_H", "z_L")):
            got = _sel(r, loop="slow", state=state, cycle=c)
            np.testing.assert_allclose(
                got["rel_change"], rel(S[c + 1, :, k], S[c, :, k]), rtol=1e-10
            )
        inner = [S[c, :, 1]] + [tr["L.hook_out"][c * Lm + j] for j in range(Lm)]
        assert tr.labels["L.hook_out"][c * Lm] == (c, 0)
        for j in range(1, Lm + 1):
            got = _sel(r, loop="fast", cycle=c, step=j)
            np.testing.assert_allclose(got["rel_change"], rel(inner[j], inner[j - 1]), rtol=1e-10)
        # the model's z_L at the end of the cycle is the last inner iterate
        cyc = res.cycles[res.cycles["cycle"] == c]
        zs = res.fixed_points[c]
        dist = (inner[Lm] - zs).flatten(1).norm(dim=1) / zs.flatten(1).norm(dim=1)
        np.testing.assert_allclose(cyc["dist_end_rel"], dist.numpy(), rtol=1e-10)


def test_tiny_hrm_text_bridge_runs_and_follows_the_slow_loop():
    from loopscope.models import bridge_hrm_text, build_tiny_hrm_text, hrm_text_loop

    hf, tok = build_tiny_hrm_text(seed=0)
    bridge = bridge_hrm_text(hf, tok)
    ids = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    res = hierarchical(
        hrm_text_loop(bridge), ids, fast_steps=6
    )  # n_cycles: HRM-Text's own H_cycles (3)
    assert res.meta["n_cycles"] == 3 and res.meta["inner_steps"] == 4
    assert next(hf.parameters()).dtype == torch.float32  # not converted in place
    cyc = res.cycles
    assert CYCLE_COLUMNS <= set(cyc.columns) and len(cyc) == 3 * 2
    assert cyc["state_finite"].all()
    assert np.isfinite(cyc[["rho", "dist_end_rel", "inner_residual", "r_rel"]].to_numpy()).all()
    assert (cyc["spectrum_method"] == "dense").all()
    assert np.isfinite(res.participation.query("cycle >= 1")["participation_ratio"]).all()
    # the same dynamics as the float32 slow Loop through the bridge
    tr = ls.unroll(hrm_text_loop(bridge).slow, ids, 3)
    err = (res.states.float() - tr.states).abs().max() / tr.states.abs().max()
    assert err < 1e-4
    # HrmTextLoops is accepted as well and gives the same result
    res2 = hierarchical(hrm_text_loop(bridge), ids, 1, spectrum="none")
    np.testing.assert_allclose(
        res2.cycles["dist_end_rel"], cyc.loc[cyc["cycle"] == 0, "dist_end_rel"], rtol=1e-8
    )
