"""TransformerFAM: block attention with a feedback memory carried from block to block.

The input ``[B, P]`` is cut into ``n_blocks = P / block_size`` blocks. Every layer ``l`` keeps
``F = n_memory`` memory activations ``M^l [F, d]``. On block ``t`` layer ``l`` runs ONE attention
+ MLP over the joint sequence ``[M^l_t ; x^l_t]`` with the layer's own Q/K/V/FF weights:

* block tokens attend to every memory slot and causally to the block (``causal=False``: to
  the whole block);
* memory queries attend to every memory slot and the whole block;
* the layer's output at the memory rows is ``M^l_{t+1}`` (fed to the same layer on block
  ``t + 1``); the output at the token rows is ``x^{l+1}_t``.

No earlier block is attended (FAM with 0 sliding-window memory blocks), so the memory
``M_t [B, n_layers, F, d]`` is the loop's entire latent state and the recurrence is a Loop::

    ctx = encode(tokens)            # block embeddings [B, n_blocks, block, d] + the joint mask
    M_0 = init_state(ctx)           # the learned initial memory, broadcast to the batch
    M_{t+1} = step(M_t, ctx, t)     # consume block t (non-autonomous: t picks the block)
    y = decode(M_t, ctx)            # the last (query) block read with memory M_t -> [B, block, C]

``forward(tokens)`` runs the ``n_blocks - 1`` context blocks and decodes the query block: that is
the model's answer. Decoding at an earlier ``t`` answers the query as if it followed block
``t - 1``.

Hook names: ``hook_embed`` ``[B, P, d]``, ``hook_state`` (the memory entering a step),
``blocks.{l}.hook_memory`` ``[B, F, d]`` (memory read by layer l at this block),
``blocks.{l}.hook_memory_out`` (memory written), ``blocks.{l}.*`` (the layer's usual hooks, see
:mod:`.layers`; they also fire inside ``decode``), ``hook_readout``, ``hook_logits``.

Example:
    >>> import torch
    >>> from loopscope.models.fam import FAMConfig, FAMTransformer
    >>> m = FAMTransformer(FAMConfig(vocab_size=10, n_classes=4, block_size=4, n_memory=2))
    >>> m(torch.randint(0, 10, (2, 12))).shape  # 3 blocks: 2 context + the query block
    torch.Size([2, 4, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError
from loopscope.core.loop import Loop
from loopscope.models.config import _fail, _Serializable, _validate
from loopscope.models.layers import Block, RMSNorm
from loopscope.models.looped import check_tokens

__all__ = ["FAMConfig", "FAMTransformer", "fam_mask"]


@dataclass
class FAMConfig(_Serializable):
    """Knobs of the TransformerFAM model (tiny CPU defaults).

    Fields:
        d_model, n_heads, d_mlp: widths. vocab_size: input ids. n_classes: logits per position.
        n_layers: layers; each has its own memory and its own weights (shared by memory and
            tokens). block_size: tokens per block (must divide the input length).
        n_memory: F, memory activations per layer (>= 1).
        norm: ``pre`` (memory is a residual stream: its norm may grow) or ``post`` (RMS-normed
            memory). causal: block tokens attend causally within the block.
        memory_init_std: std of the learned initial memory.
    """

    d_model: int = 32
    n_heads: int = 2
    d_mlp: int = 64
    vocab_size: int = 16
    n_classes: int = 16
    n_layers: int = 2
    block_size: int = 8
    n_memory: int = 4
    norm: str = "post"
    causal: bool = True
    act: str = "gelu"
    memory_init_std: float = 1.0
    norm_eps: float = 1e-6
    name: str = "fam"

    def __post_init__(self) -> None:
        _validate(self)
        for field in ("block_size", "n_memory"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(self, field, f"must be a positive integer, got {v!r}")
        if self.norm not in ("pre", "post"):
            _fail(self, "norm", f"must be 'pre' or 'post', got {self.norm!r}")
        if not self.memory_init_std > 0:
            _fail(self, "memory_init_std", f"must be > 0, got {self.memory_init_std!r}")


def fam_mask(n_memory: int, block_size: int, causal: bool, device: Any = None) -> Tensor:
    """Joint mask ``[F + b, F + b]`` (True = may attend) over ``[memory ; block]`` rows/cols.

    Memory rows see everything; token rows see every memory slot and the block (causally when
    ``causal``).
    """
    F, b = n_memory, block_size
    m = torch.ones(F + b, F + b, dtype=torch.bool, device=device)
    if causal:
        m[F:, F:] = torch.ones(b, b, dtype=torch.bool, device=device).tril()
    return m


class FAMBlock(Block):
    """A layer that also hooks the memory it reads (``hook_memory``) and writes (``hook_memory_out``)."""

    def __init__(self, cfg: FAMConfig) -> None:
        d = cfg.d_model
        super().__init__(
            d, cfg.n_heads, cfg.d_mlp, cfg.norm, "nope", False, cfg.act, 1e4, cfg.norm_eps
        )
        self.hook_memory, self.hook_memory_out = HookPoint(), HookPoint()


class FAMTransformer(Loop):
    """TransformerFAM as a non-autonomous Loop whose state is the memory ``[B, L, F, d]``.

    ctx (dict, batch on axis 0): ``tokens [B, P]``, ``x [B, n_blocks, block, d]`` (token +
    in-block position embeddings), ``mask [B, F + b, F + b]`` (expanded view).
    ``step(M, ctx, t)`` consumes block ``t`` (``0 <= t < n_blocks``); ``t=None`` means the last
    context block (the map a Jacobian at the end state refers to).
    """

    label_names = ("iteration", "sub")
    #: the memory [B, L, F, d]: per layer, F memory slots, which patching and probes index as
    #: the positions of the state (a probe site per layer: state[0], state[1] ...)
    state_axes = ("batch", "layer", "pos", "d_model")

    def __init__(self, cfg: FAMConfig) -> None:
        super().__init__()
        if not isinstance(cfg, FAMConfig):
            raise LoopscopeError(f"FAMTransformer needs a FAMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.pos_embed = nn.Parameter(torch.randn(cfg.block_size, d) * 0.1)
        self.memory_init = nn.Parameter(
            torch.randn(cfg.n_layers, cfg.n_memory, d) * cfg.memory_init_std
        )
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(FAMBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = RMSNorm(d, cfg.norm_eps)
        self.unembed = nn.Linear(d, cfg.n_classes)
        self.hook_readout, self.hook_logits = HookPoint(), HookPoint()
        self.setup()

    # -- Loop protocol ------------------------------------------------------------------------
    def encode(self, tokens: Tensor) -> dict[str, Any]:
        """``tokens [B, P]`` -> ctx; P must be a multiple of ``block_size`` (one-line error)."""
        cfg = self.cfg
        tokens = check_tokens(tokens, cfg.vocab_size).to(self.embed.weight.device)
        B, P = tokens.shape
        b = cfg.block_size
        if P % b:
            raise LoopscopeError(
                f"sequence length {P} is not a multiple of block_size={b} (FAM reads whole blocks)"
            )
        pos = torch.arange(P, device=tokens.device) % b
        x = self.hook_embed(self.embed(tokens) + self.pos_embed[pos])
        mask = fam_mask(cfg.n_memory, b, cfg.causal, tokens.device)
        return {
            "tokens": tokens,
            "x": x.view(B, P // b, b, cfg.d_model),
            "mask": mask.expand(B, *mask.shape),
        }

    def n_context(self, ctx: dict[str, Any]) -> int:
        """Context blocks in ``ctx`` (every block but the last, query block): the model's T."""
        return ctx["x"].shape[1] - 1

    def n_steps(self, ctx: dict[str, Any]) -> int:
        """Steps the input supplies (:meth:`Loop.n_steps`): the context blocks."""
        return self.n_context(ctx)

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """The learned initial memory broadcast to ``[B, L, F, d]`` (``generator`` unused)."""
        B = ctx["x"].shape[0]
        return self.memory_init.unsqueeze(0).expand(B, *self.memory_init.shape).clone()

    def _layers(self, M: Tensor, x: Tensor, mask: Tensor, hooks: bool) -> tuple[Tensor, Tensor]:
        """Every layer on ``[M^l ; x]``: memory ``[B, L, F, d]``, block ``[B, b, d]`` -> both new."""
        F = self.cfg.n_memory
        new = []
        for layer, blk in enumerate(self.blocks):
            m = blk.hook_memory(M[:, layer]) if hooks else M[:, layer]
            out = blk(torch.cat([m, x], dim=1), mask)
            new.append(blk.hook_memory_out(out[:, :F]) if hooks else out[:, :F])
            x = out[:, F:]
        return torch.stack(new, dim=1), x

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        """Consume block ``t``: memory ``[B, L, F, d]`` -> the memory after that block."""
        nb = ctx["x"].shape[1]
        if t is None:
            t = max(0, nb - 2)
        if not 0 <= int(t) < nb:
            raise LoopscopeError(
                f"FAM step t={t} but the input has {nb} blocks (one step per block: "
                f"n_iter <= {nb - 1} context blocks)"
            )
        self._check_state(h)
        M, _ = self._layers(h, ctx["x"][:, int(t)], ctx["mask"], hooks=True)
        return M

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        """The last block read with memory ``h``: final RMSNorm, unembed -> ``[B, block, C]``."""
        self._check_state(h)
        _, x = self._layers(h, ctx["x"][:, -1], ctx["mask"], hooks=False)
        y = self.hook_readout(self.ln_final(x))
        return self.hook_logits(self.unembed(y))

    def forward(
        self, inputs: Tensor, n_iter: int | None = None, h0: Tensor | None = None
    ) -> Tensor:
        """Encode, consume ``n_iter`` blocks (default: every context block), decode the last."""
        ctx = self.encode(inputs)
        h = self.init_state(ctx) if h0 is None else h0
        for t in range(self.n_context(ctx) if n_iter is None else n_iter):
            h = self.step(self.hook_state(h), ctx, t)
        return self.decode(h, ctx)

    def _check_state(self, h: Tensor) -> None:
        want = tuple(self.memory_init.shape)
        if not isinstance(h, Tensor) or h.dim() != 4 or tuple(h.shape[1:]) != want:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise LoopscopeError(f"FAM memory must be [B, {', '.join(map(str, want))}], got {got}")
