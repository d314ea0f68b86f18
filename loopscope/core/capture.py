"""Per-iteration capture through TransformerLens hook points.

TransformerLens has no notion of iterations: a hook inside a weight-tied block fires once per loop
iteration and its ``run_with_cache`` keeps only the **last** firing (last-write-wins), while
``transformer_lens.patching`` silently patches *every* firing with the last clean value. This
module builds on the hook layer only (``HookPoint.add_hook``), never on TL's cache or patching:

* :func:`resolve_hooks` — names, globs or a filter -> canonical hook points (aliases de-duplicated
  by identity, unknown names rejected with close-match suggestions);
* :class:`Recorder` — copies every firing (detached, into a preallocated buffer; no in-place
  corruption), optional position subset, dtype and CPU offload;
* :class:`BufferPool` (``buffers``) — recycles the CPU memory of dropped traces' buffers, so a
  run of many unrolls writes into memory that is already mapped;
* :class:`HookSession` — one run's wiring (clock, interventions, recorders), shared by
  :func:`loopscope.core.unroll` and the HRM-Text capture;
* :func:`count_firings` / :func:`warn_looped_hooks` — the counting pass that warns where stock TL
  caching or patching would keep only the last firing.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import mmap
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from loopscope.core.errors import LoopedHookWarning, LoopscopeError, UnknownHookError, suggest

__all__ = [
    "resolve_hooks",
    "BufferPool",
    "buffers",
    "release_buffers",
    "Recorder",
    "HookSession",
    "IterationClock",
    "attach",
    "count_firings",
    "warn_looped_hooks",
    "available_memory_bytes",
    "pos_dim_of",
]

_LEVELS = itertools.count(10_000)  # unique hook levels so we only ever remove our own hooks


def _hook_dict(model: Any) -> dict[str, HookPoint]:
    d = getattr(model, "hook_dict", None)
    if d is None:
        raise LoopscopeError(f"{type(model).__name__} exposes no TransformerLens hook_dict")
    return dict(d)


def _wrap_hint(model: Any, name: str) -> str:
    """Where a missing hook's module is, and that ``loopscope.wrap`` adds hook points to it."""
    from loopscope.core.wrap import unknown_hook_hint

    return unknown_hook_hint(model, name)


def pos_dim_of(hp: HookPoint) -> int:
    """Position axis of a hook's activation (``HookPoint.pos_dim`` if set, else 1)."""
    pd_ = getattr(hp, "pos_dim", None)
    return 1 if pd_ is None else int(pd_)


def resolve_hooks(
    model: Any, selection: Any, what: str = "hook selection"
) -> tuple[dict[str, HookPoint], dict[str, str]]:
    """Resolve a hook selection to ``({canonical_name: HookPoint}, {alias: canonical})``.

    ``selection``: None/False/[] (nothing), True or "all" (every hook point), a name, a glob
    (``"core.blocks.*.hook_resid_pre"``), a list of names/globs, or a callable ``filter(name)``.
    Aliases (several names for one HookPoint, as on ``TransformerBridge``) are de-duplicated by
    identity so each physical point is recorded once per firing.
    """
    hd = _hook_dict(model)
    if not (
        selection is None
        or isinstance(selection, (bool, str, list, tuple, set, frozenset))
        or callable(selection)
    ):
        raise LoopscopeError(
            f"{what} must be a hook name, a glob, a list of names, a filter callable or True, "
            f"got {type(selection).__name__} {selection!r}"[:200]
        )
    if selection is None or selection is False:
        return {}, {}
    if selection is True or (isinstance(selection, str) and selection == "all"):
        names = list(hd)
    elif callable(selection) and not isinstance(selection, str):
        names = [n for n in hd if selection(n)]
    else:
        items = [selection] if isinstance(selection, str) else list(selection)
        names = []
        for item in items:
            if not isinstance(item, str):
                raise LoopscopeError(f"{what} items must be hook names, got {item!r}")
            if any(c in item for c in "*?["):
                hits = fnmatch.filter(hd, item)
                if not hits:
                    raise UnknownHookError(
                        f"hook pattern {item!r} matches no hook point{suggest(item, hd)}"
                        f"{_wrap_hint(model, item)}"
                    )
                names.extend(hits)
            elif item in hd:
                names.append(item)
            else:
                raise UnknownHookError(
                    f"unknown hook name {item!r}{suggest(item, hd)}{_wrap_hint(model, item)}"
                )
    out: dict[str, HookPoint] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for n in names:
        hp = hd[n]
        canonical = hp.name if isinstance(getattr(hp, "name", None), str) and hp.name in hd else n
        if id(hp) in seen:
            if n != seen[id(hp)]:
                aliases[n] = seen[id(hp)]
            continue
        seen[id(hp)] = canonical
        out[canonical] = hp
        if n != canonical:
            aliases[n] = canonical
    return out, aliases


