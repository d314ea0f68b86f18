"""CLI start-up: ``loopscope --help`` and ``--version`` against a bare ``python -c pass``.

The command line imports torch, TransformerLens and the analyses only inside the command that
needs them, so asking for help or the version pays for Python, Typer and Rich alone (target:
under 1 s). Best of ``--repeat`` runs of each, interleaved, as fresh processes:

    python benchmarks/cli_startup.py [--repeat 5]

Prints one line per command: seconds and the difference to ``python -c pass``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time


def _best(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    exe = shutil.which("loopscope")
    cli = [exe] if exe else [sys.executable, "-m", "loopscope"]
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "loopscope --help": [*cli, "--help"],
        "loopscope --version": [*cli, "--version"],
        "loopscope stability --help": [*cli, "stability", "--help"],
    }
    best = {k: float("inf") for k in cases}
    for _ in range(args.repeat):  # interleaved: a busy moment hits every case alike
        for name, cmd in cases.items():
            best[name] = min(best[name], _best(cmd, 1))
    base = best["python -c pass"]
    for name, t in best.items():
        extra = "" if name == "python -c pass" else f"  (+{t - base:.3f} s over python -c pass)"
        print(f"{name:28s} {t:.3f} s{extra}")


if __name__ == "__main__":
    main()
