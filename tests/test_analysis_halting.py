"""analysis.halting: golden #14 exit steps = closed-form first crossings, online == offline,
FPRM damping, learned halting inputs, oracle agreement, trade-off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr, softmax

import loopscope as ls
from loopscope.analysis import halting
from loopscope.analysis.halting import Criterion
from loopscope.core.errors import LoopscopeError
from loopscope.core.trace import Trace

KAPPA = 0.8
T = 60
HSTAR = np.array([3.0, 0.0, 0.0, 0.0])
V = np.array([0.0, 1.0, -2.0, 0.5])  # orthogonal to h*
EPS = 1e-9


def closed_form_states(theta: float = 0.0) -> np.ndarray:
    """h_t = h* + κ^t R(θ)^t v, the rotation acting in the (e2, e3) plane."""
    out = []
    for t in range(T + 1):
        c, s = math.cos(t * theta), math.sin(t * theta)
        R = np.eye(4)
        R[1:3, 1:3] = [[c, -s], [s, c]]
        out.append(HSTAR + KAPPA**t * (R @ V))
    return np.stack(out)


def first_crossing(stat: np.ndarray, tau: float, start: int, two_hit: bool = False) -> int:
    """First e >= start with stat[e] < tau (and stat[e-1] < tau if two_hit); checks the margin."""
    for e in range(start, len(stat)):
        if stat[e] < tau and (not two_hit or stat[e - 1] < tau):
            # the crossing must not be borderline (eps-level changes cannot move it)
            assert abs(stat[e] - tau) > 1e-6 * tau and abs(stat[e - 1] - tau) > 1e-6 * tau
            return e
    raise AssertionError("no crossing")


def trace_of(H: np.ndarray, logits: np.ndarray | None = None) -> Trace:
    lg = None if logits is None else torch.as_tensor(logits).unsqueeze(1)
    return Trace(states=torch.as_tensor(H).unsqueeze(1), logits=lg)


@pytest.mark.parametrize("tau", [3e-2, 1e-3, 1e-5])
def test_golden14_latent_diff_and_acceleration_exit_steps(tau):
    H = closed_form_states()
    nv, nh = np.linalg.norm(V), np.linalg.norm(HSTAR)
    e = np.arange(T + 1)
    norm_h = np.sqrt(nh**2 + KAPPA ** (2 * e) * nv**2)
    with np.errstate(divide="ignore"):
        latent = np.where(e >= 1, (1 - KAPPA) * KAPPA ** (e - 1.0) * nv / (norm_h + EPS), np.nan)
        accel = np.where(
            e >= 2, (1 - KAPPA) ** 2 * KAPPA ** (e - 2.0) * nv / (norm_h + EPS), np.nan
        )
    rep = halting.evaluate(
        trace_of(H), {"latent_diff": [tau], "acceleration": [tau], "residual": [tau]}
    )
    assert rep.exit_steps("latent_diff")[0] == first_crossing(latent, tau, 1)
    # acceleration is two-hit by default
    assert rep.exit_steps("acceleration")[0] == first_crossing(accel, tau, 2, two_hit=True)
    # residual at exit step e is ||h_e - h_{e-1}|| / (||f(h_{e-1})|| + eps): the same number
    assert rep.exit_steps("residual")[0] == rep.exit_steps("latent_diff")[0]


@pytest.mark.parametrize("tau", [1e-3, 1e-5])
def test_golden14_cosine_exit_with_rotation(tau):
    theta = 0.7
    H = closed_form_states(theta)
    nv, nh = np.linalg.norm(V), np.linalg.norm(HSTAR)
    e = np.arange(1, T + 1)
    # <R^e v, R^{e-1} v> = cos θ ||v_23||² + v_4² (e4 is outside the rotation plane)
    dot = nh**2 + KAPPA ** (2 * e - 1) * (math.cos(theta) * (V[1] ** 2 + V[2] ** 2) + V[3] ** 2)
    cos = dot / np.sqrt((nh**2 + KAPPA ** (2 * e) * nv**2) * (nh**2 + KAPPA ** (2 * e - 2) * nv**2))
    stat = np.concatenate([[np.nan], 1 - cos])
    rep = halting.evaluate(trace_of(H), {"cosine": [tau]})
    assert rep.exit_steps("cosine")[0] == first_crossing(stat, tau, 1)


@pytest.mark.parametrize("tau", [1e-3, 1e-6])
def test_golden14_kl_exit_step(tau):
    H = closed_form_states(0.3)
    logits = 2.0 * H  # readout = a fixed linear map of the state
    p = softmax(logits, axis=-1)
    stat = np.array([np.nan] + [rel_entr(p[e - 1], p[e]).sum() for e in range(1, T + 1)])
    rep = halting.evaluate(trace_of(H, logits), {"kl": [tau]})
    assert rep.exit_steps("kl")[0] == first_crossing(stat, tau, 1)


# -- online == offline ---------------------------------------------------------------------------
def rnn_loop(seed=0, n=6, B=4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    Wo = torch.randn(5, n, generator=g, dtype=torch.float64)
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    loop = ls.FnLoop(
        step=lambda h, u: torch.tanh(h @ W.T + u),
        init_state=torch.zeros(n, dtype=torch.float64),
        decode=lambda h, u: 3 * h @ Wo.T,
    )
    return loop, x


@pytest.mark.parametrize(
    "crit",
    [
        ("residual", 1e-4, {}),
        ("latent_diff", 1e-3, {}),
        ("cosine", 1e-7, {}),
        ("acceleration", 1e-3, {}),
        ("period_residual", 1e-5, {"p_max": 4}),
        ("fp_residual", 1e-3, {"decay": 0.9, "decay_patience": 2}),
        ("kl", 1e-6, {"decode": True}),
        ("argmax_stable", 3, {"decode": True}),
        ("predicted", 1e-6, {"budget": 40}),
    ],
)
def test_online_halting_equals_offline_exit(crit):
    name, tau, params = crit
    loop, x = rnn_loop()
    params = dict(params)
    if params.get("decode"):
        params["decode"] = loop.decode
    full = ls.unroll(loop, x, 40, decode=True)
    offline = halting.evaluate(
        full, [Criterion(name, tau, **{k: v for k, v in params.items() if k != "decode"})]
    )
    exits = offline.exit_steps(name)
    halted = offline.exits["halted"].to_numpy()
    c = Criterion(name, tau, **params)
    online = ls.unroll(loop, x, 40, halt=c)
    got = online.halted_at.numpy()
    np.testing.assert_array_equal(np.where(halted, exits, -1), got)
    assert halted.any()


def test_fp_residual_damping_schedule_closed_form():
    # h -> -h: FPRM residual = 2 forever; s halves after 2 non-improving steps: decays at
    # e = 3, 5, 7, 9 -> s = 0.0625 < s_min = 0.1 at e = 9
    loop = ls.FnLoop(step=lambda h: -h)
    tr = ls.unroll(loop, None, 30, init=torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    rep = halting.evaluate(
        tr, [Criterion("fp_residual", 0.1, decay=0.5, decay_patience=2, s_min=0.1)]
    )
    assert rep.exit_steps("fp_residual")[0] == 9
    online = ls.unroll(
        loop,
        None,
        30,
        init=torch.tensor([[1.0, -2.0]], dtype=torch.float64),
        halt=Criterion("fp_residual", 0.1, decay=0.5, decay_patience=2, s_min=0.1),
    )
    assert int(online.halted_at[0]) == 9
    # period_residual stops the same 2-cycle at the first e with h_e = h_{e-2}, and reports p = 2
    rep2 = halting.evaluate(tr, {"period_residual": [1e-9]})
    assert rep2.exit_steps("period_residual")[0] == 2
    assert rep2.exits["period"].iloc[0] == 2
    # the plain residual never fires on a cycle
    assert not halting.evaluate(tr, {"residual": [1e-3]}).exits["halted"].iloc[0]


def test_learned_halting_inputs_q_head_ouro_fixed():
    Tn, B = 10, 2
    tr = Trace(states=torch.zeros(Tn + 1, B, 1, dtype=torch.float64))
    q = torch.zeros(Tn + 1, B, 2, dtype=torch.float64)
    q[:, :, 1] = 1.0  # q_cont = 1
    q[3:, 0, 0] = 2.0  # sample 0: q_halt > q_cont from step 3 on; sample 1 never
    lam = torch.full((Tn + 1, B), 0.2, dtype=torch.float64)
    rep = halting.evaluate(tr, {"q_head": [0.0], "ouro_cdf": [0.5], "fixed": [4]}, q=q, gate=lam)
    assert rep.exit_steps("q_head").tolist() == [3, Tn]
    # CDF_e = 1 - 0.8^e >= 0.5  <=>  e >= ln 0.5 / ln 0.8 = 3.1
    assert rep.exit_steps("ouro_cdf").tolist() == [4, 4]
    assert rep.exit_steps("fixed").tolist() == [4, 4]
    # TRM variant: q_halt > 0 on a single channel
    qt = torch.full((Tn + 1, B), -1.0, dtype=torch.float64)
    qt[6:, 1] = 0.5
    rep2 = halting.evaluate(tr, [Criterion("q_head", 0.0, variant="trm")], q=qt)
    assert rep2.exit_steps("q_head").tolist() == [Tn, 6]


def test_predicted_stops_hopeless_runs_and_converging_ones():
    H = closed_form_states()
    tr = trace_of(H)
    # budget 60 is plenty for tol 1e-3 -> stops at the residual crossing
    rep = halting.evaluate(tr, [Criterion("predicted", 1e-3), Criterion("residual", 1e-3)])
    assert rep.exit_steps("predicted")[0] == rep.exit_steps("residual")[0]
    # tol 1e-300 cannot be reached within the budget: stop as soon as κ̄ is known (w + 1 = 6)
    rep2 = halting.evaluate(tr, [Criterion("predicted", 1e-300)])
    assert rep2.exit_steps("predicted")[0] == 6


def test_oracle_agreement_accuracy_and_tradeoff():
    Tn, B = 10, 2
    seq0 = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]  # argmax settles at step 3
    logits = torch.zeros(Tn + 1, B, 3, dtype=torch.float64)
    for t, k in enumerate(seq0):
        logits[t, 0, k] = 1.0
    logits[:, 1, 1] = 1.0  # sample 1: settled from the start
    tr = Trace(states=torch.zeros(Tn + 1, B, 1, dtype=torch.float64), logits=logits)
    rep = halting.evaluate(tr, {"fixed": [2, 5, 10]}, targets=torch.tensor([2, 1]))
    assert rep.oracle.tolist() == [3, 0]
    s = rep.to_frame().set_index("threshold")
    # d = 5: stopped steps 6 + 6, all allowed; allowed steps 8 + 10 -> precision 1, recall 2/3
    assert s.loc[5.0, "oracle_precision"] == 1.0
    assert abs(s.loc[5.0, "oracle_recall"] - 12 / 18) < 1e-12
    assert s.loc[2.0, "safe_rate"] == 0.5 and s.loc[5.0, "safe_rate"] == 1.0
    assert s.loc[2.0, "accuracy"] == 0.5 and s.loc[2.0, "accuracy_delta"] == -0.5
    assert s.loc[2.0, "saturation_gap"] == 0.5  # ((2 - 3) + (2 - 0)) / 2
    assert abs(s.loc[5.0, "compute_saved"] - 0.5) < 1e-12
    tr_df = rep.tradeoff()
    assert tr_df["pareto"].tolist() == [True, True, False]


def test_default_criteria_and_errors():
    loop, x = rnn_loop()
    tr = ls.unroll(loop, x, 20, decode=True)
    rep = halting.evaluate(tr)
    names = set(rep.to_frame()["criterion"])
    assert names == {
        "residual",
        "fp_residual",
        "latent_diff",
        "cosine",
        "kl",
        "minp_kl",
        "entropy_diff",
        "argmax_stable",
        "acceleration",
        "period_residual",
        "predicted",
        "fixed",
    }
    assert len(rep.exits) == len(rep.to_frame()) * 4
    with pytest.raises(LoopscopeError, match="did you mean"):
        Criterion("latent_dif")
    with pytest.raises(LoopscopeError, match="unknown option"):
        Criterion("residual", 1e-3, p_max=3)
    with pytest.raises(LoopscopeError, match="decode=True"):
        halting.evaluate(ls.unroll(loop, x, 5), {"kl": [1e-3]})
    with pytest.raises(LoopscopeError, match="budget"):
        ls.unroll(loop, x, 5, halt=Criterion("predicted", 1e-3))
    with pytest.raises(LoopscopeError, match="thresh"):
        halting.evaluate(tr, {"residual": [1e-3]}, threshold=1)
