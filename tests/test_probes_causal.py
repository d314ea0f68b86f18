"""probes.steer: golden #25 (two directions both decode the bit; a set-projection edit along the
read direction flips 100 % of positives, along the merely correlated one 0 %), on tensors and
through a loop; dose-response; LEACE / INLP erasure with the orthogonal control; interchange
intervention accuracy against a carry causal model, with time locality and the orthogonal control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope.core.errors import LoopscopeError
from loopscope.probes import (
    dose_response,
    erase,
    fit_probes,
    interchange_intervention_accuracy,
    intervene,
    project_out,
    set_projection,
    steer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden25():
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 32
    z = torch.randint(0, 2, (n,), generator=g)
    s = (2 * z - 1).double()
    e1, e2 = torch.eye(d, dtype=torch.float64)[0], torch.eye(d, dtype=torch.float64)[1]
    h = (
        2 * s[:, None] * e1
        + 2 * s[:, None] * e2
        + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    )
    return h, z, e1, e2


def test_golden25_two_direction_case_on_tensors():
    h, z, e1, e2 = _golden25()
    for coord in (0, 1):  # single-coordinate probes are perfect on both directions
        r = fit_probes(h[:, coord : coord + 1].unsqueeze(0), z, probe="logistic", seed=0)
        assert r.accuracy[0] == 1.0

    def readout(x):  # the model reads e1 only
        return (x @ e1 > 0).long()

    pos = readout(h) == 1
    flip1 = (readout(set_projection(h[pos], e1, -2.0)) == 0).double().mean().item()
    flip2 = (readout(set_projection(h[pos], e2, -2.0)) == 0).double().mean().item()
    assert flip1 == 1.0 and flip2 == 0.0
    # set-projection sets exactly the component along u and leaves the complement untouched
    out = set_projection(h, e2, -2.0)
    assert torch.allclose(out @ e2, torch.full((len(h),), -2.0, dtype=torch.float64))
    assert torch.equal(project_out(out, e2)[:, 2:], h[:, 2:])


def _readout_loop(h):
    """The golden #25 state as a loop: identity step, decode = logits of 1[h.e1 > 0]."""

    def decode(x, ctx):
        return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0]], -1)

    loop = ls.FnLoop(step=lambda x: x, init_state=lambda ctx, g: ctx.clone(), decode=decode)
    return loop, h


def test_golden25_through_a_loop_and_dose_response():
    h, z, e1, e2 = _golden25()
    loop, inputs = _readout_loop(h)
    pos = (h @ e1 > 0).long() == 1
    r1 = steer(loop, inputs, n_iter=2, iteration=1, direction=e1, mode="set", value=-2.0)
    r2 = steer(loop, inputs, n_iter=2, iteration=1, direction=e2, mode="set", value=-2.0)
    assert r1.flip_rate(pos) == 1.0 and r2.flip_rate(pos) == 0.0
    # iterations before the edit are bit-identical; erasing the read direction also flips all
    assert torch.equal(r1.edited.states[:1], r1.clean.states[:1])
    assert not torch.equal(r1.edited.states[1], r1.clean.states[1])
    er = intervene(
        loop, inputs, n_iter=2, iteration=1, edit=erase(None, method="direction", direction=e1)
    )
    assert (er.edited_out[pos] == 0).all()
    assert r1.to_frame()["flip_rate"].iloc[0] == pytest.approx(r1.flip_rate())
    # additive steering: dose-response on the positives is monotone, 0 at alpha = 0, 1 at -6
    alphas = [0.0, -1.0, -2.0, -3.0, -6.0]
    dr = dose_response(
        loop,
        inputs[pos.nonzero().flatten()[:400]],
        n_iter=2,
        iteration=1,
        direction=e1,
        values=alphas,
    )
    m = dr.metric
    assert m[0] == 0.0 and m[-1] == 1.0 and np.all(np.diff(m) >= 0) and 0.2 < m[2] < 0.8
    assert dr.to_frame()["value"].tolist() == alphas
    dr2 = dose_response(loop, inputs[:400], n_iter=2, iteration=1, direction=e2, values=alphas)
    assert dr2.metric.max() == 0.0


