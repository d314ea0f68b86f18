"""Two-state hierarchical loops: HRM (two stacks) and TRM (one shared net).

State ``[B, 2, pos, d]`` = ``(z_H, z_L)``. One :meth:`step` is one slow H-cycle::

    repeat L_cycles:  z_L <- f_L(z_L + z_H + x)
    z_H <- f_H(z_H + z_L)                 (TRM: the same net, no x)

Hooks: ``L.hook_in``, ``L.blocks.{l}.*``, ``L.hook_out``, ``H.hook_in``, ``H.blocks.{l}.*``,
``H.hook_out`` (TRM: the shared ``net.*`` hooks fire ``L_cycles + 1`` times per step, the first
``L_cycles`` in the L role). Since ``unroll`` labels a firing ``(t, k)`` — iteration, and how often
the hook already fired in it — L hooks carry ``(h_cycle, l_cycle)`` labels. :meth:`fast_loop`
gives the L-step with the slow state held fixed as a Loop of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.errors import LoopscopeError
from loopscope.loop import Loop
from loopscope.models.config import HierarchicalConfig
from loopscope.models.layers import Block, RMSNorm
from loopscope.models.looped import check_tokens, trunc_normal

__all__ = ["HierarchicalLoopedTransformer", "FastLoop"]


class Stack(nn.Module):
    """``n`` post/pre-norm layers with ``hook_in`` / ``hook_out``."""

    def __init__(self, cfg: HierarchicalConfig) -> None:
        super().__init__()
        self.hook_in, self.hook_out = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(
            Block(
                cfg.d_model,
                cfg.n_heads,
                cfg.d_mlp,
                cfg.norm,
                cfg.positions,
                cfg.causal,
                cfg.act,
                cfg.rope_base,
                cfg.norm_eps,
            )
            for _ in range(cfg.n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_in(x)
        for blk in self.blocks:
            x = blk(x)
        return self.hook_out(x)


class HierarchicalLoopedTransformer(Loop):
    """HRM / TRM two-state looped transformer (see module docstring)."""

    label_names = ("h_cycle", "l_cycle")

    def __init__(self, cfg: HierarchicalConfig) -> None:
        super().__init__()
        if not isinstance(cfg, HierarchicalConfig):
            raise LoopscopeError(
                f"HierarchicalLoopedTransformer needs a HierarchicalConfig, got {type(cfg).__name__}"
            )
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=1.0)
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(torch.randn(cfg.max_pos, d) * 0.1)
        self.hook_embed = HookPoint()
        if cfg.shared:
            self.net = Stack(cfg)
        else:
            self.L = Stack(cfg)
            self.H = Stack(cfg)
        if cfg.init == "fixed":
            self.register_buffer("H_init", torch.randn(d) * cfg.init_std)
            self.register_buffer("L_init", torch.randn(d) * cfg.init_std)
        self.ln_final = RMSNorm(d, cfg.norm_eps)
        self.unembed = nn.Linear(d, cfg.n_classes)
        self.hook_readout, self.hook_logits = HookPoint(), HookPoint()
        if cfg.halting == "act":
            self.q_proj = nn.Linear(d, 2)
            nn.init.zeros_(self.q_proj.weight)
            nn.init.constant_(self.q_proj.bias, cfg.halt_bias)
        self.setup()

    @property
    def f_L(self) -> Stack:
        return self.net if self.cfg.shared else self.L

    @property
    def f_H(self) -> Stack:
        return self.net if self.cfg.shared else self.H

    def encode(self, tokens: Tensor) -> dict[str, Any]:
        max_pos = self.cfg.max_pos if self.cfg.positions == "learned" else None
        tokens = check_tokens(tokens, self.cfg.vocab_size, max_pos)
        e = self.embed(tokens)
        if self.cfg.positions == "learned":
            e = e + self.pos_embed[: tokens.shape[1]]
        return {"tokens": tokens, "e": self.hook_embed(e)}

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        e = ctx["e"]
        if self.cfg.init == "fixed":
            zH = self.H_init.to(e.dtype).expand_as(e)
            zL = self.L_init.to(e.dtype).expand_as(e)
        elif self.cfg.init == "zeros":
            zH = zL = torch.zeros_like(e)
        elif self.cfg.init == "embedding":
            zH, zL = e, torch.zeros_like(e)
        else:
            zH = trunc_normal(tuple(e.shape), self.cfg.init_std, generator, e.dtype, e.device)
            zL = trunc_normal(tuple(e.shape), self.cfg.init_std, generator, e.dtype, e.device)
        return torch.stack([zH, zL], dim=1).clone()

    def l_step(self, zL: Tensor, zH: Tensor, e: Tensor) -> Tensor:
        """One fast step ``z_L <- f_L(z_L + z_H + x)``."""
        return self.f_L(zL + zH + e)

    def h_update(self, zH: Tensor, zL: Tensor, e: Tensor) -> Tensor:
        """The slow update ``z_H <- f_H(z_H + z_L)`` (no x in either wiring)."""
        return self.f_H(zH + zL)

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        e = ctx["e"]
        zH, zL = h[:, 0], h[:, 1]
        for _ in range(self.cfg.L_cycles):
            zL = self.l_step(zL, zH, e)
        zH = self.h_update(zH, zL, e)
        return torch.stack([zH, zL], dim=1)

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        y = self.hook_readout(self.ln_final(h[:, 0]))
        return self.hook_logits(self.unembed(y))

    def q_head(self, h: Tensor, ctx: dict[str, Any] | None = None) -> Tensor:
        """ACT Q-head on token 0 of z_H: ``[B, 2]``."""
        if self.cfg.halting != "act":
            raise LoopscopeError(f"model {self.cfg.name!r} has no ACT Q-head")
        return self.q_proj(h[:, 0, 0])

    def slow_loop(self) -> HierarchicalLoopedTransformer:
        """The slow loop (one step = one full H-cycle): the model itself."""
        return self

    def fast_loop(self, z_H: Tensor | None = None) -> FastLoop:
        """The fast L-loop with the slow state held fixed (``z_H`` from the ctx or given)."""
        return FastLoop(self, z_H)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class FastLoop(Loop):
    """``z_L <- f_L(z_L + z_H + x)`` with ``z_H`` fixed; state ``[B, pos, d]``.

    ``encode(tokens)`` gives ``{"tokens", "e", "z_H"}`` (z_H = the model's initial slow state
    unless given); ``decode`` reads the slow state one H-update later, ``f_H(z_H + z_L)``.
    Shares the parent's hook points (``L.*`` ...).
    """

    label_names = ("l_cycle", "sub")

    def __init__(self, parent: HierarchicalLoopedTransformer, z_H: Tensor | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "parent", parent)  # not a submodule: no duplicate hook names
        self.fixed_zH = z_H
        self.setup()
        self.hook_dict = {**parent.hook_dict, "hook_state": self.hook_state}
        self.mod_dict = {**parent.mod_dict, "hook_state": self.hook_state}

    def parameters(self, recurse: bool = True):  # analyses read the dtype from here
        return self.parent.parameters(recurse)

    def encode(self, tokens: Tensor) -> dict[str, Any]:
        ctx = self.parent.encode(tokens)
        if self.fixed_zH is not None:
            ctx["z_H"] = self.fixed_zH.to(ctx["e"].dtype)
        else:
            ctx["z_H"] = self.parent.init_state(ctx)[:, 0]
        return ctx

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        return self.parent.init_state(ctx, generator)[:, 1]

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        return self.parent.l_step(h, ctx["z_H"], ctx["e"])

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        zH = self.parent.h_update(ctx["z_H"], h, ctx["e"])
        return self.parent.decode(torch.stack([zH, h], dim=1), ctx)
