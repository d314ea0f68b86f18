"""analysis.metrics: closed forms (golden #7, #14, #16), output-space metrics, calibration,
per-layer metrics, divergence handling, and hypothesis invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax
from transformer_lens.hook_points import HookPoint

import loopscope as ls
from loopscope.analysis.convergence import calibration, layer_metrics, metrics
from loopscope.core.errors import LoopscopeError
from loopscope.core.trace import Trace

A_TANH2 = 0.9575040240772688  # a = tanh(2a)


def synthetic(kappa: float, T: int, hstar: np.ndarray, v: np.ndarray) -> Trace:
    """h_t = h* + κ^t v (golden #14), one sample."""
    t = np.arange(T + 1).reshape(-1, 1)
    h = hstar.reshape(1, -1) + kappa**t * v.reshape(1, -1)
    return Trace(states=torch.as_tensor(h).unsqueeze(1))


# -- golden #14: step and acceleration closed forms ---------------------------------------------
def test_golden14_step_and_acceleration_closed_form():
    kappa, T = 0.7, 30
    hstar = np.array([1.0, -2.0, 0.5, 3.0])
    v = np.array([0.3, 0.4, -1.2, 0.1])
    m = metrics(synthetic(kappa, T, hstar, v))
    nv = np.linalg.norm(v)
    t = np.arange(1, T + 1)
    np.testing.assert_allclose(
        m["step"][1:, 0].numpy(), (1 - kappa) * kappa ** (t - 1) * nv, rtol=1e-10
    )
    t2 = np.arange(2, T + 1)
    # backward convention a_t = ||Δ_t − Δ_{t−1}|| = (1 − κ)² κ^{t−2} ||v||
    np.testing.assert_allclose(
        m["accel"][2:, 0].numpy(), (1 - kappa) ** 2 * kappa ** (t2 - 2) * nv, rtol=1e-8
    )
    assert torch.isnan(m["accel"][:2, 0]).all() and torch.isnan(m["step"][0, 0])
    # residual r_t = ||Δ_{t+1}||; contraction κ_t = κ exactly; Banach bound ≥ true error
    np.testing.assert_allclose(
        m["residual"][:T, 0].numpy(), (1 - kappa) * kappa ** np.arange(T) * nv, rtol=1e-10
    )
    np.testing.assert_allclose(m["kappa"][: T - 1, 0].numpy(), kappa, rtol=1e-8)
    np.testing.assert_allclose(m["kappa_bar"][5:T, 0].numpy(), kappa, rtol=1e-8)
    err = kappa ** np.arange(T + 1) * nv
    ban = m["banach_bound"][5:T, 0].numpy()
    assert np.all(ban >= err[5:T] * (1 - 1e-9))
    np.testing.assert_allclose(ban, err[5:T], rtol=1e-8)  # tight for an exact geometric sequence
    # steps to tolerance: predicted crossing of r_rel matches the actual one within 1 step
    rel = m["rel_residual"][:, 0].numpy()
    pred = m["steps_to_tol"][10, 0].item()
    actual = int(np.nonzero(rel[10:T] <= m.tol)[0][0])
    assert abs(pred - actual) <= 1
    # straight-line convergence: step cosine exactly 1
    np.testing.assert_allclose(m["step_cos"][2:, 0].numpy(), 1.0, atol=1e-12)


# -- golden #7: 2-cycle residuals ---------------------------------------------------------------
def test_golden7_cycle_residuals():
    loop = ls.FnLoop(step=lambda h: torch.tanh(-2 * h))
    h0 = torch.linspace(-0.8, 0.9, 8, dtype=torch.float64).reshape(1, 8) + 0.05
    tr = ls.unroll(loop, None, 80, init=h0)
    m = metrics(tr, p_max=4)
    r = m["residual"][40:80, 0].numpy()
    np.testing.assert_allclose(r, 2 * A_TANH2 * math.sqrt(8), rtol=1e-12)
    assert m["res_p2"][60:, 0].max() < 1e-13 and m["res_p4"][60:, 0].max() < 1e-13
    assert (m["period"][60:, 0] == 2).all()
    assert m.t_conv[0] == -1  # one-step residual plateaus: never "converged"
    assert not m.summary_frame()["converged"][0]


# -- golden #16 (analysis part): T_conv = longest carry chain -----------------------------------
def carry_loop():
    """Hand-wired parallel carry c_{t+1}[i+1] = 1[s_i + c_t[i] >= 10]; state one-hot [B, D+1, 2]."""

    def encode(inputs):
        a, b = inputs
        return a + b  # [B, D] digit sums, LSB first

    def step(h, s):
        c = h[..., 1]
        new = torch.zeros_like(c)
        new[:, 1:] = (s + c[:, :-1] >= 10).to(h.dtype)
        return torch.stack([1 - new, new], dim=-1)

    def init(s, gen=None):
        B, D = s.shape
        h = torch.zeros(B, D + 1, 2, dtype=torch.float64)
        h[..., 0] = 1
        return h

    def decode(h, s):
        c = h[..., 1]
        digits = torch.cat([(s + c[:, :-1]) % 10, c[:, -1:]], dim=1).long()
        return torch.nn.functional.one_hot(digits, 10).double()

    return ls.FnLoop(step=step, init_state=init, decode=decode, encode=encode)


def digits(x: int, D: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(D)]


CARRY_CASES = [(999, 1, 3), (5555, 4445, 4), (19, 81, 2), (1234, 4321, 0)]


def test_golden16_t_conv_equals_longest_carry_chain():
    a = torch.tensor([digits(x, 4) for x, _, _ in CARRY_CASES], dtype=torch.float64)
    b = torch.tensor([digits(y, 4) for _, y, _ in CARRY_CASES], dtype=torch.float64)
    tr = ls.unroll(carry_loop(), (a, b), 8, decode=True)
    m = metrics(tr)
    assert m.t_conv.tolist() == [c for _, _, c in CARRY_CASES]
    # the decoded answer at the end is the true sum (LSB first, 5 digits)
    ans = tr.logits[-1].argmax(-1)
    for i, (x, y, _) in enumerate(CARRY_CASES):
        assert ans[i].tolist() == digits(x + y, 5)
    # per token: each carry position settles at its own step (999+1: positions 1, 2, 3 at 1, 2, 3)
    mt = metrics(tr, per_token=True)
    assert mt.t_conv[0].tolist() == [0, 1, 2, 3, 0]


# -- output-space metrics against an independent numpy reference --------------------------------
def test_output_metrics_match_numpy_reference():
    g = torch.Generator().manual_seed(0)
    T, B, P, V = 6, 3, 2, 5
    logits = torch.randn(T + 1, B, P, V, generator=g, dtype=torch.float64)
    tr = Trace(states=torch.randn(T + 1, B, 4, dtype=torch.float64, generator=g), logits=logits)
    m = metrics(tr)
    L = logits.numpy()
    p = softmax(L, axis=-1)
    for t in range(1, T + 1):
        kl = rel_entr(p[t - 1], p[t]).sum(-1).mean(-1)
        np.testing.assert_allclose(m["kl"][t].numpy(), kl, rtol=1e-10)
        H = -(p * np.log(p)).sum(-1)
        np.testing.assert_allclose(
            m["entropy_diff"][t].numpy(), np.abs(H[t] - H[t - 1]).mean(-1), rtol=1e-10
        )
        np.testing.assert_allclose(
            m["logit_delta"][t].numpy(),
            np.linalg.norm(L[t] - L[t - 1], axis=-1).mean(-1),
            rtol=1e-10,
        )
    # KL(uniform || p_0) at t = 0
    np.testing.assert_allclose(
        m["kl"][0].numpy(), rel_entr(np.full(V, 1 / V), p[0]).sum(-1).mean(-1), rtol=1e-10
    )


def test_argmax_stable_counts_run_length():
    # argmax sequence per step: 0 0 1 1 1 0 -> counts 0 1 0 1 2 0
    seq = [0, 0, 1, 1, 1, 0]
    logits = torch.zeros(len(seq), 1, 3, dtype=torch.float64)
    for t, k in enumerate(seq):
        logits[t, 0, k] = 1.0
    tr = Trace(states=torch.zeros(len(seq), 1, 2, dtype=torch.float64), logits=logits)
    assert metrics(tr)["argmax_stable"][:, 0].tolist() == [0, 1, 0, 1, 2, 0]


# -- divergence: flagged per sample, never crashes the batch -----------------------------------
def test_diverged_sample_is_flagged_and_masked():
    scale = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    loop = ls.FnLoop(step=lambda h, x: x * h + 0.1, init_state=torch.ones(3, dtype=torch.float64))
    tr = ls.unroll(loop, scale, 40, blowup=1e4)
    assert tr.diverged_at[1] > 0 and tr.diverged_at[0] == -1
    m = metrics(tr)
    s = m.summary_frame()
    assert s["diverged"].tolist() == [False, True]
    d = int(tr.diverged_at[1])
    # frozen copies after the blow-up are not dynamics: NaN, not a fake zero residual
    assert torch.isnan(m["residual"][d - 1 :, 1]).all()
    assert torch.isfinite(m["residual"][: d - 1, 1]).all()
    assert m.t_conv[1] == -1 and m.t_conv[0] > 0
    df = m.to_frame()
    assert set(df.columns) >= {"iteration", "sample", "residual", "res_p16", "diverged"}
    assert len(df) == 41 * 2


def test_bad_options_rejected():
    tr = Trace(states=torch.zeros(3, 1, 2))
    with pytest.raises(LoopscopeError, match="tl"):
        metrics(tr, tl=1e-3)
    with pytest.raises(LoopscopeError, match="p_max"):
        metrics(tr, p_max=0)
    with pytest.raises(LoopscopeError, match="decode"):
        metrics(tr, decode="yes")


# -- calibration ---------------------------------------------------------------------------------
def test_calibration_auroc_and_bins():
    # 6 samples with final residual 10^-k; correct exactly when the residual is small
    T = 3
    B = 6
    states = torch.zeros(T + 1, B, 1, dtype=torch.float64)
    res = torch.tensor([1e-8, 1e-6, 1e-5, 1e-2, 1e-1, 1.0], dtype=torch.float64)
    states[:, :, 0] = 1.0
    states[T, :, 0] = 1.0 + res
    tr = Trace(states=states)
    c = calibration(tr, torch.tensor([1, 1, 1, 0, 0, 0]), n_bins=2)
    assert c.auroc == 1.0
    assert c.bins["accuracy"].tolist() == [1.0, 0.0]
    c2 = calibration(tr, torch.tensor([0, 0, 0, 1, 1, 1]), n_bins=2)
    assert c2.auroc == 0.0
    c3 = calibration(tr, torch.tensor([1, 0, 1, 0, 1, 0]))
    assert abs(c3.auroc - 6 / 9) < 1e-12  # Mann-Whitney: 6 of 9 (correct, wrong) pairs ordered


# -- per-layer residuals and attention stabilisation -------------------------------------------
class TwoLayer(ls.Loop):
    """K = 2 layer block with per-layer hooks and a fake attention pattern (softmax of -h)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_l0 = HookPoint()
        self.hook_l1 = HookPoint()
        self.hook_pattern = HookPoint()
        self.setup()

    def init_state(self, ctx, generator=None):
        return torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).expand(ctx.shape[0], 3).clone()

    def step(self, h, ctx, t=None):
        a = self.hook_l0(0.5 * h)
        b = self.hook_l1(a + ctx)
        heads = torch.stack([b, 2 * b], dim=1)  # [B, 2 heads, 3]
        self.hook_pattern(torch.softmax(-heads.unsqueeze(2).expand(-1, 2, 3, 3), dim=-1))
        return b


def test_layer_metrics_residuals_and_js():
    loop = TwoLayer()
    x = torch.ones(2, 3, dtype=torch.float64)
    tr = ls.unroll(loop, x, 6, capture=["hook_l0", "hook_l1", "hook_pattern"])
    lm = layer_metrics(tr).to_frame()
    r0 = lm[(lm.hook == "hook_l0") & (lm.metric == "residual") & (lm["sample"] == 0)].sort_values(
        "iteration"
    )
    # layer 0 output a_t = 0.5 h_t, h_t -> 2 geometrically: ||a_t - a_{t-1}|| = 0.5 ||h_t - h_{t-1}||
    h = tr.states[:, 0]
    ref = [0.5 * float((h[t] - h[t - 1]).norm()) for t in range(1, 6)]
    np.testing.assert_allclose(r0["value"].to_numpy(), ref, rtol=1e-12)
    js = lm[lm.metric == "attn_js"]
    assert set(js["head"]) == {0, 1}
    pat = tr["hook_pattern"]  # [T, B, heads, q, k]
    for head in (0, 1):
        got = (
            js[(js["sample"] == 1) & (js["head"] == head)]
            .sort_values("iteration")["value"]
            .to_numpy()
        )
        ref = [
            np.mean(
                [
                    jensenshannon(pat[t, 1, head, q].numpy(), pat[t - 1, 1, head, q].numpy()) ** 2
                    for q in range(3)
                ]
            )
            for t in range(1, 6)
        ]
        np.testing.assert_allclose(got, ref, rtol=1e-9)
        assert np.all(np.diff(got) < 0)  # the block contracts: patterns stabilise


# -- hypothesis invariants ------------------------------------------------------------------------
traj = st.integers(min_value=3, max_value=12).flatmap(
    lambda T: st.integers(min_value=1, max_value=4).flatmap(
        lambda n: st.lists(
            # values below 1e-100 become 0: norms of ~1e-162 states underflow to subnormals,
            # where ratios lose their precision (a float64 limit, not a metric bug)
            st.floats(-5, 5, allow_nan=False, allow_infinity=False).map(
                lambda x: 0.0 if abs(x) < 1e-100 else x
            ),
            min_size=(T + 1) * n,
            max_size=(T + 1) * n,
        ).map(lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(T + 1, 1, n))
    )
)


@settings(max_examples=40, deadline=None)
@given(traj)
def test_property_residuals_nonnegative(S):
    m = metrics(Trace(states=S), p_max=4)
    for name in ("residual", "rel_residual", "step", "accel", "q", "fprm_residual"):
        v = m[name]
        assert (v[~torch.isnan(v)] >= 0).all()
    rp = m["res_p"]
    assert (rp[~torch.isnan(rp)] >= 0).all()


@settings(max_examples=40, deadline=None)
@given(traj, st.floats(0.01, 100.0))
def test_property_scaling_covariance(S, c):
    m1 = metrics(Trace(states=S), p_max=3, eps=0.0)
    m2 = metrics(Trace(states=c * S), p_max=3, eps=0.0)
    for name in ("residual", "step", "accel"):
        a, b = m1[name], m2[name]
        ok = ~torch.isnan(a)
        assert torch.allclose(c * a[ok], b[ok], rtol=1e-9, atol=1e-12)
    for name in ("rel_residual", "state_cos", "step_cos", "kappa"):
        a, b = m1[name], m2[name]
        ok = torch.isfinite(a) & torch.isfinite(b) & (m1["residual"].nan_to_num(1.0) > 1e-8)
        assert torch.allclose(a[ok], b[ok], rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 10), st.integers(1, 5), st.integers(0, 1000))
def test_property_constant_trajectory_zero_at_every_period(T, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    S = x.expand(T + 1, 1, n).clone()
    m = metrics(Trace(states=S), p_max=16)
    rp = m["res_p"]
    assert (rp[~torch.isnan(rp)] == 0).all()
    assert (m["residual"][:T] == 0).all()
    assert m.t_conv[0] == 0


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(0, 1000))
def test_property_periodic_trajectory_detects_smallest_period(p, seed):
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(p, 3, generator=g, dtype=torch.float64) * 3
    S = pattern.repeat(8, 1)[: 6 * p + 1].unsqueeze(1)
    m = metrics(Trace(states=S), p_max=10)
    last = S.shape[0] - 1
    assert m["res_p"][p - 1, p:, 0].abs().max() == 0
    assert int(m["period"][last, 0]) == p


def test_package_exports_are_callable():
    from loopscope.analysis import (
        Metrics,
        basins,
        classify,
        detect_cycle,
        halting,
        lyapunov,
        path_independence,
    )
    from loopscope.analysis import metrics as metrics_export

    tr = ls.unroll(
        ls.FnLoop(step=lambda h: 0.5 * h), None, 5, init=torch.ones(1, 2, dtype=torch.float64)
    )
    m = metrics_export(tr)
    assert isinstance(m, Metrics)
    assert callable(lyapunov) and callable(basins) and callable(halting.evaluate)
    assert callable(detect_cycle) and callable(classify) and callable(path_independence)
