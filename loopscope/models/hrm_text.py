"""HF HRM-Text through a TransformerLens ``TransformerBridge``, exposed as two Loops.

HRM-Text (transformers >= 5.9) runs ``H_cycles`` slow cycles; each runs ``L_cycles`` fast passes
``z_L <- L(z_L + z_H)`` then ``z_H <- H(z_H + z_L)`` (both stacks pre-norm Llama layers with a
final RMSNorm); ``z_H`` starts at the scaled embedding, ``z_L`` at the frozen ``z_L_init``.
The bridge's hooks on ``L_blocks.{i}.*`` fire ``H_cycles x L_cycles`` times per forward and TL
exposes no iteration index; here every firing gets a label:

* :func:`hrm_text_loop` -> :class:`HrmTextLoops` with ``.slow`` (state ``[B, 2, pos, d]`` =
  ``(z_H, z_L)``, one step = one H-cycle, L hooks labelled ``(h_cycle, l_cycle)`` by ``unroll``)
  and ``.fast`` (state ``z_L`` with ``z_H`` held fixed). Both run *through the bridge's modules*
  so every TransformerLens hook fires.
* :func:`capture_forward` runs the bridge's ordinary forward once with a boundary-hook clock
  (``L_blocks.0.hook_in`` advances ``l``, ``H_blocks.0.hook_in`` ends the L passes of a cycle) and
  records every firing with ``(h_cycle, l_cycle)``; H-stack firings get ``l_cycle = -1``.
* :func:`build_tiny_hrm_text` / :func:`bridge_hrm_text` build a tiny random-weight model and its
  bridge offline (capture.md §4.1).

What the labels do *not* mean: they count hook firings in forward order; they do not know about
``L_bp_cycles`` (early L passes run under ``no_grad`` in HF's own forward, so they have no
gradients there).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loopscope.core.capture import HookSession, resolve_hooks
from loopscope.core.errors import LoopscopeError, reject_unknown_kwargs
from loopscope.core.interventions import Intervention
from loopscope.core.loop import Loop
from loopscope.core.trace import Trace
from loopscope.models.hf import local_tokenizer, promote_float32

__all__ = [
    "build_tiny_hrm_text",
    "bridge_hrm_text",
    "local_tokenizer",
    "hrm_text_loop",
    "HrmTextLoops",
    "capture_forward",
]


def build_tiny_hrm_text(seed: int = 0, **overrides: Any):
    """A tiny random-weight ``HrmTextForCausalLM`` and a local word-level tokenizer (offline).

    Returns ``(hf_model, tokenizer)``; defaults: d=64, 1 layer per stack, H=3, L=4, vocab 64.
    """
    from transformers import HrmTextConfig, HrmTextForCausalLM

    kw = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_layers_per_stack=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        H_cycles=3,
        L_cycles=4,
        max_position_embeddings=64,
    )
    # HF configs accept any keyword silently; a typo here must not build a different model
    reject_unknown_kwargs("build_tiny_hrm_text", overrides, HrmTextConfig().to_dict())
    kw.update(overrides)
    cfg = HrmTextConfig(**kw)
    cfg.architectures = ["HrmTextForCausalLM"]  # the bridge picks its adapter from this
    torch.manual_seed(seed)
    model = HrmTextForCausalLM(cfg).eval()
    return model, local_tokenizer(cfg.vocab_size)


def bridge_hrm_text(hf_model: Any, tokenizer: Any = None):
    """Wrap an ``HrmTextForCausalLM`` in a TransformerLens ``TransformerBridge`` (no download).

    Without ``tokenizer`` the bridge gets :func:`local_tokenizer` (ids only; TransformerLens would
    otherwise fetch one by name); pass the model's own tokenizer for text.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if getattr(hf_model.config, "architectures", None) is None:
        hf_model.config.architectures = ["HrmTextForCausalLM"]
    if tokenizer is None:
        tokenizer = local_tokenizer(hf_model.config.vocab_size)
    return TransformerBridge.boot_transformers(
        "local-hrm-text", hf_model=hf_model, tokenizer=tokenizer
    )


