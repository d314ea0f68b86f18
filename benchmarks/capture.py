"""Capture overhead: loopscope per-iteration recording vs TransformerLens last-only caching.

Runs the same looped block (attention + MLP, weight-tied, T iterations) three ways, interleaved
in blocks so machine noise hits all variants alike, and prints medians and ratios against the
bare forward (the anchor). TL's ``run_with_cache`` keeps only the last firing of each hook;
loopscope keeps every firing, so the interesting number is the ratio of the two.

    python benchmarks/capture.py [--d 256 --pos 64 --batch 8 --iters 8 --reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

import loopscope as ls


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.hook_resid_pre, self.hook_attn_out = HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x):
        x = self.hook_resid_pre(x)
        a = self.hook_attn_out(self.attn(x, x, x, need_weights=False)[0])
        x = self.n1(x + a)
        x = self.n2(x + self.hook_mlp_out(self.mlp(x)))
        return self.hook_resid_post(x)


class LoopedToy(ls.Loop):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.block = Block(d, heads)
        self.setup()

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        return self.block(h + ctx)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LoopedToy(args.d, 4).eval()
    x = torch.randn(args.batch, args.pos, args.d)
    names = [
        "block.hook_resid_pre",
        "block.hook_attn_out",
        "block.hook_mlp_out",
        "block.hook_resid_post",
    ]

    def bare():
        with torch.no_grad():
            model(x, args.iters)

    def tl_cache():
        with torch.no_grad():
            model.run_with_cache(x, args.iters, names_filter=names)

    def loopscope_all():
        ls.unroll(model, x, args.iters, capture=names)

    variants = {
        "bare forward (anchor)": bare,
        "TL run_with_cache (last only)": tl_cache,
        "loopscope unroll (every iteration)": loopscope_all,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(max(1, args.reps // 5)):
        for k, fn in variants.items():
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["bare forward (anchor)"])
    tl = statistics.median(times["TL run_with_cache (last only)"])
    print(
        f"looped block d={args.d} pos={args.pos} batch={args.batch} T={args.iters}, 4 hooks, threads={torch.get_num_threads()}"
    )
    for k, v in times.items():
        m = statistics.median(v)
        print(
            f"  {k:38s} median {m * 1e3:8.2f} ms   x{m / base:5.2f} vs bare   x{m / tl:5.2f} vs TL cache"
        )
    tr = ls.unroll(model, x, args.iters, capture=names)
    _, cache = model.run_with_cache(x, args.iters, names_filter=names)
    same = all(torch.allclose(tr[n][-1], cache[n], atol=1e-5) for n in names)
    print(
        f"  loopscope keeps {args.iters} firings per hook; TL keeps 1 (TL value == loopscope last firing: {same})"
    )


if __name__ == "__main__":
    main()
