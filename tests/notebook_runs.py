"""Execute each notebook once per test run, shared by tests/test_notebooks.py and the docs site.

With pytest-xdist the workers of one run share a folder (the parent of their ``basetemp``):
whichever worker asks for a notebook first executes it under a file lock, the others wait for
it and read the executed copy. The kernel runs with matplotlib's inline backend (the test
process's ``MPLBACKEND=Agg`` is not passed on), so figures end up in the outputs as images,
as they do for a user in Jupyter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; every notebook takes a few minutes at most in all


@dataclass
class Run:
    """One executed notebook: the notebook with outputs, the error text if a cell failed."""

    path: Path  # the executed copy
    error: str | None
    seconds: float

    def notebook(self) -> nbformat.NotebookNode:
        return nbformat.read(self.path, as_version=4)


def shared_dir(tmp_path_factory) -> Path:
    """One folder per test run, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    d = base / "executed-notebooks"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _execute(src: Path, out: Path, workdir: Path) -> tuple[str | None, float]:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(src, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    workdir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    t0, error = time.perf_counter(), None
    try:
        client.execute(env=env, cwd=str(workdir))
    except CellExecutionError as e:
        error = str(e)
    seconds = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(out)
    return error, seconds


def executed(src: Path, folder: Path) -> Run:
    """``src`` executed (once per ``folder``): the copy is ``folder/notebooks/<name>``."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out_dir = folder / "notebooks"
    out_dir.mkdir(exist_ok=True)
    out, status = out_dir / src.name, folder / f"{src.stem}.{digest}.json"
    with open(folder / f"{src.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not status.exists():
            error, seconds = _execute(src, out, folder / "work" / src.stem)
            status.write_text(json.dumps({"error": error, "seconds": seconds}))
    s = json.loads(status.read_text())
    return Run(path=out, error=s["error"], seconds=s["seconds"])
