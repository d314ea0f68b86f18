"""Safe checkpoints: safetensors for tensors, JSON for configs and model cards.

Nothing is ever unpickled: ``.pt`` / ``.bin`` / ``.pkl`` files are refused, and a corrupted or
truncated file gets a :class:`~loopscope.core.errors.CheckpointError` naming it. Writes are atomic
(write to a temporary name unique to the writing process, ``<name>.<pid>-<random>.tmp``, then
``os.replace``) so an interrupted save never leaves a half file and two writers never share a
temporary file. A write that fails (disk full, read-only folder) is an
:class:`~loopscope.core.errors.OutputError` naming the file, and leaves no temporary behind.

Integrity: :func:`payload_sha256` is the SHA-256 of a safetensors file's payload (the bytes after
its header); model checkpoints and traces record it in their JSON and :func:`load_state_dict`
verifies it (``sha256=``), so a flipped payload byte is a ``CheckpointError`` naming the file,
never a silently different model. Sweep chunks carry it in their own header (``loopscope.sha256``).

One writer per output folder: :class:`OutputLock` (``folder/.loopscope.lock`` with the writer's
pid, host and process start time) refuses a second process while the first is alive and takes
over a lock left by a killed one.

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
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loopscope.core.errors import CheckpointError, OutputError

__all__ = [
    "load_state_dict",
    "save_state_dict",
    "payload_sha256",
    "verify_sha256",
    "atomic_write_text",
    "atomic_savefig",
    "read_json",
    "fingerprint",
    "ChunkCheckpoint",
    "OutputLock",
    "check_writable",
    "tmp_name",
]

_UNSAFE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


def tmp_name(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` unique to this process and call
    (``<name>.<pid>-<random>.tmp``): two writers of one file never share a temporary."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_failed(path: Path, e: BaseException) -> OutputError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return OutputError(f"cannot write {path}: {why}")


def _atomic(path: str | os.PathLike, write: Any) -> Path:
    """``write(tmp)`` to a unique temporary, then ``os.replace`` it onto ``path``; any failure
    (disk full, read-only folder, a file where the folder should be) is an OutputError naming
    ``path`` and removes the temporary."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_failed(path, e) from None
    tmp = tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            raise _write_failed(path, e) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_savefig(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (the format is taken from the suffix)."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or None)
    return _atomic(path, lambda tmp: fig.savefig(tmp, **kwargs))


def check_writable(folder: str | os.PathLike, option: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove a file can be written there (before any work), or
    raise an OutputError naming ``option`` and the reason."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tmp_name(folder / ".write-check")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        why = e.strerror or str(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)):
            why = "a file stands where a folder is needed"
        raise OutputError(f"{option} {folder} is not writable: {why}") from None
    return folder


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
    """Atomically save a flat dict of tensors as safetensors (its payload hash:
    :func:`payload_sha256`)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def _header_size(head: bytes, path: Path) -> int:
    if len(head) < 8:
        raise CheckpointError(f"corrupted or truncated safetensors file {path}: no header")
    return struct.unpack("<Q", head[:8])[0]


def payload_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a safetensors file's payload: every byte after its header (read in
    blocks; the header, which holds metadata only, is left out)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            n = _header_size(f.read(8), path)
            f.seek(8 + n)
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: Any, where: Any = None) -> None:
    """Raise a CheckpointError naming ``path`` when its payload hash is not ``expected`` (the
    value recorded in ``where``, a JSON file)."""
    path = Path(path)
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise CheckpointError(
            f"{where or path}: the recorded sha256 of {path.name} is not a SHA-256 hex digest"
        )
    actual = payload_sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"{path} is damaged: content hash (sha256) {actual[:12]}... differs from the "
            f"{expected[:12]}... recorded in {where or 'its JSON'}; restore or re-create the file"
        )


def load_state_dict(path: str | os.PathLike, *, sha256: str | None = None, where: Any = None):
    """Load a safetensors file (refusing pickle-based formats); with ``sha256`` the payload is
    verified first (``where``: the JSON that recorded the hash, for the message)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in _UNSAFE_SUFFIXES:
        raise CheckpointError(
            f"refusing to load {path}: pickle-based checkpoints are never loaded; convert it to safetensors"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several error types for corrupt headers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {msg}") from None
    if sha256 is not None:
        verify_sha256(path, sha256, where)
    return tensors


# -- one writer per output folder ------------------------------------------------------------------
def _start_token(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux /proc; None elsewhere): a reused pid differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, token: str | None) -> bool:
    """Whether the process that wrote a lock still runs (a zombie or a reused pid does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return False  # killed, not yet reaped
    except OSError:
        pass
    return token is None or _start_token(pid) in (None, token)


_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it


class OutputLock:
    """One writer per output folder: ``folder/.loopscope.lock``, created exclusively, records the
    writer's pid, host and process start time.

    A second process is refused (:class:`~loopscope.core.errors.OutputError` naming the holder)
    while the holder lives; a lock left by a process that died (``kill -9``) is stale and taken
    over. The same process may take it again (nested calls); it is removed when the last holder
    releases it. Use as a context manager::

        with OutputLock(out):
            ...  # write into out
    """

    NAME = ".loopscope.lock"

    def __init__(self, folder: str | os.PathLike, *, option: str = "output folder") -> None:
        self.folder = Path(folder)
        self.option = option
        self.path = self.folder / self.NAME
        self.held = False

    def acquire(self) -> OutputLock:
        check_writable(self.folder, self.option)
        key = str(self.path.resolve())
        if _HELD.get(key):
            _HELD[key] += 1
            self.held = True
            return self
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _start_token(os.getpid()),
            "time": time.time(),
        }
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise _write_failed(self.path, e) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _HELD[key] = 1
            self.held = True
            return self
        raise OutputError(f"cannot lock {self.option} {self.folder}: {self.path} keeps reappearing")

    def _take_over_if_stale(self) -> None:
        try:
            info = json.loads(self.path.read_text())
            pid, host = int(info["pid"]), str(info.get("host"))
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError, OSError):
            info, pid, host = {}, -1, socket.gethostname()  # a half-written lock: stale
        if host != socket.gethostname():
            raise OutputError(
                f"{self.option} {self.folder} is locked by a loopscope process on {host} (pid "
                f"{pid}); use another folder, or delete {self.path} if no process writes there"
            )
        if pid > 0 and _alive(pid, info.get("start")):
            since = time.strftime("%H:%M:%S", time.localtime(float(info.get("time", 0))))
            raise OutputError(
                f"{self.option} {self.folder} is being written by another loopscope process "
                f"(pid {pid}, since {since}); wait for it to finish or use another folder"
            )
        stale = self.path.with_name(f"{self.NAME}.stale.{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.replace(self.path, stale)  # one process wins the take-over
            stale.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = str(self.path.resolve())
        _HELD[key] = _HELD.get(key, 1) - 1
        if _HELD[key] <= 0:
            _HELD.pop(key, None)
            try:
                info = json.loads(self.path.read_text())
                if int(info.get("pid", -1)) == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- resumable sweeps ------------------------------------------------------------------------------


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor) and obj.is_meta:  # offloaded weights: no data here
        h.update(f"M{obj.dtype}{tuple(obj.shape)}".encode())
    elif isinstance(obj, torch.Tensor):
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
    ``values``), one ``chunk-<key>.safetensors`` per finished chunk (tensors + string metadata,
    with the payload's SHA-256 as ``loopscope.sha256``, verified on load) and ``computed.jsonl``
    (one line per chunk computed: key, pid, time). Chunks are written atomically (a temporary
    unique to the process, then ``os.replace``), so a kill at any moment leaves only complete
    chunks; a chunk whose bytes changed since is a ``CheckpointError`` naming it. One process
    writes a directory at a time (:class:`OutputLock`, released by :meth:`close`). Opening a
    directory that holds a different sweep (another fingerprint) raises
    :class:`~loopscope.core.errors.CheckpointError` naming the differing fields; nothing is
    ever mixed or pickled.
    """

    FORMAT = "loopscope.chunks/1"
    HASH_KEY = "loopscope.sha256"

    def __init__(self, directory: str | os.PathLike, kind: str, fingerprint: dict[str, Any]):
        self.dir = Path(directory)
        self.kind = kind
        self.fingerprint = _json_norm(fingerprint)
        self.path = self.dir / "manifest.json"
        self.resumed = 0
        self.computed = 0
        if self.dir.exists() and not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} is a file")
        self.lock = OutputLock(self.dir, option="checkpoint directory").acquire()
        try:
            self._open(kind)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory for another process (the chunks stay)."""
        self.lock.release()

    def __enter__(self) -> ChunkCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self, kind: str) -> None:
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
        """The tensors and metadata of a finished chunk (its payload hash verified)."""
        from safetensors import safe_open

        path = self.file(key)
        tensors = load_state_dict(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"corrupted or truncated chunk {path}: {e}") from None
        recorded = meta.pop(self.HASH_KEY, None)
        if recorded is not None:  # chunks written before hashes were recorded load unchecked
            verify_sha256(path, recorded, where="the chunk's header")
        self.resumed += 1
        return tensors, meta

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        """Write a finished chunk atomically, with its payload hash in its header, then note it
        in ``computed.jsonl`` (key, pid, time: which process computed which chunk)."""
        from safetensors.torch import save

        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        meta = {str(k): str(v) for k, v in meta.items()}
        raw = save(flat, metadata=meta)  # the payload does not depend on the metadata
        n = _header_size(raw[:8], self.file(key))
        digest = hashlib.sha256(memoryview(raw)[8 + n :]).hexdigest()
        raw = save(flat, metadata={**meta, self.HASH_KEY: digest})
        path = _atomic(self.file(key), lambda tmp: tmp.write_bytes(raw))
        self.computed += 1
        log = self.dir / "computed.jsonl"
        line = json.dumps({"key": key, "pid": os.getpid(), "time": time.time()}) + "\n"
        try:
            if log.exists() and log.stat().st_size:
                with open(log, "rb") as f:  # a line cut short by a kill: start on a fresh line
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            with open(log, "a") as f:
                f.write(line)
        except OSError as e:
            raise _write_failed(log, e) from None
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
