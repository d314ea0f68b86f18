"""Looped transformer family (own models, TransformerLens hook points) and presets."""

from loopscope.models.checkpoint import load_model, save_model
from loopscope.models.config import HierarchicalConfig, LoopedConfig
from loopscope.models.fam import FAMConfig, FAMTransformer
from loopscope.models.hierarchical import FastLoop, HierarchicalLoopedTransformer
from loopscope.models.looped import LoopedTransformer
from loopscope.models.presets import PRESETS, preset, preset_names

__all__ = [
    "LoopedConfig",
    "LoopedTransformer",
    "HierarchicalConfig",
    "HierarchicalLoopedTransformer",
    "FastLoop",
    "FAMConfig",
    "FAMTransformer",
    "PRESETS",
    "preset",
    "preset_names",
    "build",
    "save_model",
    "load_model",
]


def build(cfg: LoopedConfig | HierarchicalConfig | FAMConfig):
    """The model of a config (single-state, hierarchical or FAM)."""
    if isinstance(cfg, FAMConfig):
        return FAMTransformer(cfg)
    return (
        HierarchicalLoopedTransformer(cfg)
        if isinstance(cfg, HierarchicalConfig)
        else LoopedTransformer(cfg)
    )


from loopscope.models.hrm_text import (  # noqa: E402
    HrmTextLoops,
    bridge_hrm_text,
    build_tiny_hrm_text,
    capture_forward,
    hrm_text_loop,
)

__all__ += [
    "HrmTextLoops",
    "bridge_hrm_text",
    "build_tiny_hrm_text",
    "capture_forward",
    "hrm_text_loop",
]

from loopscope.models.hf import from_hf, load_hf  # noqa: E402

__all__ += ["from_hf", "load_hf"]
