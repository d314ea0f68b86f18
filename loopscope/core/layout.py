"""State layouts: which axis of a Loop's state is what.

A Loop's state is one tensor ``[B, ...]``. Its axes are declared on the Loop as ``state_axes``,
a tuple of names, one per axis:

* ``"batch"``: always first;
* ``"pos"``: token positions (what ``positions=`` selects when patching, capturing or probing);
* the last axis: the feature axis (``"d_model"``);
* every other axis is a *stack* axis (``"stack"`` for HRM's ``(z_H, z_L)``, ``"layer"`` for a
  per-layer memory ...): patching a position patches it in every stack entry; probes see one
  site per stack entry (``state[0]``, ``state[1]``).

Examples: ``("batch", "pos", "d_model")`` (the looped transformers), ``("batch", "stack", "pos",
"d_model")`` (HRM, Inkling-2's message states), ``("batch", "d_model")`` (an RNN, no positions).

A Loop that declares nothing gets the TransformerLens convention where it is unambiguous: a
``[B, d]`` state has no positions, a ``[B, pos, d]`` state has them on axis 1. A state with more
axes and no declaration is refused with a one-line error wherever positions matter (patching,
probes, per-position path independence) instead of guessing that axis 1 is positions (on a
stacked ``[B, 2, pos, d]`` state that guess patched the stack axis, silently).

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h: h)
    >>> position_axis(loop, (4, 7, 16))
    1
    >>> loop.state_axes = ("batch", "stack", "pos", "d_model")
    >>> position_axis(loop, (4, 2, 7, 16)), loop.hook_state.pos_dim
    (2, 2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError

__all__ = [
    "check_state_axes",
    "declared_axes",
    "position_axis",
    "site_position_axis",
    "probe_layout",
    "positions_per_sample",
]

STATE_SITES = ("hook_state", "state", "states")


def check_state_axes(axes: Any) -> tuple[str, ...] | None:
    """Validate a ``state_axes`` declaration (None, or a tuple of distinct names, batch first)."""
    if axes is None:
        return None
    if isinstance(axes, str) or not all(isinstance(a, str) and a for a in axes):
        raise LoopscopeError(
            f"state_axes must be a tuple of axis names like ('batch', 'pos', 'd_model'), got "
            f"{axes!r}"
        )
    axes = tuple(axes)
    if len(axes) < 2 or axes[0] != "batch":
        raise LoopscopeError(
            f"state_axes must start with 'batch' and name every axis of the state, got {axes!r}"
        )
    if len(set(axes)) != len(axes):
        raise LoopscopeError(f"state_axes names must be distinct, got {axes!r}")
    if axes[-1] == "pos":
        raise LoopscopeError(
            f"state_axes {axes!r} ends with 'pos': the last axis is the feature axis"
        )
    return axes


def declared_axes(loop: Any, shape: tuple[int, ...] | torch.Size | None = None) -> tuple | None:
    """The loop's ``state_axes`` (checked against ``shape`` ``[B, ...]`` when given), or None."""
    axes = getattr(loop, "state_axes", None)
    if axes is not None and shape is not None and len(axes) != len(shape):
        raise LoopscopeError(
            f"{type(loop).__name__}.state_axes {axes!r} names {len(axes)} axes but the state has "
            f"shape {tuple(shape)}"
        )
    return axes


def position_axis(
    loop: Any, shape: tuple[int, ...] | torch.Size, what: str = "state"
) -> int | None:
    """The position axis of a state of ``shape`` ``[B, ...]`` (None: it has none).

    Declared: the index of ``"pos"``. Undeclared: None for ``[B, d]``, 1 for ``[B, pos, d]``;
    anything else is ambiguous and refused (naming the way out).
    """
    shape = tuple(shape)
    axes = declared_axes(loop, shape)
    if axes is not None:
        return axes.index("pos") if "pos" in axes else None
    if len(shape) <= 2:
        return None
    if len(shape) == 3:
        return 1
    raise LoopscopeError(
        f"the {what} of {type(loop).__name__} has shape {shape} and the loop declares no "
        "state_axes: which axis holds positions is ambiguous; declare it, e.g. "
        "loop.state_axes = ('batch', 'stack', 'pos', 'd_model')"
    )


def site_position_axis(loop: Any, site: str, hook_point: Any, shape: tuple[int, ...]) -> int | None:
    """Position axis of hook ``site``'s activation ``[B, ...]``: the state's layout for the
    state hook, the hook point's ``pos_dim`` (default 1) for others; None below 3 axes."""
    if site in STATE_SITES:
        return position_axis(loop, shape, what=f"state ({site})")
    if len(shape) < 3:
        return None
    pd_ = getattr(hook_point, "pos_dim", None)
    return 1 if pd_ is None else int(pd_)


def probe_layout(loop: Any, x: Tensor, lead: int = 1) -> Tensor:
    """States ``[*lead, B, ...]`` -> ``[*lead, B, *stack, pos, d]`` (positions second to last,
    the feature axes flattened last; a state without positions gets one position).

    ``lead`` counts the leading axes before the batch (1 for ``trace.states`` ``[T+1, B, ...]``).
    """
    shape = tuple(x.shape[lead:])
    pos = position_axis(loop, shape)
    axes = declared_axes(loop, shape)
    if axes is None:  # [B, d] or [B, pos, d]: already in probe layout
        return x
    n = len(shape)
    feature = [n - 1]
    stack = [i for i in range(1, n - 1) if i != pos]
    order = [*range(lead), *(lead + i for i in [0, *stack])]
    if pos is not None:
        order.append(lead + pos)
    order += [lead + i for i in feature]
    y = x.permute(order)
    if pos is None:
        y = y.unsqueeze(-2)
    return y


def positions_per_sample(loop: Any, a: Tensor) -> Tensor | None:
    """States ``[B, ...]`` -> ``[B, pos, rest]`` (every non-position axis flattened), or None
    when the state has no position axis."""
    pos = position_axis(loop, tuple(a.shape))
    if pos is None:
        return None
    return a.movedim(pos, 1).reshape(a.shape[0], a.shape[pos], -1)
