"""Two-state hierarchical loops: HRM (two stacks) and TRM (one shared net), spec §1.2.

State ``[B, 2, pos, d]`` = ``(z_H, z_L)``. One :meth:`step` is one slow H-cycle::

    repeat L_cycles:  z_L <- f_L(z_L + z_H + x)
    z_H <- f_H(z_H + z_L)                 (no x; TRM: f_H is the same net as f_L)

Hooks (HRM): ``L.hook_in``, ``L.blocks.{l}.*``, ``L.hook_out`` fire ``L_cycles`` times per step;
``H.hook_in``, ``H.blocks.{l}.*``, ``H.hook_out`` once. TRM: the role boundaries ``L.hook_in`` /
``L.hook_out`` (``L_cycles`` times) and ``H.hook_in`` / ``H.hook_out`` (once) exist as in HRM, but
the layers are one shared net whose hooks ``net.blocks.{l}.*`` fire in both roles,
``L_cycles + 1`` times per step: firings ``k < L_cycles`` are the L role, ``k = L_cycles`` the H
role. Since ``unroll`` labels a firing ``(t, k)`` (iteration, and how often the hook already fired
in it), L hooks carry ``(h_cycle, l_cycle)`` labels. :meth:`fast_loop` gives the L-step with the
slow state held fixed as a Loop of its own; :meth:`slow_loop` is the model itself.

Example:
    >>> import torch
    >>> from loopscope.models import HierarchicalConfig, HierarchicalLoopedTransformer
    >>> m = HierarchicalLoopedTransformer(HierarchicalConfig(vocab_size=5, n_classes=4))
    >>> ctx = m.encode(torch.randint(0, 5, (2, 9)))
    >>> m.step(m.init_state(ctx), ctx).shape
    torch.Size([2, 2, 9, 64])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError
from loopscope.core.loop import Loop
from loopscope.models.config import HierarchicalConfig
from loopscope.models.layers import Block, RMSNorm, attention_mask
from loopscope.models.looped import check_tokens, trunc_normal

__all__ = ["HierarchicalLoopedTransformer", "FastLoop"]


def _blocks(cfg: HierarchicalConfig) -> nn.ModuleList:
    return nn.ModuleList(
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


class Stack(nn.Module):
    """``n_layers`` blocks between ``hook_in`` and ``hook_out``: ``[B, pos, d] -> [B, pos, d]``.

    With ``shared`` given (TRM) the blocks are that net's, held without registering them here, so
    their parameters and hooks have one name (``net.blocks.{l}``) while each role keeps its own
    boundary hooks.
    """

    def __init__(self, cfg: HierarchicalConfig, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.hook_in, self.hook_out = HookPoint(), HookPoint()
        if shared is None:
            self.blocks = _blocks(cfg)
        else:
            object.__setattr__(self, "_shared", shared)  # not a submodule: no duplicate names

    def layers(self) -> nn.ModuleList:
        return self._shared.blocks if "blocks" not in self._modules else self.blocks

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.hook_in(x)
        for blk in self.layers():
            x = blk(x, mask)
        return self.hook_out(x)


class HierarchicalLoopedTransformer(Loop):
    """HRM / TRM two-state looped transformer (see module docstring).

    Shapes: tokens ``[B, pos]``, state ``[B, 2, pos, d]`` (z_H, z_L), logits read from z_H
    ``[B, pos, n_classes]``. ctx: ``tokens``, ``e [B, pos, d]``, ``mask`` (bool ``[B, pos, pos]``
    or None when bidirectional).
    """

    label_names = ("h_cycle", "l_cycle")
    state_axes = ("batch", "stack", "pos", "d_model")  # stack: (z_H, z_L)

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
            self.net = nn.Module()
            self.net.blocks = _blocks(cfg)
            self.L, self.H = Stack(cfg, shared=self.net), Stack(cfg, shared=self.net)
        else:
            self.L, self.H = Stack(cfg), Stack(cfg)
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

    def encode(self, tokens: Tensor) -> dict[str, Any]:
        """``tokens [B, pos]`` -> ctx ``{"tokens", "e" [B, pos, d], "mask"}`` (validated ids)."""
        max_pos = self.cfg.max_pos if self.cfg.positions == "learned" else None
        tokens = check_tokens(tokens, self.cfg.vocab_size, max_pos).to(self.embed.weight.device)
        B, P = tokens.shape
        e = self.embed(tokens)
        if self.cfg.positions == "learned":
            e = e + self.pos_embed[:P]
        mask = attention_mask(B, P, self.cfg.causal, tokens.device)
        return {"tokens": tokens, "e": self.hook_embed(e), "mask": mask}

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """``[B, 2, pos, d]``: fixed buffers / zeros / (e, 0) / trunc-normal per ``cfg.init``."""
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

    def l_step(self, zL: Tensor, zH: Tensor, e: Tensor, mask: Tensor | None = None) -> Tensor:
        """One fast step ``z_L <- f_L(z_L + z_H + x)``, all ``[B, pos, d]``."""
        return self.L(zL + zH + e, mask)

    def h_update(self, zH: Tensor, zL: Tensor, e: Tensor, mask: Tensor | None = None) -> Tensor:
        """The slow update ``z_H <- f_H(z_H + z_L)`` (no x in either wiring)."""
        return self.H(zH + zL, mask)

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        """One slow H-cycle ``[B, 2, pos, d] -> [B, 2, pos, d]`` (``L_cycles`` fast steps inside)."""
        e, mask = ctx["e"], ctx.get("mask")
        zH, zL = h[:, 0], h[:, 1]
        for _ in range(self.cfg.L_cycles):
            zL = self.l_step(zL, zH, e, mask)
        zH = self.h_update(zH, zL, e, mask)
        return torch.stack([zH, zL], dim=1)

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        """Logits from z_H: final RMSNorm (``hook_readout``), unembed -> ``[B, pos, n_classes]``."""
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
        """The fast L-loop with the slow state held fixed (``z_H [B, pos, d]`` or the initial one)."""
        return FastLoop(self, z_H)


class FastLoop(Loop):
    """``z_L <- f_L(z_L + z_H + x)`` with ``z_H`` fixed; state ``[B, pos, d]``.

    ``encode(tokens)`` gives the parent's ctx plus ``z_H [B, pos, d]`` (the one given, else the
    model's initial slow state; a random init is drawn from a fixed seed-0 generator so that
    the fast map is deterministic); ``decode`` reads the slow state one H-update later,
    ``f_H(z_H + z_L)``. Shares the parent's hook points (``L.*`` ...); ``hook_state`` is its own.

    Example:
        >>> import torch
        >>> from loopscope.models import HierarchicalConfig, HierarchicalLoopedTransformer
        >>> m = HierarchicalLoopedTransformer(HierarchicalConfig(vocab_size=5, n_classes=4))
        >>> fast = m.fast_loop()
        >>> ctx = fast.encode(torch.randint(0, 5, (2, 9)))
        >>> fast.step(fast.init_state(ctx), ctx).shape
        torch.Size([2, 9, 64])
    """

    label_names = ("l_cycle", "sub")
    state_axes = ("batch", "pos", "d_model")

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
        e = ctx["e"]
        if self.fixed_zH is not None:
            zH = self.fixed_zH.to(dtype=e.dtype, device=e.device)
            if (
                zH.dim() not in (2, 3)
                or zH.shape[-2:] != e.shape[-2:]
                or (zH.dim() == 3 and zH.shape[0] not in (1, e.shape[0]))
            ):
                raise LoopscopeError(
                    f"fast_loop z_H has shape {tuple(zH.shape)}; expected [B, pos, d] or [pos, d] "
                    f"matching the tokens' {tuple(e.shape)}"
                )
            ctx["z_H"] = zH.expand_as(e)
        else:
            g = torch.Generator().manual_seed(0) if self.parent.cfg.init == "random" else None
            ctx["z_H"] = self.parent.init_state(ctx, g)[:, 0]
        return ctx

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        return self.parent.init_state(ctx, generator)[:, 1]

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        return self.parent.l_step(h, ctx["z_H"], ctx["e"], ctx.get("mask"))

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        zH = self.parent.h_update(ctx["z_H"], h, ctx["e"], ctx.get("mask"))
        return self.parent.decode(torch.stack([zH, h], dim=1), ctx)
