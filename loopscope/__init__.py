"""loopscope: mechanistic interpretability of looped (recurrent-depth) transformers.

Core names: :class:`Loop`, :class:`FnLoop`, :func:`unroll`, :class:`Trace` and the interventions
:class:`Patch`, :class:`Add`, :class:`Zero`, :class:`MeanAblate`, :class:`Transplant`.
"""

__version__ = "0.1.0"

from loopscope.errors import LoopscopeError  # noqa: E402
from loopscope.interventions import Add, Intervention, MeanAblate, Patch, Transplant, Zero  # noqa: E402
from loopscope.loop import FnLoop, Loop  # noqa: E402
from loopscope.trace import Trace  # noqa: E402
from loopscope.unroll import unroll  # noqa: E402

__all__ = [
    "Loop",
    "FnLoop",
    "unroll",
    "Trace",
    "Intervention",
    "Patch",
    "Add",
    "Zero",
    "MeanAblate",
    "Transplant",
    "LoopscopeError",
    "__version__",
]
