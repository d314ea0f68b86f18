"""Capture overhead: loopscope every-iteration recording vs the bare forward, TransformerLens's
last-only cache and nnsight's every-iteration save.

Runs the same looped block (attention + MLP, weight-tied, T iterations, 4 hook points) four ways:

* the bare forward (the anchor);
* TransformerLens ``run_with_cache`` (keeps only the **last** firing of each hook);
* ``loopscope.unroll(..., capture=...)`` (keeps **every** firing, copied: clone-on-record);
* nnsight 0.8 (``tracer.iter[:T]`` and ``.save()`` on each hook's output, every firing, as
  references to the model's own tensors: no copy), when nnsight is installed;
* the copies alone: four bare TransformerLens hooks, each copying its firing into a row of a
  buffer allocated once, outside the timed run (no labels, no guard, no states: the floor that
  recording every firing by copy can reach).

The variants are interleaved in rounds (each round runs every variant ``--per-round`` times, in
rotating order) so machine noise hits all alike. The table gives, against the bare forward, the
ratio of the best-of-N runs (the least disturbed run of each) and the paired ratio: in each round,
the variant's fastest run over the bare forward's fastest run of the same round, the median over
rounds with its interquartile range (a slow stretch of the machine hits both sides of a pair, so
this is the steadier of the two). Then one values check per anchor: TL's cached value equals
loopscope's last firing; nnsight's every firing equals loopscope's.

    python benchmarks/capture.py [--d 256 --pos 64 --batch 8 --iters 8 --rounds 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

import loopscope as ls

NAMES = [
    "block.hook_resid_pre",
    "block.hook_attn_out",
    "block.hook_mlp_out",
    "block.hook_resid_post",
]
TARGET = 1.05  # loopscope every-iteration capture / bare forward, best-of-N and paired
OURS = "loopscope unroll (every firing, copied)"
NNSIGHT = "nnsight 0.8 iter+save (every firing, refs)"


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


def nnsight_every_iteration(model: LoopedToy, x: torch.Tensor, n_iter: int, names=NAMES):
    """A function returning ``{hook: [firing 0, ..., firing T-1]}`` as saved by nnsight, on a copy
    of ``model`` with the same weights (None if nnsight is not installed)."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    # NNsight replaces ``forward`` on every module it wraps, which slows every later call of that
    # module, the bare forward included: it gets its own copy so the other variants stay bare.
    wrapped = NNsight(copy.deepcopy(model))
    envoys = {}
    for n in names:
        e = wrapped
        for part in n.split("."):
            e = getattr(e, part)
        envoys[n] = e

    def run() -> dict[str, list[torch.Tensor]]:
        saved: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        with torch.no_grad(), wrapped.trace(x, n_iter) as tracer:
            for _ in tracer.iter[:n_iter]:
                for n in names:
                    saved[n].append(envoys[n].output.save())
        return saved

    return run


def measure(variants: dict, rounds: int, per_round: int) -> dict[str, dict[str, list[float]]]:
    """``{variant: {"wall": [s, ...], "cpu": [s, ...]}}``: wall-clock and process CPU time of each
    run (CPU time leaves out the time spent waiting for a core on a shared machine)."""
    times = {k: {"wall": [], "cpu": []} for k in variants}
    for fn in variants.values():
        fn()  # warm-up (and nnsight's first-trace compilation)
    keys = list(variants)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            for _ in range(per_round):
                w0, c0 = time.perf_counter(), time.process_time()
                variants[k]()
                times[k]["cpu"].append(time.process_time() - c0)
                times[k]["wall"].append(time.perf_counter() - w0)
    return times


def paired_ratios(runs: list[float], anchor: list[float], per_round: int) -> list[float]:
    """Per round: the fastest of ``runs`` over the fastest of ``anchor`` in the same round."""
    rounds = range(0, len(runs), per_round)
    return [min(runs[i : i + per_round]) / min(anchor[i : i + per_round]) for i in rounds]


def copies_alone(model: LoopedToy, x: torch.Tensor, n_iter: int, names=NAMES):
    """A function running the bare forward with one TL hook per name that copies each firing into
    a row of a buffer allocated here, once: the floor for recording every firing by copy."""
    bufs = {n: torch.empty(n_iter, *x.shape) for n in names}

    def run() -> None:
        count = dict.fromkeys(names, 0)

        def copy_into(a, hook):
            bufs[hook.name][count[hook.name]].copy_(a)
            count[hook.name] += 1

        for n in names:
            model.hook_dict[n].add_hook(copy_into)
        try:
            with torch.no_grad():
                model(x, n_iter)
        finally:
            model.reset_hooks()

    return run


