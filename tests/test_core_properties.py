"""Property-based tests (hypothesis) of the core: interventions are local in time, capture never
aliases model memory, unroll is deterministic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformer_lens.hook_points import HookPoint

import loopscope as ls


class InPlaceLoop(ls.Loop):
    """A step that writes into its hooked activation in place after the hook (capture.md pitfall 4)."""

    def __init__(self, d: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(d, d, generator=g, dtype=torch.float64) * 0.4)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.setup()

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        x = self.hook_pre(h + ctx)
        x += torch.tanh(x @ self.W)  # in place, after the hook fired
        return self.hook_post(x)


loops = st.builds(InPlaceLoop, d=st.integers(2, 6), seed=st.integers(0, 10_000))


@settings(max_examples=25, deadline=None)
@given(loop=loops, T=st.integers(2, 8), data=st.data())
def test_patch_at_t_is_local_in_time(loop, T, data):
    t = data.draw(st.integers(0, T - 1))
    d = loop.W.shape[0]
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
    clean = ls.unroll(loop, x, T, capture=["hook_pre", "hook_post"])
    value = torch.full((3, d), 0.25, dtype=torch.float64)
    pt = ls.unroll(
        loop,
        x,
        T,
        capture=["hook_pre", "hook_post"],
        interventions=[ls.Patch("hook_pre", t, value=value)],
    )
    assert torch.equal(pt["hook_pre"][:t], clean["hook_pre"][:t])
    assert torch.equal(pt["hook_post"][:t], clean["hook_post"][:t])
    assert torch.equal(pt.states[: t + 1], clean.states[: t + 1])
    assert torch.equal(pt["hook_pre"][t], value)


@settings(max_examples=25, deadline=None)
@given(loop=loops, T=st.integers(1, 6))
def test_recorded_values_are_not_corrupted_by_in_place_ops(loop, T):
    d = loop.W.shape[0]
    x = torch.randn(2, d, dtype=torch.float64)
    tr = ls.unroll(loop, x, T, capture=["hook_pre"])
    h = torch.zeros(2, d, dtype=torch.float64)
    for t in range(T):
        pre = h + x
        assert torch.equal(tr["hook_pre"][t], pre)  # the value at hook time, not after `x +=`
        h = pre + torch.tanh(pre @ loop.W.detach())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 5))
def test_unroll_is_deterministic_with_seeded_random_init(seed, T):
    loop = ls.FnLoop(
        step=lambda h, x: torch.tanh(h + x),
        init_state=lambda ctx, g: torch.randn(ctx.shape, generator=g, dtype=ctx.dtype),
    )
    x = torch.randn(4, 3, dtype=torch.float64)
    a = ls.unroll(loop, x, T, seed=seed)
    b = ls.unroll(loop, x, T, seed=seed)
    assert torch.equal(a.states, b.states)


def test_patch_positions_only_touch_selected_positions():
    loop = ls.FnLoop(
        step=lambda h, x: 0.5 * h + x, init_state=torch.zeros(4, 2, dtype=torch.float64)
    )
    x = torch.randn(2, 4, 2, dtype=torch.float64)
    clean = ls.unroll(loop, x, 3)
    pt = ls.unroll(loop, x, 3, interventions=[ls.Zero("hook_state", 2, positions=[1, 3])])
    assert torch.equal(pt.states[2][:, [0, 2]], clean.states[2][:, [0, 2]])
    assert (pt.states[2][:, [1, 3]] == 0).all()


def test_add_and_mean_ablate():
    loop = ls.FnLoop(step=lambda h, x: h + x, init_state=torch.zeros(2, dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    a = ls.unroll(
        loop,
        x,
        2,
        interventions=[
            ls.Add("hook_state", 1, delta=torch.tensor([10.0, 0.0], dtype=torch.float64))
        ],
    )
    assert a.states[1].tolist() == [[11.0, 2.0], [13.0, 4.0]]
    m = ls.unroll(loop, x, 2, interventions=[ls.MeanAblate("hook_state", 1)])
    assert m.states[1].tolist() == [[2.0, 3.0], [2.0, 3.0]]
