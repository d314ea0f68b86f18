"""Census at scale, visibly: one definition of "converged" shared with solve, an estimate from a
timed first batch, progress through a callback (no bar in tests)."""

from __future__ import annotations

import pytest
import torch

from loopscope import FnLoop
from loopscope.analysis import find_fixed_points, solve
from loopscope.analysis.solvers import CONVERGED_R_REL, is_converged
from loopscope.core.errors import LoopscopeError

F64 = torch.float64


def ghost_loop(eps: float) -> FnLoop:
    """f(h) = h - 0.5 (h + 1)((h - 1)^2 + eps): a fixed point at -1, a ghost near 1 whose
    residual stalls at r_rel ~ eps."""
    return FnLoop(step=lambda h: h - 0.5 * (h + 1) * ((h - 1) ** 2 + eps))


def test_the_census_calls_fixed_exactly_what_solve_calls_converged():
    loop = ghost_loop(1.5e-9)  # the ghost stalls at r_rel ~ 1.5e-9, between 1e-10 and 1e-6
    seeds = torch.linspace(-1.6, 1.6, 17, dtype=F64)[:, None]
    c = find_fixed_points(loop, None, seeds, spectra=False, decode=False)
    ends = c.end_states[0]
    again = solve(loop, None, h0=ends, max_iter=1)  # solve's default tol, from the end points
    assert again.tol == CONVERGED_R_REL == c.meta["q_tol_rel"]
    solved = [s == "converged" for s in again.status]
    assert solved == [k == "fixed" for k in c.seed_class[0]]
    ghost = c.seed_r_rel[0] > 1e-10
    assert ghost.any() and (c.seed_class[0][ghost] == "fixed").all()
    # the ghost is still told apart: a local minimum of q (vanishing relative gradient) ...
    assert (c.seeds_frame()["rel_grad"][ghost] < 1e-3).all()
    # ... and a strict census calls it slow
    strict = find_fixed_points(loop, None, seeds, q_tol_rel=1e-10, spectra=False, decode=False)
    assert (strict.seed_class[0][ghost] == "slow").all()
    assert is_converged(torch.tensor([1.5e-9])).item() and not is_converged(float("nan"))


def test_a_long_census_reports_progress_and_an_estimate_from_its_first_batch():
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(6, 6, generator=g, dtype=F64) / 6**0.5
    loop = FnLoop(step=lambda h, x: torch.tanh(h @ W.T + x))
    x = torch.randn(3, 6, generator=g, dtype=F64)
    seen = []
    c = find_fixed_points(loop, x, torch.randn(8, 6, generator=g, dtype=F64), method="lm",
                          chunk=4, progress=seen.append, spectra=False)  # fmt: skip
    assert [i["done"] for i in seen] == [3, 7, 11, 15, 19, 23, 24] and seen[-1]["total"] == 24
    assert seen[0]["estimated_s"] is not None and seen[0]["estimated_s"] > 0
    assert c.meta["estimated_s"] == seen[0]["estimated_s"] and c.meta["wall_time"] > 0
    quiet = find_fixed_points(loop, x, torch.randn(8, 6, generator=g, dtype=F64), method="lm",
                              chunk=4, progress=False, spectra=False)  # fmt: skip
    assert quiet.meta["estimated_s"] is not None  # estimated even when nothing is shown
    with pytest.raises(LoopscopeError, match="progress must be"):
        find_fixed_points(loop, x, 2, progress="yes")


def test_batched_seeds_give_the_same_census_as_one_batch():
    g = torch.Generator().manual_seed(1)
    W = 1.5 * torch.randn(5, 5, generator=g, dtype=F64) / 5**0.5
    loop = FnLoop(step=lambda h: torch.tanh(h @ W.T))
    seeds = torch.randn(24, 5, generator=g, dtype=F64)
    a = find_fixed_points(loop, None, seeds, method="lm", chunk=24, spectra=False)
    b = find_fixed_points(loop, None, seeds, method="lm", chunk=5, spectra=False)
    assert (a.seed_class == b.seed_class).all()
    assert torch.allclose(a.end_states, b.end_states, atol=1e-12)
