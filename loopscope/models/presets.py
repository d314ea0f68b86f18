"""Presets named after the published designs (tiny CPU sizes; models-and-tasks.md §1, §7).

=================== ==========================================================================
preset              wiring
=================== ==========================================================================
universal           looped / Universal Transformer: post-norm, add injection, zeros init, RoPE
huginn              prelude/core/coda, sandwich norm, random init, concat+adapter injection
fprm                FPRM: pre-norm + residual scaling, convex injection, NoPE + causal conv1d,
                    random init std 6
fprm_rope_postnorm  baseline for fprm: post-norm, RoPE, add injection, zeros init
ouro                no injection after step 0, embedding init, pre-norm, Ouro exit gate
act                 post-norm + ACT Q-head (HRM/TRM-style halting), NoPE + conv1d
maze_conv           FPRM recipe on grids: bidirectional, conv2d 3x3 mixer, NoPE
hrm                 hierarchical, two post-norm stacks, fixed inits, learned positions
trm                 hierarchical, one shared post-norm net
fam                 TransformerFAM: block attention + per-layer feedback memory (a loop over blocks)
=================== ==========================================================================
"""

from __future__ import annotations

from typing import Any

from loopscope.core.errors import LoopscopeError, suggest
from loopscope.models.config import HierarchicalConfig, LoopedConfig
from loopscope.models.fam import FAMConfig

__all__ = ["PRESETS", "preset", "preset_names"]

PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "universal": (
        LoopedConfig,
        dict(norm="post", injection="add", init="zeros", positions="rope", name="universal"),
    ),
    "huginn": (
        LoopedConfig,
        dict(
            n_prelude=1,
            n_core=2,
            n_coda=1,
            norm="sandwich",
            injection="concat",
            init="random",
            init_std=0.1,
            positions="rope",
            name="huginn",
        ),
    ),
    "fprm": (
        LoopedConfig,
        dict(
            norm="pre",
            residual_scale="fprm",
            injection="convex",
            init="random",
            init_std=6.0,
            positions="nope",
            mixer="conv1d",
            name="fprm",
        ),
    ),
    "fprm_rope_postnorm": (
        LoopedConfig,
        dict(
            norm="post", injection="add", init="zeros", positions="rope", name="fprm_rope_postnorm"
        ),
    ),
    "ouro": (
        LoopedConfig,
        dict(
            norm="pre",
            injection="none",
            init="embedding",
            positions="rope",
            halting="exit_gate",
            name="ouro",
        ),
    ),
    "act": (
        LoopedConfig,
        dict(
            norm="post",
            injection="add",
            init="zeros",
            positions="nope",
            mixer="conv1d",
            halting="act",
            name="act",
        ),
    ),
    # FPRM's bounded update (pre-norm, input-independent residual scaling, convex injection)
    # on a grid: the first recipe (pre-norm + additive injection from zeros, whose state grows
    # every step) never left the majority rate on 9x9 reachability
    "maze_conv": (
        LoopedConfig,
        dict(
            norm="pre",
            residual_scale="fprm",
            injection="convex",
            init="random",
            init_std=6.0,
            positions="nope",
            mixer="conv2d",
            causal=False,
            name="maze_conv",
        ),
    ),
    # TransformerFAM: post-norm layers, F = 4 memory activations per layer, blocks of 8
    "fam": (FAMConfig, dict(name="fam")),
    "hrm": (HierarchicalConfig, dict(shared=False, L_cycles=2, name="hrm")),
    "trm": (HierarchicalConfig, dict(shared=True, L_cycles=3, name="trm")),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> LoopedConfig | HierarchicalConfig:
    """The config of preset ``name`` with ``overrides`` applied (unknown fields rejected)."""
    if name not in PRESETS:
        raise LoopscopeError(
            f"unknown preset {name!r}{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    cls, base = PRESETS[name]
    cfg = cls(**base)
    return cfg.replace(**overrides)
