"""The one abstraction: a Loop is a map iterated on a latent state.

::

    ctx   = loop.encode(inputs)             # prelude: embeddings, masks; fixed across iterations
    h_0   = loop.init_state(ctx, generator) # zeros / fixed vector / random / embedding
    h_t+1 = loop.step(h_t, ctx, t)          # ONE iteration of the recurrent block(s)
    y_t   = loop.decode(h_t, ctx)           # coda + unembed -> logits, readable at every t

The state is always a single tensor with the batch on axis 0 (``[B, ...]``); a hierarchical
model stacks its states (e.g. ``[B, 2, pos, d]`` for ``(z_H, z_L)``). ``step`` must be a pure
function of ``(h, ctx, t)``: that is what lets analyses take Jacobians, run solvers from arbitrary
start states and transplant states. Autonomous loops ignore ``t``.

Every Loop is a TransformerLens :class:`HookedRootModule` with at least one hook point,
``hook_state``, fired by :func:`loopscope.core.unroll` on the state entering each step. Subclasses call
``self.setup()`` last in ``__init__`` (TransformerLens convention).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopscopeError

__all__ = ["Loop", "FnLoop", "select_batch", "batch_size_of"]


def batch_size_of(obj: Any) -> int | None:
    """First batch size found in a tensor / mapping / sequence / dataclass ``obj`` (None if none)."""
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    if isinstance(obj, dict):
        for v in obj.values():
            b = batch_size_of(v)
            if b is not None:
                return b
    if isinstance(obj, (list, tuple)):
        for v in obj:
            b = batch_size_of(v)
            if b is not None:
                return b
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            b = batch_size_of(getattr(obj, f.name))
            if b is not None:
                return b
    return None


def select_batch(obj: Any, index: Tensor, batch_size: int) -> Any:
    """Index every tensor of ``obj`` whose leading axis is the batch (size ``batch_size``).

    Used to run a loop on a subset of samples (per-sample masking in solvers). Tensors whose first
    axis is not ``batch_size`` (shared masks, rotary tables) are passed through unchanged.
    """
    if isinstance(obj, Tensor):
        return obj[index] if obj.dim() > 0 and obj.shape[0] == batch_size else obj
    if isinstance(obj, dict):
        return {k: select_batch(v, index, batch_size) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(select_batch(v, index, batch_size) for v in obj)
    if isinstance(obj, list):
        return [select_batch(v, index, batch_size) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj,
            **{
                f.name: select_batch(getattr(obj, f.name), index, batch_size)
                for f in dataclasses.fields(obj)
                if f.init
            },
        )
    return obj


class Loop(HookedRootModule):
    """Base class of every loop (own models, bridged HF models, user functions).

    Subclasses implement :meth:`init_state` and :meth:`step`; :meth:`encode` and :meth:`decode`
    default to the identity. Hook points: ``hook_state`` (``[B, ...]``, the state entering a step).

    ``state_axes`` names the state's axes (``("batch", "pos", "d_model")``,
    ``("batch", "stack", "pos", "d_model")`` ...; see :mod:`loopscope.core.layout`): set it on the
    class or the instance; patching, probes and path independence read positions from it, and
    ``hook_state.pos_dim`` follows it.
    """

    #: names of the label fields of one firing inside the loop, e.g. ("iteration", "sub")
    label_names: tuple[str, ...] = ("iteration", "sub")
    #: names of the state's axes, batch first (None: undeclared, see loopscope.core.layout)
    state_axes: tuple[str, ...] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.hook_state = HookPoint()
        if type(self).state_axes is not None:
            self.state_axes = type(self).state_axes

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "state_axes":
            from loopscope.core.layout import check_state_axes

            value = check_state_axes(value)
            super().__setattr__(name, value)
            hp = self.__dict__.get("_modules", {}).get("hook_state")
            if hp is not None:  # positions of hook_state (capture, interventions) follow it
                hp.pos_dim = value.index("pos") if value and "pos" in value else None
            return
        super().__setattr__(name, value)

    # -- the protocol -------------------------------------------------------------------------
    def encode(self, inputs: Any) -> Any:
        """Prelude: inputs -> context held fixed across iterations (identity by default)."""
        return inputs

    def init_state(self, ctx: Any, generator: torch.Generator | None = None) -> Tensor:
        """Initial latent state ``h_0`` of shape ``[B, ...]``."""
        raise NotImplementedError(f"{type(self).__name__} has no init_state; pass init= to unroll")

    def step(self, h: Tensor, ctx: Any, t: int | None = None) -> Tensor:
        """One iteration ``h_{t+1} = f(h_t; ctx)``; same shape as ``h``."""
        raise NotImplementedError

    def decode(self, h: Tensor, ctx: Any) -> Tensor:
        """Readout (coda + unembed) at any iteration; identity by default."""
        return h

    def n_steps(self, ctx: Any) -> int | None:
        """Steps the input supplies: None (any number) for autonomous loops; a loop that
        consumes one input block per step returns its number of context blocks."""
        return None

    # -- helpers ------------------------------------------------------------------------------
    def batch_size(self, ctx: Any) -> int:
        """Batch size of a context (first tensor's leading axis)."""
        b = batch_size_of(ctx)
        if b is None:
            raise LoopscopeError(
                f"cannot find a batch axis in the context of {type(self).__name__}"
            )
        return b

    def select(self, ctx: Any, index: Tensor) -> Any:
        """Context restricted to the samples ``index`` (override for unusual contexts)."""
        return select_batch(ctx, index, self.batch_size(ctx))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the floating-point parameters (float64 after ``.double()``; the default dtype
        for a loop without any)."""
        for p in self.parameters():
            if p.is_floating_point() or p.is_complex():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def n_params(self) -> int:
        """Number of learned parameters (a shared one counted once; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, inputs: Any, n_iter: int, h0: Tensor | None = None) -> Tensor:
        """Plain forward: encode, iterate ``n_iter`` times (no capture), decode."""
        ctx = self.encode(inputs)
        h = self.init_state(ctx) if h0 is None else h0
        for t in range(n_iter):
            h = self.step(self.hook_state(h), ctx, t)
        return self.decode(h, ctx)


def _accepts_t(fn: Callable) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3


def _accepts_ctx(fn: Callable) -> bool:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


class FnLoop(Loop):
    """A Loop from plain functions or modules, any state shape.

    Args:
        step: ``step(h)``, ``step(h, ctx)`` or ``step(h, ctx, t)`` -> next state ``[B, ...]``.
        init_state: ``init_state(ctx, generator)`` -> ``[B, ...]``, or a fixed tensor without the
            batch axis (broadcast to the batch), or None (then ``unroll`` needs ``init=``).
        decode: ``decode(h, ctx)`` -> readout (identity if None).
        encode: ``encode(inputs)`` -> ctx (identity if None).
        state_axes: the state's axes, e.g. ``("batch", "pos", "d_model")`` (see
            :mod:`loopscope.core.layout`; None: undeclared).

    Modules passed as callables are registered as submodules (their parameters and hook points
    move and are found with the loop).

    Example:
        >>> import torch
        >>> W = 0.5 * torch.eye(3, dtype=torch.float64)
        >>> loop = FnLoop(step=lambda h, x: torch.tanh(h @ W + x),
        ...               init_state=torch.zeros(3, dtype=torch.float64))
        >>> x = torch.ones(2, 3, dtype=torch.float64)
        >>> loop.step(loop.init_state(x), x).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        step: Callable,
        init_state: Callable | Tensor | None = None,
        decode: Callable | None = None,
        encode: Callable | None = None,
        state_axes: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        if not callable(step):
            raise LoopscopeError(f"FnLoop step must be callable, got {type(step).__name__}")
        self._fns: dict[str, Any] = {}
        for name, fn in (
            ("step", step),
            ("init", init_state),
            ("decode", decode),
            ("encode", encode),
        ):
            if isinstance(fn, nn.Module):
                self.add_module(f"{name}_fn", fn)
            elif fn is not None and not callable(fn) and not isinstance(fn, Tensor):
                raise LoopscopeError(f"FnLoop {name} must be callable, got {type(fn).__name__}")
            self._fns[name] = fn
        if isinstance(init_state, Tensor):
            self.register_buffer("fixed_init", init_state.detach().clone())
        self._step_takes_t = _accepts_t(step)
        self._step_takes_ctx = _accepts_ctx(step)
        if state_axes is not None:
            self.state_axes = state_axes
        self.setup()

    def encode(self, inputs: Any) -> Any:
        fn = self._fns["encode"]
        return inputs if fn is None else fn(inputs)

    def init_state(self, ctx: Any, generator: torch.Generator | None = None) -> Tensor:
        fn = self._fns["init"]
        if fn is None:
            raise LoopscopeError(
                "this FnLoop has no init_state: pass init= (a [B, ...] tensor) to unroll"
            )
        if isinstance(fn, Tensor):
            b = self.batch_size(ctx)
            return self.fixed_init.unsqueeze(0).expand(b, *self.fixed_init.shape).clone()
        return fn(ctx, generator)

    def step(self, h: Tensor, ctx: Any, t: int | None = None) -> Tensor:
        fn = self._fns["step"]
        if self._step_takes_t:
            return fn(h, ctx, t)
        if self._step_takes_ctx:
            return fn(h, ctx)
        return fn(h)

    def decode(self, h: Tensor, ctx: Any) -> Tensor:
        fn = self._fns["decode"]
        return h if fn is None else fn(h, ctx)

    def batch_size(self, ctx: Any) -> int:
        b = batch_size_of(ctx)
        if b is None:
            raise LoopscopeError(
                "cannot find a batch axis in the FnLoop context: pass inputs with a leading batch "
                "axis, or init= to unroll"
            )
        return b
