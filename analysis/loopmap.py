"""LoopMap: a Loop's step as a map on flat per-sample vectors, with counted jvp / vjp / Jacobians.

Every dynamics analysis (solvers, spectra, Lyapunov, cycles, basins) works on
``f(z; x)`` with ``z`` of shape ``[b, n]`` (``n`` = the flattened state of one sample). LoopMap
holds the encoded context, evaluates the step on any subset of samples (per-sample masking:
``index``), and counts function evaluations, JVPs and VJPs per sample.

It never mutates the user's model: analysis in another dtype (float64 by default) runs on a
deep copy; modules the step uses without the Loop registering them (an ``FnLoop`` whose function
closes over a model, a module kept in a plain list or dict attribute) are found by inspecting the
functions and attributes, and run with analysis-dtype copies of their parameters and buffers
(``torch.func.functional_call``), the originals untouched.

Jacobians work on any PyTorch code. Products ``J v`` use forward mode (``torch.func.jvp``); an op
without a forward-AD formula (``nn.MultiheadAttention``'s fused fast path, the CPU flash SDPA
kernel, ``_grouped_mm`` of MoE experts) switches the map, once, to the math attention kernels
(MHA fast path off, ``SDPBackend.MATH``) and, if forward mode still fails, to reverse mode (dense
Jacobian rows by ``torch.autograd.grad``, cached per state). ``jacobian_path`` says which ran:
``forward``, ``forward (math attention)`` or ``reverse``.

Example:
    >>> import torch
    >>> from loopscope import FnLoop
    >>> loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    >>> m = LoopMap(loop, None, state_shape=(3,), batch_size=1)
    >>> z = torch.full((1, 3), 0.5, dtype=torch.float64)
    >>> fz, jv = m.jvp(z, torch.ones_like(z))
    >>> round(float(jv[0, 0]), 6)  # 2 (1 - tanh(1)^2)
    0.839949
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from loopscope.core.errors import LoopscopeError
from loopscope.core.loop import Loop, batch_size_of

__all__ = ["LoopMap", "cast_floats", "closure_modules"]

FORWARD, FORWARD_MATH, REVERSE = "forward", "forward (math attention)", "reverse"


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor inside ``obj`` (tensor / dict / list / tuple) to ``dtype``."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def _model_dtype(loop: Loop) -> torch.dtype | None:
    for p in loop.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in loop.buffers():
        if b.is_floating_point():
            return b.dtype
    return None


# -- modules the step uses without the Loop registering them ----------------------------------


def _referenced(obj: Any) -> Iterator[Any]:
    """Objects a function / bound method / partial / container / plain object refers to."""
    if isinstance(obj, functools.partial):
        yield obj.func
        yield from obj.args
        yield from obj.keywords.values()
    elif hasattr(obj, "__func__") and hasattr(obj, "__self__"):  # bound method
        yield obj.__self__
        yield obj.__func__
    elif callable(obj) and hasattr(obj, "__code__"):  # a function or lambda
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                continue
        g = getattr(obj, "__globals__", {})
        for name in obj.__code__.co_names:
            if name in g:
                yield g[name]
        for const in obj.__code__.co_consts:  # nested lambdas / functions
            if hasattr(const, "co_names"):
                for name in const.co_names:
                    if name in g:
                        yield g[name]
    elif isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set)):
        yield from obj
    elif not isinstance(obj, (Tensor, nn.Module, type)) and hasattr(obj, "__dict__"):
        yield from vars(obj).values()


def closure_modules(loop: Loop, depth: int = 4) -> list[nn.Module]:
    """Modules the loop's functions and attributes reach that ``loop.modules()`` does not list.

    Searches the loop's (and its submodules') plain attributes, and through them functions'
    closures, the globals they name, bound methods and ``functools.partial`` arguments, ``depth``
    references deep. Parameters of these modules are what the float64 copy must also cover.
    """
    own = {id(m) for m in loop.modules()}
    found: dict[int, nn.Module] = {}
    seen: set[int] = set()
    frontier: list[Any] = [v for mod in loop.modules() for v in vars(mod).values()]
    for _ in range(depth):
        nxt: list[Any] = []
        for obj in frontier:
            if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, Tensor)):
                continue
            if isinstance(obj, _WEAK):  # a weak reference owns nothing (TL's capture hooks
                continue  # point at their block through one): never a module the step uses
            seen.add(id(obj))
            if isinstance(obj, nn.Module):
                if id(obj) not in own and not any(id(m) in found for m in [obj]):
                    found[id(obj)] = obj
                    own.update(id(m) for m in obj.modules())
                    nxt.extend(v for mod in obj.modules() for v in vars(mod).values())
                continue
            if obj is None or isinstance(obj, type(contextlib)):  # skip modules (python)
                continue
            nxt.extend(_referenced(obj))
        frontier = nxt
    # a module found first and later reached inside another found one is listed once
    tops = list(found.values())
    inner = {id(m) for t in tops for m in list(t.modules())[1:]}
    return [t for t in tops if id(t) not in inner]


def _nan_rows(ctx: Any, B: int, batched: bool) -> Tensor:
    """``[B]`` bool: a NaN in a tensor of the context with a leading batch axis flags that row;
    one in a shared tensor flags every row (``inf`` is left alone: ``-inf`` masks are normal)."""
    bad = torch.zeros(B, dtype=torch.bool)
    stack, seen = [ctx], 0
    while stack and seen < 10_000:
        obj = stack.pop()
        seen += 1
        if isinstance(obj, Tensor):
            if not obj.is_floating_point() or obj.numel() == 0:
                continue
            if batched and obj.dim() > 0 and obj.shape[0] == B:
                bad |= torch.isnan(obj.detach()).reshape(B, -1).any(1).cpu()
            elif bool(torch.isnan(obj.detach()).any()):
                bad[:] = True
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dataclass_fields__"):
            stack.extend(getattr(obj, f) for f in obj.__dataclass_fields__)
    return bad


_WEAK = (weakref.ProxyType, weakref.CallableProxyType, weakref.ReferenceType)


def _slots(root: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` once per distinct (module, attribute) slot under ``root``.

    A module registered under two paths (TransformerLens bridges expose HF layers as both
    ``_original_component.q_proj`` and ``q``) is listed once; a tensor tied between two modules
    is listed in both. Swapping exactly these slots with ``tie_weights=False`` restores every
    original on exit (``tie_weights=True`` swaps an aliased slot twice and leaves the swapped-in
    copy behind, mutating the user's model).
    """
    for mname, mod in root.named_modules(remove_duplicate=True):
        pre = f"{mname}." if mname else ""
        for pname, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None:
                yield pre + pname, t


