"""loopscope.analysis — dynamics of the loop: metrics, halting, solvers, fixed-point census,
spectra, Lyapunov exponents, cycles, trajectory classes, basins, path independence, verdict.

Names are imported lazily so that ``import loopscope.analysis`` stays cheap and one module's
optional dependency never breaks another.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoopMap": "loopmap",
    "metrics": "convergence",
    "Metrics": "convergence",
    "calibration": "convergence",
    "layer_metrics": "convergence",
    "halting": "halting",
    "solve": "solvers",
    "SolveResult": "solvers",
    "SolverConfig": "solvers",
    "Picard": "solvers",
    "Anderson": "solvers",
    "Broyden": "solvers",
    "NewtonKrylov": "solvers",
    "LM": "solvers",
    "AdamQ": "solvers",
    "Capture": "fixed_point_capture",
    "Sensitivity": "fixed_points",
    "RayleighEstimate": "spectra",
    "find_fixed_points": "fixed_points",
    "FixedPointCensus": "fixed_points",
    "input_sensitivity": "fixed_points",
    "spectrum": "spectra",
    "power_iteration_rho": "spectra",
    "Spectrum": "spectra",
    "lyapunov": "lyapunov_qr",
    "LyapunovResult": "lyapunov_qr",
    "detect_cycle": "cycles",
    "classify": "cycles",
    "basins": "attractors",
    "path_independence": "attractors",
    "compare_splits": "attractors",
    "BasinResult": "attractors",
    "hierarchical": "hierarchy",
    "HierarchicalResult": "hierarchy",
    "participation_ratio": "hierarchy",
    "verdict": "evidence",
    "Verdict": "evidence",
    "confident_wrong": "evidence",
    "memory_drift": "memory",
    "memory_spectrum": "memory",
    "filler_fixed_point": "memory",
    "decodability": "memory",
    "memory_transplant": "memory",
    "logit_lens": "lens",
    "LogitLensResult": "lens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"loopscope.analysis.{_EXPORTS[name]}")
        # a module and its main function never share a name here (a submodule import would
        # shadow the function on the package), so modules are exported only as themselves
        return getattr(module, name) if hasattr(module, name) else module
    raise AttributeError(f"module 'loopscope.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
