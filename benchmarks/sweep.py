"""Wall time of a study grid on Ray with 2 workers vs sequentially in-process, side by side.

    python benchmarks/sweep.py [--study studies/architecture.toml] [--full] [--workers 2]

Runs the study's ``--quick`` grid (4 train-then-analyse jobs) twice from scratch in temporary
folders: once in this process, one job after another (``backend="sequential"``), once as Ray
tasks on a local Ray with ``--workers`` CPUs (``backend="ray"``). Prints both wall times, their
ratio, the Ray start-up time, the busiest worker's share of the job time (what 2 workers can at
best reach), and checks that both runs give the same table (timing columns aside). The machine's
load average is printed too: on a shared machine it limits the speed-up more than Ray does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from loopscope.experiments.grid import load_study
from loopscope.experiments.sweep import run_sweep

TIMES = ["wall_s", "train_s", "analysis_s"]


def _lpt(times: list[float], workers: int) -> float:
    """Makespan of the jobs in study order on ``workers`` (each job goes to the first free one):
    the best wall time ``workers`` processes can reach with no overhead at all."""
    free = [0.0] * workers
    for t in times:
        i = free.index(min(free))
        free[i] += t
    return max(free)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--study", default="studies/architecture.toml")
    ap.add_argument("--full", action="store_true", help="the full grid instead of --quick")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    import ray

    study = load_study(args.study, quick=not args.full)
    n = len(study.jobs)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        seq = run_sweep(study, out=Path(tmp) / "seq", backend="sequential", progress=False)
        t_seq = time.perf_counter() - t0
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # as the sweep's own Ray
        t0 = time.perf_counter()
        ray.init(
            num_cpus=args.workers,
            object_store_memory=100 * 1024**2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
        t_init = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            par = run_sweep(
                study, out=Path(tmp) / "ray", backend="ray", max_parallel=args.workers,
                progress=False,
            )  # fmt: skip
            t_ray = time.perf_counter() - t0
        finally:
            ray.shutdown()
    load1 = os.getloadavg()[0]
    a = seq.to_frame().drop(columns=TIMES, errors="ignore")
    b = par.to_frame().drop(columns=TIMES, errors="ignore")
    same = a.reset_index(drop=True).equals(b.reset_index(drop=True))
    job_seq = seq.to_frame()["wall_s"].tolist()
    job_ray = par.to_frame()["wall_s"].tolist()
    ideal = _lpt(job_seq, args.workers)
    print(
        f"study {study.name} ({'full' if args.full else 'quick'}): {n} jobs, {args.workers} Ray workers"
    )
    print(f"load average {load0:.1f} at the start, {load1:.1f} at the end, {os.cpu_count()} CPUs")
    table = pd.DataFrame(
        {
            "backend": ["sequential in-process", f"Ray, {args.workers} workers"],
            "wall_s": [round(t_seq, 1), round(t_ray, 1)],
            "wall_s_with_ray_init": [round(t_seq, 1), round(t_ray + t_init, 1)],
            "sum_of_job_wall_s": [round(sum(job_seq), 1), round(sum(job_ray), 1)],
        }
    )
    print(table.to_string(index=False))
    print(
        f"speed-up sequential / Ray: {t_seq / t_ray:.2f}x ({t_seq / (t_ray + t_init):.2f}x with ray.init {t_init:.1f} s)"
    )
    print(
        f"best possible on {args.workers} workers with these job times: "
        f"{t_seq / ideal:.2f}x (makespan {ideal:.1f} s of {sum(job_seq):.1f} s); "
        f"each Ray job ran {sum(job_ray) / max(sum(job_seq), 1e-9):.2f}x as long as in-process"
    )
    print(f"same table (timing columns aside): {same}")


if __name__ == "__main__":
    main()
