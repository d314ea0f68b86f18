"""Memory analyses on loops with known answers (planted maps, a copy register), then FAM."""

import math

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope import FnLoop
from loopscope.analysis import memory as M
from loopscope.core.errors import LoopscopeError, UnknownOptionError

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def _planted(eigs):
    """A real linear map h -> A h with the given eigenvalues (complex ones as conjugate pairs)."""
    blocks = []
    for lam in eigs:
        if isinstance(lam, complex):
            r, th = abs(lam), math.atan2(lam.imag, lam.real)
            blocks.append(
                r * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            )
        else:
            blocks.append(torch.tensor([[lam]]))
    A = torch.block_diag(*blocks).to(D)
    g = torch.Generator().manual_seed(0)
    S = torch.randn(A.shape[0], A.shape[0], generator=g, dtype=D) + 3 * torch.eye(
        A.shape[0], dtype=D
    )
    return S @ A @ torch.linalg.inv(S)  # same eigenvalues, not normal


def test_planted_linear_memory_map_recovers_spectrum_and_near_unit_modes():
    eigs = [0.999, -0.98, 0.97j + 0.1, 0.6, 0.3, 0.05]
    A = _planted(eigs)
    loop = FnLoop(step=lambda h, x, t: h @ A.T)
    sp = M.memory_spectrum(loop, torch.zeros(2, 1), state=torch.zeros(2, A.shape[0], dtype=D))
    want = sorted([abs(e) for e in eigs] + [abs(eigs[2])], reverse=True)
    got = np.sort(np.abs(sp.eigenvalues[0]))[::-1]
    np.testing.assert_allclose(got, want, atol=1e-10)
    # |0.999|, |-0.98|, |0.1 + 0.97i| (a pair: 0.975) are within 0.05 of the unit circle
    assert sp.n_near_unit() == [4, 4]
    assert sp.summary()["n_near_unit"] == 4.0 and sp.summary()["dim"] == 7
    f = sp.to_frame()
    assert set(f.columns) >= {"sample", "rank", "modulus", "near_unit"} and len(f) == 14


def test_contraction_memory_converges_to_the_computable_fixed_point_and_trace_approaches_it():
    A = _planted([0.8, 0.5, -0.4])
    c = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    loop = FnLoop(step=lambda h, x, t: h @ A.T + c, init_state=torch.zeros(3, dtype=D))
    star = torch.linalg.solve(torch.eye(3, dtype=D) - A, c)
    tr = ls.unroll(loop, torch.zeros(2, 1), 60)
    fp = M.filler_fixed_point(loop, torch.zeros(2, 1), trace=tr)
    assert fp.status == ["converged", "converged"]
    assert (fp.fixed_point - star).abs().max() < 1e-8
    d = fp.distance[:, 0]
    assert d[0] == pytest.approx(1.0)  # M_0 = 0: distance ||M*|| / ||M*||
    assert d[-1] < 1e-4 and fp.summary()["distance_end"] < 1e-4
    assert fp.to_frame()["iteration"].max() == 60


def test_a_drifting_memory_has_no_fixed_point_even_where_the_relative_residual_vanishes():
    c = torch.tensor([0.0, 1.0], dtype=D)
    # f(z) - z = c / (1 + |z|): no root, but r_rel = |f(z) - z| / |z| -> 0 far out
    loop = FnLoop(step=lambda h: h + c / (1 + h.norm(dim=1, keepdim=True)))
    fp = M.filler_fixed_point(loop, None, h0=torch.ones(2, 2, dtype=D), max_iter=300)
    assert "converged" not in fp.status and fp.summary()["converged_fraction"] == 0.0


def test_drift_of_a_growing_and_a_bounded_memory():
    c = torch.tensor([0.0, 1.0], dtype=D)
    grow = FnLoop(step=lambda h, x, t: h + c, init_state=torch.tensor([1.0, 0.0], dtype=D))
    dr = M.memory_drift(grow, torch.zeros(3, 1), n_iter=200)
    np.testing.assert_allclose(dr.norm[:, 0], np.sqrt(1 + np.arange(201) ** 2.0), rtol=1e-12)
    s = dr.summary()
    assert s["bounded_fraction"] == 0.0 and s["growth_end"] == pytest.approx(math.sqrt(1 + 200**2))
    rot = _planted([0.9j])  # a rotation-and-shrink: norm decays to 0, never above the start x 4
    bounded = FnLoop(step=lambda h, x, t: h @ rot.T, init_state=torch.tensor([1.0, 0.0], dtype=D))
    s = M.memory_drift(bounded, torch.zeros(3, 1), n_iter=200).summary()
    assert s["bounded_fraction"] == 1.0 and s["growth_end"] < 1e-6


