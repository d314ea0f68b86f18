"""probes: batched fit equals per-site fits; planted iteration-dependent feature gives the right
onset; golden #25 two-direction causal case (set-projection along the read direction flips
100% of positives, along the merely-correlated one 0%)."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope.errors import LoopscopeError
from loopscope.probes import fit_probes, onset, probe_trace, steer_set_projection, transfer_matrix


def test_batched_fit_equals_per_site_fits():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 300, 6, generator=g, dtype=torch.float64)
    y = (X[2, :, 0] + 0.3 * X[4, :, 1] > 0).long()
    batched = fit_probes(X, y, seed=3)
    for s in range(5):
        single = fit_probes(X[s : s + 1], y, seed=3)
        assert torch.allclose(single.W[0], batched.W[s], atol=1e-10)
        assert single.test_acc[0] == batched.test_acc[s]
    assert batched.test_acc.argmax().item() == 2 and batched.test_acc[2] > 0.85  # y also depends on site 4


def test_planted_feature_onset_and_transfer():
    # state at iteration t carries the label in coordinate 0 only from t >= 3 on
    T, B, P, d = 6, 200, 2, 4
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (B, P), generator=g)

    def step(h, ctx, t):
        noise = torch.randn(h.shape, generator=torch.Generator().manual_seed(t), dtype=h.dtype)
        signal = (
            (2 * ctx.double() - 1).unsqueeze(-1)
            * torch.tensor([3.0, 0, 0, 0], dtype=h.dtype)
            * (t + 1 >= 3)
        )
        return noise + signal

    loop = ls.FnLoop(step=step, init_state=torch.zeros(P, d, dtype=torch.float64))
    tr = ls.unroll(loop, labels, T)
    _, df = probe_trace(tr, labels, pooled=False)
    on = onset(df, threshold=0.95)
    assert on["onset"].tolist() == [3, 3]
    res, _ = probe_trace(tr, labels, pooled=True)
    X = tr.states[1:].reshape(T, B * P, d)
    M = transfer_matrix(res, X, labels.reshape(-1))
    assert M[3:, 3:].min() > 0.95 and M[:2, :2].max() < 0.7


def test_golden25_two_direction_causal_case():
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
    readout = lambda x: (x @ e1 > 0).long()  # noqa: E731  the model reads e1 only
    for coord in (0, 1):  # single-coordinate probes are perfect on both directions
        r = fit_probes(h[:, coord : coord + 1].unsqueeze(0), z, seed=0)
        assert r.test_acc.item() == 1.0
    pos = readout(h) == 1
    flipped_e1 = (readout(steer_set_projection(h[pos], e1, -2.0)) == 0).double().mean().item()
    flipped_e2 = (readout(steer_set_projection(h[pos], e2, -2.0)) == 0).double().mean().item()
    assert flipped_e1 == 1.0 and flipped_e2 == 0.0


def test_bad_probe_inputs():
    with pytest.raises(LoopscopeError, match="sites, examples, features"):
        fit_probes(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(LoopscopeError, match="y must be"):
        fit_probes(torch.zeros(2, 10, 3), torch.zeros(9))
