"""Small hand-built Loops with known circuits (golden cases, docs, benchmarks).

* :class:`GateLoop` — golden #26/#27: A, B are input bits, C = ReLU(A + B - 1) (AND) or
  min(1, A + B) (OR); logits ``[3C, 3(1 - C)]`` so LD = 3C - 3(1 - C) (:func:`gate_metric`).
* :class:`SaturatingLoop` — golden #28: C = tanh(gain (A - 0.5)) (saturating) or C = gain A + bias
  (linear path); readout C (:func:`first_logit`).
* :class:`ShiftLoop` — a delay line whose circuit is known: position t at iteration t.
* :class:`HeuristicAdder` — adds two operands with range and units-digit neurons only
  (Nikankin-style heuristics with known labels).
* :class:`TinyLoopedTransformer` — a one-block looped transformer (attention + MLP, input
  injection, post-norm) whose matmuls are per-example batched (``bmm``), so a row's result does
  not depend on the batch it is in: batched patching equals one forward per patch bit for bit.

All are :class:`loopscope.Loop` s (TransformerLens ``HookedRootModule`` s with ``HookPoint`` s), so
they go through the real ``unroll`` / ``patch_sweep`` / ``attribution`` code paths.

Example:
    >>> import torch, loopscope as ls
    >>> tr = ls.unroll(GateLoop("and"), torch.tensor([[1, 1]]), 1, capture=["hook_C"])
    >>> tr["hook_C"][0].tolist()
    [[1.0]]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError
from loopscope.core.loop import Loop

__all__ = [
    "GateLoop",
    "gate_metric",
    "SaturatingLoop",
    "first_logit",
    "ShiftLoop",
    "HeuristicAdder",
    "TinyLoopedTransformer",
]


class GateLoop(Loop):
    """One-iteration AND / OR gate with hook points ``hook_A``, ``hook_B``, ``hook_C`` ([B, 1])."""

    def __init__(self, kind: str = "and") -> None:
        super().__init__()
        if kind not in ("and", "or"):
            raise LoopscopeError(f"GateLoop kind must be 'and' or 'or', got {kind!r}")
        self.kind = kind
        self.hook_A, self.hook_B, self.hook_C = HookPoint(), HookPoint(), HookPoint()
        self.setup()

    def encode(self, tokens: Tensor) -> Tensor:
        return torch.as_tensor(tokens).double()

    def init_state(self, ctx: Tensor, generator: Any = None) -> Tensor:
        return torch.zeros(ctx.shape[0], 1, dtype=torch.float64)

    def step(self, h: Tensor, ctx: Tensor, t: int | None = None) -> Tensor:
        a = self.hook_A(ctx[:, 0:1])
        b = self.hook_B(ctx[:, 1:2])
        c = torch.relu(a + b - 1) if self.kind == "and" else torch.clamp(a + b, max=1)
        return self.hook_C(c)

    def decode(self, h: Tensor, ctx: Tensor) -> Tensor:
        return torch.stack([3 * h, 3 * (1 - h)], -1)  # [B, 1, 2]


def gate_metric(logits: Tensor, idx: Tensor) -> Tensor:
    """LD = logit(C = 1) - logit(C = 0) = 3C - 3(1 - C) of :class:`GateLoop` readouts."""
    return logits[:, 0, 0] - logits[:, 0, 1]


class SaturatingLoop(Loop):
    """C = tanh(gain (A - 0.5)) ("tanh") or C = gain A + bias ("linear"); hooks ``hook_A``,
    ``hook_C`` ([B, 1]); the state is C and the readout is the state."""

    def __init__(self, kind: str = "tanh", gain: float = 5.0, bias: float = 0.0) -> None:
        super().__init__()
        if kind not in ("tanh", "linear"):
            raise LoopscopeError(f"SaturatingLoop kind must be 'tanh' or 'linear', got {kind!r}")
        self.kind, self.gain, self.bias = kind, float(gain), float(bias)
        self.hook_A, self.hook_C = HookPoint(), HookPoint()
        self.setup()

    def encode(self, x: Tensor) -> Tensor:
        return torch.as_tensor(x).double().reshape(-1, 1)

    def init_state(self, ctx: Tensor, generator: Any = None) -> Tensor:
        return torch.zeros_like(ctx)

    def step(self, h: Tensor, ctx: Tensor, t: int | None = None) -> Tensor:
        a = self.hook_A(ctx)
        c = torch.tanh(self.gain * (a - 0.5)) if self.kind == "tanh" else self.gain * a + self.bias
        return self.hook_C(c)


def first_logit(logits: Tensor, idx: Tensor) -> Tensor:
    """The first readout coordinate of each row (``[R, 1]`` -> ``[R]``)."""
    return logits.reshape(len(idx), -1)[:, 0]


class ShiftLoop(Loop):
    """A delay line: state ``[B, P, 1]`` starts at the input, each iteration shifts it one position
    (h'[p] = h[p - 1], h'[0] = 0); readout ``h[:, -1]`` ([B, 1]). After T = P - 1 iterations the
    output is x[0], carried by position t at iteration t: the circuit is the diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.setup()

    def encode(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).double()
        return x.reshape(x.shape[0], -1, 1)

    def init_state(self, ctx: Tensor, generator: Any = None) -> Tensor:
        return ctx.clone()

    def step(self, h: Tensor, ctx: Tensor, t: int | None = None) -> Tensor:
        return torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)

    def decode(self, h: Tensor, ctx: Tensor) -> Tensor:
        return h[:, -1]


