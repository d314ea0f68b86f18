"""probes on Traces: collect keys, the disk store (append / resume / atomic / corrupt), planted
iteration-dependent features give the right onset per position, transfer matrices separate a
fixed-point code (block) from a rotating code (diagonal), logit lens, diverged samples, onset
regression on graph depth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import loopscope as ls
from loopscope.core.errors import CheckpointError, LoopscopeError
from loopscope.probes import (
    ActivationStore,
    collect,
    fit_probes,
    logit_lens,
    onset,
    onset_regression,
    probe_trace,
    transfer_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


T, B, P, D = 6, 160, 4, 5
ONSET = [1, 2, 3, 4]  # position p carries its bit from iteration p + 1 on (a wavefront)


def _planted_loop(rotating: bool = False, onset_at=ONSET):
    """State [B, P, D]: noise, plus 3(2z - 1) along e_0 (or e_{t mod D} if rotating) at
    position p once iteration >= onset_at[p]."""

    def step(h, ctx, t):
        g = torch.Generator().manual_seed(100 + t)
        it = t + 1  # this step produces the state of iteration t + 1
        noise = torch.randn(h.shape, generator=g, dtype=h.dtype)
        on = torch.tensor([it >= o for o in onset_at], dtype=h.dtype)  # [P]
        e = torch.zeros(D, dtype=h.dtype)
        e[it % D if rotating else 0] = 3.0
        return noise + (2 * ctx.double() - 1).unsqueeze(-1) * on[:, None] * e

    return ls.FnLoop(step=step, init_state=torch.zeros(P, D, dtype=torch.float64))


def _labels(seed=0):
    return torch.randint(0, 2, (B, P), generator=torch.Generator().manual_seed(seed))


def test_collect_keys_shapes_and_components():
    z = _labels()
    tr = ls.unroll(_planted_loop(), z, T)
    a = collect(tr)
    assert a.X.shape == (T + 1, B, P, D)
    assert [k["iteration"] for k in a.keys] == list(range(T + 1))
    assert torch.equal(a.get(3, "state", 2), tr.states[3, :, 2])
    sub = collect(tr, positions=[-1, 1], iterations=range(2, 5))
    assert sub.positions == [3, 1] and sub.X.shape == (3, B, 2, D)
    assert torch.equal(sub.at_position(3)[0], tr.states[2, :, 3])
    # an HRM-like state [B, 2, pos, d] becomes two sites; a narrower site is zero-padded
    loop2 = ls.FnLoop(
        step=lambda h: 0.5 * h,
        init_state=torch.ones(2, P, D),
        state_axes=("batch", "stack", "pos", "d_model"),  # undeclared: refused, not guessed
    )
    tr2 = ls.unroll(loop2, torch.zeros(3, 1), 2)
    a2 = collect(tr2)
    assert a2.sites == ["state[0]", "state[1]"] and a2.X.shape == (6, 3, P, D)
    with pytest.raises(LoopscopeError, match="was not captured"):
        collect(tr, sites=["hook_nope"])
    with pytest.raises(LoopscopeError, match="out of range"):
        collect(tr, positions=[P])


def test_planted_onset_per_position_and_pooled():
    z = _labels()
    tr = ls.unroll(_planted_loop(), z, T)
    res = fit_probes(tr, z, probe="logistic", seed=0)  # one batched fit: 7 iterations x 4 positions
    assert res.n_sites == (T + 1) * P
    df = res.to_frame(aggregate=True)
    assert {
        "site",
        "iteration",
        "position",
        "fold",
        "probe",
        "train_acc",
        "test_acc",
        "seed",
    } <= set(df.columns)
    on = onset(df, threshold=0.95).to_frame()
    assert on["onset"].tolist() == ONSET
    # before onset the probe is at chance
    pre = df[df["iteration"] < df["position"] + 1]
    assert pre["test_acc"].max() < 0.75
    # pooled over positions: accuracy rises step by step as more positions carry their bit
    pooled = fit_probes(tr, z, probe="logistic", pooled=True, seed=0).to_frame(aggregate=True)
    acc = pooled.sort_values("iteration")["test_acc"].to_numpy()
    assert (pooled["position"] == -1).all()
    assert acc[0] < 0.6 and acc[-1] > 0.95 and np.all(np.diff(acc[1:]) > -0.03)


def test_selectivity_onset_on_a_trace():
    # control: a random bit per (position, sequence mod 20) type — the state does not carry it
    from loopscope.probes import control_task, selectivity

    z = _labels()
    tr = ls.unroll(_planted_loop(), z, T)
    types = torch.stack(
        [torch.arange(P).expand(B, P), (torch.arange(B) % 20)[:, None].expand(B, P)], -1
    )
    ctrl = control_task(types, z, seed=0)
    task = fit_probes(tr, z, probe="logistic", seed=0)
    control = fit_probes(tr, ctrl, probe="logistic", seed=0)
    sel = selectivity(task, control, n_boot=200)
    df = sel.to_frame()
    assert {"iteration", "position", "task_acc", "selectivity", "ci_low"} <= set(df.columns)
    on = onset(df, threshold=0.95, min_selectivity=0.3, acc="task_acc").to_frame()
    assert on["onset"].tolist() == ONSET
    assert df[df["iteration"] >= 5]["selectivity"].min() > 0.3


def test_onset_requires_selectivity_when_asked():
    df = pd.DataFrame(
        {
            "position": [0] * 4,
            "iteration": [1, 2, 3, 4],
            "test_acc": [0.95, 0.96, 0.97, 0.98],
            "selectivity": [0.0, 0.05, 0.3, 0.4],
        }
    )
    assert onset(df, 0.9).to_frame()["onset"].tolist() == [1]
    assert onset(df, 0.9, min_selectivity=0.2).to_frame()["onset"].tolist() == [3]
    assert onset(df, 0.99).to_frame()["onset"].tolist() == [-1]
    with pytest.raises(LoopscopeError, match="lacks column"):
        onset(df.drop(columns="selectivity"), 0.9, min_selectivity=0.2)


def test_onset_regression_on_graph_depth():
    # onset = 2 * depth + 1 exactly, one variable never reaches threshold (left out)
    on = pd.DataFrame({"position": [0, 1, 2, 3, 4], "onset": [1, 3, 5, 7, -1]})
    reg = onset_regression(on, {0: 0, 1: 1, 2: 2, 3: 3, 4: 4})
    assert reg.n == 4 and abs(reg.slope - 2) < 1e-12 and abs(reg.intercept - 1) < 1e-12
    assert abs(reg.r - 1) < 1e-12
    assert reg.to_frame()["slope"].iloc[0] == pytest.approx(2.0)
    with pytest.raises(LoopscopeError, match="need >= 3"):
        onset_regression(on.iloc[:2], {0: 0, 1: 1})


def test_transfer_block_for_fixed_code_and_diagonal_for_rotating_code():
    z = _labels(1)
    for rotating in (False, True):
        tr = ls.unroll(_planted_loop(rotating, onset_at=[2] * P), z, T)
        X = tr.states[2:, :, 0]  # iterations 2..T at position 0: [5, B, D]
        y = z[:, 0]
        res = fit_probes(X, y, probe="logistic", seed=0)
        M = transfer_matrix(res, X, y)
        assert np.allclose(np.diag(M.acc), res.test_acc[0].numpy())
        off = M.acc[~np.eye(len(M.acc), dtype=bool)]
        if rotating:  # each iteration uses a new direction: only the diagonal decodes
            assert np.diag(M.acc).min() > 0.95 and off.max() < 0.75
        else:  # the same direction from the onset on: the whole block decodes
            assert M.acc.min() > 0.95
    df = M.to_frame()
    assert len(df) == 25 and {"train_site", "test_site", "acc"} <= set(df.columns)


def test_logit_lens_per_iteration_accuracy():
    # decode reads coordinate 0; the right answer appears there from iteration 2 on
    z = _labels(2)[:, :1]

    def step(h, ctx, t):
        return h + (t == 1) * 2.0 * (2 * ctx.double() - 1).unsqueeze(-1)

    def decode(h, ctx):
        return torch.stack([-h[..., 0], h[..., 0]], -1)

    loop = ls.FnLoop(
        step=step, init_state=torch.full((1, 1), -0.5, dtype=torch.float64), decode=decode
    )
    tr = ls.unroll(loop, z, 4)
    lens = logit_lens(tr, z)
    zero_frac = float((z == 0).double().mean())
    assert np.allclose(lens.accuracy, [zero_frac, zero_frac, 1, 1, 1])
    df = lens.to_frame()
    assert set(df["position"]) == {-1, 0} and len(df) == 10
    with pytest.raises(LoopscopeError, match="targets must be"):
        logit_lens(tr, z[:5])


def test_diverged_samples_are_excluded_not_fatal():
    z = _labels(3)

    def step(h, ctx, t):  # samples 0..9 blow up at iteration 2
        out = h + (2 * ctx.double() - 1).unsqueeze(-1)
        bad = torch.zeros(h.shape[0], dtype=torch.bool)
        bad[:10] = t == 1
        return torch.where(bad[:, None, None], torch.full_like(h, float("nan")), out)

    tr = ls.unroll(ls.FnLoop(step=step, init_state=torch.zeros(P, D, dtype=torch.float64)), z, 3)
    assert (tr.diverged_at[:10] == 2).all()
    res = fit_probes(tr, z, probe="ridge", iterations=[3], seed=0)
    assert res.meta["n_diverged_excluded"] == 10
    assert (res.n_train[0] + res.n_test[0] == B - 10).all() and res.accuracy.min() == 1.0


def test_probe_trace_quick_path_frame():
    z = _labels()
    tr = ls.unroll(_planted_loop(), z, T)
    df = probe_trace(tr, z, pooled=False, seed=0).to_frame()
    assert sorted(df["iteration"].unique()) == list(range(1, T + 1))  # states after each step
    assert onset(df, threshold=0.95).to_frame()["onset"].tolist() == ONSET


def test_activation_store_append_resume_and_corruption(tmp_path):
    z = _labels()
    sets = [collect(ls.unroll(_planted_loop(), z[i : i + 40], T)) for i in range(0, B, 40)]
    st = ActivationStore(tmp_path / "acts", meta={"model": "planted", "seed": 0})
    st.append_set(0, sets[0])
    st.append_set(1, sets[1])
    # an interrupted writer leaves only a *.tmp file, which is never read
    (tmp_path / "acts" / "chunk-000002.safetensors.tmp").write_bytes(b"partial")
    st2 = ActivationStore(tmp_path / "acts", meta={"model": "planted", "seed": 0})  # resume
    assert st2.done() == [0, 1]
    for i in range(len(sets)):
        if i not in st2.done():
            st2.append_set(i, sets[i])
    full = st2.load_set()
    ref = torch.cat([s.X for s in sets], 1)
    assert torch.equal(full.X, ref)  # chunks concatenate along the batch axis, in chunk order
    assert full.keys == sets[0].keys and full.meta["model"] == "planted"
    assert ("state", 3, 0) in st2 and ("state", 99, 0) not in st2
    with pytest.raises(LoopscopeError, match="already stored"):
        st2.append_set(0, sets[0])
    with pytest.raises(LoopscopeError, match="was written with meta"):
        ActivationStore(tmp_path / "acts", meta={"model": "other"})
    with pytest.raises(LoopscopeError, match="share the batch size"):
        st2.append(9, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    # probes fitted from the store equal probes fitted on the in-memory activations
    a = fit_probes(full, z, probe="ridge", seed=0)
    b = fit_probes(ref.permute(0, 2, 1, 3).reshape(-1, B, D), z.T.repeat(T + 1, 1), probe="ridge")
    assert np.allclose(a.accuracy, b.accuracy)
    (tmp_path / "acts" / "index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted store index"):
        ActivationStore(tmp_path / "acts")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(CheckpointError, match="not a loopscope activation store"):
        ActivationStore(tmp_path / "bad")


def test_trace_fit_bad_inputs():
    z = _labels()
    tr = ls.unroll(_planted_loop(), z, 2)
    with pytest.raises(LoopscopeError, match="targets must be"):
        fit_probes(tr, z[:10])
    with pytest.raises(LoopscopeError, match="unknown option 'pooling'"):
        fit_probes(tr, z, pooling=True)
    with pytest.raises(LoopscopeError, match="unknown option 'groups'"):
        fit_probes(tr, z, groups=np.arange(B))
