"""loopscope's own Python per iteration and per recorded firing, on a block small enough (d = 16,
4 tokens, batch 2) that the model's arithmetic is a few µs and what ``unroll`` adds stands out.

Times, with ``torch.utils.benchmark``, the bare forward, ``unroll`` without capture and ``unroll``
capturing the 4 hooks of ``benchmarks/capture.py``, each at two loop lengths, side by side in one
run. The differences between the lengths give the cost per iteration (``unroll`` over the bare
forward) and per recorded firing (capture over no capture); the hook call that PyTorch and
TransformerLens make for any forward hook is measured the same way, with a hook doing nothing.

    python benchmarks/capture_python.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from capture import NAMES, LoopedToy
from torch.utils.benchmark import Timer

import loopscope as ls

SHORT, LONG = 2, 10  # loop lengths; their difference cancels the per-call costs


def costs(model: LoopedToy, x: torch.Tensor) -> dict[str, float]:
    """µs per iteration of ``unroll`` over the bare forward, µs per recorded firing, and µs per
    firing of a TL hook that does nothing."""

    def bare(n_iter):
        with torch.no_grad():
            model(x, n_iter)

    def noop_hooks(n_iter):
        for n in NAMES:
            model.hook_dict[n].add_hook(lambda a, hook: None)
        try:
            bare(n_iter)
        finally:
            model.reset_hooks()

    runs = {
        "bare": bare,
        "noop": noop_hooks,
        "unroll": lambda n: ls.unroll(model, x, n),
        "capture": lambda n: ls.unroll(model, x, n, capture=NAMES),
    }
    t = {(k, n): Timer("f(n)", globals={"f": f, "n": n}).blocked_autorange(min_run_time=1).median
         for n in (SHORT, LONG) for k, f in runs.items()}  # fmt: skip
    per_iter = {k: (t[k, LONG] - t[k, SHORT]) / (LONG - SHORT) for k in runs}
    firings = len(NAMES)
    return {
        "unroll_us_per_iteration": (per_iter["unroll"] - per_iter["bare"]) * 1e6,
        "capture_us_per_firing": (per_iter["capture"] - per_iter["unroll"]) / firings * 1e6,
        "hook_call_us_per_firing": (per_iter["noop"] - per_iter["bare"]) / firings * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LoopedToy(16, 4).eval()
    x = torch.randn(2, 4, 16)
    runs = [costs(model, x) for _ in range(args.repeats)]
    print(f"d=16 pos=4 batch=2, {len(NAMES)} hooks, threads={torch.get_num_threads()}, "
          f"{args.repeats} repeats (median, range)")  # fmt: skip
    for key in runs[0]:
        v = [r[key] for r in runs]
        print(f"  {key:26s} {statistics.median(v):6.1f} us  ({min(v):.1f}-{max(v):.1f})")


if __name__ == "__main__":
    main()
