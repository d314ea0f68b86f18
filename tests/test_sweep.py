"""Study sweeps: grid expansion, config hashes, resume, fault isolation, kill -9, Ray vs sequential."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from loopscope.core.errors import LoopscopeError
from loopscope.experiments.grid import Study, expand_grid, load_study
from loopscope.experiments.job import run_job
from loopscope.experiments.sweep import load_table, read_rows, run_sweep
from tests.fixtures.tiny_study import TINY_HEADER

TINY = (
    TINY_HEADER
    + """
[[grid]]
seed = [0, 1]
"model.norm" = ["pre"]
[[grid]]
seed = [0]
"model.norm" = ["bogus"]
[quick]
seed = [0]
"train.steps" = 2
"""
)


def _study(tmp_path: Path, text: str = TINY, quick: bool = False) -> Study:
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return load_study(p, quick=quick)


TIMES = ["wall_s", "train_s", "analysis_s"]  # wall-clock columns: never equal across runs


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        a.drop(columns=TIMES, errors="ignore").reset_index(drop=True),
        b.drop(columns=TIMES, errors="ignore").reset_index(drop=True),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny study run once, uninterrupted, sequentially in-process."""
    tmp = tmp_path_factory.mktemp("ref")
    study = _study(tmp)
    res = run_sweep(study, out=tmp / "out", backend="sequential", progress=False)
    return study, res


def test_config_hash_is_stable_and_ignores_key_order():
    a = expand_grid(
        {"defaults": {"task": "s3", "preset": "fprm", "train": {"steps": 5, "lr": 1e-3}}}
    )
    b = expand_grid(
        {"defaults": {"train": {"lr": 1e-3, "steps": 5}, "preset": "fprm", "task": "s3"}}
    )
    assert a[0].key == b[0].key
    # the literal pins the hash across versions: old results stay reusable (bump JOB_FORMAT to break)
    assert a[0].key == "16d2cca7631e9083"
    assert a[0].train_key == "c1873b9dfa9e4b55"
    c = expand_grid(
        {"defaults": {"task": "s3", "preset": "fprm", "train": {"steps": 6, "lr": 1e-3}}}
    )
    assert c[0].key != a[0].key


def test_grid_is_the_union_of_cartesian_products_and_quick_replaces_axes(tmp_path):
    full = _study(tmp_path)
    assert [(j.seed, j.model["norm"]) for j in full.jobs] == [(0, "pre"), (1, "pre"), (0, "bogus")]
    assert all(j.train["steps"] == 3 and j.model["d_model"] == 16 for j in full.jobs)
    quick = _study(tmp_path, quick=True)
    assert [(j.seed, j.train["steps"]) for j in quick.jobs] == [(0, 2), (0, 2)]


def test_recipe_axis_starts_from_the_zoo_recipe():
    (job,) = expand_grid({"grid": {"recipe": ["maze_reach_conv"]}, "defaults": {"train.steps": 7}})
    assert (job.task, job.preset, job.train["steps"]) == ("maze_reach", "maze_conv", 7)
    assert job.model == {"d_mlp": 128} and job.analysis["evals"]["ood"] == {"n_iter": 80}


def test_unknown_study_key_is_a_one_line_error_with_a_suggestion():
    with pytest.raises(LoopscopeError, match="did you mean.*model"):
        expand_grid({"defaults": {"task": "s3", "preset": "fprm"}, "grid": {"modle.n_core": [1]}})
    with pytest.raises(LoopscopeError, match="no 'preset'"):
        expand_grid({"defaults": {"task": "s3"}})
    base = {"task": "s3", "preset": "fprm"}
    for bad, msg in (
        ({"grid": {"model.n_cor": [1]}}, r"unknown knob model.n_cor \(did you mean: n_core"),
        ({"defaults": {**base, "preset": "fprn"}}, r"unknown preset 'fprn' \(did you mean: fprm"),
        ({"defaults": {**base, "task": "s4"}}, r"unknown task 's4' \(did you mean: s5"),
        ({"grid": {"train.stpes": [3]}}, r"unknown knob train.stpes \(did you mean: steps"),
    ):
        with pytest.raises(LoopscopeError, match=msg):
            expand_grid({"defaults": base, **bad})


