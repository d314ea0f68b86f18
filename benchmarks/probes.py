"""Probes at every iteration and site: loopscope's ONE batched L2-logistic fit vs a scikit-learn
``LogisticRegression`` loop over (iteration, site) — the anchor — on the same activations,
standardisation, split and objective (C = 1).

Activations come from the zoo S3 model (d = 64): ``--iterations`` x 4 sites (state, resid_mid,
mlp_out, core out) at one position, N sequences (``--data synthetic``: planted class means of
rising strength, same sizes). Two targets: the running group element (6 classes, multinomial)
and a binary function of it. ``solver="auto"`` picks Newton or L-BFGS with Kronecker-factored
curvature per problem (see :mod:`loopscope.probes.logistic`); the line says which.

    python benchmarks/probes.py [--iterations 32 --n 2000 --threads 1 --repeat 3 --data zoo|synthetic]

Prints, side by side, wall times, the speed ratio vs the scikit-learn loop (target >= 5x) and
the per-site accuracy gap (target: mean within 0.3 points) for the batched logistic fit (float64
and float32), each timed ``--repeat`` times interleaved with the anchor (the ratio of the fastest
runs, and every run's ratio: a shared machine is noisy), and the closed-form batched ridge
(float64, and float32 passes over float32 activations); the ridge also against its like-for-like
anchor, a scikit-learn ``RidgeClassifier`` loop (same estimator, same alpha: equal accuracy by
construction). Both sides run single-threaded by default (set before numpy / torch load), so
the ratio measures the algorithm, not the thread count. scikit-learn is a bench/test extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _threads_from_argv() -> str:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "1"


for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, _threads_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402

import loopscope as ls  # noqa: E402
from loopscope import tasks, zoo  # noqa: E402
from loopscope.probes import collect, fit_probes  # noqa: E402

SITES = [
    "state",
    "core.blocks.0.hook_resid_mid",
    "core.blocks.0.hook_mlp_out",
    "core.hook_out",
]


def sklearn_loop(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, C: float):
    from sklearn.linear_model import LogisticRegression

    acc = []
    for s in range(X.shape[0]):
        mu, sd = X[s, tr].mean(0), X[s, tr].std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        clf = LogisticRegression(C=C, max_iter=1000)
        clf.fit((X[s, tr] - mu) / sd, y[tr])
        acc.append(clf.score((X[s, te] - mu) / sd, y[te]))
    return np.asarray(acc)


def sklearn_ridge_loop(X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, alpha: float):
    """The like-for-like anchor of the batched ridge: ``RidgeClassifier`` (±1 one-vs-rest
    targets, unpenalised intercept, the same alpha) on the same train-fold standardisation."""
    from sklearn.linear_model import RidgeClassifier

    acc = []
    for s in range(X.shape[0]):
        mu, sd = X[s, tr].mean(0), X[s, tr].std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        clf = RidgeClassifier(alpha=alpha)
        clf.fit((X[s, tr] - mu) / sd, y[tr])
        acc.append(clf.score((X[s, te] - mu) / sd, y[te]))
    return np.asarray(acc)


def synthetic(S: int, N: int, d: int, K: int = 6, seed: int = 0):
    """Class means along random directions whose strength ramps up with the site index
    (chance at site 0, well separated at the last), anisotropic Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    means = torch.randn(K, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    strength = torch.linspace(0, 1.5, S, dtype=torch.float64)
    noise = torch.randn(S, N, d, generator=g, dtype=torch.float64) @ mix
    return strength[:, None, None] * means[y] + noise, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--position", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--data", choices=["zoo", "synthetic"], default="zoo")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.data == "zoo":
        model = zoo.load("s3_fprm")
        b = tasks.get("s3", train_len=(16, 16)).sample(args.n, "id", seed=0)
        # one extra step so every site has iterations 1..T (block hooks fire at t = 0..T-1)
        # ~0.8 GiB of captures: above the guard's default share of free memory on a busy box
        tr_ = ls.unroll(
            model, b.tokens, args.iterations + 1, seed=0, capture=SITES[1:], max_bytes=2**31
        )
        its = range(1, args.iterations + 1)
        acts = collect(tr_, SITES, positions=[args.position], iterations=its)
        X = acts.X[:, :, 0].double()  # [S, N, d]
        y6 = b.targets[:, args.position]
    else:
        X, y6 = synthetic(args.iterations * len(SITES), args.n, 64)
    S, N, d = X.shape
    targets = {"6-class (multinomial)": y6, "binary": (y6 < 3).long()}

    # warm-up: first-call costs (lazy imports in torch.optim, BLAS init) are not the algorithm
    fit_probes(X[:2, :200], y6[:200], probe="logistic")
    sklearn_loop(X[:1, :200].numpy(), y6[:200].numpy(), np.arange(150), np.arange(150, 200), 1.0)

    print(
        f"probes ({args.data}): {S} sites ({args.iterations} iterations x {len(SITES)} sites), N={N}, d={d}"
    )
    print(f"        position {args.position}, C={args.C}, threads={args.threads}")
    for name, y in targets.items():
        t_sk, t_64, t_32 = [], [], []
        for _ in range(args.repeat):  # interleaved: load on a shared machine hits both sides
            t0 = time.perf_counter()
            res = fit_probes(X, y, probe="logistic", C=args.C, seed=0)
            t_64.append(time.perf_counter() - t0)
            tr, te = (i.numpy() for i in res.folds[0])
            t0 = time.perf_counter()
            sk = sklearn_loop(X.numpy(), y.numpy(), tr, te, args.C)
            t_sk.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res32 = fit_probes(X, y, probe="logistic", C=args.C, seed=0, dtype="float32")
            t_32.append(time.perf_counter() - t0)
        ours = res.test_acc[0].numpy()
        t_sk_min, t_ours, t_32_min = min(t_sk), min(t_64), min(t_32)
        per_run = " ".join(f"x{a / b:.1f}" for a, b in zip(t_sk, t_64, strict=True))
        t0 = time.perf_counter()
        ridge = fit_probes(X, y, probe="ridge", seed=0)
        t_ridge = time.perf_counter() - t0
        X32 = X.float()  # activations as a model stores them; the conversion is not timed
        t0 = time.perf_counter()
        ridge32 = fit_probes(X32, y, probe="ridge", seed=0, dtype="float32")
        t_ridge32 = time.perf_counter() - t0
        t0 = time.perf_counter()
        skr = sklearn_ridge_loop(X.numpy(), y.numpy(), tr, te, 1.0)
        t_skr = time.perf_counter() - t0
        gap_r32 = np.abs(ridge32.test_acc[0].numpy() - sk)
        gap = np.abs(ours - sk)
        gap32 = np.abs(res32.test_acc[0].numpy() - sk)
        gap_r = np.abs(ridge.test_acc[0].numpy() - sk)
        print(f"\n  target: {name} (logistic solver: {res.meta['solver']})")
        rows = [
            ("loopscope batched logistic float64", t_ours, ours.mean(), gap),
            ("loopscope batched logistic float32", t_32_min, res32.accuracy.mean(), gap32),
            ("loopscope batched ridge (closed form)", t_ridge, ridge.accuracy.mean(), gap_r),
            ("loopscope batched ridge float32 passes", t_ridge32, ridge32.accuracy.mean(), gap_r32),
        ]
        print(
            f"    {'scikit-learn LogisticRegression loop':40s} {t_sk_min:7.2f} s   acc {sk.mean():.4f}"
        )
        for label, t, acc, g in rows:
            print(
                f"    {label:40s} {t:7.2f} s   acc {acc:.4f}   x{t_sk_min / t:5.1f} vs sklearn   "
                f"acc gap mean {g.mean() * 100:.2f} / max {g.max() * 100:.2f} points"
            )
        print(f"    batched logistic float64 vs sklearn, each of {args.repeat} runs: {per_run}")
        # like for like: the same ridge estimator, one scikit-learn fit per site
        for label, res_r, t in (
            ("loopscope batched ridge (closed form)", ridge, t_ridge),
            ("loopscope batched ridge float32 passes", ridge32, t_ridge32),
        ):
            g = np.abs(res_r.test_acc[0].numpy() - skr)
            print(
                f"    {label:40s} x{t_skr / t:5.1f} vs a scikit-learn RidgeClassifier loop "
                f"({t_skr:.2f} s, acc {skr.mean():.4f}); acc gap mean {g.mean() * 100:.2f} / "
                f"max {g.max() * 100:.2f} points"
            )


if __name__ == "__main__":
    main()
