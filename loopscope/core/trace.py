"""Trace: the ordered record of one unrolled loop.

* ``trace.states``: ``[T+1, B, ...]`` — ``h_0 .. h_T`` (after any intervention on ``hook_state``).
* ``trace[hook]``: every firing of a captured hook stacked ``[n_firings, B, ...]`` (for a hook
  inside the block: ``[T, B, ...]``); ``trace.labels[hook]`` is the label tuple of each firing,
  e.g. ``(iteration, sub)`` for own loops or ``(h_cycle, l_cycle)`` for HRM-Text.
* ``trace.status``: per sample ``"diverged" | "halted" | "max_iter"`` (the dynamical class —
  converged / cycle(p) / slider / chaotic — comes from :func:`loopscope.analysis.classify`).
* ``trace.diverged_at`` / ``trace.halted_at``: ``[B]`` long, ``-1`` where it did not happen.
* ``trace.logits``: ``[T+1, B, ...]`` when ``unroll(..., decode=True)``, else :meth:`decode` on demand.

Saved as ``NAME.safetensors`` (tensors) + ``NAME.json`` (labels, status, metadata and the
tensors' SHA-256); :meth:`Trace.load` reads only those formats and verifies the hash.
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
    @staticmethod
    def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
        """``(tensors, json)`` of a trace at ``path``: ``path.safetensors`` + ``path.json``
        (a name ending in ``.json`` / ``.safetensors`` names the pair; any other suffix is part
        of the name, so ``r.id`` and ``r.ood`` are two traces)."""
        base = Path(path)
        if base.suffix in (".json", ".safetensors"):
            base = base.with_suffix("")
        return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path.safetensors`` + ``path.json`` atomically; returns the JSON path.

        The JSON records the SHA-256 of the tensors' payload (verified by :meth:`load`); it is
        written last, so a kill between the two files leaves a pair that :meth:`load` refuses.
        """
        from safetensors.torch import save_file

        from loopscope.core.io import _atomic, payload_sha256

        st, js = self._paths(path)
        tensors = {"states": self.states}
        for name, v in self.acts.items():
            tensors[f"acts/{name}"] = v
        for name in ("diverged_at", "halted_at", "logits"):
            v = getattr(self, name)
            if v is not None:
                tensors[name] = v
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _atomic(st, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": "loopscope.trace/1",
            "tensors": st.name,
            "sha256": payload_sha256(st),
            "labels": {k: [list(x) for x in v] for k, v in self.labels.items()},
            "status": list(self.status),
            "aliases": self.aliases,
            "meta": self.meta,
        }
        _atomic(js, lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str)))
        return js

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace written by :meth:`save` (safetensors + JSON only; nothing is unpickled).

        The payload hash recorded in the JSON is checked, and so is every field: a damaged or
        mismatched pair is a :class:`~loopscope.core.errors.CheckpointError` naming the file.
        """
        from loopscope.core.io import _UNSAFE_SUFFIXES, load_state_dict, read_json

        if Path(path).suffix in _UNSAFE_SUFFIXES:
            raise CheckpointError(
                f"refusing to load {path}: pickle-based files are never loaded; a trace is "
                "NAME.safetensors + NAME.json"
            )
        st, js = cls._paths(path)
        for f in (js, st):
            if not f.exists():
                raise CheckpointError(f"trace file not found: {f}")
        meta = read_json(js)
        if not isinstance(meta, dict) or meta.get("format") != "loopscope.trace/1":
            raise CheckpointError(f"{js} is not a loopscope trace (no format loopscope.trace/1)")
        sha = meta.get("sha256")  # traces saved before hashes were recorded load unchecked
        try:
            tensors = load_state_dict(st, sha256=sha, where=js)
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("checkpoint", "trace file", 1)) from None
        if "states" not in tensors:
            raise CheckpointError(f"{st} is not a loopscope trace (no states tensor)")
        return cls(**_fields(meta, tensors, js))


def _fields(meta: dict, tensors: dict[str, Tensor], js: Path) -> dict[str, Any]:
    """The Trace fields of a loaded pair, each checked against the tensors (field named)."""

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{js}: field {field!r} {why}")

    states = tensors["states"]
    B = states.shape[1] if states.dim() > 1 else None
    acts = {k[5:]: v for k, v in tensors.items() if k.startswith("acts/")}
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        raise bad("labels", f"must be a dict of hook -> firing labels, got {_kind(labels)}")
    for k, v in labels.items():
        if k not in acts:
            raise bad("labels", f"names hook {k!r}, which has no tensor")
        if not isinstance(v, list) or not all(isinstance(x, list) for x in v):
            raise bad("labels", f"of {k!r} must be a list of label lists")
        if len(v) != acts[k].shape[0]:
            raise bad("labels", f"of {k!r} has {len(v)} entries for {acts[k].shape[0]} firings")
    status = meta.get("status")
    if not isinstance(status, list) or not all(isinstance(x, str) for x in status):
        raise bad("status", f"must be a list of strings, got {_kind(status)}")
    if status and B is not None and len(status) != B:
        raise bad("status", f"has {len(status)} entries for a batch of {B}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict):
        raise bad("aliases", f"must be a dict, got {_kind(aliases)}")
    extra = meta.get("meta", {})
    if not isinstance(extra, dict):
        raise bad("meta", f"must be a dict, got {_kind(extra)}")
    return {
        "states": states,
        "acts": acts,
        "labels": {k: [tuple(x) for x in v] for k, v in labels.items()},
        "status": status,
        "diverged_at": tensors.get("diverged_at"),
        "halted_at": tensors.get("halted_at"),
        "logits": tensors.get("logits"),
        "meta": extra,
        "aliases": aliases,
    }


def _kind(v: Any) -> str:
    return "nothing" if v is None else type(v).__name__