class _Holder(nn.Module):
    """Registers closure modules so ``functional_call`` can swap their parameters."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.mods = nn.ModuleList(mods)

    def forward(self, thunk: Callable[[], Any]) -> Any:
        return thunk()


def _missing_forward_ad(e: BaseException) -> bool:
    msg = str(e)
    return isinstance(e, (NotImplementedError, RuntimeError)) and (
        "forward AD" in msg
        or "forward-mode AD" in msg
        or "jvp" in msg.lower()
        or "not implemented for" in msg
        or "Batching rule not implemented" in msg
        or "vmap" in msg
    )


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """MHA fast path off and the math SDPA kernel: attention made of differentiable primitives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    prev = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(prev)


def _refuse_offloaded(loop: Loop) -> None:
    """A Jacobian needs every weight in memory: weights offloaded to disk by an HF ``device_map``
    (meta tensors swapped in by accelerate's hooks) break forward AD and the analysis-dtype copy
    deep inside torch, so refuse them up front."""
    mods = [loop, *closure_modules(loop)]
    n = sum(p.numel() for m in mods for p in (*m.parameters(), *m.buffers()) if p.is_meta)
    if n:
        raise LoopscopeError(
            f"{type(loop).__name__} has {n} weights offloaded (meta tensors, e.g. an HF device_map "
            "with disk offload): Jacobian analyses need them in memory; load the model without "
            "device_map / max_memory for spectra, solvers and Lyapunov (capture, patching and "
            "the logit lens work offloaded)"
        )


