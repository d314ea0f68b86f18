"""Per-iteration capture through TransformerLens hook points.

TransformerLens has no notion of iterations: a hook inside a weight-tied block fires once per loop
iteration and its ``run_with_cache`` keeps only the **last** firing (last-write-wins), while
``transformer_lens.patching`` silently patches *every* firing with the last clean value. This
module builds on the hook layer only (``HookPoint.add_hook``), never on TL's cache or patching:

* :func:`resolve_hooks` — names, globs or a filter -> canonical hook points (aliases de-duplicated
  by identity, unknown names rejected with close-match suggestions);
* :class:`Recorder` — appends a detached clone of every firing (no in-place corruption), optional
  position subset, dtype and CPU offload;
* :func:`count_firings` / :func:`warn_looped_hooks` — the counting pass that warns where stock TL
  caching or patching would keep only the last firing.
"""

from __future__ import annotations

import fnmatch
import itertools
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
    "Recorder",
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


def pos_dim_of(hp: HookPoint) -> int:
    """Position axis of a hook's activation (``HookPoint.pos_dim`` if set, else 1)."""
    pd_ = getattr(hp, "pos_dim", None)
    return 1 if pd_ is None else int(pd_)


def resolve_hooks(model: Any, selection: Any) -> tuple[dict[str, HookPoint], dict[str, str]]:
    """Resolve a hook selection to ``({canonical_name: HookPoint}, {alias: canonical})``.

    ``selection``: None/False/[] (nothing), True or "all" (every hook point), a name, a glob
    (``"core.blocks.*.hook_resid_pre"``), a list of names/globs, or a callable ``filter(name)``.
    Aliases (several names for one HookPoint, as on ``TransformerBridge``) are de-duplicated by
    identity so each physical point is recorded once per firing.
    """
    hd = _hook_dict(model)
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
                raise LoopscopeError(f"hook selection items must be strings, got {item!r}")
            if any(c in item for c in "*?["):
                hits = fnmatch.filter(hd, item)
                if not hits:
                    raise UnknownHookError(
                        f"hook pattern {item!r} matches no hook point{suggest(item, hd)}"
                    )
                names.extend(hits)
            elif item in hd:
                names.append(item)
            else:
                raise UnknownHookError(f"unknown hook name {item!r}{suggest(item, hd)}")
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


class Recorder:
    """Appends every forward firing of one hook point with its label.

    Args:
        name: canonical hook name (bound here, not read from ``hook.name``, which is the alias in
            TL compatibility mode).
        label_fn: ``() -> tuple`` giving the current firing's label (the loop clock).
        positions: optional index into the position axis to keep.
        offload: device to move records to (e.g. ``"cpu"``), or None to keep them in place.
        dtype: optional storage dtype.
    """

    def __init__(
        self,
        name: str,
        label_fn: Callable[[], tuple],
        positions: Any = None,
        pos_dim: int = 1,
        offload: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.label_fn = label_fn
        self.positions = positions
        self.pos_dim = pos_dim
        self.offload = offload
        self.dtype = dtype
        self.values: list[Tensor] = []
        self.labels: list[tuple] = []
        self.requires_grad: list[bool] = []

    def __call__(self, x: Tensor, hook: HookPoint) -> None:
        v = x.detach()
        if self.positions is not None and v.dim() > self.pos_dim:
            index: list[Any] = [slice(None)] * v.dim()
            index[self.pos_dim] = self.positions
            v = v[tuple(index)]
        if self.dtype is not None:
            v = v.to(self.dtype)
        if self.offload is not None:
            v = v.to(self.offload)
        # clone: detach() shares storage, and a model doing `x += ...` after the hook would
        # otherwise rewrite what we recorded (capture.md pitfall 4).
        shares = v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        self.values.append(v.clone() if shares else v)
        self.labels.append(self.label_fn())
        self.requires_grad.append(bool(x.requires_grad))
        return None

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)

    def stacked(self) -> Tensor:
        if not self.values:
            raise LoopscopeError(f"hook {self.name!r} never fired")
        shapes = {tuple(v.shape) for v in self.values}
        if len(shapes) > 1:
            raise LoopscopeError(f"hook {self.name!r} fired with varying shapes {sorted(shapes)}")
        return torch.stack(self.values)


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
