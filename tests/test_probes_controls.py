"""probes.controls: Hewitt–Liang control tasks (one label per type, empirical marginals), type
keys, selectivity with paired bootstrap CIs; golden #24 (planted-feature selectivity (a), (b), (c)
with an L2-logistic C = 1 probe and a 1 x 256 MLP — the MLP erases selectivity in (c))."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.probes import control_task, fit_probes, selectivity, type_keys

pytestmark = pytest.mark.usefixtures("one_thread")


def test_control_task_one_label_per_type_with_empirical_marginals():
    rng = np.random.default_rng(0)
    types = torch.as_tensor(rng.integers(0, 2000, size=20000))
    labels = torch.as_tensor(rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1], size=20000))
    labels[:50] = -100
    c = control_task(types, labels, seed=1)
    assert (c[:50] == -100).all() and c.shape == labels.shape
    for t in torch.unique(types[50:])[:200]:  # deterministic per type
        vals = torch.unique(c[50:][types[50:] == t])
        assert vals.numel() == 1
    # per-type labels follow the empirical label distribution (2000 types: +- 0.035)
    first = {int(t): int(v) for t, v in zip(types[50:], c[50:], strict=True)}
    freq = np.bincount(list(first.values()), minlength=3) / len(first)
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.035)
    assert torch.equal(c, control_task(types, labels, seed=1))
    assert not torch.equal(c, control_task(types, labels, seed=2))


def test_control_task_tuple_types_and_pluggable_key():
    tokens = torch.tensor([[1, 2, 1, 2], [2, 1, 1, 2]])
    labels = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 1]])
    tk = type_keys(tokens, "token")
    assert torch.equal(tk == tk[0, 0], tokens == 1)
    pt = type_keys(tokens, "position_token")
    assert pt.unique().numel() == 6  # (position, token) pairs present
    win = type_keys(tokens, "window", width=2)  # (previous token, token)
    assert win[0, 1] == win[0, 3] == win[1, 3]  # (1, 2)
    assert win[0, 2] == win[1, 1] != win[0, 1]  # (2, 1)
    assert win[0, 0] != win[1, 0]  # (-, 1) vs (-, 2)
    inp = type_keys(tokens, "input")
    assert inp[0].unique().numel() == 1 and inp[0, 0] != inp[1, 0]
    # tuple types (extra trailing axis) and a key function that merges everything into one type
    pairs = torch.stack([torch.arange(4).expand(2, 4), tokens], -1)
    for seed in range(5):
        c = control_task(pairs, labels, seed=seed)
        assert c[0, 2] == c[1, 2] and c[0, 3] == c[1, 3]  # same (position, token)
        by_token = control_task(pairs, labels, seed=seed, key=lambda t: t[1])
        for tok in (1, 2):
            assert by_token[tokens == tok].unique().numel() == 1
    one = control_task(tokens, labels, seed=0, key=lambda t: 0)
    assert one.unique().numel() == 1
    with pytest.raises(LoopscopeError, match="types must have the labels' shape"):
        control_task(tokens[:, :3], labels)
    with pytest.raises(LoopscopeError, match="unknown type kind"):
        type_keys(tokens, "bigram")


def _golden24(seed=0):
    g = torch.Generator().manual_seed(seed)
    n_types, d, N = 200, 64, 8000
    types = torch.randint(0, n_types, (N,), generator=g)
    z = torch.randint(0, 2, (N,), generator=g)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    w = w / w.norm()
    E = torch.randn(n_types, d, generator=g, dtype=torch.float64)
    s = (2 * z - 1).double()[:, None]
    type_bit = torch.randint(0, 2, (n_types,), generator=g)[types]  # (b)'s task label

    def noise():
        return torch.randn(N, d, generator=g, dtype=torch.float64)

    X = {
        "a": 3 * s * w + noise(),
        "b": 2 * E[types] + 0.5 * noise(),
        "c": 3 * s * w + 2 * E[types] + noise(),
    }
    y = {"a": z, "b": type_bit, "c": z}
    ctrl = control_task(types, z, seed=seed + 1)  # a random bit per type
    return X, y, ctrl


def test_golden24_planted_feature_selectivity():
    X, y, ctrl = _golden24()
    cases = ["a", "b", "c"]
    Xs = torch.stack([X[c] for c in cases])  # [3, 8000, 64]: all cases in one batched fit
    ys = torch.stack([y[c] for c in cases])
    split = (torch.arange(6000), torch.arange(6000, 8000))  # first 6000 tokens train
    labels = [{"case": c} for c in cases]
    lin = selectivity(
        Xs, ys, ctrl, probe="logistic", C=1.0, split=split, site_labels=labels, n_boot=300
    )
    mlp = selectivity(
        Xs,
        ys,
        ctrl,
        probe="mlp",
        hidden=256,
        epochs=15,
        lr=1e-2,
        batch_size=500,
        split=split,
        site_labels=labels,
        n_boot=300,
    )
    la, lc, ls_ = lin.task_acc, lin.control_acc, lin.selectivity
    # (a) linear: task >= 0.98, control 0.5 +- 0.05, selectivity >= 0.40; MLP selectivity >= 0.40
    assert la[0] >= 0.98 and abs(lc[0] - 0.5) <= 0.05 and ls_[0] >= 0.40
    assert mlp.selectivity[0] >= 0.40
    # (b) the label is itself a per-type bit: |selectivity| <= 0.05; MLP memorises both (1.0)
    assert abs(ls_[1]) <= 0.05 and abs(mlp.selectivity[1]) <= 0.05
    assert 0.6 < la[1] < 0.8 and mlp.task_acc[1] >= 0.99 and mlp.control_acc[1] >= 0.99
    # (c) linear keeps selectivity >= 0.20; the MLP memorises the types and erases it (<= 0.05)
    assert ls_[2] >= 0.20 and mlp.selectivity[2] <= 0.05
    # paired bootstrap CIs bracket the point estimate; the frame is tidy
    assert np.all(lin.ci_low <= ls_ + 1e-12) and np.all(ls_ <= lin.ci_high + 1e-12)
    assert lin.ci_low[0] > 0.35 and lin.ci_high[1] - lin.ci_low[1] < 0.1
    df = lin.to_frame()
    assert df["case"].tolist() == cases and {
        "task_acc",
        "control_acc",
        "selectivity",
        "ci_low",
    } <= set(df.columns)


def test_selectivity_from_two_results_equals_joint_fit_and_checks_split():
    X, y, ctrl = _golden24(seed=3)
    Xa = X["a"][:2000].unsqueeze(0)
    ya, ca = y["a"][:2000], ctrl[:2000]
    t = fit_probes(Xa, ya, probe="ridge", seed=4)
    c = fit_probes(Xa, ca, probe="ridge", seed=4)
    two = selectivity(t, c, n_boot=200)  # bootstrap seed defaults to the fit seed
    joint = selectivity(Xa, ya, ca, probe="ridge", seed=4, n_boot=200)
    assert np.allclose(two.selectivity, joint.selectivity)
    assert np.allclose(two.ci_low, joint.ci_low)
    other = fit_probes(Xa, ca, probe="ridge", seed=5)
    with pytest.raises(LoopscopeError, match="share sites, examples and split"):
        selectivity(t, other)
    with pytest.raises(LoopscopeError, match="unknown option"):
        selectivity(Xa, ya, ca, n_bootstrap=10)
    with pytest.raises(LoopscopeError, match="ci must lie"):
        selectivity(t, c, ci=1.5)
