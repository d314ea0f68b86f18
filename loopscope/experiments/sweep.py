"""Run a study's jobs (on Ray, or sequentially in-process) into one resumable results table.

Layout of the output folder::

    study.json                 the study and its jobs (key -> config)
    results.parquet / .csv     one row per job, in the study's job order (rewritten atomically
                               after every finished job)
    jobs/<key>/row.json        the job's row: written last, atomically = the job is done
    jobs/<key>/model/          the trained model (safetensors + config + card)
    jobs/<key>/trace_summary.json
    train/<train_key>/         the training checkpoint, keyed by the training config alone (a
                               killed job resumes from it; a job that only measures differently
                               reuses it)

Rerunning skips every job whose ``row.json`` says ``ok`` (keyed by the config hash, so a changed
config is a new job); failed jobs are retried. A job that raises is recorded (``status``
``failed``, ``error``) and the others finish. Every job runs on one torch thread, so Ray and the
sequential fallback give the same table (``wall_s`` aside).

Ray: ``ray.init()`` local with the machine's CPUs, a small object store and Ray's memory monitor
off (``RAY_memory_monitor_refresh_ms=0`` unless set: it would kill these small jobs for other
processes' memory) by default, or ``address=`` to join a running cluster (the output folder must then be on a filesystem every
node sees). Without Ray installed the jobs run sequentially and the run says so in one line.

Example:
    >>> from loopscope.experiments.grid import load_study          # doctest: +SKIP
    >>> res = run_sweep(load_study("studies/architecture.toml", quick=True), out="runs/arch")
    >>> res.frame[["label", "id.seq_acc", "ood.seq_acc"]]           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.io import _atomic, atomic_write_text, read_json
from loopscope.core.result import Result, float_summary
from loopscope.experiments.grid import Job, Study
from loopscope.experiments.job import config_columns, run_job

__all__ = ["run_sweep", "SweepResult", "load_table", "read_rows", "ray_available"]

#: object store of the embedded local Ray (jobs exchange small dicts; Ray's minimum is 75 MiB)
OBJECT_STORE_BYTES = 96 * 1024**2


@dataclass(kw_only=True, repr=False)
class SweepResult(Result):
    """The results table of a sweep (one row per job) and how the run went."""

    frame: pd.DataFrame
    backend: str = "sequential"
    ran: int = 0
    skipped: int = 0
    failed: int = 0
    wall_s: float = 0.0

    def to_frame(self) -> pd.DataFrame:
        """The table: one row per job, ``<split>.<metric>`` columns."""
        return self.frame

    def summary(self) -> dict[str, float]:
        """Jobs run / skipped / failed and the wall time."""
        return float_summary(
            {
                "jobs": len(self.frame),
                "ran": self.ran,
                "skipped": self.skipped,
                "failed": self.failed,
                "wall_s": self.wall_s,
            }
        )


def ray_available() -> bool:
    """Whether Ray can be imported."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _row_path(out: Path, job: Job) -> Path:
    return out / "jobs" / job.key / "row.json"