class HeuristicAdder(Loop):
    """``op1 + op2`` from heuristic neurons only (one iteration, tokens ``[B, 2]``).

    Neurons (``hook_post``, ``[B, 1, units]``): ``n_ranges`` range neurons 1[result in [w j,
    w (j + 1))] followed by ten units-digit neurons 1[result = k mod 10]. The readout over results
    0..``2 (max_operand - 1)`` adds the range neuron covering r and the digit neuron of r, so the
    correct result scores 2 and every other at most 1: knocking out a prompt's range or digit
    neuron breaks exactly the prompts in that heuristic's set.
    """

    def __init__(self, max_operand: int = 50, width: int = 10) -> None:
        super().__init__()
        self.n_results = 2 * max_operand - 1
        self.width = int(width)
        self.n_ranges = -(-self.n_results // self.width)
        self.hook_post = HookPoint()
        r = torch.arange(self.n_results)
        W = torch.zeros(self.n_ranges + 10, self.n_results, dtype=torch.float64)
        W[r // self.width, r] = 1.0
        W[self.n_ranges + r % 10, r] = 1.0
        self.register_buffer("W_out", W)
        self.setup()

    @property
    def n_units(self) -> int:
        return self.n_ranges + 10

    def encode(self, tokens: Tensor) -> Tensor:
        return torch.as_tensor(tokens).long()

    def init_state(self, ctx: Tensor, generator: Any = None) -> Tensor:
        return torch.zeros(ctx.shape[0], 1, self.n_units, dtype=torch.float64)

    def step(self, h: Tensor, ctx: Tensor, t: int | None = None) -> Tensor:
        res = ctx[:, 0] + ctx[:, 1]
        units = torch.zeros(ctx.shape[0], self.n_units, dtype=torch.float64)
        units[torch.arange(len(res)), res // self.width] = 1.0
        units[torch.arange(len(res)), self.n_ranges + res % 10] = 1.0
        return self.hook_post(units.unsqueeze(1))

    def decode(self, h: Tensor, ctx: Tensor) -> Tensor:
        return h @ self.W_out  # [B, 1, n_results]


def _bmm(x: Tensor, w: Tensor) -> Tensor:
    """``x [B, P, d] @ w [d, n]`` as a per-example batched matmul (batch-size invariant)."""
    return torch.bmm(x, w.expand(x.shape[0], *w.shape))


def _ln(x: Tensor) -> Tensor:
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


class TinyLoopedTransformer(Loop):
    """One weight-tied block iterated on ``[B, pos, d]``:
    ``h' = LN(h + e + attn(h + e) + mlp(h + e + attn))`` with causal multi-head attention, a GELU
    MLP and additive input injection ``e`` (token + position embedding); readout ``LN(h) W_U``.

    Hooks (TransformerLens names): ``hook_embed``, ``hook_state``, ``blocks.0.attn.hook_z``
    ([B, pos, heads, d_head]), ``blocks.0.hook_attn_out``, ``blocks.0.mlp.hook_post``,
    ``blocks.0.hook_mlp_out``, ``blocks.0.hook_resid_post``. Weights are drawn from ``seed``.
    """

    def __init__(
        self,
        vocab_size: int = 8,
        n_ctx: int = 16,
        d_model: int = 32,
        n_heads: int = 4,
        d_mlp: int = 64,
        n_classes: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise LoopscopeError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        g = torch.Generator().manual_seed(int(seed))
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        n_out = n_classes or vocab_size

        def p(*shape: int, scale: float) -> nn.Parameter:
            return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=dtype))

        self.W_E = p(vocab_size, d_model, scale=1.0)
        self.W_pos = p(n_ctx, d_model, scale=0.5)
        s = 1 / math.sqrt(d_model)
        self.W_Q, self.W_K, self.W_V, self.W_O = (p(d_model, d_model, scale=s) for _ in range(4))
        self.W_in = p(d_model, d_mlp, scale=s)
        self.W_out = p(d_mlp, d_model, scale=1 / math.sqrt(d_mlp))
        self.W_U = p(d_model, n_out, scale=s)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList([_TinyHooks()])
        self.setup()

    def encode(self, tokens: Tensor) -> Tensor:
        P = tokens.shape[1]
        return self.hook_embed(self.W_E[tokens] + self.W_pos[:P])

    def init_state(self, ctx: Tensor, generator: Any = None) -> Tensor:
        return torch.zeros_like(ctx)

    def _attn(self, x: Tensor, hooks: _TinyHooks) -> Tensor:
        B, P, _ = x.shape
        H, dh = self.n_heads, self.d_head

        def heads(w: Tensor) -> Tensor:
            # contiguous: a strided batched matmul takes a different BLAS path at batch size 1,
            # which would break the bit-for-bit batch invariance the benchmark checks
            return _bmm(x, w).view(B, P, H, dh).transpose(1, 2).contiguous()  # [B, H, P, dh]

        q, k, v = heads(self.W_Q), heads(self.W_K), heads(self.W_V)
        scores = q @ k.transpose(-1, -2).contiguous() / math.sqrt(dh)
        mask = torch.ones(P, P, dtype=torch.bool, device=x.device).triu(1)
        pattern = scores.masked_fill(mask, float("-inf")).softmax(-1)
        z = hooks.attn.hook_z((pattern @ v).transpose(1, 2))  # [B, P, H, dh]
        return _bmm(z.reshape(B, P, H * dh), self.W_O)

    def step(self, h: Tensor, ctx: Tensor, t: int | None = None) -> Tensor:
        hooks = self.blocks[0]
        x = h + ctx
        attn = hooks.hook_attn_out(self._attn(_ln(x), hooks))
        mid = x + attn
        post = hooks.mlp.hook_post(torch.nn.functional.gelu(_bmm(_ln(mid), self.W_in)))
        mlp = hooks.hook_mlp_out(_bmm(post, self.W_out))
        return hooks.hook_resid_post(_ln(mid + mlp))

    def decode(self, h: Tensor, ctx: Tensor) -> Tensor:
        return _bmm(_ln(h), self.W_U)


class _TinyHooks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.hook_z = HookPoint()
        self.mlp = nn.Module()
        self.mlp.hook_post = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
