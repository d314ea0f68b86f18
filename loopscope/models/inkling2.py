"""HF ``Inkling2LoopForCausalLM`` as a loopscope Loop (hand-written over HF's own modules).

Inkling2Loop (transformers >= 5.25) runs decoder layers ``[0, start)`` once, then re-runs layers
``[start, end)`` ``loop_num_passes`` times, every pass restarting from the pre-loop state; passes
after the first read *messages* from the previous pass (an attention over its block states and
its output, one learned query per layer and input) through gates ``(1 - f) * x + g * message`` on
the query / key / value / MLP inputs. Then layers ``[end, L)``, the final attention residual,
RMSNorm, the LM head and a logit softcap. ``loopscope.models.from_hf(model)`` gives :class:`Inkling2Loop`:

* state ``[B, K, pos, d]``: what the next pass reads, the pass's block states after the first
  (entry ``k`` = input of the ``k``-th block-boundary loop layer, ``k >= 1``) and, last, the pass's
  output; ``K`` = loop layers / ``n_layers_per_attn_res_block``.
* ``step(h, ctx, t)``: one pass. ``t = 0`` is HF's first pass (no messages: ``h_0`` is zeros and
  unused); ``t >= 1`` or ``None`` is a message-gated pass, an autonomous map of ``h`` (the map that
  ``spectrum`` / ``find_fixed_points`` study). ``unroll(loop, ids, loop_num_passes)`` reproduces HF.
* ``encode`` runs the pre-loop layers, ``decode`` the post-loop layers and the head.
* hook points (our own: TransformerLens 4.3 has no adapter for this class, and its
  ``boot_transformers`` rejects it): ``core.hook_resid_pre`` / ``core.hook_resid_post``
  ``[B, pos, d]`` around every loop layer, ``core.hook_messages`` ``[B, pos, 4, d]`` (q, k, v, mlp
  messages; passes >= 1), ``hook_state``. Core hooks fire once per loop layer, so ``unroll`` labels
  them ``(pass, layer)`` with ``layer`` the offset from ``loop_layer_index_start``.

Known limitations:

* no hooks inside a layer (attention pattern, experts): use ``loopscope.wrap`` on the HF model
  for those; no KV cache (every call is a full-sequence forward, as an analysis needs).
* experts run HF's ``"eager"`` implementation inside the Loop (``grouped_mm`` has no forward-mode
  AD); on CPU the two agree bit for bit on the tiny model (tests), not guaranteed on GPU.
* HF casts to float32 in ~30 places (``.float()``, ``dtype=torch.float32``); a float64 Loop runs
  its modules under :func:`promote_float32`, which turns those casts into float64, so analyses are
  float64 end to end. HF's own forward in float64 fails without it (``float != double``).
* ``h_0`` is unused: patching ``hook_state`` at iteration 0 changes nothing (pass 0 has no
  messages); patch iteration >= 1. Text-only (no vision tower); ``attention_mask`` is all ones.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError, did_you_mean, reject_unknown_kwargs
from loopscope.core.loop import Loop
from loopscope.models.hf import promote_float32

__all__ = ["Inkling2Loop", "build_tiny_inkling2", "promote_float32", "CLASS_NAMES"]

#: HF classes this adapter accepts
CLASS_NAMES = ("Inkling2LoopForCausalLM",)


@contextmanager
def _eager_experts(config: Any):
    old = getattr(config, "_experts_implementation_internal", None)
    config._experts_implementation_internal = "eager"
    try:
        yield
    finally:
        config._experts_implementation_internal = old


class _Core(nn.Module):
    """Container of the loop-layer hook points (``core.hook_*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_messages = HookPoint()


class Inkling2Loop(Loop):
    """An ``Inkling2LoopForCausalLM`` as a Loop: one step = one pass over the looped layers.

    Args:
        model: the HF model (kept as the submodule ``hf``; the Loop never changes its weights).

    Example:
        >>> import loopscope as ls
        >>> hf = build_tiny_inkling2(seed=0)
        >>> loop = Inkling2Loop(hf)
        >>> ids = torch.randint(0, 60, (1, 6))
        >>> tr = ls.unroll(loop, ids, hf.config.loop_num_passes, decode=True)
        >>> tr.logits.shape  # [passes + 1, B, pos, vocab]
        torch.Size([4, 1, 6, 64])
    """

    label_names = ("pass", "layer")
    state_axes = ("batch", "stack", "pos", "d_model")  # stack: the K block states
    #: the per-layer logit lens reads this hook with :meth:`lens_residual`
    lens_hook = "core.hook_resid_post"

    def __init__(self, model: Any) -> None:
        super().__init__()
        if type(model).__name__ not in CLASS_NAMES:
            raise LoopscopeError(
                f"Inkling2Loop needs an Inkling2LoopForCausalLM, got {type(model).__name__}"
            )
        self.hf = model
        cfg = model.config
        self.start, self.end = cfg.loop_layer_index_start, cfg.loop_layer_index_end
        self.n_passes = cfg.loop_num_passes
        self.n_blocks = sum(
            1 for i in range(self.start, self.end) if self.layers[i].is_block_boundary
        )
        self.core = _Core()
        self.setup()

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    @contextmanager
    def _numerics(self):
        """float64 promotion (when cast to float64) and eager experts around every HF call."""
        mode = promote_float32() if self.dtype == torch.float64 else nullcontext()
        with mode, _eager_experts(self.hf.config):
            yield

    # -- the protocol -------------------------------------------------------------------------
    def encode(self, input_ids: Tensor) -> dict[str, Any]:
        """Token ids ``[B, pos]`` -> masks and the pre-loop state (layers ``[0, start)`` run here)."""
        from loopscope.models.looped import check_tokens

        m = self.hf.model
        ids = check_tokens(input_ids, self.hf.config.vocab_size)
        w = m.embed_tokens.weight
        if not w.is_meta and ids.device != w.device:  # weights on a device: ids follow them
            ids = ids.to(w.device)
        with self._numerics():
            x = m.embed_tokens(ids)
            ctx = self._masks(x)
            ctx["input_ids"] = ids
            h, blocks = x, x.new_zeros(*x.shape[:-1], 0, x.shape[-1])
            for layer in self.layers[: self.start]:
                h, blocks = self._layer(layer, h, blocks, ctx)
        ctx["pre_hidden"], ctx["pre_blocks"] = h, blocks
        return ctx

    def _masks(self, x: Tensor) -> dict[str, Any]:
        from transformers.masking_utils import (
            create_causal_mask,
            create_recurrent_attention_mask,
            create_sliding_window_causal_mask,
        )
        from transformers.models.inkling2.modeling_inkling2 import get_relative_distance

        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        kw = dict(
            config=self.hf.config,
            inputs_embeds=x,
            attention_mask=None,
            cache=None,
            position_ids=pos,
        )
        masks = {
            "full_attention": create_causal_mask(**kw),
            "sliding_attention": create_sliding_window_causal_mask(**kw),
            "linear_attention": create_recurrent_attention_mask(**kw),
        }
        rel = {
            "full_attention": get_relative_distance(x, None, is_sliding=False),
            "sliding_attention": get_relative_distance(x, None, is_sliding=True),
        }
        return {"masks": masks, "rel": rel, "position_ids": pos}

    def _layer(self, layer: nn.Module, h: Tensor, blocks: Tensor, ctx: dict, messages: Any = None):
        """One HF decoder layer; appends ``h`` to the block states at a block boundary (as HF)."""
        kind = layer.attention_type
        extra = () if messages is None else (messages,)
        out = layer(
            h,
            blocks,
            *extra,
            attention_mask=ctx["masks"][kind],
            relative_distance=ctx["rel"][kind],
            conv_mask=ctx["masks"]["linear_attention"],
            cache=None,
            position_ids=ctx["position_ids"],
        )
        if layer.is_block_boundary:
            blocks = torch.cat([blocks, h.unsqueeze(-2)], dim=-2)
        return out, blocks

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Zeros ``[B, K, pos, d]`` (pass 0 reads no messages, so ``h_0`` is a placeholder)."""
        x = ctx["pre_hidden"]
        return x.new_zeros(x.shape[0], self.n_blocks, *x.shape[1:])

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        """One pass over layers ``[start, end)``; messages from ``h`` unless ``t == 0``."""
        prev = None if t == 0 else h.transpose(1, 2)  # HF's layout [B, pos, K, d]
        hidden, blocks = ctx["pre_hidden"], ctx["pre_blocks"]
        n_pre = blocks.shape[-2]
        with self._numerics():
            for j, layer in enumerate(self.layers[self.start : self.end]):
                msg = None
                if prev is not None:
                    msg = self.hf.model.message_input(prev[..., :-1, :], prev[..., -1, :], j)
                    msg = self.core.hook_messages(msg)
                hidden = self.core.hook_resid_pre(hidden)
                hidden, blocks = self._layer(layer, hidden, blocks, ctx, msg)
                hidden = self.core.hook_resid_post(hidden)
        new = torch.cat([blocks[..., n_pre + 1 :, :], hidden.unsqueeze(-2)], dim=-2)
        return new.transpose(1, 2)

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        """Post-loop layers, final attention residual, norm, LM head, softcap -> ``[B, pos, V]``."""
        hs = h.transpose(1, 2)
        first = ctx["pre_hidden"].unsqueeze(-2)
        blocks = torch.cat([ctx["pre_blocks"], first, hs[..., :-1, :]], dim=-2)
        hidden = hs[..., -1, :]
        m = self.hf.model
        with self._numerics():
            for layer in self.layers[self.end :]:
                hidden, blocks = self._layer(layer, hidden, blocks, ctx)
            hidden = m.final_input(blocks, hidden)[0]
            return self.lens(m.norm(hidden).to(ctx["pre_hidden"].dtype))

    def lens(self, hidden: Tensor) -> Tensor:
        """The head alone (LM head + softcap) on a normed residual ``[..., d]`` -> logits."""
        with self._numerics():
            return self.hf.logit_softcap(self.hf.lm_head(hidden).float())

    def lens_residual(self, resid: Tensor) -> Tensor:
        """Direct logit lens of a residual ``[..., d]``: final RMSNorm then the head."""
        with self._numerics():
            return self.lens(self.hf.model.norm(resid).to(resid.dtype))

    def select(self, ctx: dict[str, Any], index: Tensor) -> dict[str, Any]:
        out = dict(ctx)
        for k in ("input_ids", "pre_hidden", "pre_blocks"):
            out[k] = ctx[k][index]
        B = ctx["pre_hidden"].shape[0]
        out["masks"] = {
            k: m[index] if isinstance(m, Tensor) and m.dim() > 0 and m.shape[0] == B > 1 else m
            for k, m in ctx["masks"].items()
        }
        return out

    def batch_size(self, ctx: dict[str, Any]) -> int:
        return ctx["pre_hidden"].shape[0]


_TINY = dict(
    vocab_size=64,
    unpadded_vocab_size=64,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    swa_num_attention_heads=2,
    swa_num_key_value_heads=1,
    swa_head_dim=16,
    sliding_window_size=8,
    d_rel=4,
    rel_extent=16,
    layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
    max_position_embeddings=64,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_layers_per_attn_res_block=1,
    loop_layer_index_start=1,
    loop_layer_index_end=3,
    loop_num_passes=3,
    loop_gate_rank=8,
    eos_token_id=None,
)


@did_you_mean
def build_tiny_inkling2(*, seed: int = 0, noise: float = 0.02, overrides: dict | None = None):
    """A tiny random-weight ``Inkling2LoopForCausalLM`` built offline from its config.

    Args:
        seed: torch seed for the weights.
        noise: std of Gaussian noise added to every parameter after HF's init (HF zero-inits the
            message queries and gates, which would make every pass read uniform messages).
        overrides: config fields to change (default: d=32, 4 layers, loop [1, 3), 3 passes,
            4 experts top-2, vocab 64).
    """
    from transformers import Inkling2LoopForCausalLM, Inkling2LoopTextConfig

    kw = dict(_TINY)
    if overrides:
        # HF configs accept any keyword silently; a typo must not build a different model
        reject_unknown_kwargs("build_tiny_inkling2", overrides, Inkling2LoopTextConfig().to_dict())
        kw.update(overrides)
    cfg = Inkling2LoopTextConfig(**kw)
    torch.manual_seed(seed)
    model = Inkling2LoopForCausalLM(cfg).eval()
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model
