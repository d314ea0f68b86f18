"""Full (iteration x position) patching sweep: loopscope's batched ``patch_sweep`` vs one forward
per patch through plain TransformerLens hooks (``run_with_hooks`` with a counting patch hook).

    python benchmarks/patching.py [--iters 12 --pos 12 --n 4 --d-model 32 --site hook_state]
    python benchmarks/patching.py --zoo s3_fprm      # a shipped LoopedTransformer instead

The default Loop is :class:`loopscope.circuits.toys.TinyLoopedTransformer` (attention + MLP,
input injection; per-example batched matmuls), whose rows do not depend on the batch they are in:
the two sets of numbers must then agree bit for bit (max |difference| = 0). On a zoo model the
BLAS matmuls tile by batch size and differences of a few ulps are expected.

Prints both wall times, the speed ratio and the largest difference between the two sets of numbers.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from loopscope.circuits import patch_sweep, toys


def _model(args: argparse.Namespace):
    if args.zoo:
        from loopscope import tasks, zoo

        model = zoo.load(args.zoo).double().eval()
        task = tasks.get("s3", train_len=(args.pos - 1, args.pos - 1))
        b = task.sample(args.n, "id", seed=args.seed)
        clean = b.tokens
        vocab = task.vocab_size
    else:
        model = toys.TinyLoopedTransformer(
            vocab_size=16,
            n_ctx=args.pos,
            d_model=args.d_model,
            n_heads=4,
            d_mlp=2 * args.d_model,
            seed=args.seed,
        ).eval()
        g = torch.Generator().manual_seed(args.seed)
        clean = torch.randint(0, 16, (args.n, args.pos), generator=g)
        vocab = 16
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % vocab
    return model, clean, corrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--pos", type=int, default=12)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--site", default="hook_state")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--zoo", default=None, help="zoo model name (s3 task) instead of the toy")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI box is shared)")
    ap.add_argument("--repeats", type=int, default=3, help="timed batched runs (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, clean, corrupt = _model(args)
    T, site = args.iters, args.site

    def metric(lg: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return lg[:, -1].double().log_softmax(-1)[:, 0]

    def sweep():
        return patch_sweep(
            model,
            clean,
            corrupt,
            [site],
            "all",
            metric,
            n_iter=T,
            batch_size=args.batch_size,
            seed=args.seed,
        ).frame

    # warm-up (first-call allocations), then the median of a few timed runs: the batched sweep
    # is short, so one burst of load on the shared box would otherwise dominate its timing
    sweep()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fast = sweep()
        times.append(time.perf_counter() - t0)
    t_fast = float(np.median(times))

    # anchor: one forward per (iteration, position, example) through TL's run_with_hooks
    with torch.no_grad():
        gen = torch.Generator().manual_seed(args.seed)
        h0 = model.init_state(model.encode(corrupt), gen)
        store: list[torch.Tensor] = []
        model.run_with_hooks(
            clean,
            T,
            model.init_state(model.encode(clean), torch.Generator().manual_seed(args.seed)),
            fwd_hooks=[(site, lambda x, hook: store.append(x.clone()))],
        )
    clean_acts = torch.stack(store)  # [T, B, pos, d]
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
            out[:, p] = clean_acts[t][e, p]
            return out

        with torch.no_grad():
            lg = model.run_with_hooks(
                corrupt[r.example : r.example + 1],
                T,
                h0[r.example : r.example + 1],
                fwd_hooks=[(site, patch)],
            )
        slow.append(metric(lg, torch.tensor([r.example])).item())
    t_slow = time.perf_counter() - t0
    diff = max(abs(a - b) for a, b in zip(fast["metric"], slow, strict=True))
    name = args.zoo or f"TinyLoopedTransformer(d_model={args.d_model})"
    print(
        f"sweep: {name}, site {site}, {T} iterations x {clean.shape[1]} positions x {len(clean)} "
        f"examples = {len(fast)} patches (float64, {args.threads} thread(s))"
    )
    print(f"  loopscope batched patch_sweep      {t_fast:8.2f} s (median of {args.repeats})")
    print(f"  one forward per patch (TL hooks)   {t_slow:8.2f} s")
    print(f"  speed-up x{t_slow / t_fast:.1f}; max |difference| = {diff:.2e}")


if __name__ == "__main__":
    main()
