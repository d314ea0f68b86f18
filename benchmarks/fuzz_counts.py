"""Run the catalog of bad inputs (tests/fuzz_catalog.py) against the Python API and the command
line and print the counts: tried / one-line error / warning / unclear / raw traceback / silent.

    python benchmarks/fuzz_counts.py            # a Markdown table (docs/reliability.md)
    python benchmarks/fuzz_counts.py --verbose  # also every case that is not a clean refusal
    python benchmarks/fuzz_counts.py --json     # the counts as JSON

A one-line error is a LoopscopeError of the expected type (CLI: exit code 2) whose single-line
message names the argument; a warning counts for cases where the input is legal but surely not
meant (an intervention at an iteration the run never reaches). "Unclear" is a clean refusal whose
message is several lines or does not name the argument; "raw" is any other exception (CLI: exit
code 1 or a traceback); "silent" returned normally with nothing said. Runs in under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_catalog as fc  # noqa: E402

COLUMNS = [
    ("tried", "tried"),
    ("error", "one-line error"),
    ("warning", "warning"),
    ("unclear", "unclear error"),
    ("raw", "raw traceback"),
    ("silent", "silent"),
]


def run(kind: str, verbose: bool) -> dict[str, int]:
    cases = fc.API_CASES if kind == "API" else fc.CLI_CASES
    outcome = fc.outcome_api if kind == "API" else fc.outcome_cli
    results = []
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            got, message = outcome(case, Path(tmp))
        results.append(got)
        if verbose and got not in ("error", "warning"):
            print(f"[{kind} {got}] {case.name}: {message[:200]}", file=sys.stderr)
    return fc.counts(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="print every case not cleanly refused")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # the library's own warnings are counted per case
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    table = {kind: run(kind, args.verbose) for kind in ("API", "CLI")}
    wall = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**table, "wall_s": round(wall, 1)}, indent=1))
        return
    print("| surface | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for kind, c in table.items():
        print(f"| {kind} | " + " | ".join(str(c[key]) for key, _ in COLUMNS) + " |")
    print(f"\n({wall:.0f} s)")


if __name__ == "__main__":
    main()