class BufferPool:
    """Recycles the CPU memory of record buffers that nothing references any more.

    Fresh memory costs a page fault per 4 KiB page the first time it is written; on a busy
    machine that, not the copy, is most of what recording a firing costs. A buffer handed out here
    is a tensor over an anonymous memory map that the pool keeps: once every tensor, view and
    NumPy array over it is gone (the trace was dropped), the next request of a similar size gets
    the same memory back, already mapped, as PyTorch's CUDA caching allocator does for GPU memory.
    A map is handed out again only when the pool holds the only reference to it
    (``torch.frombuffer`` holds one for as long as any tensor over the memory lives), so a buffer
    still in use is never reused. Maps kept for reuse total at most ``max_bytes``; :meth:`clear`
    returns the idle ones to the system. Other devices (their allocators cache already) and
    buffers under ``min_bytes`` come from ``torch.empty``.

    Args:
        max_bytes: most memory the pool keeps mapped for reuse (in use or idle).
        min_bytes: smaller buffers are plain ``torch.empty``.

    Example:
        >>> pool = BufferPool(max_bytes=2**24)
        >>> a = pool.empty((256, 1024), dtype=torch.float32)
        >>> ptr = a.data_ptr()
        >>> del a  # the only tensor over that memory
        >>> pool.empty((256, 1024), dtype=torch.float32).data_ptr() == ptr
        True
    """

    def __init__(self, *, max_bytes: int = 2**30, min_bytes: int = 2**20) -> None:
        for name, v in (("max_bytes", max_bytes), ("min_bytes", min_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise LoopscopeError(f"BufferPool {name} must be an integer >= 0, got {v!r}")
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._maps: list[mmap.mmap] = []  # least recently handed out first
        self._lock = threading.Lock()
        self._maps.append(mmap.mmap(-1, mmap.PAGESIZE))
        self._idle_refs = self._refs(0)  # what "only the pool holds it" reads as here
        self._maps.clear()

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self._maps[i])

    def _idle(self, i: int) -> bool:
        return self._refs(i) == self._idle_refs

    def empty(
        self,
        shape: Iterable[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> Tensor:
        """An uninitialised tensor of ``shape`` (recycled memory where there is some)."""
        shape = tuple(int(s) for s in shape)
        device = torch.device(device)
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if device.type != "cpu" or nbytes < max(1, self.min_bytes):
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            mm = self._take(-(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)

    def _take(self, size: int) -> mmap.mmap:
        best = None
        for i in reversed(range(len(self._maps))):  # most recently used first: warm in cache
            n = len(self._maps[i])
            if size <= n <= 2 * size and (best is None or n < len(self._maps[best])):
                if self._idle(i):
                    best = i
        if best is not None:  # reuse; it becomes the most recently used
            self._maps.append(self._maps.pop(best))
            return self._maps[-1]
        total = size + sum(len(m) for m in self._maps)
        i = 0
        while total > self.max_bytes and i < len(self._maps):  # evict idle maps, oldest first
            if self._idle(i):
                total -= len(self._maps.pop(i))
            else:
                i += 1
        mm = mmap.mmap(-1, size)
        if total <= self.max_bytes:
            self._maps.append(mm)
        return mm

    @property
    def held_bytes(self) -> int:
        """Bytes the pool keeps mapped (buffers in use and idle ones)."""
        with self._lock:
            return sum(len(m) for m in self._maps)

    def clear(self) -> int:
        """Return every idle map to the system; returns the bytes released."""
        with self._lock:
            freed, i = 0, 0
            while i < len(self._maps):
                if self._idle(i):
                    freed += len(self._maps.pop(i))
                else:
                    i += 1
            return freed


#: the pool every :class:`Recorder` and ``unroll``'s state buffer draw from
buffers = BufferPool()


def release_buffers() -> int:
    """Return the idle memory of dropped traces to the system (see :class:`BufferPool`)."""
    return buffers.clear()


def _shown(positions: Any) -> Any:
    return positions.tolist() if isinstance(positions, Tensor) else positions


class Recorder:
    """Keeps a detached copy of every forward firing of one hook point, with its label.

    Firings are copied into one preallocated ``[capacity, ...]`` buffer (one copy per firing, no
    stacking at the end): allocated at the first firing when ``capacity`` is known and fits
    ``allowance``, else by :meth:`reserve` once the first iteration has sized it. Firings that do
    not fit the buffer (a different shape, dtype or device, more firings than reserved) are kept
    as their own copies. The copy is taken before the model can write into the activation in place
    (a model doing ``x += ...`` after the hook cannot rewrite what was recorded).

    Args:
        name: canonical hook name (bound here, not read from ``hook.name``, which is the alias in
            TL compatibility mode).
        positions: optional index into the position axis to keep.
        pos_dim: the position axis of this hook's activation.
        offload: device to keep records on (e.g. ``"cpu"``), or None to keep them in place.
        dtype: optional storage dtype.
        capacity: firings to preallocate room for at the first firing (None: wait for
            :meth:`reserve`).
        allowance: ``allowance(device) -> bytes``: the most that first buffer may take (a larger
            one waits for the caller's memory check and :meth:`reserve`).
    """

    def __init__(
        self,
        name: str,
        *,
        positions: Any = None,
        pos_dim: int = 1,
        offload: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        capacity: int | None = None,
        allowance: Callable[[torch.device], int] | None = None,
    ) -> None:
        self.name = name
        self.positions = positions
        self.pos_dim = pos_dim
        self.offload = None if offload is None else torch.device(offload)
        self.dtype = dtype
        self.capacity = capacity
        self.allowance = allowance
        self.labels: list[tuple] = []
        self.buf: Tensor | None = None  # [capacity, ...]: firings 0 .. n-1
        self._rows: tuple[Tensor, ...] = ()  # views of buf's rows while it takes firings
        self.n = 0
        self.extra: list[Tensor] = []  # firings after the buffer's, each its own copy

    def __len__(self) -> int:
        return len(self.labels)

    def _select(self, x: Tensor) -> Tensor:
        v = x.detach()
        if self.positions is not None and v.dim() > self.pos_dim:
            index: list[Any] = [slice(None)] * v.dim()
            index[self.pos_dim] = self.positions
            try:
                v = v[tuple(index)]
            except IndexError:
                raise LoopscopeError(
                    f"positions {_shown(self.positions)} out of range for hook {self.name!r}: it "
                    f"has {v.shape[self.pos_dim]} positions (axis {self.pos_dim})"
                ) from None
        return v

    def record(self, x: Tensor, label: tuple) -> None:
        """Copy firing ``x`` (``[B, ...]``) with ``label``."""
        v = x.detach() if self.positions is None else self._select(x)
        rows, n = self._rows, self.n
        if not rows and self.capacity and not self.labels:
            rows = self._first_buffer(v)
        row = rows[n] if n < len(rows) else None
        if (
            row is not None
            and v.shape == row.shape
            and (self.dtype is not None or v.dtype == row.dtype)
            and (self.offload is not None or v.device == row.device)
        ):
            row.copy_(v)
            self.n = n + 1
        else:
            self.extra.append(self._copy(v, x))
            self._rows = ()  # the buffer is closed: later firings follow in ``extra``
        self.labels.append(label)

    def _first_buffer(self, v: Tensor) -> tuple[Tensor, ...]:
        dtype = self.dtype if self.dtype is not None else v.dtype
        device = self.offload if self.offload is not None else v.device
        nbytes = self.capacity * v.numel() * dtype.itemsize
        if self.allowance is not None and nbytes > self.allowance(device):
            return ()
        self._use(buffers.empty((self.capacity, *v.shape), dtype=dtype, device=device))
        return self._rows

    def _use(self, buf: Tensor) -> None:
        """Record into ``buf`` from row ``self.n`` on (its rows are views made once, here)."""
        self.buf, self._rows = buf, buf.unbind(0)

    def _copy(self, v: Tensor, x: Tensor) -> Tensor:
        if self.dtype is not None:
            v = v.to(self.dtype)
        if self.offload is not None:
            v = v.to(self.offload)
        shares = v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        return v.clone() if shares else v

    @property
    def firing_bytes(self) -> int:
        """Bytes one stored firing takes (0 before the first firing)."""
        if not self.labels:
            return 0
        first = self.buf[0] if self.buf is not None and self.n else self.extra[0]
        return first.numel() * first.element_size()

    @property
    def nbytes(self) -> int:
        return self.firing_bytes * len(self)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` firings in one buffer (the firings so far move into it)."""
        if (
            not self.labels
            or capacity <= len(self)
            or (self.buf is not None and capacity <= self.buf.shape[0])
        ):
            return
        if self.buf is not None and self.extra:
            return  # already overflowed: stacked() joins the parts
        parts = self.extra if self.buf is None else [self.buf[: self.n]]
        first = parts[0][0] if self.buf is not None else parts[0]
        if self.buf is None and any(
            v.shape != first.shape or v.dtype != first.dtype or v.device != first.device
            for v in parts
        ):
            return  # varying firings: keep them apart (stacked() names the problem)
        grown = buffers.empty((capacity, *first.shape), dtype=first.dtype, device=first.device)
        if self.buf is not None:
            grown[: self.n].copy_(self.buf[: self.n])
        else:
            for i, v in enumerate(self.extra):
                grown[i].copy_(v)
            self.n, self.extra = len(self.extra), []
        self._use(grown)

    def stacked(self) -> Tensor:
        """Every firing ``[n_firings, B, ...]`` (a view of the buffer when nothing overflowed)."""
        if not self.labels:
            raise LoopscopeError(f"hook {self.name!r} never fired")
        parts = [] if self.buf is None or not self.n else [self.buf[: self.n]]
        if not self.extra:
            return parts[0]
        shapes = {tuple(v.shape) for v in self.extra} | {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise LoopscopeError(f"hook {self.name!r} fired with varying shapes {sorted(shapes)}")
        return torch.cat(parts + [torch.stack(self.extra)])


class IterationClock:
    """Labels firings ``(iteration, k)``: ``k`` counts a hook's firings within the iteration.

    ``advance(t)`` starts iteration ``t``; ``unroll`` runs ``init_state`` at :data:`INIT`
    (``-1``), so its firings never collide with step 0's (``encode`` firings are iteration 0).
    """

    INIT = -1

    def __init__(self) -> None:
        self.t = 0
        self.counts: dict[str, int] = {}

    def advance(self, t: int) -> None:
        self.t = t
        self.counts = {}

    def tick(self, name: str) -> tuple[tuple, int]:
        """``(label, k)`` of the firing of ``name`` happening now."""
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return (self.t, k), k

    def hooks(self, model: Any) -> list[tuple[HookPoint, Callable]]:
        """Hooks the clock itself needs (none: ``unroll`` advances it)."""
        return []


class HookSession:
    """One run's hook wiring: a clock labels each firing, interventions patch it, recorders copy it.

    Each hook point gets ONE forward hook that asks the clock for the firing's label, applies the
    interventions selecting that label, then records the value actually used downstream. Hook
    points neither captured nor intervened on get no hook. Use as a context manager around the
    model's forward; the hooks are removed on exit, whatever happens.

    Args:
        model: a TransformerLens ``HookedRootModule`` (a Loop, a bridge).
        capture: hook selection to record (see :func:`resolve_hooks`).
        interventions: interventions to apply (their ``hook`` names resolved on ``model``).
        clock: labels firings (``tick(name) -> (label, k)``, ``hooks(model)``); default
            :class:`IterationClock`.
        positions: keep only these positions of recorded activations.
        offload: device to keep records on.
        store_dtype: storage dtype of records.
        capacity: firings each recorder preallocates room for at its first firing (``unroll``
            passes ``n_iter``); None waits for :meth:`reserve`.
        allowance: ``allowance(device) -> bytes``, the most one recorder's first buffer may take
            (``unroll`` passes its memory budget shared over the recorders).

    Example:
        >>> import torch
        >>> from loopscope import FnLoop
        >>> loop = FnLoop(step=lambda h: 2 * h)
        >>> s = HookSession(loop, capture="hook_state")
        >>> with s:
        ...     for t in range(3):
        ...         s.clock.advance(t)
        ...         _ = loop.hook_state(torch.ones(1, 2) * t)
        >>> s.labels()["hook_state"]
        [(0, 0), (1, 0), (2, 0)]
    """

    def __init__(
        self,
        model: Any,
        *,
        capture: Any = None,
        interventions: Iterable[Any] = (),
        clock: Any = None,
        positions: Any = None,
        offload: str | torch.device | None = None,
        store_dtype: torch.dtype | None = None,
        capacity: int | None = None,
        allowance: Callable[[torch.device], int] | None = None,
    ) -> None:
        self.model = model
        self.points, self.aliases = resolve_hooks(model, capture, what="capture")
        self.interventions = list(interventions)
        self.iv_points, _ = resolve_hooks(model, [iv.hook for iv in self.interventions])
        self.clock = clock if clock is not None else IterationClock()
        self.pos_dims = {n: pos_dim_of(hp) for n, hp in {**self.iv_points, **self.points}.items()}
        self.recorders = {
            n: Recorder(
                n,
                positions=positions,
                pos_dim=self.pos_dims[n],
                offload=offload,
                dtype=store_dtype,
                capacity=capacity,
                allowance=allowance,
            )
            for n in self.points
        }
        self._by_point: dict[str, list[Any]] = {n: [] for n in self.iv_points}
        for iv in self.interventions:
            (name,) = resolve_hooks(model, [iv.hook])[0]
            self._by_point[name].append(iv)
        self._stack: Any = None

    def name_of(self, hp: HookPoint) -> str | None:
        """The canonical name under which hook point ``hp`` is captured or patched (or None)."""
        for n, p in {**self.iv_points, **self.points}.items():
            if p is hp:
                return n
        return None

    def set_pos_dim(self, name: str, pos_dim: int) -> None:
        """Use ``pos_dim`` as the position axis of hook ``name`` (a declared state layout)."""
        self.pos_dims[name] = pos_dim
        if name in self.recorders:
            self.recorders[name].pos_dim = pos_dim

    def _hook(self, name: str) -> Callable:
        tick = self.clock.tick
        ivs = self._by_point.get(name, [])
        rec = self.recorders.get(name)
        pos_dims = self.pos_dims
        if not ivs and rec is not None:  # the common case, once per firing: record, nothing else
            record = rec.record

            def record_only(x: Tensor, hook: Any) -> None:
                record(x, tick(name)[0])

            return record_only

        def fn(x: Tensor, hook: Any) -> Tensor | None:
            label, k = tick(name)
            out = None
            for iv in ivs:
                if iv.applies(label):
                    out = iv(x if out is None else out, label, k, pos_dims[name])
            if rec is not None:
                rec.record(x if out is None else out, label)
            return out

        return fn

    def __enter__(self) -> HookSession:
        hooks = list(self.clock.hooks(self.model))  # the clock first: it labels what follows
        hooks += [(hp, self._hook(n)) for n, hp in {**self.iv_points, **self.points}.items()]
        self._stack = attach(hooks)
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        stack.__exit__(*exc)

    def bytes_so_far(self) -> int:
        """Bytes recorded so far over every captured hook."""
        return sum(r.nbytes for r in self.recorders.values())

    def reserve(self, factor: int) -> None:
        """Size every recorder for ``factor`` times the firings it has so far (one buffer each)."""
        for r in self.recorders.values():
            r.reserve(len(r) * factor)

    def acts(self) -> dict[str, Tensor]:
        """``{hook: [n_firings, B, ...]}`` for every captured hook that fired."""
        return {n: r.stacked() for n, r in self.recorders.items() if len(r)}

    def labels(self) -> dict[str, list[tuple]]:
        """``{hook: [label, ...]}`` for every captured hook that fired."""
        return {n: list(r.labels) for n, r in self.recorders.items() if len(r)}


@contextmanager
def attach(hooks: Iterable[tuple[HookPoint, Callable]]):
    """Attach ``(hook_point, fn)`` forward hooks in order; remove exactly these on exit."""
    level = next(_LEVELS)
    attached: list[HookPoint] = []
    try:
        for hp, fn in hooks:
            hp.add_hook(fn, dir="fwd", level=level)
            attached.append(hp)
        yield
    finally:
        for hp in attached:
            hp.remove_hooks("fwd", including_permanent=False, level=level)


def count_firings(model: Any, *args: Any, names: Any = True, **kwargs: Any) -> dict[str, int]:
    """Counting pass: run ``model(*args, **kwargs)`` once and count every hook point's firings.

    Returns ``{canonical_name: n_firings}`` (points that never fired are included with 0).
    """
    points, _ = resolve_hooks(model, names)
    counts = dict.fromkeys(points, 0)

    def make(name: str) -> Callable:
        def fn(x: Tensor, hook: HookPoint) -> None:
            counts[name] += 1

        return fn

    with torch.no_grad(), attach((hp, make(n)) for n, hp in points.items()):
        model(*args, **kwargs)
    return counts


def warn_looped_hooks(counts: dict[str, int], stacklevel: int = 2) -> list[str]:
    """Warn (``LoopedHookWarning``) for hooks firing more than once per forward; return them."""
    looped = sorted(n for n, c in counts.items() if c > 1)
    if looped:
        shown = ", ".join(f"{n} (x{counts[n]})" for n in looped[:6])
        more = f" and {len(looped) - 6} more" if len(looped) > 6 else ""
        warnings.warn(
            f"{len(looped)} hook points fire more than once per forward: {shown}{more}. "
            "TransformerLens run_with_cache keeps only the last firing and "
            "transformer_lens.patching patches every firing with the last clean value; "
            "use loopscope.core.unroll / loopscope interventions instead.",
            LoopedHookWarning,
            stacklevel=stacklevel,
        )
    return looped


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device`` (MemAvailable for CPU; free CUDA memory for GPUs)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30
