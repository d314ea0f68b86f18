"""Configs of the looped transformer family (validated; JSON round-trip for checkpoints).

Every knob of models-and-tasks.md §1 is one dataclass field. A bad value raises a one-line
:class:`~loopscope.core.errors.LoopscopeError` naming the field; ``to_dict`` / ``from_dict`` give the
JSON form stored next to a checkpoint (unknown keys are rejected, never dropped).

Example:
    >>> cfg = LoopedConfig(norm="pre", injection="convex")
    >>> LoopedConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from loopscope.core.errors import LoopscopeError, suggest

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

# lower bounds of the integer fields (a field absent from a config class is skipped)
_INT_MIN = {
    "d_model": 1,
    "n_heads": 1,
    "d_mlp": 1,
    "vocab_size": 1,
    "n_classes": 1,
    "n_prelude": 0,
    "n_core": 1,
    "n_coda": 0,
    "conv_kernel": 1,
    "max_pos": 1,
    "n_layers": 1,
    "L_cycles": 1,
}
# float fields that must be strictly positive
_POSITIVE = ("init_std", "rope_base", "norm_eps")


def _fail(cfg: Any, field: str, msg: str) -> None:
    raise LoopscopeError(f"{type(cfg).__name__}.{field} {msg}")


def _validate(cfg: Any) -> None:
    """Types, ranges and option names of every field; coerces ints to floats where floats go."""
    for name, options in _CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in options:
            v = getattr(cfg, name)
            _fail(cfg, name, f"must be one of {options}, got {v!r}{suggest(str(v), options)}")
    for name, lo in _INT_MIN.items():
        if not hasattr(cfg, name):
            continue
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            what = "a positive integer" if lo == 1 else "an integer >= 0"
            _fail(cfg, name, f"must be {what}, got {v!r}")
    for name in (*_POSITIVE, "damping", "halt_bias"):
        if not hasattr(cfg, name):
            continue
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            _fail(cfg, name, f"must be a finite number, got {v!r}")
        object.__setattr__(cfg, name, float(v))
        if name in _POSITIVE and v <= 0:
            _fail(cfg, name, f"must be > 0, got {v!r}")
    for name in ("causal", "shared"):
        if hasattr(cfg, name) and not isinstance(getattr(cfg, name), bool):
            _fail(cfg, name, f"must be True or False, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.name, str) or not cfg.name:
        _fail(cfg, "name", f"must be a non-empty string, got {cfg.name!r}")
    if cfg.d_model % cfg.n_heads:
        _fail(cfg, "n_heads", f"({cfg.n_heads}) must divide d_model ({cfg.d_model})")
    if getattr(cfg, "positions", "nope") == "rope" and (cfg.d_model // cfg.n_heads) % 2:
        _fail(
            cfg,
            "positions",
            f"'rope' needs an even head dimension, got {cfg.d_model // cfg.n_heads}",
        )


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (tuples become lists in JSON; ``from_dict`` restores)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Config from ``to_dict`` output; unknown fields raise (a typo never vanishes)."""
        if not isinstance(d, dict):
            raise LoopscopeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise LoopscopeError(
                f"unknown {cls.__name__} fields {unknown}{suggest(unknown[0], known)}"
            )
        return cls(**d)

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated; unknown fields raise)."""
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

    Fields:
        d_model, n_heads, d_mlp: widths. vocab_size: input ids. n_classes: logits per position.
        n_prelude / n_core / n_coda: pre-norm layers before the loop / weight-tied layers in the
            looped core / pre-norm layers between the loop and the unembedding.
        norm: core layer norm placement, ``post`` ``x = N(x + F(x))``, ``pre`` ``x + F(N(x))``,
            ``sandwich`` ``N(F(N(x)) + x)`` (Huginn). RMSNorm throughout.
        residual_scale: ``fprm`` = FPRM input-independent residual scaling (§1.1); needs
            ``norm="pre"`` and ``injection="convex"`` (its injection is the alpha2/beta2 mix).
        alpha_init: initial (alpha1, alpha2) of the FPRM gates, each in (0, 1).
        injection: how e enters each step: ``add`` h+e, ``convex`` a*h+(1-a)*e with learned
            per-dim a = sigmoid (init 0.5), ``concat`` Linear(2d->d)([h; e]), ``none`` (e only
            enters through h_0, e.g. ``init="embedding"``).
        init: h_0 = ``zeros``, ``fixed`` (one non-learned N(0, init_std) buffer broadcast),
            ``random`` (per sample and token trunc-normal(0, init_std) from the generator),
            ``embedding`` (h_0 = e).
        mixer: ``conv1d`` depthwise causal conv (``conv_kernel`` taps) or ``conv2d`` depthwise
            3x3 on the square grid, added residually to the state at the start of each step.
        positions: ``nope``, ``rope`` (rotate-half, ``rope_base``), ``learned`` (absolute,
            ``max_pos``). causal: causal attention mask (else bidirectional).
        act: MLP activation ``gelu`` or ``swiglu``.
        damping: s in ``h <- s*f(h) + (1-s)*h``, in (0, 1]; 1 = plain update.
        halting: ``act`` (Q-head on token 0) or ``exit_gate`` (Ouro per-token gate); both
            initialised to "continue": weight 0, bias ``halt_bias`` (-5).
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
        _validate(self)
        a = self.alpha_init
        if (
            not isinstance(a, (tuple, list))
            or len(a) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a)
            or not all(0.0 < v < 1.0 for v in a)
        ):
            _fail(self, "alpha_init", f"must be two numbers in (0, 1), got {a!r}")
        self.alpha_init = (float(a[0]), float(a[1]))
        if not 0.0 < self.damping <= 1.0:
            _fail(self, "damping", f"must be in (0, 1], got {self.damping}")
        if self.residual_scale == "fprm" and self.norm != "pre":
            _fail(self, "norm", f"must be 'pre' with residual_scale='fprm', got {self.norm!r}")
        if self.residual_scale == "fprm" and self.injection != "convex":
            _fail(
                self,
                "injection",
                "must be 'convex' with residual_scale='fprm' (its injection is the "
                f"alpha2/beta2 mix), got {self.injection!r}",
            )
        if self.mixer == "conv2d" and self.causal:
            _fail(self, "causal", "must be False with mixer='conv2d' (a 3x3 conv sees the future)")


@dataclass
class HierarchicalConfig(_Serializable):
    """Two-state (z_H, z_L) wiring of HRM (two stacks) or TRM (one shared net), spec §1.2.

    Fields as in :class:`LoopedConfig`, plus ``n_layers`` (post/pre-norm layers per stack),
    ``L_cycles`` (fast steps per slow step) and ``shared`` (TRM: one net in both roles).
    ``init="fixed"`` draws separate H_init / L_init buffers; ``embedding`` starts z_H at e.
    Halting: ``none`` or ``act`` (Q-head on z_H token 0).
    """

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
        if self.halting == "exit_gate":
            _fail(
                self, "halting", "must be 'none' or 'act' for hierarchical models, got 'exit_gate'"
            )