class LoopMap:
    """``f(z) = flatten(loop.step(unflatten(z), ctx, t))`` on per-sample flat states.

    Args:
        loop: a :class:`loopscope.Loop`.
        inputs: inputs for ``loop.encode`` (ignored if ``ctx`` is given).
        ctx: an already-encoded context (optional).
        dtype: analysis dtype (default float64); the loop is deep-copied if its dtype differs,
            and modules its functions close over run with parameters cast to it.
        t: iteration index passed to ``step`` (non-autonomous loops; the fixed-point analysis holds
            the block input fixed).
        state_shape: trailing state shape ``(...)``; inferred from ``loop.init_state`` if omitted.
        batch_size: batch size when the context has none (e.g. ``FnLoop`` with ``inputs=None``).

    Attributes:
        nfe, n_jvp, n_vjp: ``[B]`` long counters of evaluations per sample.
        jacobian_path: ``forward`` | ``forward (math attention)`` | ``reverse`` (see the module
            docstring).
        extra_modules: modules the step uses that the Loop does not register.
    """

    def __init__(
        self,
        loop: Loop,
        inputs: Any = None,
        *,
        ctx: Any = None,
        dtype: torch.dtype | None = torch.float64,
        t: int | None = None,
        state_shape: tuple[int, ...] | None = None,
        batch_size: int | None = None,
        _shared: LoopMap | None = None,
    ) -> None:
        if not isinstance(loop, Loop):
            raise LoopscopeError(f"LoopMap needs a loopscope.Loop, got {type(loop).__name__}")
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise LoopscopeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if _shared is None:
            _refuse_offloaded(loop)
            mdtype = _model_dtype(loop)
            if dtype is not None and mdtype is not None and mdtype != dtype:
                loop = copy.deepcopy(loop).to(dtype)
            self.loop = loop.eval() if hasattr(loop, "eval") else loop
            self._setup_extra(dtype)
            self.jacobian_path = FORWARD
        else:  # a subset: same loop, same cast closure modules, same Jacobian path
            self.loop = loop
            self.extra_modules, self._holder, self._extra_state = (
                _shared.extra_modules, _shared._holder, _shared._extra_state,
            )  # fmt: skip
            self.jacobian_path = _shared.jacobian_path
        self._parent = _shared
        self._reach_checked = False  # the first step is run under _dtype_checked
        self.dtype = dtype
        with torch.no_grad():
            ctx = self._call(lambda: self.loop.encode(inputs)) if ctx is None else ctx
        self.ctx = cast_floats(ctx, dtype) if dtype is not None else ctx
        self.t = t
        self._set_shape(state_shape, batch_size)
        self.nfe = torch.zeros(self.B, dtype=torch.long)
        self.n_jvp = torch.zeros(self.B, dtype=torch.long)
        self.n_vjp = torch.zeros(self.B, dtype=torch.long)
        self._jac_cache: tuple[Tensor, Any, Tensor] | None = None

    def _set_shape(self, state_shape: tuple[int, ...] | None, batch_size: int | None) -> None:
        B = batch_size_of(self.ctx) if batch_size is None else batch_size
        if state_shape is None:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                h0 = self._call(lambda: self.loop.init_state(self.ctx, gen))
            state_shape = tuple(h0.shape[1:])
            B = h0.shape[0] if B is None else B
        if B is None:
            raise LoopscopeError("cannot infer the batch size: pass batch_size=")
        self.B = int(B)
        self.state_shape = tuple(state_shape)
        self.n = int(torch.tensor(self.state_shape).prod().item()) if self.state_shape else 1
        self._has_batch_ctx = batch_size_of(self.ctx) is not None
        #: ``[B]`` bool: samples whose context holds NaN (their map is undefined, never solved)
        self.bad_input = _nan_rows(self.ctx, self.B, self._has_batch_ctx)

    def _setup_extra(self, dtype: torch.dtype | None) -> None:
        """Closure modules in another dtype get analysis-dtype copies of their tensors."""
        mods = closure_modules(self.loop) if dtype is not None else []
        mods = [
            m for m in mods
            if any(p.is_floating_point() and p.dtype != dtype
                   for p in (*m.parameters(), *m.buffers()))
        ]  # fmt: skip
        self.extra_modules = mods
        self._holder = _Holder(mods) if mods else None
        self._extra_state: dict[str, Tensor] = {}
        if self._holder is not None:
            cast: dict[int, Tensor] = {}  # one copy per tensor: ties stay tied
            for k, v in _slots(self._holder):
                if id(v) not in cast:
                    cast[id(v)] = v.detach().to(dtype) if v.is_floating_point() else v
                self._extra_state[k] = cast[id(v)]

    def _call(self, thunk: Callable[[], Any]) -> Any:
        """Run ``thunk`` with the closure modules' tensors in the analysis dtype."""
        if self._holder is None:
            return thunk()
        return torch.func.functional_call(
            self._holder, self._extra_state, (thunk,), tie_weights=False
        )

    # -- shapes -------------------------------------------------------------------------------
    def flatten(self, h: Tensor) -> Tensor:
        """``[b, *state_shape] -> [b, n]``."""
        return h.reshape(h.shape[0], self.n)

    def unflatten(self, z: Tensor) -> Tensor:
        """``[b, n] -> [b, *state_shape]``."""
        return z.reshape(z.shape[0], *self.state_shape)

    def _index(self, index: Tensor | None) -> Tensor:
        return torch.arange(self.B) if index is None else torch.as_tensor(index, dtype=torch.long)

    def _ctx(self, index: Tensor | None) -> Any:
        if index is None or not self._has_batch_ctx:
            return self.ctx
        return self.loop.select(self.ctx, index)

    def _raw(self, z: Tensor, ctx: Any) -> Tensor:
        root = self
        while root._parent is not None:
            root = root._parent
        if self.dtype is not None and not root._reach_checked:
            out = self._dtype_checked(lambda: self.loop.step(self.unflatten(z), ctx, self.t))
            root._reach_checked = True
        else:
            out = self._call(lambda: self.loop.step(self.unflatten(z), ctx, self.t))
        if not isinstance(out, Tensor) or out.numel() != z.shape[0] * self.n:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LoopscopeError(
                f"the step returned {got} for states of shape {(z.shape[0], *self.state_shape)}: "
                "the state does not match the loop's state shape"
            )
        return out.reshape(z.shape[0], self.n)

    def _dtype_checked(self, thunk: Callable[[], Any]) -> Any:
        """``self._call(thunk)`` with every module the step calls checked: a floating parameter
        or buffer not in the analysis dtype (a module the copy and the closure search did not
        reach) fails here, naming the tensor, instead of a ``float != double`` from inside the
        model or a float64 analysis silently computed partly in float32."""
        bad: list[tuple[nn.Module, str, torch.dtype]] = []

        def check(mod: nn.Module, args: Any) -> None:
            if bad:
                return
            for name, t in (*mod._parameters.items(), *mod._buffers.items()):
                if t is not None and t.is_floating_point() and t.dtype != self.dtype:
                    bad.append((mod, name, t.dtype))
                    return

        handle = nn.modules.module.register_module_forward_pre_hook(check)
        try:
            out = self._call(thunk)
        except (RuntimeError, TypeError):
            if not bad:
                raise
            out = None
        finally:
            handle.remove()
        if bad:
            mod, name, dt = bad[0]
            raise LoopscopeError(
                f"{self._tensor_name(mod, name)} is {dt} but the analysis runs in {self.dtype}: "
                "the step reaches a module that is neither registered on the Loop nor found in "
                "its functions' closures; register it on the Loop (or pass dtype=None)"
            )
        return out

    def _tensor_name(self, mod: nn.Module, name: str) -> str:
        roots: list[tuple[str, nn.Module]] = [("loop", self.loop)]
        roots += [(type(m).__name__, m) for m in closure_modules(self.loop)]
        for prefix, root in roots:
            for path, m in root.named_modules():
                if m is mod:
                    return f"{prefix}.{path}.{name}" if path else f"{prefix}.{name}"
        return f"{type(mod).__name__}.{name}"

    def check_state(self, z: Tensor, name: str = "state") -> None:
        """A state that does not fit the loop is a one-line error naming ``name`` (instead of a
        shape error from inside the model, or a step that silently broadcasts it): its per-sample
        shape must be that of the loop's own ``init_state`` (where the loop has one), and one step
        on its first sample must run."""
        own = self._init_state_shape()
        if own is not None and own != self.state_shape:
            raise LoopscopeError(
                f"{name} of shape {(z.shape[0], *self.state_shape)} does not match the loop's "
                f"state: its init_state gives {(z.shape[0], *own)}"
            )
        try:
            with torch.no_grad():
                self._raw(z[:1], self._ctx(torch.tensor([0])))
        except LoopscopeError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoopscopeError(
                f"{name} of shape {(z.shape[0], *self.state_shape)} does not fit the loop's step "
                f"({type(e).__name__}: {first})"
            ) from e

    def _init_state_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of the loop's own initial state (None where it has no tensor one)."""
        gen = torch.Generator().manual_seed(0)
        try:
            with torch.no_grad():
                h0 = self._call(lambda: self.loop.init_state(self._ctx(torch.tensor([0])), gen))
        except (NotImplementedError, LoopscopeError, RuntimeError, TypeError, ValueError):
            return None
        return tuple(h0.shape[1:]) if isinstance(h0, Tensor) and h0.dim() >= 1 else None

    def subset(self, index: Tensor) -> LoopMap:
        """A LoopMap whose sample i is sample ``index[i]`` of this one (context rows selected,
        same dtype, t and state shape; the loop is shared, not copied)."""
        index = torch.as_tensor(index, dtype=torch.long)
        ctx = self.loop.select(self.ctx, index) if self._has_batch_ctx else self.ctx
        return LoopMap(
            self.loop,
            ctx=ctx,
            dtype=self.dtype,
            t=self.t,
            state_shape=self.state_shape,
            batch_size=len(index),
            _shared=self,
        )

    def _set_path(self, path: str) -> None:
        """Record a switch of the Jacobian path here and in the map this one was taken from."""
        m: LoopMap | None = self
        while m is not None:
            m.jacobian_path = path
            m = m._parent

    # -- evaluations --------------------------------------------------------------------------
    def f(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        """One step on flat states ``z [b, n]`` of samples ``index`` (default all ``B``)."""
        idx = self._index(index)
        self._check(z, idx)
        self.nfe[idx] += 1
        with torch.no_grad():
            return self._raw(z, self._ctx(index))

    __call__ = f

    def residual(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        """``g(z) = f(z) - z``, ``[b, n]``."""
        return self.f(z, index) - z

    def _forward_mode(self, fn: Callable[[], Any]) -> Any | None:
        """``fn()`` (forward-mode AD) on the current Jacobian path; None once it is reverse."""
        if self.jacobian_path == FORWARD:
            try:
                return fn()
            except (NotImplementedError, RuntimeError) as e:
                if not _missing_forward_ad(e):
                    raise
                self._set_path(FORWARD_MATH)
        if self.jacobian_path == FORWARD_MATH:
            try:
                with math_attention():
                    return fn()
            except (NotImplementedError, RuntimeError) as e:
                if not _missing_forward_ad(e):
                    raise
                self._set_path(REVERSE)
        return None

    def jvp(self, z: Tensor, v: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f(z), J(z) v)`` for tangents ``v [b, n]`` (forward mode, torch.func)."""
        idx = self._index(index)
        self._check(z, idx)
        ctx = self._ctx(index)
        self.n_jvp[idx] += 1
        out = self._forward_mode(lambda: torch.func.jvp(lambda zz: self._raw(zz, ctx), (z,), (v,)))
        if out is None:  # reverse mode: J from rows, J v by a product
            J = self._reverse_jacobian(z, ctx, index)
            with torch.no_grad():
                fz = self._raw(z, ctx)
            return fz, torch.einsum("bij,bj->bi", J, v)
        fz, jv = out
        return fz.detach(), jv.detach()

    def vjp(self, z: Tensor, u: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f(z), J(z)^T u)`` for cotangents ``u [b, n]`` (reverse mode, torch.func)."""
        idx = self._index(index)
        self._check(z, idx)
        ctx = self._ctx(index)
        self.n_vjp[idx] += 1
        fz, pull = torch.func.vjp(lambda zz: self._raw(zz, ctx), z)
        (ju,) = pull(u)
        return fz.detach(), ju.detach()

    def q_grad(self, z: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(f(z), ∇q(z))`` for q = ½‖f(z) − z‖²: ∇q = (J − I)ᵀ(f(z) − z), from one forward and
        one pullback (counted as one evaluation and one VJP)."""
        idx = self._index(index)
        self._check(z, idx)
        ctx = self._ctx(index)
        self.nfe[idx] += 1
        self.n_vjp[idx] += 1
        # plain autograd: ~25 % less overhead than torch.func.vjp on small batched steps
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._raw(zz, ctx)
        fz = out.detach()
        g = fz - z
        (jtg,) = torch.autograd.grad(out, zz, g)
        return fz, jtg - g

    def jvp_many(self, z: Tensor, V: Tensor, index: Tensor | None = None) -> Tensor:
        """``J(z) V`` for ``k`` tangents at once: ``V [b, n, k] -> [b, n, k]`` (vmap over jvp)."""
        idx = self._index(index)
        self._check(z, idx)
        ctx = self._ctx(index)
        k = V.shape[-1]
        self.n_jvp[idx] += k

        def one(v: Tensor) -> Tensor:
            return torch.func.jvp(lambda zz: self._raw(zz, ctx), (z,), (v,))[1]

        out = self._forward_mode(lambda: torch.func.vmap(one, in_dims=2, out_dims=2)(V))
        if out is None:
            return torch.einsum("bij,bjk->bik", self._reverse_jacobian(z, ctx, index), V)
        return out.detach()

    def _reverse_jacobian(self, z: Tensor, ctx: Any, index: Tensor | None) -> Tensor:
        """Dense ``[b, n, n]`` Jacobians by reverse mode: row i of every sample at once from one
        pullback of ``e_i`` (samples are independent); cached for the last state."""
        key = None if index is None else torch.as_tensor(index)
        c = self._jac_cache
        if c is not None and c[0].shape == z.shape and torch.equal(c[0], z):
            if (c[1] is None and key is None) or (
                c[1] is not None and key is not None and torch.equal(c[1], key)
            ):
                return c[2]
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self._raw(zz, ctx)
        rows = []
        for i in range(self.n):
            e = torch.zeros_like(out)
            e[:, i] = 1.0
            (r,) = torch.autograd.grad(out, zz, e, retain_graph=i < self.n - 1)
            rows.append(r)
        J = torch.stack(rows, 1).detach()  # [b, n(out), n(in)]
        self._jac_cache = (z.detach().clone(), None if key is None else key.clone(), J)
        return J

    def jacobian(self, z: Tensor, index: Tensor | None = None, chunk: int = 256) -> Tensor:
        """Dense per-sample Jacobians ``[b, n, n]`` (``J[b, i, j] = d f_i / d z_j``).

        Samples are independent along the batch, so one batched jvp per basis vector gives every
        sample's column at once; columns are computed in chunks of ``chunk`` to bound memory.
        """
        b = z.shape[0]
        cols = []
        eye = torch.eye(self.n, dtype=z.dtype, device=z.device)
        for s in range(0, self.n, chunk):
            E = eye[:, s : s + chunk].unsqueeze(0).expand(b, self.n, -1)
            cols.append(self.jvp_many(z, E, index))
        return torch.cat(cols, dim=2)

    def _check(self, z: Tensor, idx: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.n or z.shape[0] != idx.numel():
            raise LoopscopeError(
                f"expected flat states of shape [{idx.numel()}, {self.n}], got {tuple(z.shape)}"
            )

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Flat initial states ``[B, n]`` from ``loop.init_state`` in the analysis dtype."""
        with torch.no_grad():
            h0 = self._call(lambda: self.loop.init_state(self.ctx, generator))
        return self.flatten(h0.to(self.dtype) if self.dtype is not None else h0)

    def decode(self, z: Tensor, index: Tensor | None = None) -> Any:
        """``loop.decode`` of flat states ``z [b, n]`` of samples ``index`` (no grad)."""
        ctx = self._ctx(index)
        with torch.no_grad():
            return self._call(lambda: self.loop.decode(self.unflatten(z), ctx))

    def reset_counts(self) -> None:
        self.nfe.zero_()
        self.n_jvp.zero_()
        self.n_vjp.zero_()