def variants_for(model: LoopedToy, x: torch.Tensor, n_iter: int) -> dict:
    """``{name: fn}``: every way of running the model measured here (nnsight's when installed)."""

    def bare():
        with torch.no_grad():
            model(x, n_iter)

    def tl_cache():
        with torch.no_grad():
            model.run_with_cache(x, n_iter, names_filter=NAMES)

    def loopscope_all():
        ls.unroll(model, x, n_iter, capture=NAMES)

    variants = {
        "bare forward (anchor)": bare,
        "TL run_with_cache (last firing only)": tl_cache,
        OURS: loopscope_all,
        "the copies alone (4 hooks, static buffers)": copies_alone(model, x, n_iter),
    }
    nns = nnsight_every_iteration(model, x, n_iter)
    if nns is not None:
        variants[NNSIGHT] = nns
    return variants


def table(times: dict, per_round: int) -> dict:
    """Per variant and clock: best and median ms and their ratios to the bare forward, plus the
    paired wall-clock ratio (median and IQR over rounds); printed as it is built."""
    anchor = times["bare forward (anchor)"]
    rows = {}
    for k, v in times.items():
        row = {}
        for clock in ("wall", "cpu"):
            best, med = min(v[clock]), statistics.median(v[clock])
            row[clock] = {"best_ms": best * 1e3, "median_ms": med * 1e3,
                          "ratio_best": best / min(anchor[clock]),
                          "ratio_median": med / statistics.median(anchor[clock])}  # fmt: skip
        pairs = paired_ratios(v["wall"], anchor["wall"], per_round)
        q1, q2, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
        row["wall"] |= {"ratio_paired": q2, "ratio_paired_iqr": [q1, q3]}
        rows[k] = row
        w, c = row["wall"], row["cpu"]
        print(
            f"  {k:44s} wall best {w['best_ms']:7.2f} ms x{w['ratio_best']:5.3f}, paired "
            f"x{q2:5.3f} (IQR {q1:5.3f}-{q3:5.3f})   cpu best {c['best_ms']:7.2f} ms "
            f"x{c['ratio_best']:5.3f}"
        )
    return rows


def values_check(model: LoopedToy, x: torch.Tensor, n_iter: int, nns) -> tuple:
    """Max abs differences: TL's cached value vs loopscope's last firing, nnsight's every firing
    vs loopscope's (None without nnsight); printed."""
    tr = ls.unroll(model, x, n_iter, capture=NAMES)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, n_iter, names_filter=NAMES)
    tl_diff = max((tr[n][-1] - cache[n]).abs().max().item() for n in NAMES)
    print(f"  TL cached value == loopscope last firing: max |diff| {tl_diff:.3g}")
    if nns is None:
        print("  nnsight not installed (pip install -e '.[bench]'): its row is skipped")
        return tl_diff, None
    saved = nns()
    nn_diff = max((torch.stack(saved[n]) - tr[n]).abs().max().item() for n in NAMES)
    print(
        f"  nnsight every firing == loopscope every firing ({n_iter} per hook): "
        f"max |diff| {nn_diff:.3g}"
    )
    return tl_diff, nn_diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--pos", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LoopedToy(args.d, 4).eval()
    x = torch.randn(args.batch, args.pos, args.d)
    variants = variants_for(model, x, args.iters)
    times = measure(variants, args.rounds, args.per_round)
    n = len(times["bare forward (anchor)"]["wall"])
    print(
        f"looped block d={args.d} pos={args.pos} batch={args.batch} T={args.iters}, "
        f"{len(NAMES)} hooks, threads={torch.get_num_threads()}, best of {n} interleaved runs "
        "per variant (wall clock; process CPU time beside it)"
    )
    rows = table(times, args.per_round)
    tl_diff, nn_diff = values_check(model, x, args.iters, variants.get(NNSIGHT))
    ours = rows[OURS]
    ratio, paired = ours["wall"]["ratio_best"], ours["wall"]["ratio_paired"]
    verdict = "met" if max(ratio, paired) <= TARGET else "NOT met"
    print(
        f"  loopscope every-iteration capture x{ratio:.3f} the bare forward best-of-{n} wall, "
        f"x{paired:.3f} paired (target <= x{TARGET} on both): {verdict}; "
        f"CPU time x{ours['cpu']['ratio_best']:.3f}"
    )
    if args.json:
        result = {"config": vars(args) | {"json": None}, "rows": rows, "threads":
                  torch.get_num_threads(), "tl_max_abs_diff": tl_diff,
                  "nnsight_max_abs_diff": nn_diff}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
