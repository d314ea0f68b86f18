"""Full (iteration x position) patching sweep: loopscope's batched patch_sweep vs one forward per
patch through plain TransformerLens hooks (a counting patch hook with ``run_with_hooks``).

    python benchmarks/patching.py [--model s3_fprm --n 4 --length 12]

Prints both wall times, the speed ratio and the largest difference between the two sets of numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from loopscope import tasks, zoo
from loopscope.circuits import patch_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="s3_fprm")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--length", type=int, default=12)
    args = ap.parse_args()
    model = zoo.load(args.model).double()
    task = tasks.get("s3", train_len=(args.length, args.length))
    b = task.sample(args.n, "id", seed=0)
    clean, corrupt = b.tokens, b.tokens.clone()
    corrupt[:, 3] = corrupt[:, 3] % 5 + 1
    T = 2 * args.length
    site = "core.blocks.0.hook_resid_pre"

    def metric(lg, i):
        return lg[:, -1].log_softmax(-1).gather(-1, b.targets[i, -1:])[:, 0]

    t0 = time.perf_counter()
    fast = patch_sweep(model, clean, corrupt, [site], "all", metric, n_iter=T, seed=0)
    t_fast = time.perf_counter() - t0

    # anchor: one forward per (iteration, position, example) through TL's run_with_hooks
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h0_clean = model.init_state(model.encode(clean), torch.Generator().manual_seed(0))
        h0_corr = model.init_state(model.encode(corrupt), torch.Generator().manual_seed(0))
    del gen
    store = []
    with torch.no_grad():
        hooks = [(site, lambda x, hook: store.append(x.clone()))]
        model.run_with_hooks(clean, T, h0_clean, fwd_hooks=hooks)
    clean_acts = torch.stack(store)
    t0 = time.perf_counter()
    slow = []
    for r in fast.itertuples():
        count = [0]

        def patch(x, hook, t=r.iteration, p=r.position, e=r.example, count=count):
            k = count[0]
            count[0] += 1
            if k != t:
                return None
            out = x.clone()
            out[:, p] = clean_acts[t][e : e + 1, p]
            return out

        with torch.no_grad():
            lg = model.run_with_hooks(
                corrupt[r.example : r.example + 1],
                T,
                h0_corr[r.example : r.example + 1],
                fwd_hooks=[(site, patch)],
            )
        slow.append(metric(lg, torch.tensor([r.example])).item())
    t_slow = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(fast["metric"], slow, strict=True))
    print(
        f"sweep: {args.model}, {T} iterations x {args.length + 1} positions x {args.n} examples = {len(fast)} patches (float64)"
    )
    print(f"  loopscope batched patch_sweep      {t_fast:8.2f} s")
    print(f"  one forward per patch (TL hooks)   {t_slow:8.2f} s")
    print(f"  speed-up x{t_slow / t_fast:.1f}; max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
