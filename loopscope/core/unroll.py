"""``unroll``: the single entry to running a loop, recording every iteration.

Read top to bottom: :func:`unroll` validates its arguments, opens one
:class:`~loopscope.core.capture.HookSession` (clock, interventions, recorders), runs the prelude
(``encode``, ``init_state``) and :func:`_iterate` (the loop itself: step, divergence guard, halting),
then assembles the :class:`~loopscope.Trace`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loopscope.core.capture import HookSession, IterationClock, available_memory_bytes, buffers
from loopscope.core.errors import (
    CaptureMemoryError,
    LoopscopeError,
    NeverFiresWarning,
    check_float_dtype,
    check_number,
    check_positive_int,
    check_seed,
    did_you_mean,
)
from loopscope.core.interventions import Intervention
from loopscope.core.loop import Loop
from loopscope.core.numerics import BLOWUP, diverged, reference_norm
from loopscope.core.trace import Trace

__all__ = ["unroll", "HaltFn"]

#: ``halt(t, h_prev, h_next, ctx) -> BoolTensor[B]``: True where a sample halts after step t.
HaltFn = Callable[[int, Tensor, Tensor, Any], Tensor]


@did_you_mean
def unroll(
    loop: Loop,
    inputs: Any,
    n_iter: int,
    *,
    capture: Any = None,
    interventions: Sequence[Intervention] | Intervention | None = None,
    halt: HaltFn | None = None,
    init: Tensor | Callable | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    decode: bool = False,
    grad: bool = False,
    positions: Any = None,
    offload: str | torch.device | None = None,
    store_dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    blowup: float = BLOWUP,
    meta: dict | None = None,
) -> Trace:
    """Run ``loop`` for ``n_iter`` iterations on ``inputs``, recording every iteration.

    Args:
        loop: any :class:`loopscope.Loop`.
        inputs: what ``loop.encode`` takes (token ids ``[B, pos]`` for the own models).
        n_iter: number of iterations (>= 1).
        capture: hook names, a glob, a list, a filter callable, or True for every hook point.
        interventions: :class:`~loopscope.core.interventions.Intervention` s (``Patch``, ``Add``,
            ``Zero``, ``MeanAblate``, ``Transplant``; one or a list) applied at their
            ``(hook, iteration)``.
        halt: ``halt(t, h_prev, h_next, ctx) -> BoolTensor[B]``; halted samples are frozen and the
            run stops when every sample has halted or diverged.
        init: initial state ``[B, ...]`` (or ``fn(ctx, generator)``); default ``loop.init_state``.
        generator: randomness for ``init_state``.
        seed: seed of a fresh CPU generator for ``init_state`` (when no ``generator``).
        decode: also store ``loop.decode(h_t)`` for every t in ``trace.logits``.
        grad: run with autograd enabled (default False: ``torch.no_grad``).
        positions: keep only these positions of captured activations (memory).
        offload: device for captured activations (e.g. ``"cpu"``).
        store_dtype: dtype for captured activations.
        max_bytes: memory budget for what the trace keeps (states, logits, captures); default
            half the free memory. Over budget raises
            :class:`~loopscope.core.errors.CaptureMemoryError` naming the way out.
        blowup: a sample whose state norm exceeds ``blowup * max(1, ||h_0||)`` (or is NaN/inf) is
            marked diverged at that iteration and frozen; the rest of the batch carries on.
        meta: dict merged into ``trace.meta`` (model, task, split, seed ...).

    Returns:
        :class:`~loopscope.Trace` with ``states [T+1, B, ...]`` and ``trace[hook] [T, B, ...]``.
        Hooks fired inside ``init_state`` are labelled iteration ``-1`` (``encode``'s: ``0``).

    Example:
        >>> import torch
        >>> from loopscope import FnLoop, unroll
        >>> loop = FnLoop(step=lambda h, x: torch.tanh(2 * h), init_state=torch.full((3,), 0.3))
        >>> tr = unroll(loop, torch.zeros(2, 3), n_iter=50)
        >>> round(float(tr.final[0, 0]), 4)
        0.9575
    """
    n_iter, ivs, generator = _validate(loop, n_iter, interventions, generator, seed, blowup)
    positions = _check_options(
        positions=positions, offload=offload, store_dtype=store_dtype, halt=halt,
        max_bytes=max_bytes, meta=meta, decode=decode, grad=grad,
    )  # fmt: skip
    _warn_never_fires(ivs, n_iter)
    budget = _Budget(max_bytes, offload)
    session = HookSession(
        loop,
        capture=capture,
        interventions=ivs,
        positions=positions,
        offload=offload,
        store_dtype=store_dtype,
        capacity=n_iter,  # one firing per iteration until iteration 0 says otherwise
        allowance=budget.share,
    )
    budget.n_shares = max(1, len(session.recorders))
    with nullcontext() if grad else torch.no_grad(), session:
        ctx = loop.encode(inputs)
        session.clock.advance(IterationClock.INIT)  # init_state's own firings: iteration -1
        h = _initial_state(loop, ctx, init, generator)
        budget.check_rows("states", n_iter if halt is None else min(n_iter, 63), h, h.device)
        run = _iterate(loop, ctx, h, n_iter, session, budget, halt, decode, grad, blowup)
    meta_out: dict[str, Any] = {"loopscope_version": _version(), "n_iter_requested": n_iter}
    if seed is not None:
        meta_out["seed"] = int(seed)
    if positions is not None:
        meta_out["positions"] = (
            repr(positions) if isinstance(positions, slice) else torch.as_tensor(positions).tolist()
        )
    meta_out.update(meta or {})
    return Trace(
        states=run.states(),
        acts=session.acts(),
        labels=session.labels(),
        status=run.status(),
        diverged_at=run.diverged_at,
        halted_at=run.halted_at,
        logits=run.logits_tensor() if decode else None,
        meta=meta_out,
        aliases=session.aliases,
        loop=loop,
        ctx=ctx,
    )


# -- validation ---------------------------------------------------------------------------------
def _validate(
    loop: Any, n_iter: Any, interventions: Any, generator: Any, seed: Any, blowup: Any
) -> tuple[int, list[Intervention], torch.Generator | None]:
    if not isinstance(loop, Loop):
        raise LoopscopeError(f"unroll needs a loopscope.Loop, got {type(loop).__name__}")
    n_iter = check_positive_int("n_iter", n_iter)
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    ivs = list(interventions or [])
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise LoopscopeError(
                f"interventions must be loopscope interventions, got {type(iv).__name__}"
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise LoopscopeError(
            f"generator must be a torch.Generator, got {type(generator).__name__} {generator!r}"
        )
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(check_seed(seed))
    if blowup is not None:  # None: only NaN / inf count as diverged
        check_number("blowup", blowup, low=0, strict=True, finite=False)
    return n_iter, ivs, generator


def _check_options(
    *,
    positions: Any,
    offload: Any,
    store_dtype: Any,
    halt: Any,
    max_bytes: Any,
    meta: Any,
    decode: Any,
    grad: Any,
) -> Any:
    """The remaining options, checked before anything runs; returns ``positions`` as a 1-D long
    tensor (or None / a slice)."""
    check_float_dtype("store_dtype", store_dtype)
    if offload is not None:
        try:
            torch.device(offload)
        except (RuntimeError, TypeError):
            raise LoopscopeError(
                f"offload must be a torch device such as 'cpu', got {offload!r}"
            ) from None
    if halt is not None and not callable(halt):
        raise LoopscopeError(
            f"halt must be a callable halt(t, h_prev, h_next, ctx) -> bool[B], got "
            f"{type(halt).__name__} {halt!r}"
        )
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
    ):
        raise LoopscopeError(f"max_bytes must be a positive integer (bytes), got {max_bytes!r}")
    if meta is not None and not isinstance(meta, dict):
        raise LoopscopeError(f"meta must be a dict, got {type(meta).__name__} {meta!r}")
    for name, v in (("decode", decode), ("grad", grad)):
        if not isinstance(v, bool):
            raise LoopscopeError(f"{name} must be True or False, got {v!r}")
    if positions is None or isinstance(positions, slice):
        return positions
    bad = LoopscopeError(
        f"positions must be an int or a list / 1-D tensor of ints, got {positions!r}"
    )
    if isinstance(positions, (str, bytes, bool, float)):
        raise bad
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError):
        raise bad from None
    if pos.numel() == 0:
        raise LoopscopeError("positions is empty: keep at least one position (or pass None)")
    if pos.dim() > 1 or pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise bad
    return pos.to(torch.long).reshape(-1) if pos.dim() == 1 else positions


def _selector_ints(selector: Any) -> list[int]:
    """The plain iteration numbers an intervention's selector names (tuples and 'all' skipped)."""
    if isinstance(selector, int) and not isinstance(selector, bool):
        return [selector]
    if isinstance(selector, (list, range, set, frozenset)):
        return [i for s in selector for i in _selector_ints(s)]
    return []


def _warn_never_fires(ivs: list[Intervention], n_iter: int) -> None:
    """An intervention at iterations the run never reaches is a warning naming them."""
    import warnings

    for iv in ivs:
        late = sorted({i for i in _selector_ints(iv.iteration) if i >= n_iter})
        if late:
            warnings.warn(
                f"{type(iv).__name__} on {iv.hook!r} at iteration(s) {late} never fires: unroll "
                f"runs iterations 0..{n_iter - 1} (n_iter={n_iter})",
                NeverFiresWarning,
                stacklevel=3,
            )


def _initial_state(loop: Loop, ctx: Any, init: Any, generator: Any) -> Tensor:
    if init is None:
        h = loop.init_state(ctx, generator)
    elif callable(init) and not isinstance(init, Tensor):
        h = init(ctx, generator)
    elif isinstance(init, Tensor):
        h = init
        _check_init(loop, ctx, h)
    else:
        raise LoopscopeError(f"init must be a tensor or callable, got {type(init).__name__}")
    if not isinstance(h, Tensor) or h.dim() < 1:
        raise LoopscopeError("init_state must return a tensor with a leading batch axis")
    return h


def _check_init(loop: Loop, ctx: Any, h: Tensor) -> None:
    """A given ``init`` must be a floating ``[B, *state]`` tensor of the inputs' batch and of the
    shape the loop's own ``init_state`` gives (when it has one)."""
    shape = tuple(h.shape)
    if not (h.is_floating_point() or h.is_complex()):
        dt = str(h.dtype).replace("torch.", "")
        raise LoopscopeError(f"init must be a floating tensor [B, *state], got dtype {dt}")
    if h.dim() < 1:
        raise LoopscopeError(f"init must have a leading batch axis, got shape {shape}")
    try:
        b = loop.batch_size(ctx)
    except Exception:  # noqa: BLE001 - a context without a batch axis: nothing to compare
        b = None
    try:  # the loop's own h_0 shape, from a private generator (the caller's RNGs untouched)
        with torch.no_grad():
            ref = tuple(loop.init_state(ctx, torch.Generator().manual_seed(0)).shape)
    except Exception:  # noqa: BLE001 - no init_state (FnLoop without one): nothing to compare
        ref = None
    if ref is not None and shape != ref:
        raise LoopscopeError(f"init has shape {shape} but the loop's states are {ref}")
    if b is not None and shape[0] != b:
        raise LoopscopeError(f"init has batch {shape[0]} but the inputs have batch {b}")


# -- memory -------------------------------------------------------------------------------------
@dataclass
class _Budget:
    """What the trace keeps, against ``max_bytes`` (default half the free memory)."""

    max_bytes: Any
    offload: Any
    n_shares: int = 1
    kept: int = 0  # bytes of the states and logits rows, counted by check_rows
    _limit: int | None = None

    def limit(self, device: Any) -> int:
        if self._limit is None:
            if self.max_bytes is not None:
                self._limit = int(self.max_bytes)
            else:
                dev = self.offload if self.offload is not None else device
                self._limit = available_memory_bytes(dev) // 2
        return self._limit

    def share(self, device: Any) -> int:
        """What one recorder may preallocate before the check after iteration 0."""
        return self.limit(device) // self.n_shares

    def check_rows(self, what: str, n_iter: int, x: Tensor, device: Any) -> None:
        """What ``n_iter + 1`` rows like ``x`` (the states, decode's logits) will take, counted
        against the budget before the first row is allocated."""
        per_row = x.numel() * x.element_size()
        need = per_row * (n_iter + 1)
        self.kept += need
        budget = self.limit(device)
        if self.kept > budget:
            fix = "decode=False (decode later with trace.decode(t)), " if what != "states" else ""
            raise CaptureMemoryError(
                f"unroll would keep ~{_size(need)} of {what} ({_size(per_row)} per iteration x "
                f"n_iter + 1 = {n_iter + 1}) but the budget is {_size(budget)}; run fewer "
                f"iterations (n_iter=), {fix}use halt= to stop early, or raise max_bytes"
            )

    def check_capture(self, session: HookSession, n_iter: int, device: Any) -> None:
        per_iter = session.bytes_so_far()
        estimate = per_iter * n_iter
        budget = self.limit(device) - self.kept
        if estimate > budget:
            raise CaptureMemoryError(
                f"capture would need ~{estimate / 2**20:.1f} MiB ({per_iter / 2**20:.2f} MiB per "
                f"iteration x {n_iter}) but the budget is {budget / 2**20:.1f} MiB; capture fewer "
                "hooks, keep fewer positions (positions=), store in a smaller dtype "
                "(store_dtype=), offload to CPU (offload='cpu') or raise max_bytes"
            )


# -- the loop -----------------------------------------------------------------------------------
@dataclass
class _Rows:
    """A ``[rows, ...]`` buffer filled one row per iteration (a list under grad: the graph must
    survive); the memory comes from :data:`~loopscope.core.capture.buffers` and doubles when a
    halting run outgrows its first guess."""

    rows: int
    grad: bool
    what: str
    buf: Tensor | None = None
    n: int = 0
    kept: list[Tensor] = field(default_factory=list)
    _views: tuple[Tensor, ...] = ()  # buf's rows, made once per buffer

    def add(self, x: Tensor) -> None:
        if self.grad:
            self.kept.append(x)
            return
        x = x.detach()
        if self.buf is None:
            self._use(buffers.empty((self.rows, *x.shape), dtype=x.dtype, device=x.device))
        elif x.shape != self._views[0].shape:
            raise LoopscopeError(
                f"{self.what} changed shape from {tuple(self.buf.shape[1:])} to {tuple(x.shape)}"
            )
        if self.n == len(self._views):
            grown = buffers.empty((2 * self.n, *x.shape), dtype=self.buf.dtype, device=x.device)
            grown[: self.n].copy_(self.buf)
            self._use(grown)
        self._views[self.n].copy_(x)
        self.n += 1

    def _use(self, buf: Tensor) -> None:
        self.buf, self._views = buf, buf.unbind(0)

    def tensor(self) -> Tensor:
        return torch.stack(self.kept) if self.grad else self.buf[: self.n]


@dataclass
class _Run:
    """What the loop produced: states ``h_0..h_T``, logits, divergence and halting flags."""

    diverged_at: Tensor
    halted_at: Tensor
    states_rows: _Rows
    logits_rows: _Rows
    frozen: bool = False  # some sample diverged or halted (the guard must hold it)

    def states(self) -> Tensor:
        return self.states_rows.tensor()

    def logits_tensor(self) -> Tensor:
        return self.logits_rows.tensor()

    def status(self) -> list[str]:
        return [
            "diverged" if d >= 0 else "halted" if s >= 0 else "max_iter"
            for d, s in zip(self.diverged_at.tolist(), self.halted_at.tolist(), strict=True)
        ]


def _iterate(
    loop: Loop,
    ctx: Any,
    h: Tensor,
    n_iter: int,
    session: HookSession,
    budget: _Budget,
    halt: HaltFn | None,
    decode: bool,
    grad: bool,
    blowup: float,
) -> _Run:
    """Iterate ``h_{t+1} = step(h_t)``: freeze diverged or halted samples, stop when all are."""
    B = h.shape[0]
    rows = n_iter + 1 if halt is None else min(n_iter + 1, 64)  # a halting run stops early
    run = _Run(
        diverged_at=torch.full((B,), -1, dtype=torch.long),
        halted_at=torch.full((B,), -1, dtype=torch.long),
        states_rows=_Rows(rows, grad, "the state"),
        logits_rows=_Rows(rows, grad, "decode's output"),
    )
    ref_norm = reference_norm(h).to(h.device)
    bound = _SafeBound(ref_norm, blowup)
    clock, state_hp = session.clock, loop.hook_state
    for t in range(n_iter):
        clock.advance(t)
        h = state_hp(h)  # fires hook_state: capture / transplant of h_t
        run.states_rows.add(h)
        if decode:
            y = loop.decode(h, ctx)
            if t == 0 and isinstance(y, Tensor):
                budget.check_rows("decode logits", run.states_rows.rows - 1, y, y.device)
            run.logits_rows.add(y)
        h_next = loop.step(h, ctx, t)
        if not isinstance(h_next, Tensor) or h_next.shape != h.shape:
            raise LoopscopeError(
                f"step must return a tensor of the state's shape {tuple(h.shape)}, got "
                f"{tuple(h_next.shape) if isinstance(h_next, Tensor) else type(h_next).__name__}"
            )
        if run.frozen or not bound.holds(h_next):
            h_next = _guard(run, t, h, h_next, ref_norm, blowup)
        if halt is not None:
            stop = torch.as_tensor(halt(t, h, h_next, ctx)).bool().cpu().reshape(B)
            new = stop & (run.halted_at < 0) & (run.diverged_at < 0)
            if bool(new.any()):
                run.halted_at[new] = t + 1
                run.frozen = True
        if t == 0 and session.recorders:
            budget.check_capture(session, n_iter, h.device)
            session.reserve(n_iter)
        h = h_next
        if halt is not None and bool(((run.halted_at >= 0) | (run.diverged_at >= 0)).all()):
            break
    run.states_rows.add(h)
    if decode:
        run.logits_rows.add(loop.decode(h, ctx))
    return run


class _SafeBound:
    """A one-pass test that no sample of a state can have diverged: every norm, taken in the
    state's own dtype, finite and under half the blow-up bound. Only a state failing it goes
    through the exact float64 test of :func:`~loopscope.core.numerics.diverged` (the margin of
    one half is far beyond the rounding of a float32 or even a bfloat16 norm)."""

    def __init__(self, ref_norm: Tensor, blowup: float | None) -> None:
        self.limit = None if blowup is None else 0.5 * float(blowup) * ref_norm
        self._by_dtype: dict[torch.dtype, Tensor] = {}

    def holds(self, h: Tensor) -> bool:
        if not (h.is_floating_point() or h.is_complex()) or h.dim() == 0:
            return False
        norms = torch.linalg.vector_norm(h.detach().reshape(h.shape[0], -1), dim=1)
        lim = self._by_dtype.get(norms.dtype)
        if lim is None:
            lim = self._by_dtype[norms.dtype] = self._limit_in(norms)
        # one comparison also catches NaN and inf: both compare False against a finite bound
        return bool(torch.le(norms, lim).all())

    def _limit_in(self, norms: Tensor) -> Tensor:
        """The bound in the norms' dtype, finite (the dtype's largest number at most)."""
        big = torch.finfo(norms.dtype).max
        if self.limit is None:
            return torch.full_like(norms, big)
        return self.limit.to(norms.device).clamp_max(big).to(norms.dtype)


def _guard(run: _Run, t: int, h: Tensor, h_next: Tensor, ref_norm: Tensor, blowup: float) -> Tensor:
    """Flag samples diverging at step t and hold every flagged or halted sample at ``h``."""
    frozen = (run.diverged_at >= 0) | (run.halted_at >= 0)
    bad = diverged(h_next, ref_norm, blowup).cpu() & ~frozen
    if bad.any():
        run.diverged_at[bad] = t + 1
        run.frozen = True
    freeze = (frozen | bad).to(h_next.device)
    if freeze.any():
        mask = freeze.view(h.shape[0], *([1] * (h.dim() - 1)))
        h_next = torch.where(mask, h, h_next)
    return h_next


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _version() -> str:
    from loopscope import __version__

    return __version__