def _copy_register(C=5):
    """Memory = one-hot of the last item seen; block t holds an item id or -1 (nothing)."""

    def step(h, x, t):
        item = x[:, t]
        new = torch.nn.functional.one_hot(item.clamp_min(0), C).to(D)
        return torch.where((item >= 0)[:, None], new, h)

    def decode(h, x):
        return 10 * h[:, None, :]  # [B, 1, C]

    return FnLoop(step=step, decode=decode, init_state=torch.zeros(C, dtype=D))


def test_transplant_follows_the_donor_iff_the_memory_carries_the_item():
    loop = _copy_register()
    # sample 0: both write at block 0; sample 1: the recipient writes again at block 2
    donor = torch.tensor([[1, -1, -1, -1], [1, -1, -1, -1]])
    recip = torch.tensor([[3, -1, -1, -1], [3, -1, 4, -1]])
    res = M.memory_transplant(
        loop, donor, recip, donor_answer=[1, 1], recipient_answer=[3, 4], n_iter=4
    )
    f = res.to_frame().set_index(["sample", "iteration"])["follows_donor"]
    assert [bool(f[(0, t)]) for t in range(4)] == [False, True, True, True]
    assert [bool(f[(1, t)]) for t in range(4)] == [False, False, False, True]
    assert res.summary()["follows_donor_last"] == 1.0


def test_decodability_of_a_held_item_is_perfect_and_of_a_wiped_one_is_chance():
    g = torch.Generator().manual_seed(0)
    B, T = 400, 6
    item = torch.randint(0, 4, (B,), generator=g)
    written = torch.randint(0, 3, (B,), generator=g)
    blocks = torch.full((B, T), -1)
    blocks[torch.arange(B), written] = item
    tr = ls.unroll(_copy_register(4), blocks, T)
    dec = M.decodability(tr, item, written)
    assert (dec.to_frame()["test_acc"] == 1.0).all()
    noise = FnLoop(step=lambda h, x, t: torch.randn(h.shape, generator=g, dtype=D))
    tr2 = ls.unroll(noise, blocks, T, init=torch.zeros(B, 4, dtype=D))
    acc = M.decodability(tr2, item, written).to_frame()["test_acc"]
    assert acc.max() < 0.45  # chance is ~0.25


def test_memory_analyses_reject_typos_and_bad_shapes():
    loop = _copy_register()
    with pytest.raises(UnknownOptionError, match="did you mean: n_iter"):
        M.memory_drift(loop, torch.zeros(1, 2).long(), n_itr=2)
    tr = ls.unroll(loop, torch.full((2, 3), -1), 3)
    with pytest.raises(LoopscopeError, match="item and written_at"):
        M.decodability(tr, [0, 1, 2], [0, 0])
    with pytest.raises(LoopscopeError, match="band"):
        M.memory_spectrum(loop, torch.zeros(1, 3).long(), state=torch.zeros(1, 5, dtype=D), band=2)


def test_fam_memory_analyses_run_on_a_small_untrained_model():
    from loopscope import tasks
    from loopscope.models import FAMConfig, FAMTransformer

    t = tasks.get("passkey")
    torch.manual_seed(0)
    m = FAMTransformer(
        FAMConfig(vocab_size=t.vocab_size, n_classes=t.n_classes, d_model=16, n_memory=2)
    )
    b = t.sample(8, "ood_2x", seed=0)
    assert M.memory_drift(m, b.tokens, n_iter=6).summary()["bounded_fraction"] == 1.0
    filler = b.tokens[:, :8] % t.n_filler
    fp = M.filler_fixed_point(m, filler, max_iter=200)
    sp = M.memory_spectrum(m, filler, state=fp.fixed_point.float())
    assert sp.summary()["dim"] == 2 * 2 * 16
