"""LoopedTransformer: prelude -> one weight-tied core iterated on a latent state -> coda.

::

    ctx  = encode(tokens)            # e = prelude(embed(tokens) [+ learned positions]), mask, grid
    h_0  = init_state(ctx)           # zeros / fixed / random trunc-normal / embedding
    h'   = step(h, ctx, t)           # inject e, local mixer, n_core weight-tied layers, damping
    y_t  = decode(h, ctx)            # coda layers, final norm, unembed -> [B, pos, n_classes]

Hook names (TransformerLens style): ``hook_embed``, ``prelude.blocks.{l}.*``, ``hook_state``,
``core.hook_inject``, ``core.hook_mix``, ``core.blocks.{l}.*`` (see :mod:`.layers`),
``core.hook_out``, ``coda.blocks.{l}.*``, ``hook_readout``, ``hook_logits``. Core hooks fire once
per iteration; ``loopscope.core.unroll`` records every firing with its iteration.

Example:
    >>> import torch
    >>> from loopscope.models import LoopedTransformer, LoopedConfig
    >>> m = LoopedTransformer(LoopedConfig(vocab_size=7, n_classes=6))
    >>> m(torch.randint(0, 7, (2, 5)), n_iter=4).shape
    torch.Size([2, 5, 6])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError
from loopscope.core.loop import Loop
from loopscope.models.config import LoopedConfig
from loopscope.models.layers import Block, RMSNorm, attention_mask

__all__ = ["LoopedTransformer", "check_tokens", "trunc_normal"]


def check_tokens(tokens: Any, vocab_size: int, max_pos: int | None = None) -> Tensor:
    """Validate token ids ``[B, pos]`` (long, in range) with a one-line error naming the problem."""
    if not isinstance(tokens, Tensor):
        raise LoopscopeError(
            f"tokens must be a torch LongTensor [batch, pos], got {type(tokens).__name__}"
        )
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise LoopscopeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise LoopscopeError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise LoopscopeError("tokens are empty")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise LoopscopeError(f"token id {bad} out of vocabulary (vocab_size={vocab_size})")
    if max_pos is not None and tokens.shape[1] > max_pos:
        raise LoopscopeError(f"sequence length {tokens.shape[1]} exceeds max_pos={max_pos}")
    return tokens.long()


def trunc_normal(
    shape: tuple[int, ...],
    std: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: Any,
) -> Tensor:
    """Truncated normal N(0, std) on [-2 std, 2 std] by resampling (seeded by ``generator``)."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    for _ in range(20):
        bad = x.abs() > 2
        if not bad.any():
            break
        x[bad] = torch.randn(int(bad.sum()), generator=generator, dtype=torch.float64)
    return (x.clamp(-2, 2) * std).to(dtype=dtype, device=device)


def _grid_shape(pos: int) -> tuple[int, int]:
    s = int(math.isqrt(pos))
    if s * s != pos:
        raise LoopscopeError(
            f"the conv2d mixer needs a square grid: {pos} positions is not a perfect square"
        )
    return s, s


