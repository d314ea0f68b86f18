"""probes.fit: the batched fit of all sites equals per-site reference fits (scikit-learn Ridge to
1e-6, LogisticRegression within 1 accuracy point and matching weights), k-fold splits by example,
the estimator class, low-rank / MLP probes, diverged rows flagged per site, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from loopscope.core.errors import LoopscopeError
from loopscope.probes import LinearProbe, fit_probes, make_folds

# the CI box is shared: one BLAS thread is faster than two contended ones
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(S=6, N=500, d=8, seed=0, classes=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(S, N, d, generator=g, dtype=torch.float64)
    X = X * torch.linspace(
        0.5, 3.0, d, dtype=torch.float64
    )  # unequal scales: standardisation matters
    a, b = X[min(2, S - 1), :, 0], X[min(4, S - 1), :, 1]
    score = a + 0.5 * b + 0.7 * torch.randn(N, generator=g, dtype=torch.float64)
    if classes == 2:
        y = (score > 0).long()
    else:
        y = torch.bucketize(
            score,
            torch.quantile(score, torch.linspace(0, 1, classes + 1, dtype=torch.float64)[1:-1]),
        )
    return X, y


def _sk_standardise(Xs, tr, te):
    mu, sd = Xs[tr].mean(0), Xs[tr].std(0)
    return (Xs[tr] - mu) / sd, (Xs[te] - mu) / sd


def test_batched_ridge_equals_per_site_sklearn_ridge():
    X, y = _data(classes=3)
    res = fit_probes(X, y, probe="ridge", alpha=2.0, seed=3)
    tr, te = (i.numpy() for i in res.folds[0])
    for s in range(X.shape[0]):
        Ztr, Zte = _sk_standardise(X[s].numpy(), tr, te)
        Y = np.eye(3)[y.numpy()] * 2 - 1
        ref = Ridge(alpha=2.0).fit(Ztr, Y[tr])
        assert np.abs(ref.coef_.T - res.params[0]["W"][s].numpy()).max() < 1e-6
        assert np.abs(ref.intercept_ - res.params[0]["b"][s].numpy()).max() < 1e-6
        ref_acc = (ref.predict(Zte).argmax(1) == y.numpy()[te]).mean()
        assert abs(ref_acc - float(res.test_acc[0, s])) < 1e-6
    assert int(np.argmax(res.accuracy)) == 2
    # float32 passes over the data (the solve stays float64): same probe to float32 precision
    res32 = fit_probes(X.float(), y, probe="ridge", alpha=2.0, seed=3, dtype="float32")
    assert (res32.params[0]["W"] - res.params[0]["W"]).abs().max() < 1e-4
    assert (res32.mean[0] - res.mean[0]).abs().max() < 1e-5
    assert np.abs(res32.accuracy - res.accuracy).max() <= 0.01


@pytest.mark.parametrize("classes", [2, 3])
def test_batched_logistic_matches_per_site_sklearn(classes):
    X, y = _data(classes=classes, seed=1)
    res = fit_probes(X, y, probe="logistic", C=0.5, seed=0, tol=1e-8)
    res32 = fit_probes(X, y, probe="logistic", C=0.5, seed=0, dtype="float32")  # fast path
    tr, te = (i.numpy() for i in res.folds[0])
    for s in range(X.shape[0]):
        Ztr, Zte = _sk_standardise(X[s].numpy(), tr, te)
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(Ztr, y.numpy()[tr])
        ours = res.params[0]["W"][s].numpy()
        if classes == 2:  # sklearn's binary parametrisation = our positive-class column
            assert np.abs(ref.coef_[0] - ours[:, 1]).max() < 1e-4
        else:
            assert np.abs(ref.coef_.T - ours).max() < 1e-4
        assert abs(ref.score(Zte, y.numpy()[te]) - float(res.test_acc[0, s])) <= 0.01
        assert abs(ref.score(Zte, y.numpy()[te]) - float(res32.test_acc[0, s])) <= 0.01


def test_batched_lbfgs_sites_do_not_interact():
    # each site keeps its own curvature history and step: a site fitted alone gives the same
    # solution as inside a batch of very differently conditioned sites
    X, y = _data(S=5, N=400, classes=3, seed=2)
    X = X * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0], dtype=torch.float64)[:, None, None]
    for yy in (y, (y > 0).long()):
        batch = fit_probes(X, yy, probe="logistic", tol=1e-9, standardize=False, seed=0)
        for s in range(5):
            one = fit_probes(
                X[s : s + 1], yy, probe="logistic", tol=1e-9, standardize=False, seed=0
            )
            assert torch.allclose(
                one.params[0]["W"][0], batch.params[0]["W"][s], atol=1e-5, rtol=1e-5
            )


def test_kfold_groups_never_straddle_and_every_row_is_tested_once():
    N = 120
    groups = np.repeat(np.arange(30), 4)  # 30 sequences x 4 tokens
    folds = make_folds(N, groups=groups, folds=5, seed=2)
    seen = torch.cat([te for _, te in folds]).sort().values
    assert torch.equal(seen, torch.arange(N))
    for tr, te in folds:
        assert not set(groups[tr.numpy()]) & set(groups[te.numpy()])
    X, y = _data(S=2, N=N)
    res = fit_probes(X, y, probe="ridge", folds=5, groups=groups, seed=2)
    assert res.test_acc.shape == (5, 2)
    assert not torch.isnan(res.correct).any()  # k-fold: every row held out exactly once
    df = res.to_frame()
    assert set(df["fold"]) == set(range(5)) and len(df) == 10
    agg = res.to_frame(aggregate=True)
    assert np.allclose(agg["test_acc"], res.test_acc.mean(0).numpy())


def test_seeded_split_is_deterministic_and_seed_recorded():
    X, y = _data(S=2)
    a = fit_probes(X, y, probe="ridge", seed=7)
    b = fit_probes(X, y, probe="ridge", seed=7)
    c = fit_probes(X, y, probe="ridge", seed=8)
    assert torch.equal(a.folds[0][1], b.folds[0][1]) and not torch.equal(
        a.folds[0][1], c.folds[0][1]
    )
    assert (a.to_frame()["seed"] == 7).all()


def test_explicit_split_and_standardisation_uses_train_rows_only():
    X, y = _data(S=1, N=200)
    X = X.clone()
    X[0, 150:] += 100.0  # test rows shifted: must not leak into the train statistics
    res = fit_probes(X, y, probe="ridge", split=(torch.arange(150), torch.arange(150, 200)))
    assert torch.allclose(res.mean[0][0, 0], X[0, :150].mean(0))


def test_linear_probe_estimator():
    X, y = _data(S=1, N=400, classes=2)
    X0 = X[0]
    y0 = (X0[:, 3] - 0.5 * X0[:, 1] > 0).long()
    p = LinearProbe(kind="logistic", C=1.0, tol=1e-8).fit(X0, y0)
    assert p.score(X0, y0) > 0.97
    raw = (X0 @ p.coef_[0] + p.intercept_[0] > 0).long()  # raw-coordinate weights reproduce predict
    assert torch.equal(raw, p.predict(X0))
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(
        (X0 - X0.mean(0)).numpy() / X0.std(0, unbiased=False).numpy(), y0.numpy()
    )
    assert np.abs(ref.coef_[0] - p.result_.params[0]["W"][0, :, 1].numpy()).max() < 1e-4
    with pytest.raises(LoopscopeError, match="unknown option"):
        LinearProbe(kind="logistic", Cee=1.0)
    with pytest.raises(LoopscopeError, match="not fitted"):
        LinearProbe().predict(X0)


def test_lowrank_probe_rank_bounds_the_weights_and_mlp_fits_xor():
    X, y = _data(S=1, N=600, d=8, classes=4, seed=4)
    res = fit_probes(X, y, probe="lowrank", rank=1, seed=0)
    s = torch.linalg.svdvals(res.params[0]["W"][0])
    assert s[1] < 1e-8 * s[0]  # W = L R has rank 1
    full = fit_probes(X, y, probe="logistic", seed=0)
    assert res.accuracy[0] <= full.accuracy[0] + 0.02
    # XOR of two coordinates: no linear probe, an MLP probe does
    g = torch.Generator().manual_seed(5)
    Xx = torch.randn(1, 800, 4, generator=g, dtype=torch.float64)
    yx = ((Xx[0, :, 0] > 0) ^ (Xx[0, :, 1] > 0)).long()
    lin = fit_probes(Xx, yx, probe="logistic", seed=0)
    mlp = fit_probes(Xx, yx, probe="mlp", hidden=32, epochs=60, lr=1e-2, seed=0)
    assert lin.accuracy[0] < 0.65 and mlp.accuracy[0] > 0.9


def test_nonfinite_rows_are_dropped_per_site_and_counted():
    X, y = _data(S=3, N=300)
    X = X.clone()
    X[1, :20] = float("nan")  # site 1: 20 diverged samples
    X[2, 5] = float("inf")
    X[0, 7, :2] = 1e308  # finite, but the row sum overflows: must not count as non-finite
    X[2, 9, 3] = -float("inf")
    X[2, 9, 4] = float("inf")  # inf - inf: the sum is NaN, the row is non-finite
    res = fit_probes(X, y, probe="logistic", seed=0)
    assert res.meta["n_nonfinite"] == [0, 20, 2]
    assert not np.isnan(res.accuracy).any()
    n_used = res.n_train[0] + res.n_test[0]
    assert n_used.tolist() == [300, 280, 298]
    assert res.to_frame()["n_nonfinite"].tolist() == [0, 20, 2]


def test_directions_are_raw_coordinate_unit_vectors():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([10.0, 1, 1, 1, 1], dtype=torch.float64)
    X = torch.randn(1, 1000, 5, generator=g, dtype=torch.float64) * scale
    y = (
        X[0, :, 0] + 5 * X[0, :, 1] + torch.randn(1000, generator=g, dtype=torch.float64) > 0
    ).long()
    res = fit_probes(X, y, probe="logistic", seed=0)
    u = res.directions()[0]
    assert abs(float(u.norm()) - 1) < 1e-12
    # the decision margin is affine in raw X along the un-normalised direction
    s = res.decision_function(X)[0]
    margin = s[:, 1] - s[:, 0]
    w = res.directions(unit=False)[0]
    resid = margin - X[0] @ w
    assert float(resid.std()) < 1e-9
    assert abs(float(u[1] / u[0]) - 5.0) < 1.0  # true boundary x0 + 5 x1 (raw coordinates)


def test_bad_probe_inputs():
    X, y = _data(S=2, N=50)
    with pytest.raises(LoopscopeError, match="sites, examples, features"):
        fit_probes(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(LoopscopeError, match="y must be"):
        fit_probes(torch.zeros(2, 10, 3), torch.zeros(9))
    with pytest.raises(LoopscopeError, match="unknown option 'probes'"):
        fit_probes(X, y, probes="ridge")
    with pytest.raises(LoopscopeError, match="unknown probe kind 'lasso'"):
        fit_probes(X, y, probe="lasso")
    with pytest.raises(LoopscopeError, match="rank"):
        fit_probes(X, y, probe="lowrank")
    with pytest.raises(LoopscopeError, match="at least 2 classes"):
        fit_probes(X, torch.zeros(50, dtype=torch.long))
    with pytest.raises(LoopscopeError, match="dtype must be"):
        fit_probes(X, y, dtype="float16")
    with pytest.raises(LoopscopeError, match="C must be > 0"):
        fit_probes(X, y, C=0)
    for bad in ("a", -1, 1.5, True):
        with pytest.raises(LoopscopeError, match="seed must be an integer >= 0"):
            fit_probes(X, y, seed=bad)
    assert fit_probes(X, y, seed=np.int64(3)).meta["seed"] == 3  # numpy ints are seeds
    with pytest.raises(LoopscopeError, match="folds must be an integer >= 2"):
        fit_probes(X, y, folds=1)
    with pytest.raises(LoopscopeError, match="groups must have shape"):
        fit_probes(X, y, groups=np.arange(49))
    with pytest.raises(LoopscopeError, match="overlap"):
        fit_probes(X, y, split=(torch.arange(30), torch.arange(20, 50)))
    with pytest.raises(LoopscopeError, match=r"labels \[7\] are not in classes"):
        fit_probes(X, torch.where(y == 1, 7, 0), classes=[0, 1])
