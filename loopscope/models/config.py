"""Configs of the looped transformer family (validated; JSON round-trip for checkpoints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loopscope.errors import LoopscopeError, suggest

__all__ = ["LoopedConfig", "HierarchicalConfig"]

_CHOICES = {
    "norm": ("post", "pre", "sandwich"),
    "residual_scale": ("none", "fprm"),
    "injection": ("add", "convex", "concat", "none"),
    "init": ("zeros", "fixed", "random", "embedding"),
    "mixer": ("none", "conv1d", "conv2d"),
    "positions": ("nope", "rope", "learned"),
    "act": ("gelu", "swiglu"),
    "halting": ("none", "act", "exit_gate"),
}


def _validate(cfg: Any) -> None:
    for name, options in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in options:
            v = getattr(cfg, name)
            raise LoopscopeError(
                f"{type(cfg).__name__}.{name} must be one of {options}, got {v!r}{suggest(str(v), options)}"
            )
    for name in ("d_model", "n_heads", "d_mlp", "vocab_size", "n_classes"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LoopscopeError(
                f"{type(cfg).__name__}.{name} must be a positive integer, got {v!r}"
            )
    if cfg.d_model % cfg.n_heads:
        raise LoopscopeError(
            f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})"
        )
    if cfg.positions == "rope" and (cfg.d_model // cfg.n_heads) % 2:
        raise LoopscopeError("rope needs an even head dimension")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise LoopscopeError(
                f"unknown {cls.__name__} fields {unknown}{suggest(unknown[0], known)}"
            )
        return cls(**d)

    def replace(self, **changes: Any):
        known = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for k in changes:
            if k not in known:
                raise LoopscopeError(
                    f"unknown {type(self).__name__} field {k!r}{suggest(k, known)}"
                )
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class LoopedConfig(_Serializable):
    """Every knob of the single-state looped family (models-and-tasks.md §1).

    Defaults are a tiny CPU model: d=64, 4 heads, one weight-tied core layer.
    """

    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    vocab_size: int = 16
    n_classes: int = 16
    n_prelude: int = 0
    n_core: int = 1
    n_coda: int = 0
    norm: str = "post"
    residual_scale: str = "none"
    alpha_init: tuple[float, float] = (0.5, 0.5)
    injection: str = "add"
    init: str = "zeros"
    init_std: float = 1.0
    mixer: str = "none"
    conv_kernel: int = 4
    positions: str = "nope"
    max_pos: int = 512
    rope_base: float = 10000.0
    causal: bool = True
    act: str = "gelu"
    damping: float = 1.0
    halting: str = "none"
    halt_bias: float = -5.0
    norm_eps: float = 1e-6
    name: str = "looped"

    def __post_init__(self) -> None:
        self.alpha_init = tuple(self.alpha_init)  # type: ignore[assignment]
        _validate(self)
        for name in ("n_prelude", "n_coda"):
            if getattr(self, name) < 0:
                raise LoopscopeError(f"LoopedConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_core < 1:
            raise LoopscopeError(f"LoopedConfig.n_core must be >= 1, got {self.n_core}")
        if not 0.0 < self.damping <= 1.0:
            raise LoopscopeError(f"LoopedConfig.damping must be in (0, 1], got {self.damping}")
        if self.conv_kernel < 1:
            raise LoopscopeError(f"LoopedConfig.conv_kernel must be >= 1, got {self.conv_kernel}")


@dataclass
class HierarchicalConfig(_Serializable):
    """Two-state (z_H, z_L) wiring of HRM (two stacks) or TRM (one shared net)."""

    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    vocab_size: int = 16
    n_classes: int = 16
    n_layers: int = 1
    L_cycles: int = 2
    shared: bool = False
    norm: str = "post"
    positions: str = "learned"
    max_pos: int = 512
    rope_base: float = 10000.0
    causal: bool = False
    act: str = "gelu"
    init: str = "fixed"
    init_std: float = 1.0
    halting: str = "none"
    halt_bias: float = -5.0
    norm_eps: float = 1e-6
    name: str = "hrm"

    def __post_init__(self) -> None:
        _validate(self)
        if self.n_layers < 1 or self.L_cycles < 1:
            raise LoopscopeError("HierarchicalConfig.n_layers and L_cycles must be >= 1")
        if self.halting == "exit_gate":
            raise LoopscopeError("hierarchical models support halting 'none' or 'act'")