def read_rows(out: str | Path, jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """The recorded rows of ``jobs`` in ``out`` (key -> row); a missing or corrupt row is absent."""
    rows = {}
    for job in jobs:
        p = _row_path(Path(out), job)
        if p.exists():
            try:
                rows[job.key] = read_json(p)
            except LoopscopeError:  # a torn file cannot exist (atomic writes); be safe anyway
                continue
    return rows


def _failed_row(job: Job, err: BaseException, wall: float) -> dict[str, Any]:
    msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
    return {**config_columns(job), "status": "failed", "error": msg[:300], "wall_s": wall}


def safe_job(job_dict: dict[str, Any], out: str) -> dict[str, Any]:
    """:func:`~loopscope.experiments.job.run_job` of one job of the sweep folder ``out``; a
    failed row instead of raising."""
    job = Job.from_dict(job_dict)
    t0 = time.perf_counter()
    try:
        row = run_job(
            job,
            work_dir=Path(out) / "jobs" / job.key,
            train_dir=Path(out) / "train" / job.train_key,
        )
        # paths relative to the sweep folder: the same table wherever the folder lives
        return {
            **row,
            "checkpoint": f"jobs/{job.key}/model",
            "trace_summary": f"jobs/{job.key}/trace_summary.json",
        }
    except Exception as e:  # any job error is data: recorded, the sweep goes on
        if os.environ.get("LOOPSCOPE_DEBUG") == "1":
            traceback.print_exc()
        return _failed_row(job, e, time.perf_counter() - t0)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


def write_table(out: Path, jobs: list[Job], rows: dict[str, dict]) -> pd.DataFrame:
    """Rebuild ``results.parquet`` and ``results.csv`` from the rows (study order), atomically."""
    df = pd.DataFrame([rows[j.key] for j in jobs if j.key in rows])
    if not len(df):  # no job done yet: a valid table with the identity columns and no rows
        df = pd.DataFrame(columns=[*config_columns(jobs[0]), "status", "error"] if jobs else [])
    if len(df):
        for c in df.columns:  # config axes may mix types across jobs: keep Parquet happy
            if df[c].dtype == object:
                df[c] = df[c].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    atomic_write_text(out / "results.csv", df.to_csv(index=False))
    try:
        _atomic_parquet(df, out / "results.parquet")
    except ImportError:
        pass  # pyarrow absent: the CSV is the table
    return df


def load_table(out: str | Path) -> pd.DataFrame:
    """The results table of a sweep folder (Parquet when present, else CSV)."""
    out = Path(out)
    if (out / "results.parquet").exists():
        try:
            return pd.read_parquet(out / "results.parquet")
        except ImportError:
            pass
    if (out / "results.csv").exists():
        return pd.read_csv(out / "results.csv")
    raise LoopscopeError(f"no results table in {out}")


class _Progress:
    """done / running / failed counts on a progress bar (stderr), or nothing."""

    def __init__(self, name: str, total: int, done: int, enabled: bool) -> None:
        self.name, self.total, self.done, self.failed, self.running = name, total, done, 0, 0
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
            self.tid = self.bar.add_task("", total=total, completed=done)
            self.update()

    def update(self, *, running: int | None = None, finished: dict | None = None) -> None:
        if running is not None:
            self.running = running
        if finished is not None:
            self.done += 1
            self.failed += finished.get("status") != "ok"
            if finished.get("status") != "ok" and self.bar is not None:
                self.bar.console.print(f"failed: {finished.get('label')}: {finished.get('error')}")
        if self.bar is not None:
            text = f"{self.name}: done {self.done}/{self.total} · running {self.running} · failed {self.failed}"
            self.bar.update(self.tid, completed=self.done, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _sequential(todo: list[Job], out: Path, record: Callable, prog: _Progress) -> None:
    for job in todo:
        prog.update(running=1)
        record(job, safe_job(job.to_dict(), str(out)))
    prog.update(running=0)


def _ray_init(address: str | None) -> bool:
    """Start (or join) Ray unless this process already did; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    opts: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
    if address is None:
        # Ray's memory monitor kills workers when the whole node is short of memory; on a shared
        # machine that kills these small jobs for other processes' memory (a spurious failure).
        # Off for the embedded local Ray unless the user set it.
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        opts.update(
            num_cpus=os.cpu_count() or 1,
            object_store_memory=OBJECT_STORE_BYTES,
            include_dashboard=False,
        )
    ray.init(address=address, **opts)
    return True


def _ray(
    todo: list[Job],
    out: Path,
    record: Callable,
    prog: _Progress,
    *,
    address: str | None,
    max_parallel: int | None,
) -> None:
    import ray

    own = _ray_init(address)
    try:
        limit = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(safe_job)
        queue, pending = list(todo), {}
        while queue or pending:
            while queue and len(pending) < limit:
                # two jobs that share a training checkpoint never train it at the same time
                busy = {j.train_key for j in pending.values()}
                job = next((j for j in queue if j.train_key not in busy), None)
                if job is None:
                    break
                queue.remove(job)
                pending[remote.remote(job.to_dict(), str(out))] = job
            prog.update(running=len(pending))
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # the worker died (OOM, segfault): record, go on
                    row = _failed_row(job, e, float("nan"))
                record(job, row)
        prog.update(running=0)
    finally:
        if own:
            ray.shutdown()


def _backend(backend: str, n: int) -> str:
    if backend not in ("auto", "ray", "sequential"):
        raise LoopscopeError(f"backend must be 'auto', 'ray' or 'sequential', got {backend!r}")
    if backend == "auto":
        if ray_available():
            return "ray"
        print(
            f"ray is not installed: running {n} jobs sequentially in-process "
            "(pip install 'loopscope[sweep]' for parallel jobs)",
            file=sys.stderr,
        )
        return "sequential"
    if backend == "ray" and not ray_available():
        raise LoopscopeError("backend 'ray' needs Ray: pip install 'loopscope[sweep]'")
    return backend


@did_you_mean
def run_sweep(
    study: Study,
    *,
    out: str | Path = "runs/sweep",
    backend: str = "auto",
    address: str | None = None,
    max_parallel: int | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every job of ``study`` not yet done in ``out``; returns the whole table.

    Args:
        study: from :func:`~loopscope.experiments.grid.load_study`.
        out: output folder (see the module docstring); rerun with the same folder to resume.
        backend: "auto" (Ray when installed, else sequential, said in one line), "ray",
            "sequential".
        address: Ray cluster address to join (default: start a local Ray with every CPU).
        max_parallel: most jobs in flight at once (default: the cluster's CPUs).
        progress: show done / running / failed on stderr.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = study.jobs
    spec = {"name": study.name, "quick": study.quick, "jobs": {j.key: j.to_dict() for j in jobs}}
    atomic_write_text(out / "study.json", json.dumps(spec, indent=1))
    rows = read_rows(out, jobs)
    todo = [j for j in jobs if rows.get(j.key, {}).get("status") != "ok"]
    write_table(out, jobs, rows)  # a table exists from the start (a kill never leaves none)
    used = _backend(backend, len(todo)) if todo else "none"
    prog = _Progress(study.name, len(jobs), len(jobs) - len(todo), progress and bool(todo))
    ran = failed = 0

    def record(job: Job, row: dict[str, Any]) -> None:
        nonlocal ran, failed
        ran, failed = ran + 1, failed + (row.get("status") != "ok")
        rows[job.key] = row
        atomic_write_text(_row_path(out, job), json.dumps(row, default=str))
        write_table(out, jobs, rows)
        prog.update(finished=row)

    t0 = time.perf_counter()
    try:
        if used == "ray":
            _ray(todo, out, record, prog, address=address, max_parallel=max_parallel)
        elif used == "sequential":
            _sequential(todo, out, record, prog)
    finally:
        prog.close()
    frame = write_table(out, jobs, rows)
    return SweepResult(
        frame=frame,
        backend=used,
        ran=ran,
        skipped=len(jobs) - len(todo),
        failed=failed,
        wall_s=time.perf_counter() - t0,
        meta={"study": study.name, "out": str(out)},
    )
