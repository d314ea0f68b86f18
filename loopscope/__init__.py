"""loopscope: mechanistic interpretability of looped (recurrent-depth) transformers.

    import loopscope as ls

    loop = ls.zoo.load("s3_fprm")                  # a shipped looped model (a Loop)
    batch = ls.tasks.get("s3").sample(64, split="ood_length", seed=0)
    trace = ls.unroll(loop, batch.tokens, n_iter=24, capture="core.blocks.0.hook_resid_post")
    ls.analysis.metrics(trace).to_frame()

Core names (:mod:`loopscope.core`): :class:`Loop`, :class:`FnLoop`, :func:`unroll`,
:class:`Trace`, :class:`Result`, :func:`wrap` (hook points on any model's looped
submodule) and the interventions :class:`Patch`, :class:`Add`, :class:`Zero`,
:class:`MeanAblate`, :class:`Transplant`. Subpackages: ``models``, ``tasks``, ``zoo``,
``analysis``, ``probes``, ``circuits``, ``experiments``.

Everything here is imported on first use, so ``import loopscope`` (and the CLI's start) does not
pay for torch and TransformerLens until a name is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what static tools and IDEs follow; at run time the same names load lazily
    from loopscope import analysis, circuits, experiments, models, probes, tasks, zoo
    from loopscope.core.errors import LoopscopeError
    from loopscope.core.interventions import (
        Add,
        Intervention,
        MeanAblate,
        Patch,
        Transplant,
        Zero,
    )
    from loopscope.core.loop import FnLoop, Loop
    from loopscope.core.result import Result
    from loopscope.core.trace import Trace
    from loopscope.core.unroll import unroll
    from loopscope.core.wrap import wrap

_CORE = {
    "Loop": "loopscope.core.loop",
    "FnLoop": "loopscope.core.loop",
    "unroll": "loopscope.core.unroll",
    "wrap": "loopscope.core.wrap",
    "Trace": "loopscope.core.trace",
    "Result": "loopscope.core.result",
    "Intervention": "loopscope.core.interventions",
    "Patch": "loopscope.core.interventions",
    "Add": "loopscope.core.interventions",
    "Zero": "loopscope.core.interventions",
    "MeanAblate": "loopscope.core.interventions",
    "Transplant": "loopscope.core.interventions",
    "LoopscopeError": "loopscope.core.errors",
}
_SUBPACKAGES = ("models", "tasks", "zoo", "analysis", "probes", "circuits", "experiments", "core")

__all__ = [
    "Loop", "FnLoop", "unroll", "wrap", "Trace", "Result", "Intervention", "Patch", "Add", "Zero",
    "MeanAblate", "Transplant", "LoopscopeError", "models", "tasks", "zoo", "analysis",
    "probes", "circuits", "experiments", "core", "__version__",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _CORE:
        value = getattr(importlib.import_module(_CORE[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"loopscope.{name}")
    else:
        raise AttributeError(f"module 'loopscope' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