def test_leace_erases_linear_information_and_control_does_not():
    g = torch.Generator().manual_seed(1)
    n, d = 3000, 12
    z = torch.randint(0, 2, (n,), generator=g)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)  # correlated, anisotropic features
    X = (
        torch.randn(n, d, generator=g, dtype=torch.float64) @ A
        + 3.0 * (2 * z - 1).double()[:, None] * A[0]
    )
    before = fit_probes(X.unsqueeze(0), z, probe="logistic", seed=0).accuracy[0]
    er = erase(X, z, method="leace")
    Xe = er(X)
    assert before > 0.95 and er.rank == 1
    zc = (z - z.double().mean()).double()
    assert (Xe - Xe.mean(0)).T.matmul(zc).abs().max() < 1e-8 * n  # zero cross-covariance
    assert torch.allclose(er(Xe), Xe, atol=1e-9)  # an (oblique) projection: idempotent
    after = fit_probes(Xe.unsqueeze(0), z, probe="logistic", seed=0).accuracy[0]
    chance = max(float(z.double().mean()), 1 - float(z.double().mean()))
    assert after <= chance + 0.03
    ctrl = er.control(seed=0)
    assert ctrl.rank == 1 and abs(float(ctrl.basis[:, 0] @ er.basis[:, 0])) < 1e-10
    kept = fit_probes(ctrl(X).unsqueeze(0), z, probe="logistic", seed=0).accuracy[0]
    assert kept > 0.9
    # INLP: rounds of probe-and-project also reach chance, but need many more directions
    # (8 here, vs LEACE's single oblique one) on these correlated features
    inlp = erase(X, z, method="inlp", n_iter=8)
    assert 1 < inlp.rank <= 8
    assert torch.allclose(
        inlp.basis.T @ inlp.basis, torch.eye(inlp.rank, dtype=torch.float64), atol=1e-10
    )
    after_inlp = fit_probes(inlp(X).unsqueeze(0), z, probe="logistic", seed=0).accuracy[0]
    assert after_inlp <= chance + 0.05


def _carry_loop():
    """inputs [B, 2] bits (a, b). Step 0 writes h = (a, b, carry, carry); later steps keep it.
    decode reads coordinate 2 (the carry) and a xor b: output = 2 carry + (a xor b). The copy of
    the carry in coordinate 3 decodes perfectly but is never read."""

    def step(h, ctx, t):
        if t == 0:
            a, b = ctx[:, 0].double(), ctx[:, 1].double()
            return torch.stack([a, b, a * b, a * b], -1)
        return h

    def decode(h, ctx):
        value = 2 * h[:, 2] + (h[:, 0] - h[:, 1]).abs()
        return -((torch.arange(4, dtype=h.dtype) - value[:, None]) ** 2)

    init = lambda ctx, g: torch.zeros(ctx.shape[0], 4, dtype=torch.float64)  # noqa: E731
    return ls.FnLoop(step=step, init_state=init, decode=decode)


def test_interchange_intervention_accuracy_carry_model():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 2, (400, 2), generator=g)
    source = torch.randint(0, 2, (400, 2), generator=g)
    loop = _carry_loop()

    def cf(b, s):  # the causal model: the sum recomputed with the source's carry
        return 2 * (s[:, 0] & s[:, 1]) + (b[:, 0] ^ b[:, 1])

    e = torch.eye(4, dtype=torch.float64)
    kw = dict(n_iter=3, counterfactual=cf)
    read = interchange_intervention_accuracy(
        loop, base, source, iteration=1, subspace=e[2], control=True, **kw
    )
    assert read.iia == 1.0 and read.iia_example == 1.0
    assert read.control_iia < 0.8  # a random orthogonal direction does not implement the carry
    # the unread copy decodes the carry equally well but patching it only "works" when
    # base and source carries already agree
    same = float(((base[:, 0] & base[:, 1]) == (source[:, 0] & source[:, 1])).double().mean())
    copy = interchange_intervention_accuracy(loop, base, source, iteration=1, subspace=e[3], **kw)
    assert copy.iia == pytest.approx(same)
    # before the carry is computed (iteration 0) the patch is overwritten: same as no patch
    early = interchange_intervention_accuracy(loop, base, source, iteration=0, subspace=e[2], **kw)
    assert early.iia == pytest.approx(same)
    df = read.to_frame()
    assert df["iia"].iloc[0] == 1.0 and df["rank"].iloc[0] == 1
    with pytest.raises(LoopscopeError, match="counterfactual shape"):
        interchange_intervention_accuracy(
            loop, base, source, iteration=1, subspace=e[2], n_iter=3, counterfactual=torch.zeros(3)
        )
    with pytest.raises(LoopscopeError, match="needs a subspace"):
        interchange_intervention_accuracy(loop, base, source, iteration=1, control=True, **kw)


def test_causal_bad_inputs():
    h, z, e1, _ = _golden25()
    loop, inputs = _readout_loop(h[:10])
    with pytest.raises(LoopscopeError, match="mode must be"):
        steer(loop, inputs, n_iter=2, iteration=1, direction=e1, mode="scale")
    with pytest.raises(LoopscopeError, match="non-zero"):
        set_projection(h, torch.zeros(32), 1.0)
    with pytest.raises(LoopscopeError, match="direction must be a vector"):
        set_projection(h, torch.ones(5), 1.0)
    with pytest.raises(LoopscopeError, match="method must be"):
        erase(h, z, method="rlace")
    with pytest.raises(LoopscopeError, match="non-finite"):
        erase(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(LoopscopeError, match="n_iter must be a positive integer"):
        steer(loop, inputs, n_iter=0, iteration=1, direction=e1)
