"""Safe checkpoints: safetensors for tensors, JSON for configs and model cards.

Nothing is ever unpickled: ``.pt`` / ``.bin`` / ``.pkl`` files are refused, and a corrupted or
truncated file gets a :class:`~loopscope.core.errors.CheckpointError` naming it. Writes are atomic
(write to ``*.tmp``, then ``os.replace``) so an interrupted save never leaves a half file.

Model checkpoints (a directory of ``model.safetensors`` + ``config.json`` + ``card.json``) are
written and read by :mod:`loopscope.models.checkpoint`, which builds on the helpers here.

Long sweeps resume through :class:`ChunkCheckpoint` (one atomic safetensors file per finished
chunk plus a JSON manifest with the sweep's :func:`fingerprint`); a folder holding another sweep
is refused, never mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopscope.core.errors import CheckpointError

__all__ = [
    "load_state_dict",
    "save_state_dict",
    "atomic_write_text",
    "atomic_savefig",
    "read_json",
    "fingerprint",
    "ChunkCheckpoint",
]

_UNSAFE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (the format is taken from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; missing or corrupt files raise CheckpointError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted JSON file {path}: {e}") from None


def save_state_dict(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Atomically save a flat dict of tensors as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)
    return path


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (refusing pickle-based formats)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in _UNSAFE_SUFFIXES:
        raise CheckpointError(
            f"refusing to load {path}: pickle-based checkpoints are never loaded; convert it to safetensors"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several error types for corrupt headers
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {e}") from None


# -- resumable sweeps ------------------------------------------------------------------------------


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, type(obj).__qualname__)
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    else:  # an object without a stable content representation: its type only
        h.update(f"O{type(obj).__module__}.{type(obj).__qualname__}".encode())


def fingerprint(obj: Any) -> str:
    """SHA-256 (hex, 16 chars) of the content of ``obj``: tensors / numpy arrays (dtype, shape and
    bytes), dicts, lists, tuples, dataclasses and scalars, recursively; an ``nn.Module`` is hashed
    by its class and state dict. Other objects contribute their type only."""
    h = hashlib.sha256()
    if isinstance(obj, nn.Module):
        _feed(h, type(obj).__qualname__)
        obj = dict(obj.state_dict())
    _feed(h, obj)
    return h.hexdigest()[:16]


def _json_norm(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class ChunkCheckpoint:
    """A directory of finished chunks of a long sweep, for exact resume after an interruption.

    Layout: ``manifest.json`` (``format``, ``kind``, the sweep's ``fingerprint`` and reference
    ``values``), one ``chunk-<key>.safetensors`` per finished chunk (tensors + string metadata)
    and ``computed.jsonl`` (one line per chunk computed: key, pid, time). Chunks are written
    atomically (``*.tmp`` then ``os.replace``), so a kill at any moment leaves only complete
    chunks. Opening a directory that holds a different sweep (another
    fingerprint) raises :class:`~loopscope.core.errors.CheckpointError` naming the differing fields;
    nothing is ever mixed or pickled.
    """

    FORMAT = "loopscope.chunks/1"

    def __init__(self, directory: str | os.PathLike, kind: str, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.kind = kind
        self.fingerprint = _json_norm(fingerprint)
        self.path = self.dir / "manifest.json"
        self.resumed = 0
        self.computed = 0
        if self.dir.exists() and not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} is a file")
        if self.path.exists():
            man = read_json(self.path)
            if not isinstance(man, dict) or man.get("format") != self.FORMAT:
                raise CheckpointError(f"{self.path} is not a loopscope chunk manifest")
            if man.get("kind") != kind:
                raise CheckpointError(
                    f"{self.dir} holds a {man.get('kind')} checkpoint, not a {kind}; "
                    "pass another directory"
                )
            old = man.get("fingerprint", {})
            diff = sorted(
                k for k in {*old, *self.fingerprint} if old.get(k) != self.fingerprint.get(k)
            )
            if diff:
                shown = ", ".join(
                    f"{k} ({_short(old.get(k))} there, {_short(self.fingerprint.get(k))} now)"
                    for k in diff[:4]
                )
                raise CheckpointError(
                    f"{self.dir} holds chunks of a different {kind} (differs in: {shown}); "
                    f"resume with the same settings, or pass a new directory / delete {self.dir} "
                    "to start over"
                )
            self.manifest = man
        else:
            if self.dir.exists() and any(self.dir.glob("chunk-*.safetensors")):
                raise CheckpointError(
                    f"{self.dir} holds chunk files but no manifest.json; delete them or pass "
                    "a new directory"
                )
            self.manifest = {
                "format": self.FORMAT,
                "kind": kind,
                "fingerprint": self.fingerprint,
                "values": {},
            }
            self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.manifest, indent=1))

    def check_values(self, name: str, values: Any, rtol: float = 1e-6, atol: float = 1e-9) -> None:
        """Record reference numbers (e.g. the metric on the clean run) or, when resuming, check
        that they match the recorded ones (a changed metric or model would otherwise be mixed)."""
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        old = self.manifest.setdefault("values", {}).get(name)
        if old is None:
            self.manifest["values"][name] = arr.tolist()
            self._write()
            return
        old = np.asarray(old, dtype=np.float64)
        if old.shape != arr.shape or not np.allclose(
            old, arr, rtol=rtol, atol=atol, equal_nan=True
        ):
            raise CheckpointError(
                f"{self.dir} holds chunks of a different {self.kind}: {name} differs from the "
                "checkpoint's (another metric or model?); pass a new directory or delete "
                f"{self.dir} to start over"
            )

    def file(self, key: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise CheckpointError(f"invalid chunk key {key!r}")
        return self.dir / f"chunk-{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.file(key).exists()

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of a finished chunk."""
        from safetensors import safe_open

        path = self.file(key)
        tensors = load_state_dict(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"corrupted or truncated chunk {path}: {e}") from None
        self.resumed += 1
        return tensors, meta

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        """Write a finished chunk atomically, then note it in ``computed.jsonl`` (key, pid, time:
        which process computed which chunk)."""
        import time

        path = save_state_dict(tensors, self.file(key), metadata=meta)
        self.computed += 1
        log = self.dir / "computed.jsonl"
        line = json.dumps({"key": key, "pid": os.getpid(), "time": time.time()}) + "\n"
        if log.exists() and log.stat().st_size:
            with open(log, "rb") as f:  # a line cut short by a kill: start on a fresh line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        with open(log, "a") as f:
            f.write(line)
        return path

    @staticmethod
    def read_log(directory: str | os.PathLike) -> list[dict[str, Any]]:
        """The entries of ``directory/computed.jsonl`` (a line cut short by a kill is skipped)."""
        path = Path(directory) / "computed.jsonl"
        out = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # empty, or cut short by a kill
                    continue
        return out

    def keys(self) -> list[str]:
        """Keys of the finished chunks on disk."""
        return sorted(
            p.name[len("chunk-") : -len(".safetensors")]
            for p in self.dir.glob("chunk-*.safetensors")
        )

    @staticmethod
    def discard(directory: str | os.PathLike) -> None:
        """Delete a checkpoint's own files (chunks, log, manifest) in ``directory``; nothing else
        in the folder is touched."""
        d = Path(directory)
        if not d.is_dir():
            return
        for p in d.glob("chunk-*.safetensors*"):
            p.unlink()
        (d / "computed.jsonl").unlink(missing_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."
