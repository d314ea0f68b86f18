"""probes.inductive_bias: golden #23 (constant / merge / split / oracle / random extrapolations
with the stated values), the pair-count formulas against a brute-force upper-triangle pair loop,
and the white-noise protocol with a linear head on state-like and q-like representations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.probes import inductive_bias, inductive_bias_probe, white_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden23(seed=0):
    rng = np.random.default_rng(seed)
    S, M, K = 10, 400, 200
    state = rng.integers(0, S, M)
    q = state // 2
    nuisance = rng.integers(0, 2, M)
    models = {
        "oracle": rng.integers(0, 2, (K, S))[:, state],
        "constant": np.zeros((K, M), dtype=np.int64),
        "random": rng.integers(0, 2, (K, M)),
        "merge": rng.integers(0, 2, (K, S // 2))[:, q],
        "split": rng.integers(0, 2, (K, S, 2))[:, state, nuisance],
    }
    return models, state, q


def test_golden23_inductive_bias_values():
    models, state, q = _golden23()
    names = list(models)
    res = inductive_bias(
        np.stack([models[n] for n in names]), state, q=q, site_labels=[{"model": n} for n in names]
    )
    v = {n: {m: res.value(m, i) for m in res.metrics} for i, n in enumerate(names)}
    exact, tol = 1e-12, 0.03
    c = v["constant"]
    assert c["R_raw"] == pytest.approx(1, abs=exact) and c["D_raw"] == pytest.approx(0, abs=exact)
    assert c["D_q_eq_raw"] == pytest.approx(0, abs=exact)
    m = v["merge"]
    assert m["R_raw"] == pytest.approx(1, abs=exact) and m["D_q_eq_raw"] == pytest.approx(
        0, abs=exact
    )
    assert m["D_raw"] == pytest.approx(0.442, abs=tol) and m["D_norm"] == pytest.approx(
        0.884, abs=tol
    )
    assert m["D_q_neq_raw"] == pytest.approx(0.5, abs=tol)
    s = v["split"]
    assert s["R_raw"] == pytest.approx(0.744, abs=tol) and s["R_norm"] == pytest.approx(
        0.5, abs=tol
    )
    o = v["oracle"]
    assert o["R_raw"] == pytest.approx(1, abs=exact) and o["D_raw"] == pytest.approx(0.5, abs=tol)
    assert o["D_norm"] == pytest.approx(1, abs=0.05)
    r = v["random"]
    assert r["R_norm"] == pytest.approx(0, abs=tol) and r["D_norm"] == pytest.approx(1, abs=tol)
    # merge extrapolates by q, not by state: D_q= far below D_q!=
    assert m["D_q_eq_raw"] < m["D_q_neq_raw"] - 0.4
    # tidy frame with raw and normalised names, mean +- stderr over the 200 datasets
    df = res.to_frame()
    assert set(df["metric"]) == {
        "R_raw",
        "R_norm",
        "D_raw",
        "D_norm",
        "D_q_eq_raw",
        "D_q_eq_norm",
        "D_q_neq_raw",
        "D_q_neq_norm",
    }
    assert (df["n_datasets"] == 200).all()
    se = res.stderr("D_raw", names.index("oracle"))
    assert 0 < se < 0.01


def _brute(pred, state, q):
    same, diff, deq, dneq = [], [], [], []
    for i, j in itertools.combinations(range(len(state)), 2):
        agree = pred[i] == pred[j]
        if state[i] == state[j]:
            same.append(agree)
        else:
            diff.append(not agree)
            (deq if q[i] == q[j] else dneq).append(not agree)
    return np.mean(same), np.mean(diff), np.mean(deq), np.mean(dneq)


def test_pair_counts_equal_brute_force_pairs():
    rng = np.random.default_rng(3)
    M = 40
    state = rng.integers(0, 6, M)
    q = rng.integers(0, 3, M)  # a coarsening that is NOT a function of the state
    preds = rng.integers(0, 3, (5, M))  # non-binary predictions too
    res = inductive_bias(preds, state, q=q)
    for k in range(5):
        ref = _brute(preds[k], state, q)
        got = [res.per_dataset[m][0, k] for m in ("R_raw", "D_raw", "D_q_eq_raw", "D_q_neq_raw")]
        assert np.allclose(got, ref, atol=1e-12)


def test_white_noise_protocol_with_a_linear_head():
    rng = np.random.default_rng(0)
    n_states, N = 10, 600
    state = rng.integers(0, n_states, N)
    q = state // 2
    eye = np.eye(n_states)
    state_rep = eye[state] + 0.05 * rng.standard_normal((N, n_states))  # encodes the state
    q_rep = eye[q * 2] + 0.05 * rng.standard_normal((N, n_states))  # encodes only q = state // 2
    X = torch.as_tensor(np.stack([state_rep, q_rep]))  # two "iterations"
    res = inductive_bias_probe(
        X,
        state,
        q=q,
        n_datasets=40,
        n_train=100,
        seed=1,
        site_labels=[{"iteration": 1}, {"iteration": 2}],
    )
    assert res.value("R_raw", 0) > 0.97 and res.value("D_norm", 0) > 0.85
    # the q-only representation cannot separate q-siblings: where their white-noise bits
    # conflict the head sits at ~50/50 and noise decides, so R drops and D_q= << D_q!=
    assert res.value("D_q_eq_raw", 1) < 0.25
    assert res.value("D_q_neq_raw", 1) - res.value("D_q_eq_raw", 1) > 0.2
    assert res.value("R_raw", 1) < res.value("R_raw", 0) - 0.1
    assert res.value("D_q_eq_raw", 0) > 0.4  # the state representation separates q-siblings
    df = res.to_frame()
    assert set(df["iteration"]) == {1, 2} and (df["seed"] == 1).all()
    # white noise: one uniform bit per state per dataset
    y = white_noise(state, 300, seed=0)
    assert all(torch.unique(y[k][torch.as_tensor(state) == 3]).numel() == 1 for k in range(20))
    assert abs(float(y.double().mean()) - 0.5) < 0.03


def test_inductive_bias_bad_inputs():
    with pytest.raises(LoopscopeError, match="states must be"):
        inductive_bias(np.zeros((3, 10)), np.zeros(9))
    with pytest.raises(LoopscopeError, match="preds must be"):
        inductive_bias(np.zeros(10), np.zeros(10))
    with pytest.raises(LoopscopeError, match="unknown metric"):
        inductive_bias(np.zeros((3, 10)), np.arange(10) % 2).value("R_nrm")
    with pytest.raises(LoopscopeError, match="exceeds the training pool"):
        inductive_bias_probe(np.zeros((20, 3)), np.arange(20) % 2, n_train=50)

    def bad_learner(Xtr, ytr, Xev):
        return torch.zeros(3)

    with pytest.raises(LoopscopeError, match="learner must return"):
        inductive_bias_probe(
            np.random.default_rng(0).standard_normal((40, 3)),
            np.arange(40) % 2,
            n_train=5,
            n_datasets=2,
            learner=bad_learner,
        )
