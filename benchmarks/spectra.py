"""B3 (dynamics spec §12.3, §14): Jacobian spectra — dense vs ARPACK (ncv ≥ 64) vs ARPACK with
scipy's default ncv vs the power method.

Cases: the golden #1 non-normal linear maps (n = 256; (a) dominant complex pair 0.95·e^{±iπ/3},
(b) real 0.95 and −0.94), and the fixed point of tanh(0.95·Q h + c) with Q orthogonal (spectrum
clustered on a circle) at n = 256 and 1024 (2048 with --large). The dense spectrum is the
reference. Printed per case: ρ error and eigenvalue error (each of the 6 to its nearest dense
eigenvalue) of ARPACK (ours: ``spectrum(method="arpack",
k=6)``, ncv = 64), matvecs and time; ARPACK with the default ncv (max(2k+1, 20)), capped at
``--default-maxiter`` restarts (it stalls on circular spectra); the power method's ρ estimate
(torchdeq ``power_method`` when importable, else the same left iteration with a real Rayleigh
quotient). Pass bars: ARPACK ρ error < 1e-8; power iteration visibly wrong on the complex pair.
``auto`` picks dense up to n = 2048, so it is never slower than dense there.

    python benchmarks/spectra.py [--large]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

from loopscope import FnLoop
from loopscope.analysis import LoopMap, solve, spectrum
from loopscope.analysis.spectra import power_iteration_rho

try:  # bench-only extra
    from torchdeq.loss.jacobian import power_method as td_power_method

    HAVE_TD = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TD = False

F64 = torch.float64


def nonnormal(case: str, n: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    S = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / math.sqrt(n)
    D = np.zeros((n, n))
    if case == "a":
        r, th = 0.95, math.pi / 3
        D[:2, :2] = [[r * math.cos(th), -r * math.sin(th)], [r * math.sin(th), r * math.cos(th)]]
        D[2:, 2:] = np.diag(rng.uniform(-0.5, 0.5, n - 2))
    else:
        D = np.diag(np.concatenate([[0.95, -0.94], rng.uniform(-0.8, 0.8, n - 2)]))
    A = torch.tensor(S @ D @ np.linalg.inv(S))
    loop = FnLoop(step=lambda h, x: h @ A.T + x)
    x = torch.tensor(rng.standard_normal((1, n)))
    return loop, x, torch.zeros(1, n, dtype=F64)


def rotating(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    QT = torch.tensor(0.95 * Q.T).contiguous()  # pre-transposed: no copy inside each jvp
    loop = FnLoop(step=lambda h, x: torch.tanh(h @ QT + x))
    x = torch.tensor(rng.standard_normal((1, n))) * 0.5
    fp = solve(loop, x, h0=torch.zeros(1, n, dtype=F64), tol=1e-13, max_iter=500).z_best
    return loop, x, fp


def power_rho(loop, x, h) -> float:
    if not HAVE_TD:
        return power_iteration_rho(loop, x, h).rho[0]
    z0 = h.clone().requires_grad_(True)
    f0 = loop.step(z0, x)
    torch.manual_seed(0)
    return float(td_power_method(f0, z0, n_iters=100)[1][0])


def default_ncv_arpack(loop, x, h, maxiter: int):
    m = LoopMap(loop, x, state_shape=tuple(h.shape[1:]), batch_size=1)
    z = m.flatten(h.to(F64))
    n = m.n
    count = [0]

    def mv(v):
        count[0] += 1
        vt = torch.as_tensor(np.real_if_close(v).astype(np.float64).reshape(1, n))
        return m.jvp(z, vt)[1].reshape(n).numpy()

    t0 = time.perf_counter()
    try:
        vals = eigs(
            LinearOperator((n, n), matvec=mv, dtype=np.float64),
            k=6,
            which="LM",
            tol=1e-8,
            v0=np.random.default_rng(0).standard_normal(n),
            maxiter=maxiter,
            return_eigenvectors=False,
        )
        ok = True
    except ArpackNoConvergence as e:
        vals, ok = e.eigenvalues, False
    return vals, count[0], time.perf_counter() - t0, ok


def eig_err(found, ref) -> float:
    """Max distance of each found eigenvalue to the nearest reference eigenvalue (ordering- and
    tie-independent: clustered moduli make "the top 6" ambiguous)."""
    ref = np.asarray(ref)
    return float(max(np.abs(ref - lam).min() for lam in np.asarray(found)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true", help="add n = 2048")
    ap.add_argument("--default-maxiter", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        ("golden1(a) complex pair n=256", *nonnormal("a")),
        ("golden1(b) 0.95/-0.94 n=256", *nonnormal("b")),
        ("tanh(0.95 Q h + c) n=256", *rotating(256)),
        ("tanh(0.95 Q h + c) n=1024", *rotating(1024)),
    ]
    if args.large:
        cases.append(("tanh(0.95 Q h + c) n=2048", *rotating(2048)))
    spectrum(*cases[0][1:], method="dense", sigma=False)  # warm-up (torch.func first call)
    pm = "torchdeq power_method" if HAVE_TD else "power iteration (torchdeq-equivalent)"
    print(f"B3 spectra: dense reference vs ARPACK ncv=64 (ours) vs ARPACK default ncv vs {pm}\n")
    print(
        f"{'case':32s} {'rho dense':>10s} {'dense s':>8s} | {'ARPACK err':>10s} {'eig err':>9s} "
        f"{'mv':>5s} {'s':>6s} | {'dflt err':>9s} {'mv':>5s} {'s':>6s} | {'power rho':>9s}"
    )
    worst = 0.0
    for name, loop, x, h in cases:
        t0 = time.perf_counter()
        dense = spectrum(loop, x, h, method="dense", sigma=False)
        t_dense = time.perf_counter() - t0
        t0 = time.perf_counter()
        arp = spectrum(loop, x, h, method="arpack", k=6, sigma=False)
        t_arp = time.perf_counter() - t0
        rho = dense.rho[0]
        err = abs(arp.rho[0] - rho)
        worst = max(worst, err)
        top_err = eig_err(arp.eigenvalues[0], dense.eigenvalues[0])
        dv, dmv, dt, dok = default_ncv_arpack(loop, x, h, args.default_maxiter)
        derr = abs(np.abs(dv).max() - rho) if len(dv) else float("nan")
        dflag = "" if dok else "*"
        pw = power_rho(loop, x, h)
        print(
            f"{name:32s} {rho:10.6f} {t_dense:8.2f} | {err:10.1e} {top_err:9.1e} "
            f"{arp.matvecs[0]:5d} {t_arp:6.2f} | {derr:8.1e}{dflag} {dmv:5d} {dt:6.2f} | {pw:9.4f}"
        )
    print(
        f"\n* = default-ncv ARPACK did not converge within {args.default_maxiter} restarts "
        "(error of its partial eigenvalues)"
    )
    print(f"worst ARPACK (ncv=64) rho error vs dense: {worst:.1e} (bar < 1e-8)")
    print("power method on golden1(a): |Re lambda| = 0.95 cos(pi/3) = 0.475, not rho = 0.95")


if __name__ == "__main__":
    main()
