"""Trace: the ordered record of one unrolled loop.

* ``trace.states``: ``[T+1, B, ...]`` — ``h_0 .. h_T`` (after any intervention on ``hook_state``).
* ``trace[hook]``: every firing of a captured hook stacked ``[n_firings, B, ...]`` (for a hook
  inside the block: ``[T, B, ...]``); ``trace.labels[hook]`` is the label tuple of each firing,
  e.g. ``(iteration, sub)`` for own loops or ``(h_cycle, l_cycle)`` for HRM-Text.
* ``trace.status``: per sample ``"diverged" | "halted" | "max_iter"`` (the dynamical class —
  converged / cycle(p) / slider / chaotic — comes from :func:`loopscope.analysis.classify`).
* ``trace.diverged_at`` / ``trace.halted_at``: ``[B]`` long, ``-1`` where it did not happen.
* ``trace.logits``: ``[T+1, B, ...]`` when ``unroll(..., decode=True)``, else :meth:`decode` on demand.

Saved as safetensors (tensors) + JSON (labels, status, metadata); :meth:`Trace.load` reads only
those formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import CheckpointError, LoopscopeError, UnknownHookError, suggest

__all__ = ["Trace"]


@dataclass
class Trace:
    """Record of ``unroll``: states, captured activations per firing, labels and status."""

    states: Tensor
    acts: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, list[tuple]] = field(default_factory=dict)
    status: list[str] = field(default_factory=list)
    diverged_at: Tensor | None = None
    halted_at: Tensor | None = None
    logits: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    loop: Any = field(default=None, repr=False, compare=False)
    ctx: Any = field(default=None, repr=False, compare=False)

    # -- basic views --------------------------------------------------------------------------
    @property
    def n_iter(self) -> int:
        """Number of iterations run (``states`` holds ``n_iter + 1`` entries)."""
        return self.states.shape[0] - 1

    @property
    def batch_size(self) -> int:
        return self.states.shape[1]

    @property
    def final(self) -> Tensor:
        """Final state ``h_T`` ``[B, ...]``."""
        return self.states[-1]

    def _canonical(self, name: str) -> str:
        if name in self.acts:
            return name
        if name in self.aliases and self.aliases[name] in self.acts:
            return self.aliases[name]
        known = list(self.acts) + list(self.aliases)
        raise UnknownHookError(
            f"hook {name!r} was not captured in this trace{suggest(name, known)}"
        )

    def __getitem__(self, name: str) -> Tensor:
        """Stacked firings of hook ``name`` ``[n_firings, B, ...]``."""
        if name == "hook_state" and "hook_state" not in self.acts:
            return self.states[:-1]
        return self.acts[self._canonical(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.acts or name in self.aliases)

    def keys(self) -> list[str]:
        return list(self.acts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.acts)

    def firing(self, name: str, label: Any) -> Tensor:
        """Activation of hook ``name`` at the firing with ``label`` (int = first firing of that
        iteration, tuple = exact label)."""
        if name == "hook_state" and "hook_state" not in self.acts:
            t = label if isinstance(label, int) else label[0]
            return self.states[t]
        key = self._canonical(name)
        labs = self.labels[key]
        want = (label,) if isinstance(label, int) else tuple(label)
        for i, lab in enumerate(labs):
            if tuple(lab[: len(want)]) == want:
                return self.acts[key][i]
        raise LoopscopeError(f"hook {name!r} has no firing labelled {label!r} (has {labs[:4]}...)")

    def at(self, label: Any, model: Any = None):
        """TransformerLens ``ActivationCache`` of every captured hook at one firing label."""
        from transformer_lens import ActivationCache

        d = {}
        for name in self.acts:
            try:
                d[name] = self.firing(name, label)
            except LoopscopeError:
                continue
        return ActivationCache(d, model if model is not None else self.loop)

    def decode(self, t: int | None = None) -> Tensor:
        """Readout ``loop.decode(h_t, ctx)`` at iteration ``t`` (default: final)."""
        if self.logits is not None:
            return self.logits[self.n_iter if t is None else t]
        if self.loop is None or self.ctx is None:
            raise LoopscopeError(
                "this trace has no loop attached (loaded from disk?): cannot decode"
            )
        t = self.n_iter if t is None else t
        if not -self.n_iter - 1 <= t <= self.n_iter:
            raise LoopscopeError(f"iteration {t} out of range 0..{self.n_iter}")
        with torch.no_grad():
            return self.loop.decode(self.states[t], self.ctx)

    def to_frame(self) -> pd.DataFrame:
        """Tidy per-(iteration, sample) table: state norm, step norm, relative step, status."""
        s = self.states.detach().flatten(2).double()
        norms = s.norm(dim=-1)  # [T+1, B]
        step = torch.zeros_like(norms)
        step[1:] = (s[1:] - s[:-1]).norm(dim=-1)
        rel = step / norms.clamp_min(1e-30)
        T1, B = norms.shape
        it = torch.arange(T1).repeat_interleave(B)
        smp = torch.arange(B).repeat(T1)
        df = pd.DataFrame(
            {
                "iteration": it.numpy(),
                "sample": smp.numpy(),
                "state_norm": norms.reshape(-1).cpu().numpy(),
                "step_norm": step.reshape(-1).cpu().numpy(),
                "rel_step": rel.reshape(-1).cpu().numpy(),
            }
        )
        if self.status:
            df["status"] = [self.status[b] for b in smp.tolist()]
        if self.diverged_at is not None:
            df["diverged_at"] = self.diverged_at.cpu().numpy()[smp.numpy()]
        for k in ("model", "task", "split", "seed"):
            if k in self.meta:
                df[k] = self.meta[k]
        return df

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path.safetensors`` + ``path.json`` atomically; returns the JSON path."""
        from safetensors.torch import save_file

        base = Path(path)
        if base.suffix in (".json", ".safetensors"):
            base = base.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"states": self.states}
        for name, v in self.acts.items():
            tensors[f"acts/{name}"] = v
        for name in ("diverged_at", "halted_at", "logits"):
            v = getattr(self, name)
            if v is not None:
                tensors[name] = v
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {
            "format": "loopscope.trace/1",
            "labels": {k: [list(x) for x in v] for k, v in self.labels.items()},
            "status": list(self.status),
            "aliases": self.aliases,
            "meta": self.meta,
        }
        st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
        tmp_st, tmp_js = st.with_name(st.name + ".tmp"), js.with_name(js.name + ".tmp")
        save_file(tensors, str(tmp_st))
        tmp_js.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp_st, st)
        os.replace(tmp_js, js)
        return js

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by :meth:`save` (safetensors + JSON only; nothing is unpickled)."""
        from safetensors.torch import load_file

        base = Path(path)
        if base.suffix in (".json", ".safetensors"):
            base = base.with_suffix("")
        st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
        for f in (st, js):
            if not f.exists():
                raise CheckpointError(f"trace file not found: {f}")
        try:
            tensors = load_file(str(st))
        except Exception as e:  # safetensors raises several types on corrupt files
            raise CheckpointError(f"corrupted or truncated trace file {st}: {e}") from None
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"corrupted trace metadata {js}: {e}") from None
        if meta.get("format") != "loopscope.trace/1" or "states" not in tensors:
            raise CheckpointError(f"{js} is not a loopscope trace")
        acts = {k[5:]: v for k, v in tensors.items() if k.startswith("acts/")}
        return cls(
            states=tensors["states"],
            acts=acts,
            labels={k: [tuple(x) for x in v] for k, v in meta["labels"].items()},
            status=meta["status"],
            diverged_at=tensors.get("diverged_at"),
            halted_at=tensors.get("halted_at"),
            logits=tensors.get("logits"),
            meta=meta["meta"],
            aliases=meta.get("aliases", {}),
        )
