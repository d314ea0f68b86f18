"""Training: exact resume after interruption (in-process and kill -9), determinism, a tiny
learning check, atomic checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.train import TrainConfig, evaluate, train

TINY = dict(d_model=16, n_heads=2, d_mlp=32)


def cfg(**kw):
    base = dict(
        task="parity",
        preset="fprm",
        steps=12,
        batch_size=8,
        iters=(1.0, 1.5),
        truncate=4,
        model_overrides=TINY,
        checkpoint_every=4,
        task_params={"train_len": (2, 6)},
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full, _ = train(cfg(), out_dir=tmp_path / "a", progress=False)
    part, hist = train(cfg(), out_dir=tmp_path / "b", progress=False, stop_after=6)
    assert hist[-1]["step"] == 6
    resumed, hist2 = train(cfg(), out_dir=tmp_path / "b", progress=False)
    assert [h["step"] for h in hist2] == list(range(1, 13))  # nothing lost or duplicated
    wa, wb = weights(full), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_same_seed_same_weights_different_seed_different():
    a, _ = train(cfg(steps=5), progress=False)
    b, _ = train(cfg(steps=5), progress=False)
    c, _ = train(cfg(steps=5, seed=1), progress=False)
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_refuses_a_different_config(tmp_path):
    train(cfg(steps=4), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(LoopscopeError, match="different training config"):
        train(cfg(steps=4, lr=1e-4), out_dir=tmp_path / "r", progress=False)


def test_crash_between_the_tensor_and_json_writes_resumes_exact(tmp_path, monkeypatch):
    """A kill after a checkpoint's tensors are on disk but before its JSON is: the resume must
    use the tensors the JSON names (step k), not the newer ones (step k + 1)."""
    import loopscope.train as T

    c = cfg(steps=8, checkpoint_every=1)
    ref, _ = train(c, out_dir=tmp_path / "ref", progress=False)
    real, calls = T.atomic_write_text, []

    def crash_on_fourth(path, text):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError("simulated kill")
        return real(path, text)

    monkeypatch.setattr(T, "atomic_write_text", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(c, out_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(T, "atomic_write_text", real)
    resumed, hist = train(c, out_dir=tmp_path / "run", progress=False)
    assert [h["step"] for h in hist] == list(range(1, 9))
    wa, wb = weights(ref), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # one tensor file remains: the one the final JSON names
    assert [p.name for p in (tmp_path / "run").glob("*.safetensors")] == [
        "checkpoint-00000008.safetensors"
    ]


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from loopscope.train import TrainConfig, train
cfg = TrainConfig(**eval(sys.argv[1]))
train(cfg, out_dir=sys.argv[2], progress=False)
"""


def test_kill_minus_9_then_resume_is_exact(tmp_path):
    c = cfg(steps=150, checkpoint_every=1)  # long enough that the kill always lands mid-run
    ref, _ = train(c, out_dir=tmp_path / "ref", progress=False)
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, repr(c.to_dict()), str(run)], env=env)
    deadline = time.time() + 120
    import json

    while time.time() < deadline:
        try:
            step = json.loads((run / "checkpoint.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            step = 0
        if step >= 3 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((run / "checkpoint.json").read_text())["step"]
    assert 0 < killed_at < c.steps  # really interrupted mid-run
    resumed, hist = train(c, out_dir=run, progress=False)
    assert [h["step"] for h in hist] == list(range(1, 151))
    wa, wb = weights(ref), weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tiny_model_learns_parity_above_chance():
    model, hist = train(cfg(steps=150, batch_size=32, lr=3e-3), progress=False)
    from loopscope import tasks

    acc = evaluate(model, tasks.get("parity", train_len=(2, 6)), "id", n=256, iter_factor=1.5)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert acc["token_acc"] > 0.75


def test_bad_train_configs():
    with pytest.raises(LoopscopeError, match="steps"):
        TrainConfig(task="s3", preset="fprm", steps=0)
    with pytest.raises(LoopscopeError, match="iters_per"):
        TrainConfig(task="s3", preset="fprm", iters_per="len")
    with pytest.raises(LoopscopeError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"task": "s3", "preset": "fprm", "stpes": 3})
