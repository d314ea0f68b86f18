"""loopscope.analysis — dynamics of the loop: metrics, halting, solvers, fixed-point census,
spectra, Lyapunov exponents, cycles, trajectory classes, basins, path independence, evidence.

Every analysis takes a :class:`loopscope.Loop` (or a :class:`loopscope.Trace`) and returns a
:class:`loopscope.core.result.Result`. The verdict for a model on a task is an experiment:
:func:`loopscope.experiments.verdict.verdict`.
"""

from __future__ import annotations

from loopscope.analysis import halting
from loopscope.analysis.attractors import (
    BasinResult,
    PathIndependenceResult,
    SplitComparison,
    basins,
    compare_splits,
    path_independence,
)
from loopscope.analysis.convergence import (
    Calibration,
    LayerMetrics,
    Metrics,
    calibration,
    layer_metrics,
    metrics,
)
from loopscope.analysis.cycles import CycleClasses, CycleResult, classify, detect_cycle
from loopscope.analysis.evidence import ConfidentWrong, Verdict, confident_wrong
from loopscope.analysis.fixed_point_capture import Capture
from loopscope.analysis.fixed_points import (
    FixedPointCensus,
    Sensitivity,
    find_fixed_points,
    input_sensitivity,
)
from loopscope.analysis.hierarchy import HierarchicalResult, hierarchical, participation_ratio
from loopscope.analysis.lens import LogitLensResult, logit_lens
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.lyapunov_qr import LyapunovResult, is_chaotic, lyapunov
from loopscope.analysis.memory import (
    decodability,
    filler_fixed_point,
    memory_drift,
    memory_spectrum,
    memory_transplant,
)
from loopscope.analysis.solvers import (
    LM,
    AdamQ,
    Anderson,
    Broyden,
    NewtonKrylov,
    Picard,
    SolverConfig,
    SolveResult,
    solve,
)
from loopscope.analysis.spectra import RayleighEstimate, Spectrum, power_iteration_rho, spectrum
from loopscope.analysis.stats import block_bootstrap_ci, bootstrap_mean_ci, wilson_ci

__all__ = [
    "AdamQ",
    "Anderson",
    "BasinResult",
    "Broyden",
    "Calibration",
    "Capture",
    "ConfidentWrong",
    "CycleClasses",
    "CycleResult",
    "FixedPointCensus",
    "HierarchicalResult",
    "LM",
    "LayerMetrics",
    "LogitLensResult",
    "LoopMap",
    "LyapunovResult",
    "Metrics",
    "NewtonKrylov",
    "PathIndependenceResult",
    "Picard",
    "RayleighEstimate",
    "Sensitivity",
    "SolveResult",
    "SolverConfig",
    "Spectrum",
    "SplitComparison",
    "Verdict",
    "basins",
    "block_bootstrap_ci",
    "bootstrap_mean_ci",
    "calibration",
    "classify",
    "compare_splits",
    "confident_wrong",
    "decodability",
    "detect_cycle",
    "filler_fixed_point",
    "find_fixed_points",
    "halting",
    "hierarchical",
    "input_sensitivity",
    "is_chaotic",
    "layer_metrics",
    "logit_lens",
    "lyapunov",
    "memory_drift",
    "memory_spectrum",
    "memory_transplant",
    "metrics",
    "participation_ratio",
    "path_independence",
    "power_iteration_rho",
    "solve",
    "spectrum",
    "wilson_ci",
]
