"""Bad numbers stay per sample (issue: no silent wrong answer) in solve, the census and spectrum;
eigen-solver fallbacks; classic hard cases with known answers (Hopfield patterns, rank-deficient
and defective Jacobians); validation at the door."""

import numpy as np
import pytest
import torch

from loopscope import FnLoop
from loopscope.analysis import find_fixed_points, solve, spectrum
from loopscope.analysis import spectra as spectra_mod
from loopscope.core.errors import LoopscopeError

F64 = torch.float64


def hopfield(n=64, p=3, beta=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xi = torch.sign(torch.randn(p, n, generator=g, dtype=F64))
    W = xi.T @ xi / n  # rank p
    return FnLoop(step=lambda h: torch.tanh(beta * h @ W.T)), xi, g


def test_hopfield_census_returns_the_stored_patterns_and_their_mirrors_as_stable_points():
    loop, xi, g = hopfield()
    pats = torch.cat([xi, -xi])  # [6, n]
    seeds = (pats + 0.3 * torch.randn(6, 64, generator=g, dtype=F64)).repeat(6, 1)  # 36 seeds
    c = find_fixed_points(loop, None, seeds)
    df = c.to_frame()
    assert df["spectrum_status"].isin(["eigvals", "scipy.linalg.eig", "schur", "shifted"]).all()
    fixed = c.select(0, "fixed")
    for p in pats:  # every pattern and every mirror is a stable fixed point of its own sign
        match = [i for i, h in enumerate(fixed) if torch.equal(torch.sign(h), p)]
        assert len(match) == 1, "pattern not found exactly once"
        i = df.index[df["kind"] == "fixed"][match[0]]
        assert bool(df.loc[i, "stable"]) and df.loc[i, "rho"] < 1
    h = fixed[0:1]  # and they are fixed points: f(h*) = h*
    assert float((loop.step(h, None) - h).norm()) < 1e-8


def test_eigvals_failure_falls_back_to_scipy_then_schur_and_says_which_ran(monkeypatch):
    A = torch.tensor([[0.5, 2.0, 0.0], [0.0, -0.7, 1.0], [0.0, 0.0, 0.2]], dtype=F64)
    loop = FnLoop(step=lambda h: h @ A.T)
    h = torch.zeros(2, 3, dtype=F64)
    clean = spectrum(loop, None, h)
    assert clean.path == ["eigvals", "eigvals"]

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("linalg.eigvals: ill-conditioned (error code: 62)")

    monkeypatch.setattr(torch.linalg, "eigvals", broken)
    s = spectrum(loop, None, h)
    assert s.path == ["scipy.linalg.eig"] * 2 and s.status == ["ok", "ok"]
    assert np.allclose(s.rho, clean.rho, atol=1e-12) and s.unstable == clean.unstable
    import scipy.linalg

    monkeypatch.setattr(scipy.linalg, "eig", lambda *a, **k: (_ for _ in ()).throw(
        np.linalg.LinAlgError("geev failed")))  # fmt: skip
    s2 = spectrum(loop, None, h)
    assert s2.path == ["schur"] * 2 and np.allclose(s2.rho, 0.7, atol=1e-12)
    assert set(s2.to_frame()["path"]) == {"schur"}


def test_rank_deficient_jacobian_has_the_right_spectrum_and_fixed_point():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    A = 0.6 * torch.outer(u, v) / float(v @ u)  # rank 1, its one non-zero eigenvalue is 0.6
    c = torch.randn(8, generator=g, dtype=F64)
    loop = FnLoop(step=lambda h: h @ A.T + c)
    s = spectrum(loop, None, torch.zeros(1, 8, dtype=F64))
    assert abs(s.rho[0] - 0.6) < 1e-12 and s.unstable == [0]
    assert np.sum(np.abs(s.eigenvalues[0]) > 1e-10) == 1  # seven zero eigenvalues
    census = find_fixed_points(loop, None, torch.randn(5, 8, generator=g, dtype=F64))
    hstar = torch.linalg.solve(torch.eye(8, dtype=F64) - A, c)
    pts = census.select(0, "fixed")
    assert len(pts) == 1 and torch.allclose(pts[0], hstar, atol=1e-9)
    assert bool(census.stable[0])


def test_defective_jordan_block_jacobian_gives_its_eigenvalue():
    lam = 0.9
    J = lam * torch.eye(3, dtype=F64) + torch.diag(torch.ones(2, dtype=F64), 1)  # one 3x3 block
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    loop = FnLoop(step=lambda h: h @ J.T + c)
    s = spectrum(loop, None, torch.zeros(1, 3, dtype=F64))
    # a defective eigenvalue is only determined to ~eps^(1/3) by any backward-stable method
    assert abs(s.rho[0] - lam) < 1e-4 and s.unstable == [0] and s.status == ["ok"]
    assert np.allclose(np.abs(s.eigenvalues[0]), lam, atol=1e-4)
    r = solve(loop, None, h0=torch.zeros(1, 3, dtype=F64), tol=1e-12, max_iter=300)
    hstar = torch.linalg.solve(torch.eye(3, dtype=F64) - J, c)
    assert r.status == ["converged"] and torch.allclose(r.z_best[0], hstar, atol=1e-8)


# -- NaN in one sample --------------------------------------------------------------------------


def tanh_rnn(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.8 * torch.randn(n, n, generator=g, dtype=F64) / n**0.5
    return FnLoop(step=lambda h, x: torch.tanh(h @ W.T + x)), g


@pytest.mark.parametrize("bad_value", [float("nan")])
def test_solve_with_a_nonfinite_input_sample_flags_it_and_leaves_the_others_exact(bad_value):
    loop, g = tanh_rnn()
    x = torch.randn(3, 6, generator=g, dtype=F64)
    h0 = torch.zeros(3, 6, dtype=F64)
    clean = solve(loop, x, h0=h0, tol=1e-12)
    xb = x.clone()
    xb[1, 2] = bad_value
    r = solve(loop, xb, h0=h0, tol=1e-12)
    assert r.status[1] == "diverged" and "non-finite" in r.reason[1]
    for b in (0, 2):
        assert r.status[b] == clean.status[b] == "converged"
        assert torch.equal(r.z_best[b], clean.z_best[b]) and r.nfe[b] == clean.nfe[b]


def test_census_with_a_nan_input_sample_flags_its_seeds_and_leaves_the_others_exact():
    loop, g = tanh_rnn()
    x = torch.randn(2, 6, generator=g, dtype=F64)
    seeds = torch.randn(4, 6, generator=g, dtype=F64)
    clean = find_fixed_points(loop, x, seeds)
    xb = x.clone()
    xb[1, 0] = float("nan")
    c = find_fixed_points(loop, xb, seeds)
    assert (c.seed_class[1] == "non-converged").all()
    assert (c.seeds_frame().query("sample == 1")["solver_status"] == "diverged").all()
    keep = clean.sample == 0
    assert torch.equal(c.points, clean.points[torch.as_tensor(keep)])
    assert np.array_equal(c.rho, clean.rho[keep]) and list(c.sample) == [0] * int(keep.sum())


@pytest.mark.parametrize("method", ["dense", "arpack"])
def test_spectrum_with_a_nonfinite_sample_is_nan_for_it_and_exact_for_the_others(method):
    n = 24
    loop, g = tanh_rnn(n=n)
    x = torch.randn(3, n, generator=g, dtype=F64)
    h = torch.randn(3, n, generator=g, dtype=F64) * 0.3
    kw = {"k": 4} if method == "arpack" else {}
    clean = spectrum(loop, x, h, method=method, **kw)
    hs = h.clone()
    hs[1, 3] = float("nan")
    s = spectrum(loop, x, hs, method=method, **kw)  # a NaN state: never handed to LAPACK
    xs = x.clone()
    xs[2, 0] = float("nan")
    s2 = spectrum(loop, xs, h, method=method, **kw)  # finite state, NaN input
    assert s.status == ["ok", "non-finite state", "ok"] and np.isnan(s.rho[1])
    assert s2.status == ["ok", "ok", "non-finite input"] and np.isnan(s2.rho[2])
    # a finite state and input whose Jacobian is not finite (sqrt at 0) is flagged too
    s3 = spectrum(FnLoop(step=lambda h: torch.sqrt(h.abs())), None, torch.tensor([[0.0], [4.0]]))
    assert s3.status == ["non-finite jacobian", "ok"] and abs(s3.rho[1] - 0.25) < 1e-12
    for sp, good in ((s, (0, 2)), (s2, (0, 1))):
        for b in good:
            assert sp.rho[b] == clean.rho[b] and sp.sigma_max[b] == clean.sigma_max[b]
            assert np.array_equal(sp.eigenvalues[b], clean.eigenvalues[b])
    df = s.to_frame()
    bad = df[df["sample"] == 1]
    assert len(bad) == 1 and bad["rho"].isna().all() and (bad["status"] == "non-finite state").all()
    assert s.summary()["n_flagged"] == 1.0


def test_arpack_failure_falls_back_to_dense_and_says_so(monkeypatch):
    from scipy.sparse.linalg import ArpackNoConvergence

    n = 20
    loop, g = tanh_rnn(n=n)
    x = torch.randn(1, n, generator=g, dtype=F64)
    h = torch.zeros(1, n, dtype=F64)
    dense = spectrum(loop, x, h, method="dense", k=4, sigma=False)

    def fail(*a, **k):
        raise ArpackNoConvergence("ARPACK error -1: No convergence\n(more lines)", [], [])

    monkeypatch.setattr("scipy.sparse.linalg.eigs", fail)
    s = spectrum(loop, x, h, method="arpack", k=4, sigma=False)
    assert s.path == ["dense fallback (eigvals)"] and s.status == ["ok"]
    assert s.rho[0] == dense.rho[0]
    s2 = spectra_mod.spectrum_map(
        spectra_mod.LoopMap(loop, x, state_shape=(n,)), torch.zeros(1, n, dtype=F64),
        method="arpack", k=4,
        sigma=False, arpack_fallback_max=8,
    )  # fmt: skip
    assert np.isnan(s2.rho[0]) and s2.status[0].startswith("arpack failed: ARPACK error -1")
    assert "\n" not in s2.status[0]


def test_bad_spectrum_input_is_a_one_line_error_naming_the_argument():
    loop, g = tanh_rnn()
    x = torch.randn(3, 6, generator=g, dtype=F64)
    with pytest.raises(LoopscopeError, match="state has batch 2 but the inputs have batch 3"):
        spectrum(loop, x, torch.zeros(2, 6, dtype=F64))
    with pytest.raises(LoopscopeError, match="state"):
        spectrum(loop, x, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(LoopscopeError, match="state is empty"):
        spectrum(FnLoop(step=lambda h: h), None, torch.zeros(0, 3, dtype=F64))
    with pytest.raises(LoopscopeError, match="dense_max"):
        spectrum(loop, x, torch.zeros(3, 6, dtype=F64), dense_max=0)
    with pytest.raises(LoopscopeError, match="dtype"):
        spectrum(loop, x, torch.zeros(3, 6, dtype=F64), dtype=torch.int64)
