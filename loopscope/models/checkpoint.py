"""Model checkpoints: a directory of safetensors weights plus a JSON config and model card.

Layout::

    model.safetensors   # state dict
    config.json         # {"class": "LoopedTransformer", "config": {...}, "format": "loopscope.model/1",
                        #  "sha256": SHA-256 of model.safetensors' payload}
    card.json           # optional model card (task, preset, seed, accuracy ...)

Integrity: config.json is written after the weights and records their payload hash; loading
verifies it, so a damaged or swapped ``model.safetensors`` (even one flipped byte with the header
intact) is a :class:`~loopscope.core.errors.CheckpointError` naming the file, and weights whose
shapes disagree with the config name the config field (``d_mlp = 264 but the weights have 256``).
A config missing fields loads with their defaults and a warning naming them.

Any Loop that declares its constructor config saves and loads the same way: a ``config()``
method returning a JSON-able dict, rebuilt by the classmethod ``from_config(config)`` if the
class has one, else by ``cls(**config)``. Its ``"class"`` is recorded as ``"module:QualName"``;
loading imports that module (your code, as ``python -m`` would) and refuses anything that is not
a :class:`~loopscope.Loop` subclass before calling it; ``load_model(dir, cls=MyLoop)`` names the
class instead (one defined in a notebook). Tensors shared between two state-dict keys (a module
registered twice) are stored once and tied again on load.

Example::

    class MyLoop(ls.Loop):
        def __init__(self, d=16, seed=0): ...
        def config(self): return {"d": self.d, "seed": self.seed}

    save_model(MyLoop(d=32), "ckpt")
    loop = load_model("ckpt")            # MyLoop(d=32) with the saved weights

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
    payload_sha256,
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


FORMAT = "loopscope.model/1"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _spec(model: nn.Module) -> dict[str, Any]:
    """The config.json of ``model``: a registered loopscope model, or any Loop with ``config()``."""
    name = type(model).__name__
    cfg = getattr(model, "cfg", None)
    if name in _registry() and cfg is not None and hasattr(cfg, "to_dict"):
        return {"format": FORMAT, "class": name, "config": cfg.to_dict()}
    declare = getattr(model, "config", None)
    if not callable(declare):
        raise CheckpointError(
            f"{name} declares no constructor config: give it config() -> dict (rebuilt by a "
            f"classmethod from_config(config), else {name}(**config)) to save it"
        )
    config = declare()
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}.config() is not JSON-serialisable: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}.config() must return a dict, got {type(config).__name__}")
    return {"format": FORMAT, "class": _class_path(type(model)), "config": config}


def _untied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each storage once (safetensors refuses shared tensors): ``(state, {dup_key: kept_key})``."""
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in kept:
            tied[k] = kept[key]
        else:
            kept[key] = k
            out[k] = v
    return out, tied


def save_model(model: nn.Module, directory: str | os.PathLike, card: dict | None = None) -> Path:
    """Save ``model`` to ``directory`` atomically (safetensors weights + JSON config).

    ``model`` is a loopscope model (a ``cfg`` with ``to_dict``) or any Loop declaring its
    constructor config (``config() -> dict``); anything else is a :class:`CheckpointError`.
    """
    directory = Path(directory)
    spec = _spec(model)
    state, tied = _untied(model.state_dict())
    if tied:
        spec["tied"] = tied
    save_state_dict(state, directory / "model.safetensors")
    spec["sha256"] = payload_sha256(directory / "model.safetensors")
    atomic_write_text(directory / "config.json", json.dumps(spec, indent=1))
    if card is not None:
        atomic_write_text(directory / "card.json", json.dumps(card, indent=1, default=str))
    return directory


def _import_loop_class(path: str, where: Path) -> type:
    import importlib

    from loopscope.core.loop import Loop

    mod_name, _, qual = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(
            f"{where}: cannot import the model class {path!r} ({e}); put its module on the path "
            "or pass load_model(..., cls=TheClass)"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, Loop)):
        raise CheckpointError(
            f"{where}: {path!r} is not a loopscope Loop class; refusing to call it"
        )
    return obj


def _build(cls: Any, config: dict[str, Any], where: Path) -> nn.Module:
    try:
        build = getattr(cls, "from_config", None)
        return build(config) if callable(build) else cls(**config)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{where}: cannot rebuild {getattr(cls, '__name__', cls)} from its config: {e}"
        ) from None


def load_model(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, *, cls: Any = None
) -> nn.Module:
    """Build the model described by ``directory/config.json`` and load its safetensors weights.

    Args:
        directory: a folder written by :func:`save_model`.
        dtype: cast the loaded model to this dtype.
        cls: the class to rebuild (default: the one config.json names; needed for a class the
            loader cannot import, e.g. one defined in a notebook).
    """
    directory = Path(directory)
    if directory.is_file():
        if directory.suffix in _UNSAFE_SUFFIXES:
            load_state_dict(directory)  # raises the pickle refusal
        directory = directory.parent
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    where = directory / "config.json"
    spec = read_json(where)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a loopscope model config")
    reg = _registry()
    name, config = spec.get("class"), spec.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: invalid config (not a dict)")
    if cls is None and name in reg:
        mcls, cfg_cls = reg[name]
        _warn_missing_fields(cfg_cls, config, where)
        try:
            cfg = cfg_cls.from_dict(config)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{where}: invalid config: {msg}") from None
        model = mcls(cfg)
    elif cls is not None or (isinstance(name, str) and ":" in name):
        model = _build(cls if cls is not None else _import_loop_class(name, where), config, where)
    else:
        raise CheckpointError(f"{where}: unknown model class {name!r}")
    sha = spec.get("sha256")  # checkpoints saved before hashes were recorded load unchecked
    state = load_state_dict(directory / "model.safetensors", sha256=sha, where=where)
    for dup, kept in (spec.get("tied") or {}).items():
        if kept in state:
            state[dup] = state[kept]
    _check_shapes(model, state, config, directory / "model.safetensors")
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


def _warn_missing_fields(cfg_cls: Any, config: dict[str, Any], where: Path) -> None:
    """A config without some of its class's fields loads with their defaults, said aloud."""
    import dataclasses
    import warnings

    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    missing = [k for k in fields if k not in config]
    if missing:
        defaults = {k: fields[k].default for k in missing}
        warnings.warn(
            f"{where}: config lacks field(s) {', '.join(missing)}; using the defaults {defaults}",
            UserWarning,
            stacklevel=3,
        )


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], config: Any, path: Path):
    """Weights whose shapes disagree with the model the config builds: a one-line error naming
    the tensor and the config field(s) whose value is the disagreeing size."""
    expected = model.state_dict()
    for k, v in state.items():
        want = expected.get(k)
        if want is None or tuple(want.shape) == tuple(v.shape):
            continue
        got_s, want_s = list(v.shape), list(want.shape)
        sizes = {w: g for w, g in zip(want_s, got_s, strict=False) if w != g}
        suspects = [
            f"{f} = {val} but the weights have {sizes[val]}"
            for f, val in (config.items() if isinstance(config, dict) else [])
            if isinstance(val, int) and not isinstance(val, bool) and val in sizes
        ]
        hint = f" (config {'; '.join(suspects)})" if suspects else ""
        raise CheckpointError(
            f"{path} does not match its config: {k} is {got_s} in the weights but {want_s} for "
            f"the config{hint}"
        )
