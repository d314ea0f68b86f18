"""Steps and wall time to reach 99% ID token accuracy on S3 (FPRM recipe), next to the zoo card.

    python benchmarks/train.py [--max-steps 3000 --every 100]

Trains the s3_fprm recipe from scratch, evaluates every ``--every`` steps, stops at 99% ID token
accuracy and prints the step, the wall time and the shipped card's figures for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from loopscope import tasks, zoo
from loopscope.train import evaluate, train
from loopscope.zoo.recipes import RECIPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args()
    recipe = RECIPES["s3_fprm"]
    task = tasks.get("s3")
    done, wall, reached = 0, 0.0, None
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg = dataclasses.replace(recipe.train, steps=args.max_steps)
        while done < args.max_steps:
            t0 = time.perf_counter()
            model, _ = train(cfg, out_dir=d, progress=False, stop_after=args.every)
            wall += time.perf_counter() - t0
            done = min(args.max_steps, done + args.every)
            acc = evaluate(model, task, "id", n=512, iter_factor=2.0)
            print(
                f"  step {done:5d}  wall {wall:7.1f} s  ID token acc {acc['token_acc']:.4f}",
                flush=True,
            )
            if acc["token_acc"] >= 0.99:
                reached = (done, wall)
                break
    card = zoo.card("s3_fprm")
    print(f"threads={torch.get_num_threads()}")
    if reached:
        print(
            f"99% ID token accuracy on S3 after {reached[0]} steps, {reached[1]:.0f} s (target: under 300 s)"
        )
    else:
        print(f"99% not reached within {args.max_steps} steps ({wall:.0f} s)")
    print(
        f"zoo card s3_fprm: {card['steps']} steps, {card['wall_s']} s, ID {card['accuracy']['id']}"
    )


if __name__ == "__main__":
    main()
