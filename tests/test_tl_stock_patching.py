"""Stock TransformerLens patching on a looped model silently patches EVERY loop step with the
clean run's LAST value; loopscope patches one iteration. On an unrolled layout (one physical
block per iteration, weights shared) stock TL agrees exactly with loopscope's per-iteration sweep.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.patching import get_act_patch_resid_pre

import loopscope as ls

T, D, V, P = 4, 8, 5, 6


class Shared(nn.Module):
    """The weight-tied block's parameters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Parameter(torch.randn(V, D, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5)
        self.M = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5)
        self.U = nn.Parameter(torch.randn(D, 2, generator=g, dtype=torch.float64))


def block_fn(p: Shared, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    mixed = (
        x + torch.cumsum(x, dim=1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
    )  # causal mixing
    return torch.tanh(mixed @ p.W + e @ p.M)


class HookedBlock(nn.Module):
    def __init__(self, p: Shared) -> None:
        super().__init__()
        object.__setattr__(self, "p", p)
        self.hook_resid_pre = HookPoint()

    def forward(self, x, e):
        return block_fn(self.p, self.hook_resid_pre(x), e)


class PhysicalLooped(ls.Loop):
    """One physical block ``blocks.0`` run T times (the layout of Ouro / looped bridges)."""

    def __init__(self, p: Shared) -> None:
        super().__init__()
        self.p = p
        self.blocks = nn.ModuleList([HookedBlock(p)])
        self.cfg = SimpleNamespace(n_layers=1, n_heads=1, device="cpu", n_key_value_heads=None)
        self.setup()

    def encode(self, tokens):
        return self.p.embed[tokens]

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        return self.blocks[0](h, ctx)

    def decode(self, h, ctx):
        return h @ self.p.U

    def forward(self, tokens, n_iter=T, h0=None):  # TL calls model(tokens)
        return super().forward(tokens, n_iter, h0)


class Unrolled(HookedRootModule):
    """T physical blocks ``blocks.{t}`` sharing one set of weights: iteration IS the layer axis."""

    def __init__(self, p: Shared) -> None:
        super().__init__()
        self.p = p
        self.blocks = nn.ModuleList([HookedBlock(p) for _ in range(T)])
        self.cfg = SimpleNamespace(n_layers=T, n_heads=1, device="cpu", n_key_value_heads=None)
        self.setup()

    def forward(self, tokens):
        e = self.p.embed[tokens]
        h = torch.zeros_like(e)
        for blk in self.blocks:
            h = blk(h, e)
        return h @ self.p.U


def logit_diff(logits):
    return (logits[:, -1, 0] - logits[:, -1, 1]).mean()


def setup():
    p = Shared()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (3, P), generator=g)
    corrupt = torch.randint(0, V, (3, P), generator=g)
    return p, clean, corrupt


def test_stock_tl_patches_every_iteration_with_the_last_clean_value():
    p, clean, corrupt = setup()
    model = PhysicalLooped(p).eval()
    _, cache = model.run_with_cache(clean)
    with torch.no_grad():
        stock = get_act_patch_resid_pre(model, corrupt, cache, logit_diff)  # [1, P]
    clean_tr = ls.unroll(model, clean, T, capture=["blocks.0.hook_resid_pre"])
    last = clean_tr["blocks.0.hook_resid_pre"][-1]
    assert torch.equal(
        cache["blocks.0.hook_resid_pre"], last
    )  # TL's cache holds the last firing only
    for pos in range(P):
        every = ls.unroll(
            model,
            corrupt,
            T,
            decode=True,
            interventions=[
                ls.Patch(
                    "blocks.0.hook_resid_pre", "all", value=lambda x, lab: last, positions=[pos]
                )
            ],
        )
        assert stock[0, pos] == logit_diff(every.logits[-1]).float()  # TL stores float32
    # loopscope's per-iteration answers differ from one another and from the stock answer
    per_t = []
    for t in range(T):
        tr = ls.unroll(
            model,
            corrupt,
            T,
            decode=True,
            interventions=[
                ls.Patch("blocks.0.hook_resid_pre", t, value=clean_tr, positions=[P - 1])
            ],
        )
        per_t.append(logit_diff(tr.logits[-1]))
    per_t = torch.stack(per_t)
    assert len({round(float(v), 9) for v in per_t}) == T
    assert not torch.allclose(per_t.float(), stock[0, P - 1].expand(T))


def test_per_iteration_patch_matches_hand_computation():
    p, clean, corrupt = setup()
    model = PhysicalLooped(p).eval()
    clean_tr = ls.unroll(model, clean, T, capture=["blocks.0.hook_resid_pre"])
    t, pos = 2, 3
    tr = ls.unroll(
        model,
        corrupt,
        T,
        decode=True,
        interventions=[ls.Patch("blocks.0.hook_resid_pre", t, value=clean_tr, positions=[pos])],
    )
    with torch.no_grad():
        e = p.embed[corrupt]
        h = torch.zeros_like(e)
        for s in range(T):
            x = h.clone()
            if s == t:
                x[:, pos] = clean_tr["blocks.0.hook_resid_pre"][t][:, pos]
            h = block_fn(p, x, e)
        assert torch.equal(tr.logits[-1], h @ p.U)


def test_iteration_aware_sweep_equals_stock_tl_on_the_unrolled_layout():
    p, clean, corrupt = setup()
    physical, unrolled = PhysicalLooped(p).eval(), Unrolled(p).eval()
    _, cache = unrolled.run_with_cache(clean)
    with torch.no_grad():
        stock = get_act_patch_resid_pre(unrolled, corrupt, cache, logit_diff)  # [T, P]
    clean_tr = ls.unroll(physical, clean, T, capture=["blocks.0.hook_resid_pre"])
    ours = torch.zeros(T, P, dtype=torch.float64)
    for t in range(T):
        for pos in range(P):
            tr = ls.unroll(
                physical,
                corrupt,
                T,
                decode=True,
                interventions=[
                    ls.Patch("blocks.0.hook_resid_pre", t, value=clean_tr, positions=[pos])
                ],
            )
            ours[t, pos] = logit_diff(tr.logits[-1])
    assert torch.equal(ours.float(), stock)  # TL stores float32: the same float64 numbers, cast
