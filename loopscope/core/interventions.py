"""Per-iteration interventions: replace / add / zero / mean-ablate / patch-from-trace / transplant.

An intervention targets ``(hook, iteration[, positions])``. ``iteration`` selects firings by their
label (see :class:`loopscope.Trace`): an int matches every firing of that loop iteration, a tuple
matches one label exactly (e.g. ``(h_cycle, l_cycle)``), a list/range matches any of its items, and
``"all"`` matches every firing. Positions index the hook's position axis (``HookPoint.pos_dim``,
else axis 1). Every intervention returns a **fresh** tensor (never writes into the activation), so
the model cannot mutate a source trace and earlier iterations stay bit-identical.

Example:
    >>> import torch
    >>> from loopscope import FnLoop, unroll, Patch
    >>> loop = FnLoop(step=lambda h, x: 0.5 * h + x, init_state=torch.zeros(2))
    >>> x = torch.ones(1, 2)
    >>> tr = unroll(loop, x, 4, interventions=[Patch("hook_state", 2, value=torch.zeros(1, 2))])
    >>> tr.states[2].tolist()
    [[0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError

if TYPE_CHECKING:
    pass

__all__ = [
    "Intervention",
    "Patch",
    "Add",
    "Zero",
    "MeanAblate",
    "Transplant",
    "matches_iteration",
]

Label = tuple


def matches_iteration(selector: Any, label: Label) -> bool:
    """Whether a firing with ``label`` is selected by an ``iteration`` selector."""
    if selector is None or (isinstance(selector, str) and selector == "all"):
        return True
    if isinstance(selector, bool):
        raise LoopscopeError(f"iteration must be an int, tuple, list or 'all', got {selector!r}")
    if isinstance(selector, int):
        return label[0] == selector
    if isinstance(selector, tuple):
        return tuple(label[: len(selector)]) == selector
    if isinstance(selector, Iterable) and not isinstance(selector, str):
        return any(matches_iteration(s, label) for s in selector)
    raise LoopscopeError(f"iteration must be an int, tuple, list or 'all', got {selector!r}")


def _validate_selector(selector: Any) -> None:
    matches_iteration(selector, (0, 0))  # raises on a malformed selector
    if isinstance(selector, int) and not isinstance(selector, bool) and selector < 0:
        raise LoopscopeError(f"iteration must be >= 0, got {selector}")


def _pos_index(x: Tensor, pos_dim: int, positions: Any) -> tuple:
    if pos_dim >= x.dim():
        raise LoopscopeError(
            f"positions given but the activation has shape {tuple(x.shape)} (no axis {pos_dim})"
        )
    index: list[Any] = [slice(None)] * x.dim()
    index[pos_dim] = positions
    n = x.shape[pos_dim]
    pos = torch.as_tensor(positions) if not isinstance(positions, slice) else None
    if pos is not None and pos.numel() and bool(((pos >= n) | (pos < -n)).any()):
        shown = pos.tolist()
        raise LoopscopeError(
            f"intervention positions {shown} out of range: the activation has {n} positions "
            f"(axis {pos_dim} of shape {tuple(x.shape)})"
        )
    return tuple(index)


@dataclass
class Intervention:
    """Base class: select firings, then compute the new activation from the old one."""

    hook: str
    iteration: Any = "all"
    positions: Any = None
    pos_dim: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise LoopscopeError(f"intervention hook must be a hook name, got {self.hook!r}")
        _validate_selector(self.iteration)
        if isinstance(self.positions, list):
            self.positions = torch.as_tensor(self.positions, dtype=torch.long)

    def applies(self, label: Label) -> bool:
        return matches_iteration(self.iteration, label)

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor, label: Label, k: int, pos_dim: int) -> Tensor:
        """Apply to activation ``x`` of firing number ``k`` with ``label``; returns a fresh tensor."""
        dim = self.pos_dim if self.pos_dim is not None else pos_dim
        self._active_pos_dim = dim
        if self.positions is None:
            out = self.new_value(x, label, k)
            if out.shape != x.shape:
                raise LoopscopeError(
                    f"{type(self).__name__} on {self.hook!r} at {label}: value shape "
                    f"{tuple(out.shape)} != activation shape {tuple(x.shape)}"
                )
            return out.to(dtype=x.dtype, device=x.device).clone()
        idx = _pos_index(x, dim, self.positions)
        out = x.clone()
        sub = self.new_value(x, label, k)
        if sub.shape == x.shape:  # a full-shape value: take its selected positions
            sub = sub[idx]
        target_shape = out[idx].shape
        if sub.shape != target_shape:
            raise LoopscopeError(
                f"{type(self).__name__} on {self.hook!r} at {label}: value shape {tuple(sub.shape)} "
                f"does not match the patched positions {tuple(target_shape)}"
            )
        out[idx] = sub.to(dtype=x.dtype, device=x.device)
        return out


@dataclass
class Patch(Intervention):
    """Replace the activation with ``value``.

    ``value`` is a tensor of the activation's shape (or of the selected positions), a
    :class:`~loopscope.Trace` (patch from another run: the firing with the same label, or
    ``source_iteration``), or a callable ``fn(x, label) -> tensor``.
    """

    value: Any = None
    source_iteration: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value is None:
            raise LoopscopeError(
                f"Patch on {self.hook!r} needs a value (tensor, Trace or callable)"
            )

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:
        from loopscope.core.trace import Trace

        v = self.value
        if isinstance(v, Trace):
            src_label = label if self.source_iteration is None else self.source_iteration
            return v.firing(self.hook, src_label)
        if callable(v) and not isinstance(v, Tensor):
            return v(x, label)
        if not isinstance(v, Tensor):
            raise LoopscopeError(
                f"Patch value must be a tensor, Trace or callable, got {type(v).__name__}"
            )
        return v


@dataclass
class Add(Intervention):
    """Add ``delta`` (broadcastable to the activation or its selected positions)."""

    delta: Any = None

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:
        if self.delta is None:
            raise LoopscopeError(f"Add on {self.hook!r} needs a delta tensor")
        if self.positions is None:
            return x + self.delta
        return x[_pos_index(x, getattr(self, "_active_pos_dim", 1), self.positions)] + self.delta


@dataclass
class Zero(Intervention):
    """Zero-ablate the activation (or its selected positions)."""

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:
        return torch.zeros_like(x)


@dataclass
class MeanAblate(Intervention):
    """Replace with a mean activation: ``mean`` if given (broadcast), else the batch mean."""

    mean: Tensor | None = None

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:
        m = x.mean(dim=0, keepdim=True) if self.mean is None else self.mean
        return torch.broadcast_to(m.to(x.dtype), x.shape)


@dataclass
class Transplant(Intervention):
    """Set the state ``h_t`` entering iteration ``iteration`` from another run's trace.

    Equivalent to ``Patch("hook_state", t, value=source.states[t])``.
    """

    hook: str = "hook_state"
    source: Any = None
    fn: Callable | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        from loopscope.core.trace import Trace

        if not isinstance(self.source, Trace):
            raise LoopscopeError("Transplant needs source= a Trace from another run")
        if self.hook != "hook_state":
            raise LoopscopeError("Transplant acts on hook_state; use Patch for other hooks")

    def new_value(self, x: Tensor, label: Label, k: int) -> Tensor:
        t = label[0]
        if t >= self.source.states.shape[0]:
            raise LoopscopeError(
                f"Transplant at iteration {t}: source has only {self.source.n_iter} iterations"
            )
        return self.source.states[t].to(x.device)
