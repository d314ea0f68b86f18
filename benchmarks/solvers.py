"""B1 (dynamics spec §12.1, §14): NFE to r_rel < 1e-6 on the solver suite, loopscope vs anchors.

Anchors: naive iteration, and torchdeq's ``fixed_point_iter``, ``anderson_solver`` (default
lam = 1e-4, and lam = 1e-8) and ``broyden_solver`` when ``torchdeq`` is importable (a bench-only
extra, ``pip install torchdeq``); otherwise the two anchors it relies on are re-implemented here
exactly as the spec describes them (fixed-point iteration; Anderson with the absolute Tikhonov
term, m = 6, H = [[0, 1ᵀ], [1, GGᵀ + lam I]], batch-max stopping) and labelled
"torchdeq-equivalent".

NFE is deterministic and is the metric: for the anchors, the number of batched calls of f until the
batch-max criterion holds; for loopscope, the per-sample NFE (masked solver) — its batch column is
the max over samples (= the number of batched calls), its "mean" column the per-sample mean.

Prints one table per map, the ratios ``auto / best anchor`` (pass bar ≤ 1.1) and ``auto / torchdeq
default AA`` (pass bar ≤ 0.5), then per-sample masking vs batch-max stopping on a heterogeneous
batch of linear maps with ρ_b ∈ [0.5, 0.99].

    python benchmarks/solvers.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from loopscope import FnLoop
from loopscope.analysis.loopmap import LoopMap
from loopscope.analysis.solvers import Broyden, solve_map

TOL = 1e-6
DT = torch.float64

try:  # bench-only extra
    from torchdeq.solver import anderson_solver as td_anderson
    from torchdeq.solver import broyden_solver as td_broyden
    from torchdeq.solver import fixed_point_iter as td_fp

    HAVE_TD = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TD = False


# ---------------------------------------------------------------------------------------------
# torchdeq-equivalent anchors (used only when torchdeq is not importable)


def eq_fixed_point_iter(f, x0, max_iter, tol):
    x = x0
    for k in range(max_iter):
        fx = f(x)
        rel = (fx - x).flatten(1).norm(dim=1) / (fx.flatten(1).norm(dim=1) + 1e-9)
        if rel.max() < tol:
            return fx, k + 1
        x = fx
    return x, max_iter


def eq_anderson(f, x0, max_iter, tol, m=6, lam=1e-4):
    """torchdeq's Anderson: absolute Tikhonov term lam, batch-max stopping."""
    bsz = x0.shape[0]
    x0 = x0.flatten(1)
    d = x0.shape[1]
    X = torch.zeros(bsz, m, d, dtype=x0.dtype)
    F = torch.zeros(bsz, m, d, dtype=x0.dtype)
    X[:, 0], F[:, 0] = x0, f(x0)
    X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0])
    H = torch.zeros(bsz, m + 1, m + 1, dtype=x0.dtype)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x0.dtype)
    y[:, 0] = 1
    nfe = 2
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1 : n + 1, 1 : n + 1] = G @ G.transpose(1, 2) + lam * torch.eye(n, dtype=x0.dtype)
        alpha = torch.linalg.solve(H[:, : n + 1, : n + 1], y[:, : n + 1])[:, 1 : n + 1, 0]
        X[:, k % m] = (alpha[:, None] @ F[:, :n])[:, 0]
        F[:, k % m] = f(X[:, k % m])
        nfe += 1
        gx = F[:, k % m] - X[:, k % m]
        rel = gx.norm(dim=1) / (F[:, k % m].norm(dim=1) + 1e-9)
        if rel.max() < tol:
            break
    return F[:, k % m], nfe


# ---------------------------------------------------------------------------------------------
# the map suite


def _gauss_norm(rng, n, norm):
    W = rng.standard_normal((n, n))
    return W * norm / np.linalg.norm(W, 2)


def _sym(rng, n, lo, hi):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * rng.uniform(lo, hi, n)) @ Q.T


def tanh_map(W, U, X):
    Wt, Ut, Xt = (torch.tensor(a, dtype=DT) for a in (W, U, X))
    return FnLoop(step=lambda h, x: torch.tanh(h @ Wt.T + x @ Ut.T)), Xt


def linear_map(A, Bv):
    At, Bt = torch.tensor(A, dtype=DT), torch.tensor(Bv, dtype=DT)
    return FnLoop(step=lambda h, x: h @ At.T + x), Bt


