"""Probes at every iteration: loopscope's one batched ridge solve vs a scikit-learn
LogisticRegression loop over iterations (the anchor), on the same activations and split.

    python benchmarks/probes.py [--iterations 32 --n 1024]

Prints wall times, the speed ratio and the mean accuracy of both (scikit-learn is a test extra).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import loopscope as ls
from loopscope import tasks, zoo
from loopscope.probes import fit_probes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--position", type=int, default=12)
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression

    model = zoo.load("s3_fprm")
    b = tasks.get("s3", train_len=(16, 16)).sample(args.n, "id", seed=0)
    tr = ls.unroll(model, b.tokens, args.iterations, seed=0)
    X = tr.states[1:, :, args.position].double()  # [T, N, d]
    y = b.targets[:, args.position]
    t0 = time.perf_counter()
    res = fit_probes(X, y, seed=0)
    t_ours = time.perf_counter() - t0
    tr_idx = np.setdiff1d(np.arange(args.n), res.test_index.numpy())
    te_idx = res.test_index.numpy()
    t0 = time.perf_counter()
    sk = []
    for t in range(X.shape[0]):
        Xt = X[t].numpy()
        mu, sd = Xt[tr_idx].mean(0), Xt[tr_idx].std(0) + 1e-8
        clf = LogisticRegression(C=1.0, max_iter=500).fit((Xt[tr_idx] - mu) / sd, y[tr_idx].numpy())
        sk.append(clf.score((Xt[te_idx] - mu) / sd, y[te_idx].numpy()))
    t_sk = time.perf_counter() - t0
    ours = res.test_acc.numpy()
    print(f"probes: {X.shape[0]} iterations, N={args.n}, d={X.shape[2]}, position {args.position}")
    print(
        f"  loopscope batched ridge (one solve)     {t_ours:8.3f} s   mean test acc {ours.mean():.3f}"
    )
    print(
        f"  scikit-learn LogisticRegression loop    {t_sk:8.3f} s   mean test acc {np.mean(sk):.3f}"
    )
    print(
        f"  speed-up x{t_sk / t_ours:.1f}; largest per-iteration accuracy gap {np.max(np.abs(ours - np.array(sk))):.3f}"
    )


if __name__ == "__main__":
    main()
