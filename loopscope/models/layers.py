"""Building blocks with TransformerLens hook points: RMSNorm, attention, MLP, block.

Attention takes an optional boolean ``mask [B, q, k]`` (True = may attend; the looped models
carry it in their ctx); without one it applies its own causal mask when built ``causal``.

Hook conventions (relative to a block): ``hook_resid_pre``, ``attn.hook_q/k/v`` ``[B, pos, head,
d_head]``, ``attn.hook_pattern`` ``[B, head, q, k]`` (``pos_dim=2``), ``attn.hook_z``,
``hook_attn_out``, ``hook_resid_mid``, ``mlp.hook_pre``, ``mlp.hook_post`` (neuron activations
``[B, pos, d_mlp]``), ``hook_mlp_out``, ``hook_resid_post``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError

__all__ = ["RMSNorm", "Attention", "MLP", "Block", "rope_tables", "apply_rope", "attention_mask"]


def attention_mask(batch: int, pos: int, causal: bool, device: Any = None) -> Tensor | None:
    """Boolean mask ``[batch, pos, pos]`` (True = query may attend key), None if bidirectional.

    An expanded view (no copy): the batch axis lets ``Loop.select`` subset it with the ctx.
    """
    if not causal:
        return None
    m = torch.ones(pos, pos, dtype=torch.bool, device=device).tril()
    return m.expand(batch, pos, pos)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last axis."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(
    pos: int, d_head: int, base: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[pos, d_head]`` (rotate-half convention)."""
    inv = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float64, device=device) / d_head))
    ang = torch.arange(pos, dtype=torch.float64, device=device)[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, pos, head, d_head]``."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


class Attention(nn.Module):
    """Multi-head self-attention ``[B, pos, d] -> [B, pos, d]`` with hooks on q, k, v, pattern, z.

    q/k/v are hooked before RoPE (``[B, pos, head, d_head]``); ``hook_pattern`` ``[B, head, q, k]``
    has ``pos_dim = 2`` so position selection in capture uses the query axis.
    """

    def __init__(
        self, d: int, n_heads: int, positions: str, causal: bool, rope_base: float
    ) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d // n_heads
        self.W_Q = nn.Linear(d, d, bias=False)
        self.W_K = nn.Linear(d, d, bias=False)
        self.W_V = nn.Linear(d, d, bias=False)
        self.W_O = nn.Linear(d, d, bias=False)
        self.positions, self.causal, self.rope_base = positions, causal, rope_base
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_pattern.pos_dim = 2
        self.hook_z = HookPoint()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B, P, _ = x.shape
        q = self.hook_q(self.W_Q(x).view(B, P, self.n_heads, self.d_head))
        k = self.hook_k(self.W_K(x).view(B, P, self.n_heads, self.d_head))
        v = self.hook_v(self.W_V(x).view(B, P, self.n_heads, self.d_head))
        if self.positions == "rope":
            cos, sin = rope_tables(P, self.d_head, self.rope_base, x.dtype, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
        if mask is None and self.causal:
            mask = attention_mask(B, P, True, x.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return self.W_O(z.reshape(B, P, -1))


class MLP(nn.Module):
    """GELU or SwiGLU MLP ``[B, pos, d] -> [B, pos, d]``.

    ``hook_pre`` is the (gate) pre-activation, ``hook_post`` the neurons ``[B, pos, d_mlp]``.
    """

    def __init__(self, d: int, d_mlp: int, act: str) -> None:
        super().__init__()
        self.act = act
        self.W_in = nn.Linear(d, d_mlp)
        if act == "swiglu":
            self.W_gate = nn.Linear(d, d_mlp, bias=False)
        self.W_out = nn.Linear(d_mlp, d)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "swiglu":
            pre = self.hook_pre(self.W_gate(x))
            post = self.hook_post(F.silu(pre) * self.W_in(x))
        else:
            pre = self.hook_pre(self.W_in(x))
            post = self.hook_post(F.gelu(pre))
        return self.W_out(post)


class Block(nn.Module):
    """One transformer layer with norm placement ``post`` / ``pre`` / ``sandwich`` / ``fprm``.

    ``fprm`` is pre-norm with residual scaling: ``h <- a1 * h + b1 * F(N(h))`` with the per-dim
    gates passed in by the looped model (models-and-tasks.md §1.1).
    """

    def __init__(
        self,
        d: int,
        n_heads: int,
        d_mlp: int,
        norm: str,
        positions: str,
        causal: bool,
        act: str,
        rope_base: float,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.attn = Attention(d, n_heads, positions, causal, rope_base)
        self.mlp = MLP(d, d_mlp, act)
        self.ln1, self.ln2 = RMSNorm(d, eps), RMSNorm(d, eps)
        if norm == "sandwich":
            self.ln3, self.ln4 = RMSNorm(d, eps), RMSNorm(d, eps)
        self.hook_resid_pre, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_resid_mid, self.hook_mlp_out = HookPoint(), HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        a1: Tensor | None = None,
        b1: Tensor | None = None,
    ) -> Tensor:
        """``x [B, pos, d] -> [B, pos, d]``; ``mask [B, q, k]`` bool or None; a1/b1 for fprm."""
        x = self.hook_resid_pre(x)
        if self.norm == "post":
            x = self.hook_resid_mid(self.ln1(x + self.hook_attn_out(self.attn(x, mask))))
            x = self.ln2(x + self.hook_mlp_out(self.mlp(x)))
        elif self.norm == "pre":
            x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x), mask)))
            x = x + self.hook_mlp_out(self.mlp(self.ln2(x)))
        elif self.norm == "sandwich":  # Huginn: x = n2(Attn(n1(x)) + x); x = n4(MLP(n3(x)) + x)
            x = self.hook_resid_mid(self.ln2(self.hook_attn_out(self.attn(self.ln1(x), mask)) + x))
            x = self.ln4(self.hook_mlp_out(self.mlp(self.ln3(x))) + x)
        else:  # fprm residual scaling
            if a1 is None or b1 is None:
                raise LoopscopeError(
                    "an fprm block needs its gates: call it as blk(x, mask, a1, b1)"
                )
            attn = self.hook_attn_out(self.attn(self.ln1(x), mask))
            x = self.hook_resid_mid(a1 * x + b1 * attn)
            x = a1 * x + b1 * self.hook_mlp_out(self.mlp(self.ln2(x)))
        return self.hook_resid_post(x)