class _BridgeLoop(Loop):
    """A Loop that runs through a bridge's modules and exposes the bridge's hook points."""

    #: run HF's hard-coded float32 casts (RMSNorm, rotary) in float64. False replicates HF's
    #: own forward bit for bit; a Loop cast to float64 by ``.to`` / ``.double()`` (what every
    #: float64 analysis does to its copy) switches it on.
    promote: bool = False

    def __init__(self, bridge: Any) -> None:
        super().__init__()
        object.__setattr__(self, "bridge", bridge)  # not a submodule: keep the bridge's hook names
        self.setup()
        self.hook_dict = {**dict(bridge.hook_dict), "hook_state": self.hook_state}
        self.mod_dict = {**dict(bridge.hook_dict), "hook_state": self.hook_state}

    @property
    def hf(self) -> Any:
        return self.bridge.original_model.model

    def parameters(self, recurse: bool = True):
        return self.bridge.parameters(recurse)

    def __deepcopy__(self, memo: dict) -> _BridgeLoop:
        # TL blocks keep the last pre-LN residual on the attention bridge through a weakref
        # closure that a deep copy shares with the original: after a torch.func transform on a
        # copy it holds a dead functorch wrapper that cannot be copied again, so drop it first
        for mod in self.bridge.modules():
            if getattr(mod, "_captured_pre_ln_residual", None) is not None:
                mod._captured_pre_ln_residual = None
            # a block's first forward wires pre-hooks on its norms whose closures hold weak
            # proxies to *this* block's attention: a copy would share them and write into (and,
            # for a dtype cast, be steered by) the original. Unwired, each block (original and
            # copy) wires its own again on its next forward.
            if getattr(mod, "_capture_hooks_wired", False) and hasattr(
                mod, "_teardown_capture_hooks"
            ):
                mod._teardown_capture_hooks()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def _apply(self, fn: Any, recurse: bool = True) -> _BridgeLoop:
        # the bridge is not a submodule (its hook names stay unprefixed), so .to(dtype) and
        # .to(device) must reach it here, or a float64 analysis copy mixes dtypes
        before = self.hf.embed_tokens.weight.dtype
        self.bridge._apply(fn, recurse)
        after = self.hf.embed_tokens.weight.dtype
        if after == torch.float64 and before != after:
            self.promote = True  # an analysis copy: float64 end to end (see promote)
        return super()._apply(fn, recurse)

    def _numerics(self):
        return promote_float32() if self.promote else nullcontext()

    def encode(self, input_ids: Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask

        from loopscope.models.looped import check_tokens

        cfg = self.hf.config
        ids = check_tokens(input_ids, cfg.vocab_size, cfg.max_position_embeddings)
        w = getattr(self.hf.embed_tokens, "weight", None)
        if w is not None and not w.is_meta and ids.device != w.device:  # ids follow the weights
            ids = ids.to(w.device)
        x = self.hf.embed_tokens(ids) * self.hf.embedding_scale
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=position_ids
        )
        with self._numerics():
            pos_emb = self.hf.rotary_emb(x, position_ids)
        return {
            "input_ids": ids,
            "x": x,
            "mask": mask,
            "pos_emb": pos_emb,
            "position_ids": position_ids,
        }

    def select(self, ctx: dict[str, Any], index: Tensor) -> dict[str, Any]:
        out = dict(ctx)
        out["input_ids"], out["x"] = ctx["input_ids"][index], ctx["x"][index]
        if "z_H" in ctx:
            out["z_H"] = ctx["z_H"][index]
        m = ctx["mask"]
        if isinstance(m, Tensor) and m.shape[0] == ctx["x"].shape[0] and m.shape[0] > 1:
            out["mask"] = m[index]
        return out

    def batch_size(self, ctx: dict[str, Any]) -> int:
        return ctx["x"].shape[0]

    def _L(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        with self._numerics():
            return self.hf.L_module(
                h,
                attention_mask=ctx["mask"],
                position_embeddings=ctx["pos_emb"],
                position_ids=ctx["position_ids"],
            )

    def _H(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        with self._numerics():
            return self.hf.H_module(
                h,
                attention_mask=ctx["mask"],
                position_embeddings=ctx["pos_emb"],
                position_ids=ctx["position_ids"],
            )

    def _lm_head(self, z_H: Tensor) -> Tensor:
        with self._numerics():
            return self.bridge.original_model.lm_head(z_H)


class HrmTextSlowLoop(_BridgeLoop):
    """One step = one H-cycle: ``L_cycles`` fast passes then the H stack. State ``[B, 2, pos, d]``."""

    label_names = ("h_cycle", "l_cycle")
    state_axes = ("batch", "stack", "pos", "d_model")  # stack: (z_H, z_L)

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        x = ctx["x"]
        zL = self.hf.z_L_init.to(x.dtype).expand_as(x)
        return torch.stack([x, zL], dim=1).clone()

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        zH, zL = h[:, 0], h[:, 1]
        for _ in range(self.hf.config.L_cycles):
            zL = self._L(zL + zH, ctx)
        zH = self._H(zH + zL, ctx)
        return torch.stack([zH, zL], dim=1)

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        return self._lm_head(h[:, 0])

    def fast_loop(self, z_H: Tensor | None = None) -> HrmTextFastLoop:
        """The fast loop (L passes) with the slow state held at ``z_H`` (default: the embedding)."""
        fast = HrmTextFastLoop(self.bridge, z_H)
        fast.promote = self.promote
        return fast


class HrmTextFastLoop(_BridgeLoop):
    """``z_L <- L(z_L + z_H)`` with ``z_H`` fixed (``ctx["z_H"]``: the embedding unless given)."""

    label_names = ("l_cycle", "sub")
    state_axes = ("batch", "pos", "d_model")

    def __init__(self, bridge: Any, z_H: Tensor | None = None) -> None:
        super().__init__(bridge)
        self.fixed_zH = z_H

    def encode(self, input_ids: Tensor) -> dict[str, Any]:
        ctx = super().encode(input_ids)
        ctx["z_H"] = ctx["x"] if self.fixed_zH is None else self.fixed_zH.to(ctx["x"].dtype)
        return ctx

    def init_state(self, ctx: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        return self.hf.z_L_init.to(ctx["x"].dtype).expand_as(ctx["x"]).clone()

    def step(self, h: Tensor, ctx: dict[str, Any], t: int | None = None) -> Tensor:
        return self._L(h + ctx["z_H"], ctx)

    def decode(self, h: Tensor, ctx: dict[str, Any]) -> Tensor:
        return self._lm_head(self._H(ctx["z_H"] + h, ctx))


@dataclass
class HrmTextLoops:
    """The two Loops of HRM-Text: ``slow`` (H-cycles) and ``fast`` (L-passes, z_H fixed)."""

    slow: HrmTextSlowLoop
    fast: HrmTextFastLoop
    bridge: Any

    def fast_at(self, z_H: Tensor) -> HrmTextFastLoop:
        """The fast loop with the slow state held at ``z_H`` (e.g. ``trace.states[h][:, 0]``)."""
        return HrmTextFastLoop(self.bridge, z_H)

    def hierarchical_parts(self, dtype: torch.dtype) -> tuple[Any, Any, int, int, str]:
        """``(slow loop, z_H -> fast loop, L_cycles, H_cycles, name)`` in ``dtype`` for
        :func:`loopscope.analysis.hierarchical` (a deep copy when the dtype differs)."""
        import contextlib
        import copy
        import io

        loops = self
        p = next((q for q in self.bridge.parameters() if q.is_floating_point()), None)
        if p is not None and p.dtype != dtype:
            with contextlib.redirect_stdout(io.StringIO()):  # TL prints the dtype change
                loops = hrm_text_loop(copy.deepcopy(self.bridge).to(dtype))
        cfg = loops.slow.hf.config
        return loops.slow, loops.fast_at, int(cfg.L_cycles), int(cfg.H_cycles), "hrm_text"


def hrm_text_loop(bridge: Any) -> HrmTextLoops:
    """Expose a bridged HRM-Text model as Loops (see module docstring)."""
    hf = getattr(bridge, "original_model", None)
    if hf is None or not hasattr(getattr(hf, "model", None), "L_module"):
        raise LoopscopeError("hrm_text_loop needs a TransformerBridge around an HrmTextForCausalLM")
    return HrmTextLoops(slow=HrmTextSlowLoop(bridge), fast=HrmTextFastLoop(bridge), bridge=bridge)


class _HLClock:
    """Boundary-hook clock: ``L_blocks.0.hook_in`` starts an L pass, ``H_blocks.0.hook_in`` an H pass.

    Labels are ``(h_cycle, l_cycle)`` (``l_cycle = -1`` inside the H stack); ``k`` counts a hook's
    firings over the whole forward.
    """

    def __init__(self) -> None:
        self.h, self.l, self.in_H = 0, -1, False
        self.counts: dict[str, int] = {}

    def on_L(self, x: Tensor, hook: Any) -> None:
        if self.in_H:  # first L pass after an H pass: a new slow cycle
            self.h, self.l, self.in_H = self.h + 1, 0, False
        else:
            self.l += 1

    def on_H(self, x: Tensor, hook: Any) -> None:
        self.in_H = True

    @property
    def label(self) -> tuple[int, int]:
        return (self.h, -1 if self.in_H else self.l)

    def tick(self, name: str) -> tuple[tuple[int, int], int]:
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return self.label, k

    def hooks(self, bridge: Any) -> list[tuple[Any, Any]]:
        hd = dict(bridge.hook_dict)
        return [(hd["L_blocks.0.hook_in"], self.on_L), (hd["H_blocks.0.hook_in"], self.on_H)]


_ZH = "H_ln_final.hook_out"


def capture_forward(
    bridge: Any, input_ids: Tensor, capture: Any = None, interventions: Any = (), grad: bool = False
) -> Trace:
    """Run the bridge's own forward once and record every firing with ``(h_cycle, l_cycle)``.

    ``trace.states`` = ``z_H`` after each H-cycle (``[H+1, B, pos, d]``, entry 0 = the scaled
    embedding), ``trace.logits`` = the LM head on each of them; ``trace[hook]`` stacks every firing.
    ``interventions`` are the same objects as for ``unroll``; their ``iteration`` is matched against
    these labels (an int matches every firing of that H-cycle, ``(h, l)`` one L pass).
    """
    hd = dict(bridge.hook_dict)
    for name in ("L_blocks.0.hook_in", "H_blocks.0.hook_in", _ZH):
        if name not in hd:
            raise LoopscopeError(f"capture_forward needs an HRM-Text bridge (no hook {name!r})")
    points, aliases = resolve_hooks(bridge, capture, what="capture")
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = list(interventions or [])
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise LoopscopeError(
                f"interventions must be loopscope interventions, got {type(iv).__name__}"
            )
    # z_H after each H-cycle is read from the final norm's hook, captured or not
    session = HookSession(bridge, capture=[*points, _ZH], interventions=ivs, clock=_HLClock())
    hf = bridge.original_model
    with torch.enable_grad() if grad else torch.no_grad(), session:
        x = hf.model.embed_tokens(input_ids) * hf.model.embedding_scale
        out = hf(input_ids)
    acts, labels = session.acts(), session.labels()
    zHs = torch.cat([x.detach()[None], acts[_ZH]])
    if _ZH not in points:
        acts.pop(_ZH)
        labels.pop(_ZH)
    with torch.enable_grad() if grad else torch.no_grad():
        logits = hf.lm_head(zHs.flatten(0, 1)).view(*zHs.shape[:3], -1)
    B = input_ids.shape[0]
    if not torch.equal(logits[-1], out.logits.detach()):  # the clock and the model must agree
        raise LoopscopeError(
            "capture_forward: reconstructed final logits differ from the model's output"
        )
    return Trace(
        states=zHs,
        acts=acts,
        labels=labels,
        status=["max_iter"] * B,
        diverged_at=torch.full((B,), -1, dtype=torch.long),
        halted_at=torch.full((B,), -1, dtype=torch.long),
        logits=logits.detach(),
        meta={
            "model": "hrm_text",
            "label_names": ["h_cycle", "l_cycle"],
            "H_cycles": hf.config.H_cycles,
            "L_cycles": hf.config.L_cycles,
        },
        aliases=aliases,
    )
