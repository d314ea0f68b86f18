"""Safe checkpoints: safetensors for tensors, JSON for configs and model cards.

Nothing is ever unpickled: ``.pt`` / ``.bin`` / ``.pkl`` files are refused, and a corrupted or
truncated file gets a :class:`~loopscope.errors.CheckpointError` naming it. Writes are atomic
(write to ``*.tmp``, then ``os.replace``) so an interrupted save never leaves a half file.

Layout of a model checkpoint directory::

    model.safetensors   # state dict
    config.json         # {"class": "LoopedTransformer", "config": {...}, "format": "loopscope.model/1"}
    card.json           # optional model card (task, preset, seed, accuracy ...)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopscope.errors import CheckpointError

__all__ = [
    "save_model",
    "load_model",
    "load_state_dict",
    "save_state_dict",
    "atomic_write_text",
    "read_json",
    "MODEL_CLASSES",
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


def _registry() -> dict[str, tuple[type, Any]]:
    from loopscope import models

    reg: dict[str, tuple[type, Any]] = {}
    for cls_name, cfg_name in (
        ("LoopedTransformer", "LoopedConfig"),
        ("HierarchicalLoopedTransformer", "HierarchicalConfig"),
    ):
        cls = getattr(models, cls_name, None)
        cfg = getattr(models, cfg_name, None)
        if cls is not None and cfg is not None:
            reg[cls_name] = (cls, cfg)
    return reg


MODEL_CLASSES = _registry  # callable: the classes known to load_model


def save_model(model: nn.Module, directory: str | os.PathLike, card: dict | None = None) -> Path:
    """Save ``model`` (with a ``cfg`` having ``to_dict``) to ``directory`` atomically."""
    directory = Path(directory)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise CheckpointError(
            f"{type(model).__name__} has no cfg.to_dict(): cannot write its config"
        )
    save_state_dict(model.state_dict(), directory / "model.safetensors")
    atomic_write_text(
        directory / "config.json",
        json.dumps(
            {"format": "loopscope.model/1", "class": type(model).__name__, "config": cfg.to_dict()},
            indent=1,
        ),
    )
    if card is not None:
        atomic_write_text(directory / "card.json", json.dumps(card, indent=1, default=str))
    return directory


def load_model(directory: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model described by ``directory/config.json`` and load its safetensors weights."""
    directory = Path(directory)
    if directory.is_file():
        if directory.suffix in _UNSAFE_SUFFIXES:
            load_state_dict(directory)  # raises the pickle refusal
        directory = directory.parent
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    spec = read_json(directory / "config.json")
    if not isinstance(spec, dict) or spec.get("format") != "loopscope.model/1":
        raise CheckpointError(f"{directory / 'config.json'} is not a loopscope model config")
    reg = _registry()
    if spec.get("class") not in reg:
        raise CheckpointError(
            f"{directory / 'config.json'}: unknown model class {spec.get('class')!r}"
        )
    cls, cfg_cls = reg[spec["class"]]
    try:
        cfg = cfg_cls.from_dict(spec["config"])
    except Exception as e:
        raise CheckpointError(f"{directory / 'config.json'}: invalid config: {e}") from None
    model = cls(cfg)
    state = load_state_dict(directory / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / 'model.safetensors'} does not match its config: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.eval()
    if dtype is not None:
        model.to(dtype)
    return model
