"""analysis.spectra: golden #1 (non-normal linear maps, complex leading pair: dense and ARPACK
exact, power iteration wrong), #9 (tanh(2h) fixed points), #13 (jvp vs finite differences, dense
J = stacked jvps, similarity invariance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopscope import FnLoop
from loopscope.analysis import LoopMap, spectrum
from loopscope.analysis.spectra import power_iteration_rho
from loopscope.core.errors import LoopscopeError

# small batched ops: one thread is much faster than two contended ones
pytestmark = pytest.mark.usefixtures("one_thread")


def nonnormal(case: str, n: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    S = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / math.sqrt(n)  # well conditioned, non-normal
    D = np.zeros((n, n))
    if case == "a":
        r, th = 0.95, math.pi / 3
        D[:2, :2] = [[r * math.cos(th), -r * math.sin(th)], [r * math.sin(th), r * math.cos(th)]]
        D[2:, 2:] = np.diag(rng.uniform(-0.5, 0.5, n - 2))
        eig = np.concatenate([[r * np.exp(1j * th), r * np.exp(-1j * th)], np.diag(D)[2:]])
    else:
        d = np.concatenate([[0.95, -0.94], rng.uniform(-0.8, 0.8, n - 2)])
        D = np.diag(d)
        eig = d.astype(complex)
    A = S @ D @ np.linalg.inv(S)
    return torch.tensor(A), eig


def top(e, k=6):
    e = np.asarray(e)
    return np.sort_complex(e[np.argsort(-np.abs(e), kind="stable")][:k].round(10))


@pytest.mark.parametrize("case", ["a", "b"])
def test_golden1_dense_and_arpack_exact(case):
    A, eig = nonnormal(case)
    b = torch.randn(1, A.shape[0], dtype=torch.float64)
    loop = FnLoop(step=lambda h, x: h @ A.T + x)
    h = torch.zeros(1, A.shape[0], dtype=torch.float64)
    dense = spectrum(loop, b, h)
    arp = spectrum(loop, b, h, method="arpack", k=6, sigma=False)
    assert abs(dense.rho[0] - 0.95) < 1e-8 and abs(arp.rho[0] - 0.95) < 1e-8
    ref = top(eig)
    assert np.allclose(top(dense.eigenvalues[0]), ref, atol=1e-8)
    assert np.allclose(top(arp.eigenvalues[0]), ref, atol=1e-8)
    assert arp.meta["ncv"] >= 64
    if case == "a":
        # the real Rayleigh quotient is not rho for a complex pair: it sits near |Re lambda| =
        # 0.95 cos(pi/3) = 0.475 (dynamics spec §12.3), far below the true 0.95
        pw = power_iteration_rho(loop, b, h).rho
        assert abs(pw[0] - 0.475) < 0.02 and abs(pw[0] - 0.95) > 0.4


def test_golden9_tanh2h_fixed_points():
    loop = FnLoop(step=lambda h: torch.tanh(2 * h))
    a = 0.9575040240772688
    s = spectrum(loop, None, torch.tensor([[a], [0.0]], dtype=torch.float64))
    assert abs(s.rho[0] - 2 * (1 - a * a)) < 1e-6 and abs(s.rho[0] - 0.166372) < 1e-6
    assert s.unstable == [0, 1] and abs(s.rho[1] - 2.0) < 1e-12


def test_golden13_jacobian_plumbing():
    rng = np.random.default_rng(2)
    d = 16
    W = rng.standard_normal((d, d))
    W *= 0.5 / np.linalg.norm(W, 2)
    U, x = rng.standard_normal((d, d)), rng.standard_normal((1, d))
    Wt, Ut, xt = (torch.tensor(v) for v in (W, U, x))
    loop = FnLoop(step=lambda h, x: torch.tanh(h @ Wt.T + x @ Ut.T))
    m = LoopMap(loop, xt, state_shape=(d,), batch_size=1)
    z = torch.tensor(rng.standard_normal((1, d)))
    v = torch.tensor(rng.standard_normal((1, d)))
    eps = 1e-6
    fd = (m.f(z + eps * v) - m.f(z - eps * v)) / (2 * eps)
    jv = m.jvp(z, v)[1]
    assert ((jv - fd).norm() / jv.norm()).item() < 1e-6
    J = m.jacobian(z)[0]
    cols = torch.stack(
        [m.jvp(z, torch.eye(d, dtype=torch.float64)[i : i + 1])[1][0] for i in range(d)], 1
    )
    assert torch.allclose(J, cols, atol=1e-14)
    Q, _ = torch.linalg.qr(torch.tensor(rng.standard_normal((d, d))))
    e1 = np.sort_complex(torch.linalg.eigvals(J).numpy().round(10))
    e2 = np.sort_complex(torch.linalg.eigvals(Q @ J @ Q.T).numpy().round(10))
    assert np.allclose(e1, e2, atol=1e-9)


def test_bad_options():
    loop = FnLoop(step=lambda h: 0.5 * h)
    h = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(LoopscopeError, match="k must be"):
        spectrum(loop, None, h, k=5)
    with pytest.raises(LoopscopeError, match="unknown option 'methd'"):
        spectrum(loop, None, h, methd="dense")


def test_auto_switches_to_arpack_and_agrees_with_dense_per_sample():
    n = 96
    rng = np.random.default_rng(7)
    As = []
    for r in (0.6, 0.9):  # two samples, two different maps
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        As.append(Q @ np.diag(rng.uniform(-r, r, n)) @ Q.T + 0.05 * rng.standard_normal((n, n)))
    A = torch.tensor(np.stack(As))
    loop = FnLoop(step=lambda h, x: torch.einsum("bij,bj->bi", x, torch.tanh(h)))
    h = torch.tensor(rng.standard_normal((2, n))) * 0.3
    dense = spectrum(loop, A, h)
    arp = spectrum(loop, A, h, dense_max=64)  # auto -> ARPACK above dense_max
    assert dense.method == "dense" and arp.method == "arpack" and len(arp.eigenvalues[0]) == 6
    assert np.allclose(arp.rho, dense.rho, atol=1e-8) and dense.rho[0] != dense.rho[1]
    assert np.allclose(arp.sigma_max, dense.sigma_max, atol=1e-7)
    assert all(0 < mv < 2000 for mv in arp.matvecs)
    for b in range(2):
        J = torch.func.jacfwd(lambda z, b=b: A[b] @ torch.tanh(z))(h[b])
        ev = np.linalg.eigvals(J.numpy())
        assert abs(dense.rho[b] - np.abs(ev).max()) < 1e-10
        assert abs(dense.sigma_max[b] - np.linalg.norm(J.numpy(), 2)) < 1e-10
        assert dense.sigma_max[b] >= dense.rho[b] and dense.nonnormality[b] >= 1.0


def test_to_frame_reports_angles_timescales_and_margin():
    th = math.pi / 5
    R = 0.8 * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    R = torch.block_diag(R.double(), torch.tensor([[0.5]], dtype=torch.float64))
    loop = FnLoop(step=lambda h: h @ R.T)
    s = spectrum(loop, None, torch.zeros(1, 3, dtype=torch.float64))
    df = s.to_frame()
    assert list(df["rank"]) == [0, 1, 2]
    assert np.allclose(df["modulus"], [0.8, 0.8, 0.5])
    assert np.allclose(sorted(df["angle"].abs())[1:], [th, th])  # rotation per step
    assert np.allclose(df["timescale"], -1 / np.log([0.8, 0.8, 0.5]))
    assert np.allclose(s.timescales(0), df["timescale"])
    assert df["margin"].iloc[0] == pytest.approx(0.2) and (df["unstable"] == 0).all()
