"""Model checkpoints: a directory of safetensors weights plus a JSON config and model card.

Layout::

    model.safetensors   # state dict
    config.json         # {"class": "LoopedTransformer", "config": {...}, "format": "loopscope.model/1"}
    card.json           # optional model card (task, preset, seed, accuracy ...)

Nothing is unpickled (see :mod:`loopscope.core.io`); writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loopscope.core.errors import CheckpointError
from loopscope.core.io import (
    _UNSAFE_SUFFIXES,
    atomic_write_text,
    load_state_dict,
    read_json,
    save_state_dict,
)

__all__ = ["save_model", "load_model", "MODEL_CLASSES"]


def _registry() -> dict[str, tuple[type, Any]]:
    from loopscope import models  # the package face, imported late (it imports this module)

    reg: dict[str, tuple[type, Any]] = {}
    for cls_name, cfg_name in (
        ("LoopedTransformer", "LoopedConfig"),
        ("HierarchicalLoopedTransformer", "HierarchicalConfig"),
        ("FAMTransformer", "FAMConfig"),
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