def transformer_map(B=16, pos=8, d=64, heads=4, seed=0):
    """Tiny post-LN attention + MLP block, output ×0.5 plus an input injection."""
    g = torch.Generator().manual_seed(seed)

    def w(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=DT) * scale / math.sqrt(s[0])

    Wq, Wk, Wv, Wo = (w(d, d) for _ in range(4))
    W1, W2 = w(d, 4 * d), w(4 * d, d)
    x = torch.randn(B, pos, d, generator=g, dtype=DT)
    dh = d // heads

    def ln(h):
        return torch.nn.functional.layer_norm(h, (d,))

    def step(h, x):
        b = h.shape[0]
        q = (h @ Wq).view(b, pos, heads, dh).transpose(1, 2)
        k = (h @ Wk).view(b, pos, heads, dh).transpose(1, 2)
        v = (h @ Wv).view(b, pos, heads, dh).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
        h1 = ln(h + a.transpose(1, 2).reshape(b, pos, d) @ Wo)
        h2 = ln(h1 + torch.nn.functional.gelu(h1 @ W1) @ W2)
        return 0.5 * h2 + x

    return FnLoop(step=step), x


def suite(quick: bool):
    n, B = (128, 16) if quick else (256, 32)
    rng = np.random.default_rng(0)
    out = []
    for norm in (0.5, 0.9, 0.99, 1.5):
        W = _gauss_norm(rng, n, norm)
        U = rng.standard_normal((n, n)) / math.sqrt(n)
        out.append((f"tanh ||W||={norm}", *tanh_map(W, U, rng.standard_normal((B, n))), TOL))
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    U = rng.standard_normal((n, n)) / math.sqrt(n)
    out.append(("tanh 0.99*orthogonal", *tanh_map(0.99 * Q, U, rng.standard_normal((B, n))), TOL))
    loop, x = transformer_map(B=8 if quick else 16)
    out.append(("post-LN block x0.5", loop, x, TOL))
    for lo, hi in ((0.0, 0.9), (0.0, 0.99), (-0.99, 0.99)):
        A = _sym(rng, n, lo, hi)
        out.append(
            (f"linear sym [{lo:g},{hi:g}]", *linear_map(A, rng.standard_normal((B, n))), TOL)
        )
    W = _sym(rng, n, 0.0, 0.99)
    X = rng.standard_normal((B, n))
    out.append(("tanh sym [0,0.99] near-crit", *tanh_map(W, 0.1 * np.eye(n), X), TOL))
    out.append(("same at r_rel<1e-3", *tanh_map(W, 0.1 * np.eye(n), X), 1e-3))
    return out


# ---------------------------------------------------------------------------------------------


def anchors(loop, x, z0, tol, max_iter):
    m = LoopMap(loop, x, state_shape=tuple(z0.shape[1:]), batch_size=z0.shape[0])
    calls = [0]

    def f(h):
        calls[0] += 1
        return m.loop.step(h.view_as(z0), m.ctx).reshape(h.shape)

    res = {}

    def run(name, fn, **kw):
        calls[0] = 0
        out = fn(f, z0.clone(), max_iter=max_iter, tol=tol, stop_mode="rel", **kw)
        x_star = out[0]
        r = (f(x_star) - x_star).flatten(1).norm(dim=1) / (f(x_star).flatten(1).norm(dim=1) + 1e-9)
        calls[0] -= 2
        ok = bool(r.max() < 10 * tol)
        res[name] = (calls[0], ok)

    if HAVE_TD:
        run("td fp_iter", td_fp)
        run("td AA default", td_anderson)
        run("td AA lam1e-8", td_anderson, lam=1e-8)
        run("td Broyden", td_broyden)
    else:
        for name, fn, kw in (
            ("td-eq fp_iter", eq_fixed_point_iter, {}),
            ("td-eq AA default", eq_anderson, {}),
            ("td-eq AA lam1e-8", eq_anderson, {"lam": 1e-8}),
        ):
            calls[0] = 0
            _, nfe = fn(f, z0.clone(), max_iter, tol, **kw)
            res[name] = (nfe, True)
    return res


