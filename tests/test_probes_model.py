"""probes on a real (tiny, untrained) LoopedTransformer: the plumbing from a Trace to the
probes must agree with hand-extracted tensors.

* ``collect`` keys and values equal ``trace[hook]`` / ``trace.states`` indexed by hand;
* ``fit_probes(trace, targets)`` (one batched solve over iterations x sites x positions) gives,
  for every probe, the same accuracies as ``fit_probes`` on the hand-extracted ``[N, d]`` slice;
* ``logit_lens`` equals argmax of ``model.decode(h_t)`` per iteration, and its accuracy frame
  equals a hand count;
* ``steer`` on ``hook_state`` with set-projection leaves iterations before the edit bit-identical
  and sets the projection on the edited state to ``c`` exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope.models import build, preset
from loopscope.probes import collect, fit_probes, logit_lens, steer

HOOKS = ["core.blocks.0.hook_resid_post", "core.blocks.1.mlp.hook_post"]
B, P, T = 96, 5, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = preset("fprm", vocab_size=9, n_classes=5, d_model=16, d_mlp=32, n_core=2)
    return build(cfg).double().eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 9, (B, P), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def trace(model, tokens):
    return ls.unroll(model, tokens, T, capture=HOOKS, seed=0)


def test_collect_keys_and_values_match_the_trace(trace):
    aset = collect(trace, positions=[0, -1])
    assert aset.positions == [0, P - 1]
    assert aset.sites == ["state", *HOOKS]
    # state: iterations 0..T; hooks: one firing per iteration each (one block per hook name)
    state_its = [k["iteration"] for k in aset.keys if k["site"] == "state"]
    assert state_its == list(range(T + 1))
    for hook in HOOKS:
        keys = [(k["iteration"], k["firing"]) for k in aset.keys if k["site"] == hook]
        assert keys == [tuple(lab) for lab in trace.labels[hook]]
    for t in range(T + 1):
        assert torch.equal(aset.get(t, "state", P - 1), trace.states[t, :, P - 1])
    for i, (t, k) in enumerate(trace.labels[HOOKS[1]]):
        got = aset.get(t, HOOKS[1], 0, firing=k)
        assert torch.equal(got, trace[HOOKS[1]][i, :, 0])
        assert got.shape[-1] == 32  # d_mlp neurons, not padded in get()


def test_trace_fit_equals_hand_sliced_fits(trace, tokens):
    # target: is the current token > 4 (binary), labelled at every position
    targets = (tokens > 4).long()
    res = fit_probes(trace, targets, sites=["state", HOOKS[0]], probe="ridge", alpha=1.0, seed=3)
    df = res.to_frame()
    assert {"site", "iteration", "position", "test_acc", "train_acc", "seed"} <= set(df.columns)
    assert (df["seed"] == 3).all()
    # every probe's numbers equal a single-site fit on the hand-extracted slice
    checked = 0
    for s, lab in enumerate(res.site_labels):
        if lab["iteration"] not in (0, T) or lab["position"] not in (0, P - 1):
            continue
        if lab["site"] == "state":
            X = trace.states[lab["iteration"], :, lab["position"]]
        else:
            j = [tuple(x) for x in trace.labels[HOOKS[0]]].index((lab["iteration"], 0))
            X = trace[HOOKS[0]][j, :, lab["position"]]
        ref = fit_probes(X.unsqueeze(0), targets[:, lab["position"]], probe="ridge", seed=3)
        assert float(res.test_acc[0, s]) == pytest.approx(float(ref.test_acc[0, 0]), abs=1e-12)
        assert float(res.train_acc[0, s]) == pytest.approx(float(ref.train_acc[0, 0]), abs=1e-12)
        checked += 1
    assert checked >= 6  # state (T+1 its) and the hook (T its) at two positions, filtered


def test_logit_lens_matches_manual_decode(model, trace, tokens):
    targets = tokens % 5
    targets[:, 0] = -100  # unlabelled position is excluded from every count
    lens = logit_lens(trace, targets)
    assert lens.argmax.shape == (T + 1, B, P)
    m = targets != -100
    for t in range(T + 1):
        ref = model.decode(trace.states[t], trace.ctx).argmax(-1)
        assert torch.equal(lens.argmax[t], ref)
        want = float(((ref == targets) & m).sum()) / float(m.sum())
        assert lens.accuracy[t] == pytest.approx(want, abs=1e-12)
    df = lens.to_frame()
    pooled = df[df["position"] == -1]["accuracy"].to_numpy()
    np.testing.assert_allclose(pooled, lens.accuracy, atol=1e-12)
    assert 0 not in set(df["position"])  # position 0 had no labels


def test_steer_set_projection_on_a_real_model(model, tokens):
    d = 16
    u = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = u / u.norm()
    r = steer(model, tokens, n_iter=T, iteration=2, direction=u, value=5.0)
    clean, edited = r.clean, r.edited
    # iterations before the edit are bit-identical
    assert torch.equal(clean.states[:2], edited.states[:2])
    # the state entering step 2 is edited; its successor carries the edit, so states[3] moves
    assert not torch.equal(clean.states[3], edited.states[3])
    # re-run the edited step by hand: states[3] = step(set_projection(states[2]))
    h2 = clean.states[2]
    h2e = h2 - (h2 @ u).unsqueeze(-1) * u + 5.0 * u
    assert torch.allclose((h2e @ u), torch.full_like(h2e[..., 0], 5.0), atol=1e-12)
    ref = model.step(h2e, clean.ctx, 2)
    assert torch.allclose(edited.states[3], ref, atol=1e-10)
    assert r.clean_out.shape == r.edited_out.shape == (B, P)
