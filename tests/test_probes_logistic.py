"""The batched logistic solvers reach scikit-learn's optimum: Newton and the K-FAC L-BFGS give
scikit-learn's coefficients (binary and multinomial, a C that is not 1, so a wrong loss scaling
or regularisation would show), the gradient of an independent implementation of the objective
vanishes at their solution, and rank-deficient, constant-feature, one-class and separable sites
are fitted without a crash (jitter reported where a Hessian needed it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from loopscope.core.errors import LoopscopeError
from loopscope.probes import fit_probes
from loopscope.probes.logistic import _cholesky_step

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVERS = ("newton", "lbfgs")


def _problem(K: int, S: int = 3, n: int = 240, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(S, n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4, d)
    X = X + 3.0  # a mean far from 0: standardisation matters
    score = X[:, :, 0] - 0.8 * X[:, :, 1] + 1.5 * torch.randn(S, n, generator=g, dtype=X.dtype)
    edges = torch.quantile(score[0], torch.linspace(0, 1, K + 1, dtype=X.dtype)[1:-1])
    return X, torch.bucketize(score, edges)  # noisy labels: a finite optimum


def _standardised(res, X):
    return ((X - res.mean[0]) / res.std[0]).numpy()


def _coef(res, s: int, K: int):
    W, b = res.params[0]["W"][s].numpy(), res.params[0]["b"][s].numpy()  # [d, K], [K]
    if K == 2:  # scikit-learn's binary vector is class 1's column (class 0's is zero)
        return W[:, 1][None], b[1:]
    return W.T, b


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("K", [2, 4])
def test_the_batched_solvers_reach_scikit_learns_coefficients(solver, K):
    X, y = _problem(K)
    C = 0.3
    res = fit_probes(X, y, probe="logistic", C=C, split="all", tol=1e-10, solver=solver)
    assert res.meta["solver"] == solver
    Z = _standardised(res, X)
    for s in range(X.shape[0]):
        ref = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(Z[s], y[s].numpy())
        coef, intercept = _coef(res, s, K)
        assert np.abs(coef - ref.coef_).max() < 1e-6
        assert np.abs(intercept - ref.intercept_).max() < 1e-6
    # the comparison can tell C = 0.3 from C = 1: a wrong scaling of the loss would fail it
    other = fit_probes(X, y, probe="logistic", C=1.0, split="all", tol=1e-10, solver=solver)
    assert np.abs(_coef(other, 0, K)[0] - _coef(res, 0, K)[0]).max() > 1e-3


def _objective(W, b, Z, y, w, C, K):
    """scikit-learn's L2-logistic objective in its 1 / (C n) scaling, written independently."""
    if K == 2:
        z = Z @ W + b
        loss = torch.nn.functional.softplus(z) - y * z
    else:
        logits = Z @ W + b
        loss = torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None])[:, 0]
    return (C * (w * loss).sum() + 0.5 * (W * W).sum()) / (C * w.sum())


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("K", [2, 3])
def test_the_gradient_vanishes_at_the_solution(solver, K):
    X, y = _problem(K, seed=1)
    y[:, ::7] = -100  # unlabelled rows weigh nothing
    C, tol = 2.0, 1e-7
    res = fit_probes(X, y, probe="logistic", C=C, split="all", tol=tol, solver=solver)
    Z = torch.from_numpy(_standardised(res, X))
    for s in range(X.shape[0]):
        w = (y[s] != -100).double()
        yy = y[s].clamp_min(0)
        W = res.params[0]["W"][s].clone()
        b = res.params[0]["b"][s].clone()
        if K == 2:
            W, b, yy = W[:, 1], b[1], yy.double()
        W.requires_grad_()
        b.requires_grad_()
        f = _objective(W, b, Z[s], yy, w, C, K)
        gW, gb = torch.autograd.grad(f, (W, b))
        assert max(float(gW.abs().max()), float(gb.abs().max())) <= tol


def test_float32_passes_reach_the_same_accuracy():
    X, y = _problem(3, S=4, n=400, seed=2)
    a = fit_probes(X, y, probe="logistic", seed=0)
    b = fit_probes(X, y, probe="logistic", seed=0, dtype="float32")
    assert np.abs(a.accuracy - b.accuracy).max() <= 1 / 100  # at most one held-out row of 100
    assert torch.allclose(a.params[0]["W"], b.params[0]["W"], atol=1e-3)


@pytest.mark.parametrize("solver", SOLVERS)
def test_degenerate_sites_are_fitted_without_a_crash(solver):
    X, y = _problem(2, S=4, seed=3)
    X[0, :, 2] = 7.0  # a constant feature
    X[1, :, 3] = X[1, :, 4]  # a duplicated feature: a rank-deficient Gram matrix
    y = y.clone()
    y[2] = 1  # one class only at this site: its intercept runs off
    X[3, :, 0] = torch.where(y[3] == 1, 5.0, -5.0)  # separable: the weights run off
    res = fit_probes(X, y, probe="logistic", C=1e6, split="all", solver=solver, max_iter=200)
    for p in res.params:
        assert all(bool(torch.isfinite(v).all()) for v in p.values())
    assert res.train_acc[0, 3] == 1.0 and res.train_acc[0, 2] == 1.0
    assert len(res.meta["hessian_jitter"]) == 4


def test_a_singular_or_nan_hessian_gets_jitter_and_a_finite_step():
    H = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1)
    H[1, 2, 2] = 0.0  # singular
    H[2, 0, 0] = float("nan")  # nothing rescues it: a scaled gradient step
    g = torch.ones(3, 3, dtype=torch.float64)
    step, jitter = _cholesky_step(H, g)
    assert jitter[0] == 0 and 0 < jitter[1] < 1e-6 and jitter[2] == float("inf")
    assert bool(torch.isfinite(step).all())
    assert torch.allclose(step[0], -g[0])
    assert float((step[2] * g[2]).sum()) < 0  # still downhill


def test_a_jittered_site_is_noted_in_the_result(monkeypatch):
    import loopscope.probes.logistic as lg

    real = lg._cholesky_step

    def forced(H, g):  # the second site's Hessian loses positive definiteness
        H = H.clone()
        if len(H) > 1:
            H[1] = -H[1]
        return real(H, g)

    monkeypatch.setattr(lg, "_cholesky_step", forced)
    X, y = _problem(2, S=2, seed=4)
    res = fit_probes(X, y, probe="logistic", split="all", solver="newton")
    assert res.meta["hessian_jitter"][0] == 0 and res.meta["hessian_jitter"][1] > 0
    assert any(n.startswith("site 1: Hessian not positive definite") for n in res.meta["notes"])


def test_an_unknown_solver_is_named_with_the_choices():
    with pytest.raises(LoopscopeError, match="solver must be one of lbfgs, newton, got 'sgd'"):
        fit_probes(*_problem(2), probe="logistic", solver="sgd")
