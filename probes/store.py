"""``ActivationStore``: a disk-backed activation store for sweeps too large for memory.

Layout of the folder::

    index.json                 # {"format": "loopscope.activations/1", "meta": {...}, "chunks": [...]}
    chunk-000000.safetensors   # one shard per appended chunk (e.g. one batch of inputs)

Each chunk holds the activations of one batch of examples for any number of keys (dicts such as
``{"site": "state", "iteration": 3}``); :meth:`ActivationStore.load` concatenates a key's chunks
along the batch axis in chunk order. Writes are atomic (``*.tmp`` then ``os.replace``; the index
is rewritten after the shard), so an interrupted sweep resumes from the chunks in the index
(:meth:`done`) and a half-written shard is never read. Only safetensors and JSON are read —
nothing is unpickled.

Example:
    >>> import tempfile, torch
    >>> st = ActivationStore(tempfile.mkdtemp())
    >>> st.append(0, {("state", 1): torch.ones(2, 3)})
    >>> st.append(1, {("state", 1): torch.zeros(4, 3)})
    >>> st.load(("state", 1)).shape, st.done()
    (torch.Size([6, 3]), [0, 1])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loopscope.core.errors import CheckpointError, LoopscopeError
from loopscope.core.io import atomic_write_text

__all__ = ["ActivationStore"]

_FORMAT = "loopscope.activations/1"


def _key_str(key: Any) -> str:
    """Canonical JSON text of a key (dict, tuple, str or int)."""
    if isinstance(key, dict):
        return json.dumps({str(k): key[k] for k in sorted(key)}, sort_keys=True)
    if isinstance(key, (tuple, list)):
        return json.dumps(list(key))
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return json.dumps(key)
    raise LoopscopeError(f"store keys must be dicts, tuples, strings or ints, got {key!r}")


class ActivationStore:
    """Append-only, resumable activation store (safetensors shards + a JSON index).

    Args:
        directory: folder (created if missing; an existing store is reopened to resume).
        meta: metadata to record (model, task, seed ...); must match an existing store's.
    """

    def __init__(self, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / "index.json"
        if self.index_path.exists():
            try:
                idx = json.loads(self.index_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"corrupted store index {self.index_path}: {e}") from None
            if idx.get("format") != _FORMAT:
                raise CheckpointError(f"{self.index_path} is not a loopscope activation store")
            if meta is not None and idx.get("meta") != json.loads(json.dumps(meta, default=str)):
                raise LoopscopeError(
                    f"store {self.dir} was written with meta {idx.get('meta')}, not {meta}"
                )
            self._index = idx
        else:
            self._index = {"format": _FORMAT, "meta": meta or {}, "chunks": []}
            self._write_index()

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._index["meta"])

    def _write_index(self) -> None:
        atomic_write_text(self.index_path, json.dumps(self._index, indent=1, default=str))

    def done(self) -> list[int]:
        """Chunk ids already stored (skip them when resuming a sweep)."""
        return [c["chunk"] for c in self._index["chunks"]]

    def keys(self) -> list[Any]:
        """Every key stored (decoded from JSON), in first-appearance order."""
        seen: dict[str, None] = {}
        for c in self._index["chunks"]:
            for k in c["keys"]:
                seen.setdefault(k, None)
        return [json.loads(k) for k in seen]

    def __contains__(self, key: Any) -> bool:
        ks = _key_str(key)
        return any(ks in c["keys"] for c in self._index["chunks"])

    def append(self, chunk: int, tensors: dict[Any, Tensor], info: dict | None = None) -> None:
        """Store one chunk: ``{key: tensor [b, ...]}`` (every tensor of a chunk shares ``b``);
        ``info`` is JSON metadata kept with the chunk."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise LoopscopeError(f"chunk must be a non-negative int, got {chunk!r}")
        if chunk in self.done():
            raise LoopscopeError(f"chunk {chunk} is already stored in {self.dir}")
        if not tensors:
            raise LoopscopeError("append needs at least one tensor")
        from safetensors.torch import save_file

        names, flat, sizes = {}, {}, set()
        for i, (key, t) in enumerate(tensors.items()):
            if not isinstance(t, Tensor) or t.dim() < 1:
                raise LoopscopeError(f"value for key {key!r} must be a tensor with a batch axis")
            ks = _key_str(key)
            names[ks] = f"t{i}"
            flat[f"t{i}"] = t.detach().contiguous().cpu()
            sizes.add(t.shape[0])
        if len(sizes) != 1:
            raise LoopscopeError(f"tensors of one chunk must share the batch size, got {sizes}")
        shard = self.dir / f"chunk-{chunk:06d}.safetensors"
        tmp = shard.with_name(shard.name + ".tmp")
        save_file(flat, str(tmp))
        os.replace(tmp, shard)
        self._index["chunks"].append(
            {
                "chunk": chunk,
                "file": shard.name,
                "batch": sizes.pop(),
                "keys": names,
                "info": info or {},
            }
        )
        self._index["chunks"].sort(key=lambda c: c["chunk"])
        self._write_index()

    def append_set(self, chunk: int, aset: Any) -> None:
        """Store an :class:`ActivationSet` (one key per entry: site, iteration, firing)."""
        tensors = {
            (k["site"], k["iteration"], k["firing"]): aset.X[i] for i, k in enumerate(aset.keys)
        }
        self.append(chunk, tensors, {"positions": list(aset.positions)})

    def load(self, key: Any) -> Tensor:
        """All chunks of ``key`` concatenated along the batch axis (chunk order)."""
        from safetensors import safe_open

        ks = _key_str(key)
        parts = []
        for c in self._index["chunks"]:
            if ks not in c["keys"]:
                continue
            path = self.dir / c["file"]
            try:
                with safe_open(str(path), framework="pt") as f:
                    parts.append(f.get_tensor(c["keys"][ks]))
            except Exception as e:  # safetensors raises several types on corrupt files
                raise CheckpointError(f"corrupted or missing shard {path}: {e}") from None
        if not parts:
            raise LoopscopeError(f"key {key!r} is not in store {self.dir}")
        return torch.cat(parts)

    def load_set(self, keys: list[Any] | None = None) -> Any:
        """Reassemble an :class:`ActivationSet` from keys written by :meth:`append_set`."""
        from loopscope.probes.activations import ActivationSet

        keys = self.keys() if keys is None else keys
        X = torch.stack([self.load(k) for k in keys])  # [E, B, P, d]
        dict_keys = [{"site": k[0], "iteration": int(k[1]), "firing": int(k[2])} for k in keys]
        chunks = self._index["chunks"]
        positions = chunks[0]["info"].get("positions") if chunks else None
        positions = positions or list(range(X.shape[2]))
        return ActivationSet(X=X, keys=dict_keys, positions=positions, meta=self.meta)
