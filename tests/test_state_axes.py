"""States of any layout: a Loop declares its state axes; patching, probes and path independence
read positions from them, and an undeclared stacked state is refused instead of guessed."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope.circuits import patch_sweep
from loopscope.core.errors import LoopscopeError
from loopscope.core.layout import position_axis, probe_layout

B, P, D = 2, 5, 3
pytestmark = pytest.mark.usefixtures("one_thread")


def stacked_loop(axes=None):
    """A two-state loop: z_H, z_L ``[B, 2, P, D]``; each position reads the previous one."""
    W = 0.4 * torch.eye(D, dtype=torch.float64)

    def step(h, x):
        zH, zL = h[:, 0], h[:, 1]
        zL = torch.tanh(zL @ W + zH.roll(1, dims=1) * 0.5 + x)
        zH = torch.tanh(zH @ W + zL)
        return torch.stack([zH, zL], 1)

    return ls.FnLoop(
        step=step,
        init_state=lambda x, g: torch.zeros(x.shape[0], 2, P, D, dtype=torch.float64),
        decode=lambda h, x: h[:, 0],
        state_axes=axes,
    )


def metric(out, batch_idx=None):
    return out[:, -1].sum(-1)


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(B, P, D, generator=g, dtype=torch.float64)
    corrupt = clean.clone()
    corrupt[:, 1] = -clean[:, 1]
    return clean, corrupt


def test_an_undeclared_stacked_state_is_refused_by_patching_in_one_line(pair):
    clean, corrupt = pair
    with pytest.raises(LoopscopeError, match="ambiguous; declare it") as e:
        patch_sweep(stacked_loop(), clean, corrupt, ["hook_state"], [1], metric, n_iter=3)
    assert "\n" not in str(e.value) and "state_axes" in str(e.value)


def test_a_declared_stacked_state_is_patched_along_its_positions(pair):
    clean, corrupt = pair
    loop = stacked_loop(("batch", "stack", "pos", "d_model"))
    res = patch_sweep(loop, clean, corrupt, ["hook_state"], [2], metric, n_iter=3)
    f = res.to_frame()
    assert sorted(f["position"].unique().tolist()) == list(range(P))  # positions, not the stack
    # one row equals a hand-made patch of position 3 along axis 2 (both stack entries)
    src = ls.unroll(loop, clean, 3)
    value = src.states[2][:, :, 3]
    tr = ls.unroll(loop, corrupt, 3, decode=True,
                   interventions=[ls.Patch("hook_state", 2, positions=[3],
                                           value=value.unsqueeze(2))])  # fmt: skip
    row = f[(f["position"] == 3) & (f["example"] == 0)]
    assert float(row["metric"].iloc[0]) == pytest.approx(float(metric(tr.logits[-1])[0]))


def test_hook_state_positions_follow_the_declared_axes():
    loop = stacked_loop()
    assert loop.hook_state.pos_dim is None
    loop.state_axes = ("batch", "stack", "pos", "d_model")
    assert loop.hook_state.pos_dim == 2
    x = torch.zeros(B, P, D, dtype=torch.float64)
    tr = ls.unroll(loop, x, 2, interventions=[ls.Add("hook_state", 1, positions=[4], delta=1.0)])
    diff = tr.states[1] - ls.unroll(loop, x, 2).states[1]
    assert bool((diff[:, :, 4] == 1).all()) and float(diff[:, :, :4].abs().sum()) == 0.0


def test_state_axes_declarations_are_checked():
    loop = stacked_loop()
    for bad in [
        "batch",
        ("pos", "batch", "d"),
        ("batch", "pos", "pos", "d"),
        ("batch", "d", "pos"),
    ]:
        with pytest.raises(LoopscopeError, match="state_axes"):
            loop.state_axes = bad
    loop.state_axes = ("batch", "pos", "d_model")
    with pytest.raises(
        LoopscopeError, match=r"names 3 axes but the state has shape \(2, 2, 5, 3\)"
    ):
        position_axis(loop, (2, 2, 5, 3))


def test_the_shipped_models_declare_their_state_axes():
    from loopscope.models import (
        HierarchicalConfig,
        HierarchicalLoopedTransformer,
        LoopedConfig,
        LoopedTransformer,
        build_tiny_hrm_text,
        from_hf,
    )
    from loopscope.models.fam import FAMConfig, FAMTransformer

    ids = torch.randint(0, 5, (2, 8))  # FAM reads whole blocks of 8
    hier = HierarchicalLoopedTransformer(HierarchicalConfig(vocab_size=5, n_classes=4))
    loops = [
        LoopedTransformer(LoopedConfig(vocab_size=5, n_classes=4)),
        hier,
        hier.fast_loop(),
        FAMTransformer(FAMConfig(vocab_size=5, n_classes=4)),
    ]
    hrm = from_hf(build_tiny_hrm_text(seed=0)[0])
    loops += [hrm, hrm.fast_loop()]
    for loop in loops:
        with torch.no_grad():
            h = loop.init_state(loop.encode(ids), torch.Generator().manual_seed(0))
        assert loop.state_axes is not None and len(loop.state_axes) == h.dim(), type(loop)
    assert hier.state_axes == ("batch", "stack", "pos", "d_model") == hrm.state_axes
    assert position_axis(loops[3], (2, 1, 4, 8)) == 2  # FAM: memory slots are its positions


def test_probes_see_one_site_per_stack_entry_with_the_declared_positions():
    from loopscope.probes.activations import collect

    loop = stacked_loop(("batch", "pos", "stack", "d_model"))  # positions before the stack
    loop._fns["init"] = lambda x, g: torch.zeros(x.shape[0], P, 2, D, dtype=torch.float64)
    loop._fns["step"] = lambda h, x: torch.tanh(h + x.unsqueeze(2))
    tr = ls.unroll(loop, torch.randn(B, P, D, dtype=torch.float64), 2)
    acts = collect(tr, sites="state")
    assert sorted({k["site"] for k in acts.keys}) == ["state[0]", "state[1]"]
    assert acts.X.shape[2] == P  # positions, not the stack
    assert torch.equal(acts.get(1, "state[1]", 3), tr.states[1][:, 3, 1])
    tr.loop.state_axes = None
    with pytest.raises(LoopscopeError, match="ambiguous"):
        collect(tr, sites="state")


def test_probe_layout_moves_positions_second_to_last_and_flattens_nothing_else():
    loop = stacked_loop(("batch", "stack", "pos", "d_model"))
    x = torch.randn(3, B, 2, P, D)
    assert torch.equal(probe_layout(loop, x), x)
    loop.state_axes = ("batch", "d_model")
    y = torch.randn(3, B, D)
    assert probe_layout(loop, y).shape == (3, B, 1, D)


def test_path_independence_per_position_counts_positions_not_stack_entries(pair):
    from loopscope.analysis import path_independence

    clean, _ = pair
    loop = stacked_loop(("batch", "stack", "pos", "d_model"))
    res = path_independence(loop, clean, inits=("default", "noise"), n_iter=5, readout=False)
    f = res.to_frame()
    per_pos = f[(f["space"] == "state") & (f["position"] >= 0)]
    assert sorted(per_pos["position"].unique().tolist()) == list(range(P))
    loop.state_axes = None
    with pytest.raises(LoopscopeError, match="ambiguous"):
        path_independence(loop, clean, inits=("default", "noise"), n_iter=5, readout=False)
