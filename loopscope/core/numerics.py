"""The divergence guard shared by ``unroll``, the solvers, ``lyapunov`` and ``basins``.

A sample *diverges* when its state turns non-finite or its norm exceeds
``blowup * max(1, ||h_0||)`` (:data:`BLOWUP`, ``1e8``, for iterating the loop map; the solvers'
quasi-Newton steps may transiently travel further and use :data:`SOLVER_BLOWUP`, ``1e12``).
A diverged sample is flagged and frozen; the healthy samples of the batch are untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BLOWUP", "SOLVER_BLOWUP", "reference_norm", "diverged"]

#: Norm growth past which iterating the loop map calls a sample diverged.
BLOWUP = 1e8
#: The same for the fixed-point solvers (their trial steps overshoot before a line search).
SOLVER_BLOWUP = 1e12


def reference_norm(h0: Tensor) -> Tensor:
    """``max(1, ||h0||)`` per sample, float64, ``[B]`` (the scale a blow-up is measured against)."""
    flat = h0.detach().reshape(h0.shape[0], -1)
    if flat.is_complex():
        norms = torch.linalg.vector_norm(flat.to(torch.complex128), dim=1)
    else:  # accumulated in float64 without a float64 copy of the state
        norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)
    return torch.nan_to_num(norms, nan=1.0, posinf=1.0).clamp_min(1.0)


def diverged(h: Tensor, ref_norm: Tensor, blowup: float | None = BLOWUP) -> Tensor:
    """``[B]`` bool: non-finite, or norm above ``blowup * ref_norm`` (``blowup=None``: finite only)."""
    flat = h.detach().reshape(h.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    if blowup is None:
        return ~finite
    norms = torch.where(
        finite,
        flat.to(torch.float64).norm(dim=1),
        torch.zeros((), dtype=torch.float64, device=h.device),
    )
    return ~finite | (norms > float(blowup) * ref_norm.to(norms.device))