class LoopedTransformer(Loop):
    """The single-state looped family; every knob is a :class:`LoopedConfig` field.

    Shapes: tokens ``[B, pos]`` (long), state ``h [B, pos, d_model]``, logits
    ``[B, pos, n_classes]``. The ctx is a dict: ``tokens [B, pos]``, ``e [B, pos, d]`` (embedding
    after the prelude), ``mask`` (bool ``[B, pos, pos]``, True = may attend; None when
    bidirectional) and ``grid`` (``(H, W)`` for the conv2d mixer, else None). Every ctx tensor has
    the batch on axis 0, so ``select`` subsets it.

    Parameters are float32 at construction; ``model.double()`` gives an exact float64 model (the
    RoPE tables and random inits are drawn in float64 and cast to the model dtype).
    """

    label_names = ("iteration", "sub")
    state_axes = ("batch", "pos", "d_model")

    def __init__(self, cfg: LoopedConfig) -> None:
        super().__init__()
        if not isinstance(cfg, LoopedConfig):
            raise LoopscopeError(
                f"LoopedTransformer needs a LoopedConfig, got {type(cfg).__name__}"
            )
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=1.0)
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(torch.randn(cfg.max_pos, d) * 0.1)
        self.hook_embed = HookPoint()

        def blocks(n: int, norm: str) -> nn.ModuleList:
            return nn.ModuleList(
                Block(
                    d,
                    cfg.n_heads,
                    cfg.d_mlp,
                    norm,
                    cfg.positions,
                    cfg.causal,
                    cfg.act,
                    cfg.rope_base,
                    cfg.norm_eps,
                )
                for _ in range(n)
            )

        self.prelude = nn.Module()
        self.prelude.blocks = blocks(cfg.n_prelude, "pre")
        self.core = nn.Module()
        core_norm = "fprm" if cfg.residual_scale == "fprm" else cfg.norm
        self.core.blocks = blocks(cfg.n_core, core_norm)
        self.core.hook_inject, self.core.hook_mix, self.core.hook_out = (
            HookPoint(),
            HookPoint(),
            HookPoint(),
        )
        if cfg.residual_scale == "fprm":
            a1, a2 = cfg.alpha_init
            self.core.alpha1_logit = nn.Parameter(torch.full((d,), math.log(a1 / (1 - a1))))
            self.core.alpha2_logit = nn.Parameter(torch.full((d,), math.log(a2 / (1 - a2))))
        elif cfg.injection == "convex":
            self.core.mix_logit = nn.Parameter(torch.zeros(d))
        elif cfg.injection == "concat":
            self.core.adapter = nn.Linear(2 * d, d)
        if cfg.mixer == "conv1d":
            self.core.conv = nn.Conv1d(d, d, cfg.conv_kernel, groups=d)
        elif cfg.mixer == "conv2d":
            self.core.conv = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.coda = nn.Module()
        self.coda.blocks = blocks(cfg.n_coda, "pre")
        self.ln_final = RMSNorm(d, cfg.norm_eps)
        self.unembed = nn.Linear(d, cfg.n_classes)
        self.hook_readout, self.hook_logits = HookPoint(), HookPoint()
        if cfg.init == "fixed":
            self.register_buffer("h_init", torch.randn(d) * cfg.init_std)
        if cfg.halting == "act":
            self.q_proj = nn.Linear(d, 2)
            nn.init.zeros_(self.q_proj.weight)
            nn.init.constant_(self.q_proj.bias, cfg.halt_bias)
        elif cfg.halting == "exit_gate":
            self.gate_proj = nn.Linear(d, 1)
            nn.init.zeros_(self.gate_proj.weight)
            nn.init.constant_(self.gate_proj.bias, cfg.halt_bias)
        self.setup()

    # -- Loop protocol ------------------------------------------------------------------------
    def encode(self, tokens: Tensor) -> dict[str, Any]:
        """``tokens [B, pos]`` -> ctx ``{"tokens", "e" [B, pos, d], "mask", "grid"}``.

        Raises LoopscopeError for non-integer or non-2-D tokens, ids outside the vocabulary,
        sequences longer than ``max_pos`` (learned positions) and non-square grids (conv2d).
        """
        cfg = self.cfg
        max_pos = cfg.max_pos if cfg.positions == "learned" else None
        tokens = check_tokens(tokens, cfg.vocab_size, max_pos).to(self.embed.weight.device)
        B, P = tokens.shape
        grid = _grid_shape(P) if cfg.mixer == "conv2d" else None
        mask = attention_mask(B, P, cfg.causal, tokens.device)
        e = self.embed(tokens)
        if cfg.positions == "learned":
            e = e + self.pos_embed[:P]
        e = self.hook_embed(e)
        for blk in self.prelude.blocks:
            e = blk(e, mask)
        return {"tokens": tokens, "e": e, "mask": mask, "grid": grid}

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """``h_0 [B, pos, d]`` per ``cfg.init``; ``random`` draws from ``generator``."""
        e = ctx["e"]
        kind = self.cfg.init
        if kind == "zeros":
            return torch.zeros_like(e)
        if kind == "embedding":
            return e.clone()
        if kind == "fixed":
            return self.h_init.to(e.dtype).expand_as(e).clone()
        return trunc_normal(tuple(e.shape), self.cfg.init_std, generator, e.dtype, e.device)

    def fprm_gates(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """FPRM (alpha1, beta1, alpha2, beta2); beta1 * sum_{k<2K} alpha1^k = beta2."""
        a1 = torch.sigmoid(self.core.alpha1_logit)
        a2 = torch.sigmoid(self.core.alpha2_logit)
        K2 = 2 * self.cfg.n_core
        b2 = 1 - a2 * a1**K2
        b1 = b2 * (1 - a1) / (1 - a1**K2)
        return a1, b1, a2, b2

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        """One iteration ``h [B, pos, d] -> h' [B, pos, d]`` (pure; ``t`` is ignored).

        inject e (``core.hook_inject``) -> local mixer (``core.hook_mix``) -> ``n_core``
        weight-tied layers (``core.blocks.{l}.*``) -> ``core.hook_out`` -> damping.
        """
        cfg, e, mask = self.cfg, ctx["e"], ctx.get("mask")
        h_in = h
        a1 = b1 = None
        if cfg.residual_scale == "fprm":
            a1, b1, a2, b2 = self.fprm_gates()
            h = a2 * h + b2 * e
        elif cfg.injection == "add":
            h = h + e
        elif cfg.injection == "convex":
            a = torch.sigmoid(self.core.mix_logit)
            h = a * h + (1 - a) * e
        elif cfg.injection == "concat":
            h = self.core.adapter(torch.cat([h, e], dim=-1))
        h = self.core.hook_inject(h)
        if cfg.mixer == "conv1d":  # depthwise causal conv along positions
            x = F.pad(h.transpose(1, 2), (cfg.conv_kernel - 1, 0))
            h = h + self.core.conv(x).transpose(1, 2)
        elif cfg.mixer == "conv2d":
            B, P, d = h.shape
            H, W = ctx.get("grid") or _grid_shape(P)
            x = h.transpose(1, 2).reshape(B, d, H, W)
            h = h + self.core.conv(x).reshape(B, d, P).transpose(1, 2)
        h = self.core.hook_mix(h)
        for blk in self.core.blocks:
            h = blk(h, mask, a1, b1)
        h = self.core.hook_out(h)
        if cfg.damping != 1.0:
            h = cfg.damping * h + (1 - cfg.damping) * h_in
        return h

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        """Coda layers, final RMSNorm (``hook_readout``), unembed -> ``[B, pos, n_classes]``."""
        for blk in self.coda.blocks:
            h = blk(h, ctx.get("mask"))
        y = self.hook_readout(self.ln_final(h))
        return self.hook_logits(self.unembed(y))

    # -- halting heads ------------------------------------------------------------------------
    def q_head(self, h: Tensor, ctx: dict[str, Any] | None = None) -> Tensor:
        """ACT Q-head on token 0: ``[B, 2]`` logits ``(q_halt, q_cont)``."""
        if self.cfg.halting != "act":
            raise LoopscopeError(
                f"model {self.cfg.name!r} has no ACT Q-head (halting={self.cfg.halting!r})"
            )
        return self.q_proj(h[:, 0])

    def exit_gate(self, h: Tensor, ctx: dict[str, Any] | None = None) -> Tensor:
        """Ouro exit-gate logits per token ``[B, pos]`` (lambda_t = sigmoid)."""
        if self.cfg.halting != "exit_gate":
            raise LoopscopeError(
                f"model {self.cfg.name!r} has no exit gate (halting={self.cfg.halting!r})"
            )
        return self.gate_proj(h).squeeze(-1)
