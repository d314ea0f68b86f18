"""Integrity of saved data: content hashes on checkpoints, traces and sweep chunks; settings and
hashes on paper figures; one writer per output folder; unique temporary names; failed writes
named in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import loopscope as ls
from loopscope import zoo
from loopscope.cli import main
from loopscope.core.errors import CheckpointError, OutputError
from loopscope.core.io import (
    ChunkCheckpoint,
    OutputLock,
    atomic_write_text,
    check_writable,
    payload_sha256,
    save_state_dict,
    tmp_name,
)
from loopscope.models.checkpoint import load_model, save_model
from loopscope.report import FigureWriter

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip(path: Path, offset: int = -100) -> None:
    """Flip one payload byte (the header, and so the tensors' names and shapes, stay intact)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- model checkpoints ----------------------------------------------------------------------------
def test_every_zoo_config_records_the_hash_of_its_weights():
    for name in zoo.names():
        d = zoo.checkpoint_dir(name)
        spec = json.loads((d / "config.json").read_text())
        assert spec["sha256"] == payload_sha256(d / "model.safetensors"), name


def test_a_zoo_checkpoint_with_one_flipped_payload_byte_is_refused_naming_the_file(tmp_path):
    d = tmp_path / "s3_fprm"
    shutil.copytree(zoo.checkpoint_dir("s3_fprm"), d)
    intact = load_model(d)  # the copy itself loads, with the zoo's weights
    ref = zoo.load("s3_fprm").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in intact.state_dict().items())
    _flip(d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged") as e:
        load_model(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_weights_swapped_under_a_saved_config_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_model(zoo.load("s3_fprm"), a)
    save_model(zoo.load("s3_rope"), b)
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(a)


def test_weights_that_disagree_with_the_config_name_the_field(tmp_path):
    d = tmp_path / "m"
    save_model(zoo.load("s3_fprm"), d)
    spec = json.loads((d / "config.json").read_text())
    spec["config"]["d_mlp"] = 264
    spec.pop("sha256")  # only the config is wrong: the weights are the saved ones
    (d / "config.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=r"d_mlp = 264 but the weights have 256"):
        load_model(d)


# -- traces ---------------------------------------------------------------------------------------
def _trace():
    loop = ls.FnLoop(step=lambda h, x: torch.tanh(2 * h + x), init_state=torch.zeros(3))
    return ls.unroll(loop, torch.full((2, 3), 0.1), 6, capture="hook_state")


def test_trace_round_trips_and_a_flipped_byte_is_refused(tmp_path):
    tr = _trace()
    js = tr.save(tmp_path / "t")
    back = ls.Trace.load(js)
    assert torch.equal(back.states, tr.states) and back.labels == tr.labels
    assert json.loads(js.read_text())["sha256"] == payload_sha256(tmp_path / "t.safetensors")
    _flip(tmp_path / "t.safetensors", -5)
    with pytest.raises(CheckpointError, match=r"t\.safetensors is damaged"):
        ls.Trace.load(tmp_path / "t")


def test_a_kill_between_the_two_files_of_a_trace_leaves_a_pair_that_is_refused(tmp_path):
    _trace().save(tmp_path / "t")
    other = _trace()
    other.states = other.states * 2
    other.save(tmp_path / "u")
    # the tensors of a newer save landed, its JSON did not
    shutil.copy(tmp_path / "u.safetensors", tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="damaged"):
        ls.Trace.load(tmp_path / "t")


def test_distinct_out_names_with_dots_never_collide(tmp_path):
    a, b = _trace(), _trace()
    b.states = b.states + 1
    a.save(tmp_path / "r.id")
    b.save(tmp_path / "r.ood")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "r.id.json", "r.id.safetensors", "r.ood.json", "r.ood.safetensors",
    ]  # fmt: skip
    assert torch.equal(ls.Trace.load(tmp_path / "r.id").states, a.states)
    assert torch.equal(ls.Trace.load(tmp_path / "r.ood.json").states, b.states)


def test_cli_trace_out_names_with_dots_never_collide(tmp_path, capsys):
    for split in ("id", "ood"):
        argv = ["trace", "s3_fprm", "--task", "s3", "--split", split, "--n", "2"]
        with pytest.raises(SystemExit) as e:
            main(argv + ["--n-iter", "3", "--out", str(tmp_path / f"r.{split}")])
        assert e.value.code == 0, capsys.readouterr().err
    id_, ood = ls.Trace.load(tmp_path / "r.id"), ls.Trace.load(tmp_path / "r.ood")
    assert id_.meta["split"] == "id" and ood.meta["split"] == "ood"


# -- sweep chunks ---------------------------------------------------------------------------------
def test_a_chunk_with_a_flipped_byte_is_refused_and_a_clean_one_resumes(tmp_path):
    ck = ChunkCheckpoint(tmp_path / "ck", "patch_sweep", {"a": 1})
    path = ck.save("k0", {"x": torch.arange(32.0)}, {"m": "1"})
    ck.save("k1", {"x": torch.arange(8.0)}, {"m": "2"})
    ck.close()
    again = ChunkCheckpoint(tmp_path / "ck", "patch_sweep", {"a": 1})
    tensors, meta = again.load("k1")
    assert torch.equal(tensors["x"], torch.arange(8.0)) and meta == {"m": "2"}
    _flip(path, -9)
    with pytest.raises(CheckpointError, match=r"chunk-k0\.safetensors is damaged"):
        again.load("k0")
    again.close()


def test_patch_sweep_resume_refuses_a_damaged_chunk(tmp_path):
    from loopscope.circuits import patch_sweep

    model = zoo.load("s3_fprm")
    clean = zoo.task_of("s3_fprm").sample(2, split="id", seed=0).tokens
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % 7

    def metric(lg, i):
        return lg[:, -1].log_softmax(-1).max(-1).values

    kw = dict(n_iter=3, batch_size=4, checkpoint_dir=tmp_path / "ck")
    first = patch_sweep(model, clean, corrupt, ["hook_state"], [0, 1], metric, **kw)
    again = patch_sweep(model, clean, corrupt, ["hook_state"], [0, 1], metric, **kw)
    pd.testing.assert_frame_equal(first.to_frame(), again.to_frame())
    assert again.checkpoint["computed"] == 0
    _flip(sorted((tmp_path / "ck").glob("chunk-*.safetensors"))[0], -9)
    with pytest.raises(CheckpointError, match="damaged"):
        patch_sweep(model, clean, corrupt, ["hook_state"], [0, 1], metric, **kw)


# -- one writer per folder ------------------------------------------------------------------------
_HOLDER = textwrap.dedent(
    """
    import sys, time
    from loopscope.core.io import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(60)
    """
)


def test_a_second_process_is_refused_while_the_first_lives_and_a_killed_ones_lock_is_stale(
    tmp_path,
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"being written by another .*pid {proc.pid}"):
            OutputLock(out).acquire()
        # the CLI says the same in one line, exit 2, before loading anything
        with pytest.raises(SystemExit) as e:
            main(["stability", "s3_fprm", "--out", str(out)])
        assert e.value.code == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / OutputLock.NAME).exists()  # left behind by the kill
    with OutputLock(out) as lock:  # stale: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with OutputLock(out):  # the same process may nest
            pass
        assert lock.path.exists()
    assert not (out / OutputLock.NAME).exists()


def test_temporary_names_are_unique_per_writer_and_nothing_is_left_after_a_failed_write(
    tmp_path, monkeypatch
):
    a, b = tmp_path / "f.csv", tmp_path / "f.csv"
    assert tmp_name(a) != tmp_name(b) and str(os.getpid()) in tmp_name(a).name

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"cannot write .*f\.csv: No space left on device"):
        atomic_write_text(a, "x")
    with pytest.raises(OutputError, match=r"cannot write .*w\.safetensors"):
        save_state_dict({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no temporary, no half file


def test_safetensors_failing_on_a_full_disk_is_an_output_error(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(StorageFull)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match=r"cannot write .*w\.safetensors: .*StorageFull"):
        save_state_dict({"w": torch.ones(3)}, tmp_path / "w.safetensors")


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_writable(f, "--out")
    with pytest.raises(OutputError, match="not writable"):
        check_writable(f / "sub", "--out")


# -- paper figures --------------------------------------------------------------------------------
def _figure(writer: FigureWriter, name: str = "fig") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    writer.save(name, fig, pd.DataFrame({"x": range(30), "y": range(30)}), "t", "c.")


def test_a_figure_made_with_another_seed_is_redone_never_reused(tmp_path):
    cmd = "loopscope paper --quick --out {} --seed {}"
    _figure(FigureWriter(tmp_path, command=cmd.format("a", 0), seed=0))
    assert FigureWriter(tmp_path, command=cmd.format("b", 0), seed=0).done("fig")  # --out aside
    assert not FigureWriter(tmp_path, command=cmd.format("a", 1), seed=1).done("fig")
    assert not FigureWriter(tmp_path, command="loopscope paper --out a --seed 0", seed=0).done(
        "fig"
    )  # without --quick: other sample sizes
    w1 = FigureWriter(tmp_path, command=cmd.format("a", 1), seed=1)
    _figure(w1)
    assert "(seed 1)" in json.loads((tmp_path / "fig.json").read_text())["caption"]


def test_a_truncated_or_missing_figure_file_is_redone(tmp_path):
    w = FigureWriter(tmp_path, command="c", seed=0)
    _figure(w)
    assert FigureWriter(tmp_path, command="c", seed=0).done("fig")
    csv = tmp_path / "fig.csv"
    csv.write_bytes(csv.read_bytes()[: csv.stat().st_size // 3])
    assert not FigureWriter(tmp_path, command="c", seed=0).done("fig")
    _figure(w)
    (tmp_path / "fig.png").unlink()
    assert not FigureWriter(tmp_path, command="c", seed=0).done("fig")


def test_paper_run_after_kill_9_takes_over_the_lock_and_resumes_to_the_pinned_numbers(tmp_path):
    """A `loopscope paper` killed mid-figure: the rerun takes over its lock and writes the figure
    whole (the convergence numbers pinned in test_paper.py)."""
    from loopscope.paper import run_paper

    out = tmp_path / "paper"
    argv = ["-m", "loopscope", "paper", "--quick", "--only", "convergence", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, *argv], env=env, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and not (out / OutputLock.NAME).exists():
        time.sleep(0.05)
    time.sleep(1.0)  # into the figure's work
    os.killpg(proc.pid, signal.SIGKILL)  # the command and any worker it started
    proc.wait()
    assert not (out / "convergence.json").exists()  # killed before the figure was done
    assert (out / OutputLock.NAME).exists()
    with OutputLock(out):
        recs = run_paper(out, quick=True, only=["convergence"], progress=False)
    assert [r.name for r in recs] == ["convergence"]
    cv = pd.read_csv(out / "convergence.csv")
    assert cv.iloc[0]["median"] == pytest.approx(1.0154121737502977, rel=1e-6)  # float32
    assert cv.iloc[0]["accuracy"] == pytest.approx(0.234375)
    assert not list(out.glob("*.tmp"))
