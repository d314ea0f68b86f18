"""``wrap``: capture and patch every call of a looped submodule of any ``nn.Module``, unmodified.

A model you did not write (a paper's repo, a checkpoint's remote code) has no TransformerLens
hook points. ``wrap(model, loop="block")`` adds them from the outside: every module at the paths
in ``loop`` (and ``also``) and every submodule under them gets two parameter-free
:class:`~transformer_lens.hook_points.HookPoint` s fed by PyTorch forward hooks,

* ``<path>.hook_in``: the module's first tensor argument (positional, else the first tensor
  keyword argument),
* ``<path>.hook_out``: its output (a tensor, or the first element of a tuple / list output);
  ``<path>`` alone is an alias of it,

so ``capture="block.attn"`` and ``Patch("block.attn", 2, value=...)`` work as on the toolkit's own
models. The model's code, weights and outputs are untouched: a hook point with nothing attached
returns its input itself and the forward hook then changes nothing.

Two ways to run it:

* :meth:`WrappedLoop.run` runs the **model's own forward**. Each call of the first module in
  ``loop`` (the *boundary*) starts an iteration, so the firing of ``block.attn`` inside the third
  call of ``block`` is labelled ``(2, 0)``; firings before the first boundary call are labelled
  iteration ``-1``. Interventions select firings by these labels, so a patch at iteration ``t``
  leaves every earlier call bit-identical (the nnsight use case: ``model.block.attn`` at its
  ``t``-th call).
* The wrapped model **is a Loop** (:class:`WrappedLoop`): with a ``step`` (given, or derived when
  the boundary module maps the state to the next state: ``block(h)`` or ``block(h, ctx)``),
  ``encode`` / ``init_state`` / ``decode``, ``loopscope.unroll`` and every dynamics analysis
  (``spectrum``, ``lyapunov``, ``solve``, ``find_fixed_points``, ``basins``) run on it, with the
  same hook names captured per iteration.

Known limits (said plainly): outputs that are neither tensors nor tuples / lists (a dict, an HF
``ModelOutput``) get no ``hook_out``; a module called outside the loop (a norm shared by the
loop and the head) is labelled with the iteration running when it is called; ``run`` cannot
tell two forwards in one call apart (``generate``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         torch.manual_seed(0)
    ...         self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    ...     def forward(self, x, T=3):
    ...         h = torch.zeros_like(x)
    ...         for _ in range(T):
    ...             h = self.block(h + x)
    ...         return h
    >>> w = wrap(Net(), loop="block")
    >>> out, tr = w.run(torch.ones(2, 4), capture="block.0")
    >>> tr["block.0"].shape, tr.labels["block.0.hook_out"]
    (torch.Size([3, 2, 4]), [(0, 0), (1, 0), (2, 0)])
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from loopscope.core.capture import IterationClock
from loopscope.core.errors import LoopscopeError, did_you_mean, suggest
from loopscope.core.loop import FnLoop

__all__ = ["wrap", "WrappedLoop", "CallClock", "unknown_hook_hint", "hooked_modules"]

_POINTS = "_loopscope_points"  # attribute on a wrapped module: (hook_in, hook_out)


# -- the forward hooks: module-level functions, no closures --------------------------------------
# They look the hook points up on the module they run for, so a deep copy of a wrapped model (the
# float64 analysis copy) fires its own copied points, never the original's.
def _live(hp: HookPoint) -> bool:
    return bool(hp._forward_hooks) or bool(hp._forward_pre_hooks)


def _fire_in(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
    points = mod.__dict__.get(_POINTS)
    if points is None or not _live(points[0]):
        return None
    if args and isinstance(args[0], Tensor):
        y = points[0](args[0])
        return None if y is args[0] else ((y, *args[1:]), kwargs)
    for key, v in kwargs.items():
        if isinstance(v, Tensor):
            y = points[0](v)
            return None if y is v else (args, {**kwargs, key: y})
    return None


def _fire_out(mod: nn.Module, args: tuple, out: Any) -> Any:
    points = mod.__dict__.get(_POINTS)
    if points is None or not _live(points[1]):
        return None
    if isinstance(out, Tensor):
        y = points[1](out)
        return None if y is out else y
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        y = points[1](out[0])
        return None if y is out[0] else type(out)([y, *out[1:]])
    return None


def _is_container(mod: nn.Module) -> bool:
    # never called itself: its entries are called one by one
    return isinstance(mod, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


def _match(model: nn.Module, patterns: Sequence[str], what: str) -> list[str]:
    """Module paths of ``model`` matching names / globs, in the order given (deduplicated)."""
    paths = [p for p, _ in model.named_modules() if p]
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat:
            raise LoopscopeError(f"{what} must hold module paths (str), got {pat!r}")
        hits = fnmatch.fnmatchcase if any(c in pat for c in "*?[") else None
        found = [p for p in paths if (hits(p, pat) if hits else p == pat)]
        if not found:
            raise LoopscopeError(
                f"{what}={pat!r} names no submodule of {type(model).__name__}"
                f"{suggest(pat, paths)}; module paths are what model.named_modules() lists"
            )
        out += [p for p in found if p not in out]
    return out


def hooked_modules(model: nn.Module, roots: Sequence[str]) -> dict[str, nn.Module]:
    """``{path: module}`` for every module at ``roots`` and under them (each module once, at its
    first path; ``ModuleList`` / ``ModuleDict`` containers skipped: they are never called)."""
    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for root in roots:
        for sub, mod in model.get_submodule(root).named_modules():
            path = f"{root}.{sub}" if sub else root
            if id(mod) in seen or _is_container(mod):
                continue
            seen.add(id(mod))
            out[path] = mod
    return out


def _install(mod: nn.Module, path: str) -> tuple[HookPoint, HookPoint]:
    points = mod.__dict__.get(_POINTS)
    if points is None:  # a module wrapped twice keeps its first hooks and points
        points = (HookPoint(), HookPoint())
        mod.__dict__[_POINTS] = points
        mod.register_forward_pre_hook(_fire_in, with_kwargs=True)
        mod.register_forward_hook(_fire_out)
    points[0].name, points[1].name = f"{path}.hook_in", f"{path}.hook_out"
    return points


class CallClock(IterationClock):
    """Labels the firings of one forward by boundary calls: iteration ``t`` starts at the
    ``t``-th firing of ``boundary`` (a hook point; counted from 0, ``-1`` before the first);
    a hook's ``k``-th firing within it is labelled ``(t, k)``.

    Works on any TransformerLens module: a :class:`WrappedLoop` (boundary ``<path>.hook_in``) or
    a ``TransformerBridge`` of a looped HF model (e.g. ``blocks.0.hook_in`` on Ouro's bridge,
    whose hooks fire once per step but are not labelled by TransformerLens).
    """

    def __init__(self, boundary: HookPoint) -> None:
        super().__init__()
        self.boundary = boundary
        self.t = self.INIT

    def _on_boundary(self, x: Tensor, hook: Any) -> None:
        self.advance(self.t + 1)

    def hooks(self, model: Any) -> list[tuple[HookPoint, Callable]]:
        return [(self.boundary, self._on_boundary)]


def _derive_step(model: nn.Module, path: str) -> tuple[Callable, str]:
    """``step(h, ctx)`` calling the boundary module: ``mod(h)`` if its forward takes one
    positional argument, ``mod(h, ctx)`` if two. The module is looked up on the Loop at call time
    (a deep copy then calls its own copy)."""
    mod = model.get_submodule(path)
    try:
        params = list(inspect.signature(mod.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in pos if p.default is p.empty]
    if len(required) == 1 or (len(pos) == 1):
        return (lambda loop, h, ctx: loop.model.get_submodule(path)(h)), f"{path}(h)"
    if len(required) == 2 or (len(pos) == 2 and len(required) <= 2):
        return (lambda loop, h, ctx: loop.model.get_submodule(path)(h, ctx)), f"{path}(h, ctx)"
    return None, (
        f"{path}.forward takes {len(pos)} positional arguments ({len(required)} required)"
    )


class WrappedLoop(FnLoop):
    """A model with hook points on the submodules it loops over; a :class:`~loopscope.Loop` too.

    Built by :func:`wrap`. Attributes: ``model`` (the wrapped module, registered: it moves and is
    copied with the loop), ``loop_paths`` (the looped module paths, the boundary first),
    ``hooked`` (every hooked module path), ``hook_dict`` (``hook_state`` plus
    ``<path>.hook_in`` / ``<path>.hook_out`` / ``<path>`` for every hooked path).
    """

    def __init__(
        self,
        model: nn.Module,
        loop_paths: list[str],
        also_paths: list[str],
        step: Callable | None,
        init_state: Callable | Tensor | None,
        decode: Callable | None,
        encode: Callable | None,
        state_axes: tuple[str, ...] | None,
    ) -> None:
        self._derived = None
        why = ""
        if step is None:
            derived, why = _derive_step(model, loop_paths[0]) if len(loop_paths) == 1 else (
                None, f"loop= names {len(loop_paths)} modules"
            )  # fmt: skip
            if derived is not None:
                self._derived = derived
                step = self._derived_step
            else:
                step = self._no_step
        self._why_no_step = why
        super().__init__(
            step=step, init_state=init_state, decode=decode, encode=encode, state_axes=state_axes
        )
        # registered after setup(): setup() sets a ``name`` attribute on every submodule it
        # sees, and the user's modules stay as they were
        self.model = model
        self.loop_paths = list(loop_paths)
        self.hooked = hooked_modules(model, [*loop_paths, *also_paths])
        points: dict[str, HookPoint] = {}
        for path, mod in self.hooked.items():
            hp_in, hp_out = _install(mod, path)
            points[f"{path}.hook_in"] = hp_in
            points[f"{path}.hook_out"] = hp_out
            points[path] = hp_out  # alias: capture="block.attn" is its output
        self.hook_dict = {**dict(self.hook_dict), **points}
        self.mod_dict = {**dict(self.mod_dict), **points}

    # the step: derived, or a stub naming what is missing ------------------------------------
    def _derived_step(self, h: Tensor, ctx: Any) -> Tensor:
        return self._derived(self, h, ctx)

    def _no_step(self, h: Tensor, ctx: Any) -> Tensor:
        raise LoopscopeError(
            f"this wrapped model has no step ({self._why_no_step}): pass "
            "wrap(..., step=lambda h, ctx: ...) to unroll it or run the dynamics analyses; "
            "WrappedLoop.run(...) needs none"
        )

    @property
    def boundary(self) -> str:
        """The hook whose firings start iterations in :meth:`run` (``<first loop path>.hook_in``)."""
        return f"{self.loop_paths[0]}.hook_in"

    @did_you_mean
    def run(
        self,
        *args: Any,
        model_kwargs: dict[str, Any] | None = None,
        capture: Any = None,
        interventions: Any = None,
        positions: Any = None,
        offload: str | torch.device | None = None,
        store_dtype: torch.dtype | None = None,
        grad: bool = False,
    ) -> tuple[Any, Any]:
        """Run the model's own forward ``model(*args, **model_kwargs)``, labelling every firing.

        Args:
            *args: the model's positional inputs.
            model_kwargs: its keyword inputs.
            capture: hooks to record (names, globs, a list, a filter or True; see
                :func:`loopscope.core.capture.resolve_hooks`).
            interventions: :class:`~loopscope.Patch` and friends, selecting firings by label
                (``iteration=t`` = the ``t``-th call of the boundary).
            positions, offload, store_dtype: as in :func:`loopscope.unroll`.
            grad: run with autograd (default: ``torch.no_grad``).

        Returns:
            ``(output, trace)``: the model's output and a :class:`~loopscope.Trace` whose
            ``trace[hook]`` is ``[n_firings, B, ...]`` with ``trace.labels[hook]`` = ``(t, k)``,
            and whose ``states`` are the boundary's inputs ``h_0 .. h_{T-1}`` followed by its
            last output ``h_T`` (``[T+1, B, ...]``) when the boundary maps a state to one of the
            same shape, else its inputs only (``meta["states"]`` says which).

        Example::

            out, tr = wrap(model, loop="block").run(tokens, capture="block.attn")
            tr["block.attn"]  # [T, B, pos, d]: the attention output of every call
        """
        from loopscope.core.capture import HookSession, resolve_hooks
        from loopscope.core.interventions import Intervention
        from loopscope.core.trace import Trace

        ivs = (
            [interventions]
            if isinstance(interventions, Intervention)
            else list(interventions or [])
        )
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise LoopscopeError(
                    f"interventions must be loopscope interventions, got {type(iv).__name__}"
                )
        wanted, aliases = resolve_hooks(self, capture, what="capture")
        b_in, b_out = self.boundary, f"{self.loop_paths[0]}.hook_out"
        clock = CallClock(self.hook_dict[b_in])
        session = HookSession(
            self,
            capture=[*wanted, b_in, b_out],
            interventions=ivs,
            clock=clock,
            positions=positions,
            offload=offload,
            store_dtype=store_dtype,
        )
        with nullcontext() if grad else torch.no_grad(), session:
            out = self.model(*args, **(model_kwargs or {}))
        acts, labels = session.acts(), session.labels()
        if b_in not in acts:
            raise LoopscopeError(
                f"the model's forward never called {self.loop_paths[0]!r} with a tensor input: "
                "it is not the module the forward loops over"
            )
        states, how, n_calls = acts[b_in], "boundary inputs", len(labels[b_in])
        last = acts.get(b_out)
        if last is not None and last.shape[1:] == states.shape[1:] and positions is None:
            states, how = torch.cat([states, last[-1:]]), "boundary inputs + last output"
        for name in (b_in, b_out):
            if name not in wanted:
                acts.pop(name, None)
                labels.pop(name, None)
        B = states.shape[1]
        trace = Trace(
            states=states,
            acts=acts,
            labels=labels,
            status=["max_iter"] * B,
            diverged_at=torch.full((B,), -1, dtype=torch.long),
            halted_at=torch.full((B,), -1, dtype=torch.long),
            meta={
                "loopscope_version": _version(),
                "wrapped": type(self.model).__name__,
                "boundary": self.loop_paths[0],
                "n_calls": n_calls,
                "states": how,
            },
            aliases={a: c for a, c in aliases.items() if c in acts},
            loop=self,
            ctx=None,
        )
        return out, trace

    def unwrap(self) -> nn.Module:
        """Remove the forward hooks and hook points from the model; returns the model."""
        for mod in self.hooked.values():
            mod.__dict__.pop(_POINTS, None)
            for hooks in (mod._forward_pre_hooks, mod._forward_hooks):
                for key in [k for k, fn in hooks.items() if fn in (_fire_in, _fire_out)]:
                    del hooks[key]
                    mod._forward_pre_hooks_with_kwargs.pop(key, None)
        self.hooked = {}
        return self.model


def _version() -> str:
    from loopscope import __version__

    return __version__


@did_you_mean
def wrap(
    model: nn.Module,
    *,
    loop: str | Sequence[str],
    also: str | Sequence[str] = (),
    step: Callable | None = None,
    init_state: Callable | Tensor | None = None,
    decode: Callable | None = None,
    encode: Callable | None = None,
    state_axes: tuple[str, ...] | None = None,
) -> WrappedLoop:
    """Hook points on every call of the submodule(s) ``model`` loops over, without rewriting it.

    Args:
        model: any ``nn.Module`` (your own, a paper's, an HF model with remote code).
        loop: path(s) of the submodule(s) its forward calls in a loop, as
            ``model.named_modules()`` names them (globs allowed: ``"core_block.*"``). The first
            match is the *boundary*: each of its calls starts an iteration in
            :meth:`WrappedLoop.run`. Every module at these paths and under them is hooked.
        also: more module paths to hook (outside the loop: an embedding, a head).
        step: ``step(h)`` / ``step(h, ctx)`` / ``step(h, ctx, t)``, one iteration, for
            ``unroll`` and the dynamics analyses. Default: derived from the boundary when
            ``loop`` names one module whose forward takes ``(h)`` or ``(h, ctx)``.
        init_state, decode, encode: as in :class:`~loopscope.FnLoop`.
        state_axes: the state's axes, e.g. ``("batch", "pos", "d_model")`` (see
            :mod:`loopscope.core.layout`).

    Returns:
        a :class:`WrappedLoop`: ``.run(inputs, capture=..., interventions=...)`` runs the model's
        own forward; as a Loop, ``unroll`` and the analyses run its ``step``.

    Example::

        w = ls.wrap(model, loop="block", encode=model.emb, decode=lambda h, e: model.out(h),
                    init_state=lambda e, g: torch.zeros_like(e))   # step derived: block(h, e)
        out, tr = w.run(tokens, capture="block.attn")                # the model's own forward
        tr = ls.unroll(w, tokens, 16, capture="block.attn")          # the Loop
        ls.analysis.spectrum(w, tokens, tr.final)
    """
    if not isinstance(model, nn.Module):
        raise LoopscopeError(f"wrap needs an nn.Module, got {type(model).__name__}")
    loops = [loop] if isinstance(loop, str) else list(loop)
    if not loops:
        raise LoopscopeError("loop= must name at least one submodule path")
    alsos = [also] if isinstance(also, str) else list(also)
    loop_paths = _match(model, loops, "loop")
    also_paths = _match(model, alsos, "also") if alsos else []
    for p in loop_paths:
        if _is_container(model.get_submodule(p)):
            raise LoopscopeError(
                f"loop={p!r} is a {type(model.get_submodule(p)).__name__}, which is never called "
                f"itself: name its entries (loop='{p}.*')"
            )
    return WrappedLoop(model, loop_paths, also_paths, step, init_state, decode, encode, state_axes)


def unknown_hook_hint(model: Any, name: str) -> str:
    """The tail of the error for a hook name ``model`` does not have: where that module is and
    how :func:`wrap` gives it hook points (or '' when ``name`` does not look like a module)."""
    if not isinstance(model, nn.Module) or not isinstance(name, str):
        return ""
    if isinstance(model, WrappedLoop):
        loops = ", ".join(repr(p) for p in model.loop_paths)
        return (
            f"; wrap added hook points under loop=[{loops}] only (<path>, <path>.hook_in, "
            "<path>.hook_out): pass other module paths in also="
        )
    base = name
    for suffix in (".hook_in", ".hook_out"):
        base = base.removesuffix(suffix)
    paths = [p for p, _ in model.named_modules() if p]
    at = [p for p in paths if p == base or p.endswith("." + base)]
    where = f" ({base!r} is a plain module at {at[0]!r}, with no hook point)" if at else ""
    return (
        f"{where}; hook points exist only where a module declares them: "
        "ls.wrap(model, loop='<looped submodule>') adds them to any module and its submodules"
    )
