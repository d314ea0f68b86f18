"""``unroll``: the single entry to running a loop, recording every iteration."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from loopscope.core.capture import (
    Recorder,
    attach,
    available_memory_bytes,
    pos_dim_of,
    resolve_hooks,
)
from loopscope.core.errors import (
    CaptureMemoryError,
    LoopscopeError,
    check_positive_int,
    reject_unknown_kwargs,
)
from loopscope.core.interventions import Intervention
from loopscope.core.loop import Loop
from loopscope.core.trace import Trace

__all__ = ["unroll", "HaltFn"]

#: ``halt(t, h_prev, h_next, ctx) -> BoolTensor[B]``: True where a sample halts after step t.
HaltFn = Callable[[int, Tensor, Tensor, Any], Tensor]

_OPTIONS = (
    "capture",
    "interventions",
    "halt",
    "init",
    "generator",
    "seed",
    "decode",
    "grad",
    "positions",
    "offload",
    "store_dtype",
    "max_bytes",
    "blowup",
    "meta",
)


class _Clock:
    """Loop clock: the current iteration and how often each hook fired within it."""

    def __init__(self) -> None:
        self.t = 0
        self.counts: dict[str, int] = defaultdict(int)

    def advance(self, t: int) -> None:
        self.t = t
        self.counts.clear()

    def tick(self, name: str) -> tuple[int, int]:
        k = self.counts[name]
        self.counts[name] += 1
        return (self.t, k)


def _per_sample_bad(h: Tensor, ref_norm: Tensor, blowup: float) -> Tensor:
    flat = h.detach().reshape(h.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    norms = torch.where(
        finite, flat.double().norm(dim=1), torch.zeros((), dtype=torch.float64, device=h.device)
    )
    return ~finite | (norms > blowup * ref_norm)


def unroll(loop: Loop, inputs: Any, n_iter: int, **options: Any) -> Trace:
    """Run ``loop`` for ``n_iter`` iterations on ``inputs``, recording every iteration.

    Args:
        loop: any :class:`loopscope.Loop`.
        inputs: what ``loop.encode`` takes (token ids ``[B, pos]`` for the own models).
        n_iter: number of iterations (>= 1).

    Keyword options:
        capture: hook names, a glob, a list, a filter callable, or True for every hook point.
        interventions: list of :class:`~loopscope.core.interventions.Intervention` (``Patch``, ``Add``,
            ``Zero``, ``MeanAblate``, ``Transplant``) applied at their ``(hook, iteration)``.
        halt: ``halt(t, h_prev, h_next, ctx) -> BoolTensor[B]``; halted samples are frozen and the
            run stops when every sample has halted or diverged.
        init: initial state ``[B, ...]`` (or ``fn(ctx, generator)``); default ``loop.init_state``.
        generator / seed: randomness for ``init_state`` (seed -> a fresh CPU generator).
        decode: also store ``loop.decode(h_t)`` for every t in ``trace.logits``.
        grad: run with autograd enabled (default False: ``torch.no_grad``).
        positions: keep only these positions of captured activations (memory).
        offload: device for captured activations (e.g. ``"cpu"``).
        store_dtype: dtype for captured activations.
        max_bytes: capture budget; default half the free memory. Estimated after the first
            iteration; over budget raises :class:`~loopscope.core.errors.CaptureMemoryError`.
        blowup: a sample whose state norm exceeds ``blowup * max(1, ||h_0||)`` (or is NaN/inf) is
            marked diverged at that iteration and frozen; the rest of the batch carries on.
        meta: dict merged into ``trace.meta`` (model, task, split, seed ...).

    Returns:
        :class:`~loopscope.Trace` with ``states [T+1, B, ...]`` and ``trace[hook] [T, B, ...]``.

    Example:
        >>> import torch
        >>> from loopscope import FnLoop, unroll
        >>> loop = FnLoop(step=lambda h, x: torch.tanh(2 * h), init_state=torch.full((3,), 0.3))
        >>> tr = unroll(loop, torch.zeros(2, 3), n_iter=50)
        >>> round(float(tr.final[0, 0]), 4)
        0.9575
    """
    reject_unknown_kwargs("unroll", options, _OPTIONS)
    if not isinstance(loop, Loop):
        raise LoopscopeError(f"unroll needs a loopscope.Loop, got {type(loop).__name__}")
    n_iter = check_positive_int("n_iter", n_iter)
    interventions: Sequence[Intervention] = list(options.get("interventions") or [])
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise LoopscopeError(
                f"interventions must be loopscope interventions, got {type(iv).__name__}"
            )
    blowup = float(options.get("blowup", 1e8))
    grad = bool(options.get("grad", False))

    generator = options.get("generator")
    if generator is None and options.get("seed") is not None:
        generator = torch.Generator().manual_seed(int(options["seed"]))

    points, aliases = resolve_hooks(loop, options.get("capture"))
    iv_points, _ = resolve_hooks(loop, [iv.hook for iv in interventions])
    state_hp = loop.hook_state

    clock = _Clock()
    recorders: dict[str, Recorder] = {}
    for name, hp in points.items():
        recorders[name] = Recorder(
            name,
            label_fn=lambda: None,  # set below (needs the name)
            positions=options.get("positions"),
            pos_dim=pos_dim_of(hp),
            offload=options.get("offload"),
            dtype=options.get("store_dtype"),
        )
    hook_list: list[tuple[Any, Callable]] = []
    last_label: dict[str, tuple] = {}

    def make_clock_hook(name: str) -> Callable:
        def fn(x: Tensor, hook: Any) -> None:
            last_label[name] = clock.tick(name)

        return fn

    def make_patch_hook(name: str, ivs: list[Intervention], pos_dim: int) -> Callable:
        def fn(x: Tensor, hook: Any) -> Tensor | None:
            label = last_label[name]
            out = None
            for iv in ivs:
                if iv.applies(label):
                    out = iv(x if out is None else out, label, label[1], pos_dim)
            return out

        return fn

    # registration order matters: clock first, then patchers, then recorders (which therefore
    # see the value actually used downstream)
    all_names = dict(points)
    all_names.update(iv_points)
    for name, hp in all_names.items():
        hook_list.append((hp, make_clock_hook(name)))
    for name, hp in iv_points.items():
        ivs = [iv for iv in interventions if resolve_hooks(loop, [iv.hook])[0].keys() == {name}]
        hook_list.append((hp, make_patch_hook(name, ivs, pos_dim_of(hp))))
    for name, rec in recorders.items():
        rec.label_fn = (lambda n: lambda: last_label[n])(name)
        hook_list.append((points[name], rec))

    grad_ctx = nullcontext() if grad else torch.no_grad()
    with grad_ctx, attach(hook_list):
        ctx = loop.encode(inputs)
        init = options.get("init")
        if init is None:
            h = loop.init_state(ctx, generator)
        elif callable(init) and not isinstance(init, Tensor):
            h = init(ctx, generator)
        elif isinstance(init, Tensor):
            h = init
        else:
            raise LoopscopeError(f"init must be a tensor or callable, got {type(init).__name__}")
        if not isinstance(h, Tensor) or h.dim() < 1:
            raise LoopscopeError("init_state must return a tensor with a leading batch axis")
        B = h.shape[0]
        diverged_at = torch.full((B,), -1, dtype=torch.long)
        halted_at = torch.full((B,), -1, dtype=torch.long)
        ref_norm = h.detach().reshape(B, -1).double().norm(dim=1).clamp_min(1.0).cpu()
        states: list[Tensor] = []
        logits: list[Tensor] = []
        halt = options.get("halt")
        want_logits = bool(options.get("decode", False))
        max_bytes = options.get("max_bytes")
        for t in range(n_iter):
            clock.advance(t)
            h = state_hp(h)  # fires hook_state: capture / transplant of h_t
            states.append(h.detach().clone() if not grad else h)
            if want_logits:
                logits.append(loop.decode(h, ctx))
            h_next = loop.step(h, ctx, t)
            if not isinstance(h_next, Tensor) or h_next.shape != h.shape:
                raise LoopscopeError(
                    f"step must return a tensor of the state's shape {tuple(h.shape)}, got "
                    f"{tuple(h_next.shape) if isinstance(h_next, Tensor) else type(h_next).__name__}"
                )
            frozen = (diverged_at >= 0) | (halted_at >= 0)
            bad = _per_sample_bad(h_next, ref_norm.to(h_next.device), blowup).cpu() & ~frozen
            if bad.any():
                diverged_at[bad] = t + 1
            freeze = (frozen | bad).to(h_next.device)
            if freeze.any():
                mask = freeze.view(B, *([1] * (h.dim() - 1)))
                h_next = torch.where(mask, h, h_next)
            if halt is not None:
                stop = torch.as_tensor(halt(t, h, h_next, ctx)).bool().cpu().reshape(B)
                newly = stop & (halted_at < 0) & (diverged_at < 0)
                halted_at[newly] = t + 1
            if t == 0 and recorders:
                _check_budget(recorders, n_iter, max_bytes, options.get("offload"), h)
            h = h_next
            if halt is not None and bool(((halted_at >= 0) | (diverged_at >= 0)).all()):
                break
        states.append(h.detach().clone() if not grad else h)
        if want_logits:
            logits.append(loop.decode(h, ctx))

    status = [
        "diverged" if diverged_at[b] >= 0 else "halted" if halted_at[b] >= 0 else "max_iter"
        for b in range(B)
    ]
    meta = {"loopscope_version": _version(), "n_iter_requested": n_iter}
    if options.get("seed") is not None:
        meta["seed"] = int(options["seed"])
    if options.get("positions") is not None:
        meta["positions"] = torch.as_tensor(options["positions"]).tolist()
    meta.update(options.get("meta") or {})
    return Trace(
        states=torch.stack(states),
        acts={n: r.stacked() for n, r in recorders.items() if r.values},
        labels={n: r.labels for n, r in recorders.items() if r.values},
        status=status,
        diverged_at=diverged_at,
        halted_at=halted_at,
        logits=torch.stack(logits) if want_logits else None,
        meta=meta,
        aliases=aliases,
        loop=loop,
        ctx=ctx,
    )


def _check_budget(
    recorders: dict[str, Recorder], n_iter: int, max_bytes: Any, offload: Any, h: Tensor
) -> None:
    per_iter = sum(r.nbytes for r in recorders.values())
    estimate = per_iter * n_iter
    device = offload if offload is not None else h.device
    budget = int(max_bytes) if max_bytes is not None else available_memory_bytes(device) // 2
    if estimate > budget:
        raise CaptureMemoryError(
            f"capture would need ~{estimate / 2**20:.1f} MiB ({per_iter / 2**20:.2f} MiB per iteration x "
            f"{n_iter}) but the budget is {budget / 2**20:.1f} MiB; capture fewer hooks, keep fewer "
            "positions (positions=), store in a smaller dtype (store_dtype=), offload to CPU "
            "(offload='cpu') or raise max_bytes"
        )


def _version() -> str:
    from loopscope import __version__

    return __version__