def test_bad_toml_is_a_one_line_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[study\nname = 1")
    with pytest.raises(LoopscopeError, match="invalid TOML") as e:
        load_study(p)
    assert "\n" not in str(e.value)
    with pytest.raises(LoopscopeError, match="study file not found"):
        load_study(tmp_path / "missing.toml")


def test_quick_empty_axis_drops_its_grid_table_and_zoo_checkpoint_is_checked(tmp_path):
    cfg = {
        "grid": [
            {"recipe": ["s3_rope"], "seed": [0], "checkpoint": "zoo"},
            {"recipe": ["s3_rope"], "seed": [1]},
        ],
        "quick": {"checkpoint": [], "train.steps": 3},
    }
    full, quick = expand_grid(cfg), expand_grid(cfg, quick=True)
    assert [(j.seed, j.checkpoint) for j in full] == [(0, "zoo"), (1, None)]
    assert [(j.seed, j.checkpoint, j.train["steps"]) for j in quick] == [(1, None, 3)]
    # the zoo model is measured only where its card's training config is the job's
    from loopscope.experiments.job import _zoo_model

    model, _ = _zoo_model(full[0])
    assert model.zoo_name == "s3_rope"
    (wrong,) = expand_grid({"grid": {"recipe": ["s3_rope"], "seed": [1], "checkpoint": "zoo"}})
    with pytest.raises(LoopscopeError, match="differs in seed"):
        _zoo_model(wrong)
    with pytest.raises(LoopscopeError, match="needs a recipe"):
        expand_grid({"defaults": {"task": "s3", "preset": "fprm", "checkpoint": "zoo"}})


def test_row_has_every_column_of_the_issue(reference):
    _, res = reference
    row = res.frame.iloc[0]
    for col in (
        "id.seq_acc", "id.token_acc", "id.converged_fraction", "id.cycle_fraction",
        "id.rho_median", "id.lambda1_median", "id.correct_basin_fraction",
        "id.layer.core.0.rel_residual", "id.layer.core.0.period_residual",
        "id.halt.residual.mean_steps", "id.halt.kl.accuracy", "wall_s", "train_s",
        "final_loss", "train_key",
    ):  # fmt: skip
        assert col in row.index, col
    assert 0 <= row["id.seq_acc"] <= 1 and row["id.n_iter"] >= 2
    # the period-aware residual never exceeds the fixed-point one at the same state
    assert row["id.layer.core.0.period_residual"] <= row["id.layer.core.0.rel_residual"] * 1.01
    out = Path(res.meta["out"])
    assert (out / row["checkpoint"] / "model.safetensors").exists()
    summary = json.loads((out / row["trace_summary"]).read_text())
    assert [s["split"] for s in summary] == ["id"] and summary[0]["halting"]


def test_same_seed_gives_the_same_row_and_another_seed_another(tmp_path, reference):
    study, res = reference
    job = study.jobs[0]
    row = run_job(job, work_dir=tmp_path / "again")
    ref = res.frame.iloc[0].to_dict()
    for k, v in row.items():
        if k not in TIMES:
            assert ref[k] == v or (pd.isna(ref[k]) and pd.isna(v)) or ref[k] == str(v), k
    other = res.frame.iloc[1]
    assert other["seed"] == 1 and other["final_loss"] != ref["final_loss"]


def test_failing_job_is_recorded_and_the_rest_finish(reference):
    _, res = reference
    df = res.frame
    assert list(df["status"]) == ["ok", "ok", "failed"]
    assert "LoopedConfig.norm" in df.loc[2, "error"]
    assert df.loc[:1, "id.seq_acc"].notna().all() and pd.isna(df.loc[2, "id.seq_acc"])
    assert (res.ran, res.failed) == (3, 1)


def test_rerun_skips_completed_jobs_and_retries_failed_ones(tmp_path, reference):
    study, res = reference
    out = Path(res.meta["out"])
    again = run_sweep(study, out=out, backend="sequential", progress=False)
    assert (again.skipped, again.ran, again.failed) == (2, 1, 1)  # only the failed one reran
    _same_table(again.frame, res.frame)
    _same_table(load_table(out), res.frame)


def _ok_rows(out: Path) -> list[Path]:
    rows = []
    for p in out.glob("jobs/*/row.json"):
        try:
            if json.loads(p.read_text())["status"] == "ok":
                rows.append(p)
        except (OSError, ValueError, KeyError):
            continue
    return rows


def _kill_mid_sweep(toml: Path, out: Path, address: str) -> None:
    """Start the CLI sweep as a driver on the running local Ray (``--address``: 2 workers), kill
    -9 the driver as soon as the first job's row says ok (another job is then mid-training or
    mid-analysis), then clean up whatever it started in its own session."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loopscope", "sweep", str(toml), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--address", address, "--max-parallel", "2", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0 = time.monotonic()
    try:
        while not _ok_rows(out) and time.monotonic() - t0 < 300:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: this is what a kill -9 does
        proc.wait()
    finally:
        time.sleep(0.5)
        try:  # what the driver left behind: raylet, workers, agents of its own session
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_kill_9_of_the_ray_driver_then_rerun_runs_only_the_missing_jobs(
    tmp_path, reference, local_ray
):
    study, res = reference
    toml = tmp_path / "tiny.toml"
    toml.write_text(TINY)
    out = tmp_path / "out"
    _kill_mid_sweep(toml, out, local_ray.get_runtime_context().gcs_address)
    done = read_rows(out, study.jobs)
    ok = {k for k, r in done.items() if r["status"] == "ok"}
    assert 1 <= len(ok) and len(done) < 3  # killed mid-sweep, and what it wrote reads back whole
    load_table(out)  # the partial table is a valid table, never a torn file
    stamps = {p: p.stat().st_mtime_ns for p in _ok_rows(out)}
    rerun = run_sweep(study, out=out, backend="ray", progress=False)
    assert (rerun.skipped, rerun.ran) == (len(ok), 3 - len(ok))  # only the missing jobs ran
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # finished rows untouched
    _same_table(rerun.frame, res.frame)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # the memory monitor would kill these tiny jobs when a shared machine is short of memory
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024**2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


def test_ray_runs_the_grid_and_gives_the_sequential_table(tmp_path, reference, local_ray):
    study, res = reference
    ray_res = run_sweep(study, out=tmp_path / "ray", backend="ray", progress=False)
    assert ray_res.backend == "ray" and (ray_res.ran, ray_res.failed) == (3, 1)
    _same_table(ray_res.frame, res.frame)


def test_sequential_fallback_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import loopscope.experiments.sweep as S

    monkeypatch.setattr(S, "ray_available", lambda: False)
    study = _study(tmp_path, quick=True)
    study.jobs = study.jobs[1:]  # the failing job only: no training, instant
    res = run_sweep(study, out=tmp_path / "seq", progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert res.backend == "sequential"
    assert len(err) == 1 and "sequentially" in err[0]


def test_progress_shows_done_running_failed(capsys):
    from loopscope.experiments.sweep import _Progress

    prog = _Progress("demo", total=3, done=1, enabled=True)
    prog.update(running=2)
    prog.update(finished={"status": "failed", "label": "seed=1", "error": "ValueError: boom"})
    prog.update(running=1, finished={"status": "ok"})
    prog.close()
    err = capsys.readouterr().err
    assert "failed: seed=1: ValueError: boom" in err
    assert "demo: done 3/3 · running 1 · failed 1" in err


def test_the_architecture_study_quick_variant_runs_on_local_ray(tmp_path, local_ray):
    from loopscope.experiments.study_figures import architecture_long, architecture_summary

    study = load_study(Path(__file__).parents[1] / "studies" / "architecture.toml", quick=True)
    res = run_sweep(study, out=tmp_path / "arch", backend="ray", progress=False)
    df = res.to_frame()
    assert res.backend == "ray" and len(df) == 4 and (df["status"] == "ok").all(), df["error"]
    assert set(df["model.injection"]) == {"none", "add"} and set(df["model.norm"]) == {
        "pre",
        "post",
    }
    assert (tmp_path / "arch" / "results.parquet").exists()
    summ = architecture_summary(architecture_long(df))
    assert summ["config"].nunique() == 4 and (summ["n_seeds"] == 1).all()
