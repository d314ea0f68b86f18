"""nnsight as an anchor for every-iteration capture (skipped without nnsight): its ``tracer.iter``
saves equal loopscope's firings, and the pitfall a plain Python loop falls into inside its trace
(every read is firing 0) is one loopscope does not have."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

import loopscope as ls

nnsight = pytest.importorskip("nnsight")


class TinyLoop(ls.Loop):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) * 0.5)
        self.hook_out = HookPoint()
        self.setup()

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        return self.hook_out(torch.tanh(self.lin(h) + ctx))


T = 5


def _setup():
    model = TinyLoop().eval()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    return model, x, nnsight.NNsight(model)


def test_nnsight_iter_save_equals_loopscope_every_firing():
    model, x, wrapped = _setup()
    saved = []
    with torch.no_grad(), wrapped.trace(x, T) as tracer:
        for _ in tracer.iter[:T]:
            saved.append(wrapped.hook_out.output.save())
    tr = ls.unroll(model, x, T, capture="hook_out")
    assert len(saved) == T
    assert torch.equal(torch.stack(saved), tr["hook_out"])


def test_plain_loop_in_nnsight_trace_reads_firing_zero_every_time_loopscope_does_not():
    model, x, wrapped = _setup()
    saved = []
    with torch.no_grad(), wrapped.trace(x, T):
        for _ in range(T):  # no tracer.iter: every read binds to the first firing
            saved.append(wrapped.hook_out.output.save())
    tr = ls.unroll(model, x, T, capture="hook_out")
    fired = tr["hook_out"]
    assert all(torch.equal(s, fired[0]) for s in saved)  # T copies of firing 0
    assert all(not torch.equal(fired[t], fired[0]) for t in range(1, T))  # distinct per iteration
    assert tr.labels["hook_out"] == [(t, 0) for t in range(T)]
