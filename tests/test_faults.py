"""Disk-full faults for every command that writes: the command stops with a one-line error
(exit code 2 from the CLI) naming the file, leaves no temporary or half file, and a rerun on a
disk with room finishes with the outputs of a run that never failed. (kill -9 faults: train in
test_train.py, patch in test_reliability_sweeps.py, sweep in test_sweep.py, rounds in
test_self_improve.py, paper in test_integrity.py; rounds' disk-full in test_self_improve.py.)

The full disk is simulated by ``os.replace`` failing with ENOSPC from its k-th call on: every
output of loopscope is written to a temporary and moved into place, so the k-th output write is
the first one the disk refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from loopscope.cli import main
from tests.fixtures.tiny_study import TINY_HEADER

pytestmark = pytest.mark.usefixtures("one_thread")


class FullDisk:
    """``os.replace`` that works ``room`` times, then fails like a full disk."""

    def __init__(self, room: int) -> None:
        self.room, self.calls, self.real = room, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls > self.room:
            raise OSError(28, "No space left on device")
        return self.real(src, dst)


def cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip()


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], "temporary left"


def _assert_one_line_disk_full(code: int, err: str) -> None:
    assert code == 2, err
    assert "\n" not in err and "No space left on device" in err and "Traceback" not in err


def test_train_stops_on_a_full_disk_and_the_rerun_gives_the_same_weights(
    tmp_path, capsys, monkeypatch
):
    cfg = {"task": "parity", "preset": "universal", "steps": 12, "batch_size": 8,
           "checkpoint_every": 2, "model_overrides": {"d_model": 16, "d_mlp": 32, "n_heads": 2}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    base = ["train", "--task", "x", "--preset", "x", "--config", tmp_path / "cfg.json", "--quiet"]
    assert cli([*base, "--out", tmp_path / "ref"], capsys)[0] == 0
    full = FullDisk(room=5)  # two training checkpoints, then the disk is full
    monkeypatch.setattr(os, "replace", full)
    _assert_one_line_disk_full(*cli([*base, "--out", tmp_path / "run"], capsys))
    monkeypatch.undo()
    _no_temporaries(tmp_path / "run")
    stopped_at = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"]
    assert 0 < stopped_at < 12  # really stopped mid-run, with a checkpoint to resume from
    assert cli([*base, "--out", tmp_path / "run"], capsys)[0] == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_patch_stops_on_a_full_disk_and_the_rerun_gives_the_same_table(
    tmp_path, capsys, monkeypatch
):
    base = ["patch", "s3_fprm", "--n", "1", "--iterations", "0,1,2", "--batch-size", "2"]
    assert cli([*base, "--out", tmp_path / "ref"], capsys)[0] == 0
    monkeypatch.setattr(os, "replace", FullDisk(room=2))  # the manifest and one chunk
    _assert_one_line_disk_full(*cli([*base, "--out", tmp_path / "run"], capsys))
    monkeypatch.undo()
    _no_temporaries(tmp_path / "run")
    code, _ = cli([*base, "--out", tmp_path / "run"], capsys)
    assert code == 0
    ref = pd.read_csv(tmp_path / "ref" / "patching.csv")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "patching.csv"), ref)


def test_a_safetensors_write_error_from_the_cli_is_exit_2_in_one_line(
    tmp_path, capsys, monkeypatch
):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28 })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = cli(["trace", "s3_fprm", "--inputs", "6 1 2", "--out", tmp_path / "t"], capsys)
    assert code == 2 and "\n" not in err and "t.safetensors" in err and "code: 28" in err
    assert list(tmp_path.iterdir()) == []


def test_paper_stops_on_a_full_disk_and_the_rerun_keeps_the_finished_figure(
    tmp_path, capsys, monkeypatch
):
    base = ["paper", "--quick", "--only", "convergence", "--quiet", "--out", tmp_path / "p"]
    full = FullDisk(room=4)  # the figure's PDF, PNG, CSV and JSON; then the report fails
    monkeypatch.setattr(os, "replace", full)
    _assert_one_line_disk_full(*cli(base, capsys))
    monkeypatch.undo()
    _no_temporaries(tmp_path / "p")
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p").glob("convergence.*")}
    assert len(done) == 4 and not (tmp_path / "p" / "report.md").exists()
    assert cli(base, capsys)[0] == 0
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p").glob("convergence.*")}
    assert again == done  # the finished figure was kept, not recomputed
    assert "convergence.png" in (tmp_path / "p" / "report.md").read_text()


TINY_STUDY = (
    TINY_HEADER
    + """
[[grid]]
seed = [0, 1]
"""
)


def test_sweep_stops_on_a_full_disk_and_the_rerun_gives_the_same_table(tmp_path, monkeypatch):
    from loopscope.core.errors import OutputError
    from loopscope.experiments.grid import load_study
    from loopscope.experiments.sweep import run_sweep

    (tmp_path / "tiny.toml").write_text(TINY_STUDY)
    study = load_study(tmp_path / "tiny.toml")
    ref = run_sweep(study, out=tmp_path / "ref", backend="sequential", progress=False)
    full = FullDisk(room=12)  # the study files and the first job's training, then full
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="No space left on device") as e:
        run_sweep(study, out=tmp_path / "run", backend="sequential", progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    _no_temporaries(tmp_path / "run")
    again = run_sweep(study, out=tmp_path / "run", backend="sequential", progress=False)
    drop = ["wall_s", "train_s", "analysis_s"]
    pd.testing.assert_frame_equal(
        again.to_frame().drop(columns=drop, errors="ignore"),
        ref.to_frame().drop(columns=drop, errors="ignore"),
    )