def ours(loop, x, z0, tol, max_iter, method):
    m = LoopMap(loop, x, state_shape=tuple(z0.shape[1:]), batch_size=z0.shape[0])
    r = solve_map(m, m.flatten(z0), method, tol, max_iter)
    ok = all(s == "converged" for s in r.status)
    return int(r.nfe.max()), float(r.nfe.double().mean()), ok, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="n = 128, B = 16 (smoke run)")
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    label = "torchdeq 0.1 (installed)" if HAVE_TD else "torchdeq-equivalent (re-implemented)"
    print(f"B1 solver suite, NFE to r_rel < tol (batch = max over samples), anchors: {label}\n")
    ratios_best, ratios_aa = [], []
    totals = [0, 0]
    hdr = f"{'map':30s} {'naive':>6s} " + " ".join(
        f"{k:>14s}"
        for k in (
            ["td fp_iter", "td AA default", "td AA lam1e-8", "td Broyden"]
            if HAVE_TD
            else ["td-eq fp_iter", "td-eq AA dflt", "td-eq AA 1e-8"]
        )
    )
    hdr += f" {'ls AA m5':>9s} {'ls Broyden':>10s} {'ls auto':>8s} {'auto mean':>9s}"
    print(hdr)
    for name, loop, x, tol in suite(args.quick):
        z0 = torch.zeros_like(x)
        naive = ours(loop, x, z0, tol, args.max_iter, "picard")
        an = anchors(loop, x, z0, tol, args.max_iter)
        aa5 = ours(loop, x, z0, tol, args.max_iter, "anderson")
        br = ours(loop, x, z0, tol, args.max_iter, Broyden(memory=200))
        auto = ours(loop, x, z0, tol, args.max_iter, "auto")
        cells = [f"{naive[0]:6d}"] + [f"{v[0]:13d}{'' if v[1] else '!'}" for v in an.values()]
        cells += [f"{aa5[0]:9d}", f"{br[0]:10d}", f"{auto[0]:8d}", f"{auto[1]:9.1f}"]
        print(f"{name:30s} " + " ".join(cells))
        anchor_nfe = [naive[0]] + [v[0] for v in an.values() if v[1]]
        ratios_best.append((name, auto[0] / min(anchor_nfe)))
        aa_key = "td AA default" if HAVE_TD else "td-eq AA default"
        ratios_aa.append((name, auto[0] / an[aa_key][0]))
        totals[0] += auto[0]
        totals[1] += an[aa_key][0]
        if not auto[2]:
            print(f"   !! auto did not converge on every sample: {set(auto[3].status)}")
    print("\nratio auto / best anchor (bar <= 1.1) and auto / torchdeq-default AA (bar <= 0.5):")
    for (name, rb), (_, ra) in zip(ratios_best, ratios_aa, strict=True):
        flag = "" if rb <= 1.1 and ra <= 0.5 else "   <-- misses a bar"
        print(f"  {name:30s} {rb:6.3f}   {ra:6.3f}{flag}")
    print(
        f"  max auto/best anchor {max(r for _, r in ratios_best):.3f}; geometric mean auto/td-AA "
        f"{math.exp(np.mean([math.log(r) for _, r in ratios_aa])):.3f}, total NFE ratio "
        f"{totals[0] / totals[1]:.3f}"
    )

    # per-sample masking vs batch-max stopping on a heterogeneous batch
    n, B = (128, 32) if args.quick else (256, 64)
    rng = np.random.default_rng(1)
    rhos = np.linspace(0.5, 0.99, B)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    base = rng.uniform(0, 1, n)
    base[0] = 1.0
    As = torch.tensor(np.stack([(Q * (r * base)) @ Q.T for r in rhos]), dtype=DT)
    b = torch.tensor(rng.standard_normal((B, n)), dtype=DT)
    loop = FnLoop(step=lambda h, x: torch.einsum("bij,bj->bi", x[0], h) + x[1])
    ctx = (As, b)
    z0 = torch.zeros(B, n, dtype=DT)
    print(f"\nheterogeneous batch of {B} linear maps, rho_b in [0.5, 0.99], n = {n}:")
    for method in ("picard", "auto"):
        m = LoopMap(loop, ctx, state_shape=(n,), batch_size=B)
        r = solve_map(m, m.flatten(z0), method, TOL, 5000)
        batch_calls = int(r.nfe.max())
        print(
            f"  {method:7s} per-sample NFE mean {r.nfe.double().mean():7.1f}   batch-max stopping "
            f"would cost {batch_calls} per sample -> waste {batch_calls / r.nfe.double().mean():.2f}x"
        )
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
