"""Reliability of long sweeps: a patch sweep killed with SIGKILL mid-run resumes from its atomic
chunk checkpoint to a frame identical (bit for bit) to an uninterrupted run, computing no
finished chunk twice; a checkpoint of another sweep is refused; the sweep's memory guard refuses
with its estimate; the CLI resumes too. Property-based tests (hypothesis) of the fixed-point
solvers on random affine contractions with an analytic fixed point."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from loopscope import FnLoop, unroll, zoo
from loopscope.analysis.solvers import solve
from loopscope.circuits import patch_sweep
from loopscope.cli import main
from loopscope.core.errors import CaptureMemoryError, CheckpointError, LoopscopeError
from loopscope.core.io import ChunkCheckpoint

F64 = torch.float64


# the box is shared, and the killed subprocess runs with one thread too (same floats)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- patch sweep: kill -9 and resume -----------------------------------------------------------

# shared by the subprocess and the in-process runs: 4 examples x 5 positions x 8 iterations =
# 160 patches, batch_size 8 -> 24 chunks (3 per start iteration)
SETUP = """
import time, torch
from loopscope import tasks, zoo
model = zoo.load("s3_fprm")
task = tasks.get(zoo.card("s3_fprm")["task"])
clean = task.sample(4, "id", seed=0).tokens
corrupt = clean.clone()
corrupt[:, 1] = (corrupt[:, 1] + 1) % task.vocab_size
SLEEP = 0.0

def metric(lg, i):
    time.sleep(SLEEP)
    return lg[:, -1].log_softmax(-1).max(-1).values

KW = dict(n_iter=8, batch_size=8, seed=0)
"""

SCRIPT = (
    "import sys, torch\ntorch.set_num_threads(1)\n"
    + SETUP
    + """
SLEEP = 0.15  # every chunk calls the metric once: the kill always lands mid-run
from loopscope.circuits import patch_sweep
patch_sweep(model, clean, corrupt, ["hook_state"], "all", metric, checkpoint_dir=sys.argv[1], **KW)
"""
)


def setup_ns():
    ns: dict = {}
    exec(SETUP, ns)
    return ns


def sweep(ns, iterations="all", **kw):
    return patch_sweep(
        ns["model"], ns["clean"], ns["corrupt"], ["hook_state"], iterations, ns["metric"],
        **{**ns["KW"], **kw},
    )  # fmt: skip


def chunk_files(d: Path) -> set[str]:
    return {p.name[len("chunk-") : -len(".safetensors")] for p in d.glob("chunk-*.safetensors")}


def test_kill_minus_9_mid_sweep_then_resume_is_exact_and_computes_no_chunk_twice(tmp_path):
    ns = setup_ns()
    ref = sweep(ns)  # uninterrupted, no checkpoint
    ck = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ck)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(chunk_files(ck)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ran = time.time() - t0
    done_at_kill = chunk_files(ck)
    assert 3 <= len(done_at_kill) < 24  # really interrupted mid-run
    # the killed run logged only chunks that are on disk (a chunk cut short is not counted)
    killed = [e["key"] for e in ChunkCheckpoint.read_log(ck) if e["pid"] == proc.pid]
    assert set(killed) <= done_at_kill and len(killed) == len(set(killed))

    resumed = sweep(ns, checkpoint_dir=ck)
    assert_frame_equal(
        resumed.to_frame(), ref.to_frame(), check_exact=True
    )  # identical final result, bit for bit
    info = resumed.checkpoint
    assert info == {
        "dir": str(ck),
        "total": 24,
        "resumed": len(done_at_kill),
        "computed": 24 - len(done_at_kill),
    }
    mine = [e["key"] for e in ChunkCheckpoint.read_log(ck) if e["pid"] == os.getpid()]
    assert len(mine) == len(set(mine)) == info["computed"]
    assert not set(mine) & done_at_kill  # no finished chunk computed twice
    assert set(mine) | done_at_kill == chunk_files(ck)  # and none lost
    print(f"killed after {ran:.1f}s with {len(done_at_kill)}/24 chunks; resumed: {info}")

    # a third run reads everything back and computes nothing
    again = sweep(ns, checkpoint_dir=ck)
    assert again.checkpoint["computed"] == 0
    assert_frame_equal(again.to_frame(), ref.to_frame(), check_exact=True)


def test_a_checkpoint_of_another_sweep_is_refused_never_mixed(tmp_path):
    ns = setup_ns()
    ck = tmp_path / "ck"
    first = sweep(ns, checkpoint_dir=ck, iterations=[0, 1])
    files = {p.name: p.read_bytes() for p in ck.glob("chunk-*")}
    with pytest.raises(CheckpointError, match=r"differs in: batch_size \(8 there, 4 now\)"):
        sweep(ns, checkpoint_dir=ck, iterations=[0, 1], batch_size=4)
    with pytest.raises(LoopscopeError, match="differs in: iterations"):
        sweep(ns, checkpoint_dir=ck, iterations=[0, 2])
    other = ns["clean"].clone()
    other[0, 0] = (other[0, 0] + 1) % 6
    with pytest.raises(LoopscopeError, match="differs in: clean_inputs"):
        patch_sweep(ns["model"], other, ns["corrupt"], ["hook_state"], [0, 1], ns["metric"],
                    checkpoint_dir=ck, **ns["KW"])  # fmt: skip
    with pytest.raises(LoopscopeError, match="differs in: model_params"):
        m2 = zoo.load("s3_fprm")
        with torch.no_grad():
            next(m2.parameters()).add_(1e-3)
        patch_sweep(m2, ns["clean"], ns["corrupt"], ["hook_state"], [0, 1], ns["metric"],
                    checkpoint_dir=ck, **ns["KW"])  # fmt: skip

    def metric(lg, i):  # same name, other numbers: caught by the recorded clean/corrupt values
        return 2 * ns["metric"](lg, i)

    metric.__qualname__ = "metric"  # the fingerprint knows a metric by name only

    with pytest.raises(LoopscopeError, match="metric_clean differs"):
        patch_sweep(ns["model"], ns["clean"], ns["corrupt"], ["hook_state"], [0, 1], metric,
                    checkpoint_dir=ck, **ns["KW"])  # fmt: skip
    assert {p.name: p.read_bytes() for p in ck.glob("chunk-*")} == files  # nothing touched
    # chunk files without a manifest are not adopted
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "chunk-denoise-000000.safetensors").write_bytes(files[sorted(files)[0]])
    with pytest.raises(CheckpointError, match="no manifest.json"):
        sweep(ns, checkpoint_dir=bare, iterations=[0, 1])
    # a *.tmp left by a kill during a write is ignored (and overwritten)
    (ck / "chunk-denoise-000000.safetensors").unlink()
    (ck / "chunk-denoise-000000.safetensors.tmp").write_bytes(b"half a file")
    again = sweep(ns, checkpoint_dir=ck, iterations=[0, 1])
    assert again.checkpoint["computed"] == 1
    assert_frame_equal(again.to_frame(), first.to_frame(), check_exact=True)


def test_memory_guard_refuses_with_the_estimate_and_the_way_out():
    ns = setup_ns()
    tr = unroll(ns["model"], ns["clean"], 8, capture=["hook_state"])
    src = 2 * tr["hook_state"].numel() * tr["hook_state"].element_size()  # clean + corrupt
    assert src == 2 * 4 * 8 * 5 * 64 * 4  # 2 runs x B x T x [pos, d] float32
    with pytest.raises(CaptureMemoryError) as e:
        sweep(ns, max_bytes=50_000)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, LoopscopeError)
    assert f"source captures of 1 site(s): {src / 1024:.1f} KiB" in msg  # the estimate is right
    assert "patch sweep would need ~" in msg and "budget is 48.8 KiB" in msg
    for way_out in ("fewer sites", "smaller batch_size", "batch_size=8", "raise max_bytes"):
        assert way_out in msg
    # the estimate grows with the sites, and a sufficient budget runs
    with pytest.raises(CaptureMemoryError, match="of 2 site"):
        patch_sweep(ns["model"], ns["clean"], ns["corrupt"],
                    ["hook_state", "core.blocks.0.hook_resid_post"], "all", ns["metric"],
                    max_bytes=300_000, **ns["KW"])  # fmt: skip
    assert len(sweep(ns, max_bytes=10_000_000)) == 160
    with pytest.raises(LoopscopeError, match="max_bytes must be a positive integer"):
        sweep(ns, max_bytes=0)


def test_cli_patch_resumes_from_its_checkpoint(capsys, tmp_path):
    def run(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        out = capsys.readouterr()
        return e.value.code, out.out, out.err

    args = ["patch", "addition_conv", "--n", "2", "--position", "0", "--batch-size", "8"]
    code, out, _ = run([*args, "--out", str(tmp_path)])
    first = json.loads(out)
    assert code == 0 and first["resumed"] == 0 and first["chunks"] > 4
    csv = (tmp_path / "patching.csv").read_bytes()
    # an interruption: half the chunks and the outputs are gone
    lost = sorted((tmp_path / "checkpoint").glob("chunk-*.safetensors"))[::2]
    for p in [*lost, tmp_path / "patching.csv", tmp_path / "patching.png"]:
        p.unlink()
    code, out, _ = run([*args, "--out", str(tmp_path)])
    second = json.loads(out)
    assert code == 0 and second["resumed"] == first["chunks"] - len(lost)
    assert (tmp_path / "patching.csv").read_bytes() == csv  # same rows, same floats
    assert (tmp_path / "patching.png").exists()
    # other settings on the same OUT: one-line refusal naming the way out
    code, _, err = run([*args[:-1], "4", "--out", str(tmp_path)])
    assert code == 2 and "differs in: batch_size" in err and "--no-resume" in err
    code, out, _ = run([*args[:-1], "4", "--out", str(tmp_path), "--no-resume"])
    assert code == 0 and json.loads(out)["resumed"] == 0
    assert pd.read_csv(tmp_path / "patching.csv").equals(pd.read_csv(io.BytesIO(csv)))


# -- solvers: property-based tests on affine contractions -----------------------------------------
# (tests/test_analysis_solvers.py has a hypothesis test that 'converged' is honest on tanh maps;
# these add the analytic answer, mixed good / bad batches and tolerance monotonicity)

SOLVERS = ("picard", "anderson", "broyden", "auto", "newton_krylov")


def affine_step(h, ctx):
    """h -> A_b h + c_b per sample; samples flagged ``bad`` return NaN."""
    A, c, bad = ctx
    out = torch.einsum("bij,bj->bi", A, h) + c
    return torch.where(bad[:, None], out * torch.nan, out)


AFFINE = FnLoop(step=affine_step)


def contraction(B, d, gain, seed, scale):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, d, d, generator=g, dtype=F64)
    A *= (gain / torch.linalg.matrix_norm(A, ord=2))[:, None, None]  # ||A_b||_2 = gain < 1
    c = scale * torch.randn(B, d, generator=g, dtype=F64)
    h0 = 3 * scale * torch.randn(B, d, generator=g, dtype=F64)
    hstar = torch.linalg.solve(torch.eye(d, dtype=F64) - A, c)  # (I - A)^-1 c
    return A, c, h0, hstar


def assert_solved(r, A, c, hstar, gain, idx, tol):
    z = r.z_best[idx]
    fz = torch.einsum("bij,bj->bi", A[idx], z) + c[idx]
    res = (fz - z).norm(dim=1)
    assert bool((res < tol * (fz.norm(dim=1) + 1e-9) * (1 + 1e-9)).all())
    # contraction: ||z - h*|| <= ||f(z) - z|| / (1 - ||A||)  (plus float round-off)
    err = (z - hstar[idx]).norm(dim=1)
    assert bool((err <= res / (1 - gain) + 1e-12 * (1 + hstar[idx].norm(dim=1)) / (1 - gain)).all())


problems = dict(
    B=st.integers(1, 3),
    d=st.integers(1, 12),
    gain=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-2, 1.0, 1e3]),
)


@settings(max_examples=20, deadline=None)
@given(**problems)
def test_every_solver_finds_the_analytic_fixed_point_of_a_contraction(B, d, gain, seed, scale):
    A, c, h0, hstar = contraction(B, d, gain, seed, scale)
    bad = torch.zeros(B, dtype=torch.bool)
    for method in SOLVERS:
        r = solve(AFFINE, (A, c, bad), h0=h0, method=method, tol=1e-10, max_iter=1000)
        assert r.status == ["converged"] * B, (method, r.reason)
        assert_solved(r, A, c, hstar, gain, torch.arange(B), 1e-10)


@settings(max_examples=15, deadline=None)
@given(**problems, bad_at=st.integers(0, 3), method=st.sampled_from(SOLVERS))
def test_a_divergent_sample_is_flagged_alone_and_the_others_still_solve(
    B, d, gain, seed, scale, bad_at, method
):
    B += 1  # at least one good and one bad sample
    bad_at %= B
    A, c, h0, hstar = contraction(B, d, gain, seed, scale)
    bad = torch.zeros(B, dtype=torch.bool)
    bad[bad_at] = True  # its step returns NaN
    r = solve(AFFINE, (A, c, bad), h0=h0, method=method, tol=1e-10, max_iter=1000)
    good = torch.nonzero(~bad)[:, 0]
    assert [s == "diverged" for s in r.status] == bad.tolist(), (method, r.status)
    assert "non-finite" in r.reason[bad_at]
    assert int(r.nfe[bad_at]) == 1  # flagged at its first evaluation, then masked out
    assert_solved(r, A, c, hstar, gain, good, 1e-10)
    # the good samples cost what they cost without the bad one in the batch
    alone = solve(AFFINE, (A[good], c[good], bad[good]), h0=h0[good], method=method, tol=1e-10,
                  max_iter=1000)  # fmt: skip
    if method == "broyden":  # batched vs single reductions: round-off, a few steps at most
        assert bool(((r.nfe[good] - alone.nfe).abs() <= 3).all())
    else:
        assert torch.equal(r.nfe[good], alone.nfe) and torch.equal(r.n_jvp[good], alone.n_jvp)
    if method == "picard":  # an expanding map blows up under naive iteration: flagged too
        A2 = A.clone()
        A2[bad_at] = 4 * torch.eye(d, dtype=F64)  # blows up before `patience` (50) stalls it
        r2 = solve(AFFINE, (A2, c, bad & False), h0=h0, method="picard", tol=1e-10, max_iter=1000)
        assert [s == "diverged" for s in r2.status] == bad.tolist()
        assert "blew up" in r2.reason[bad_at]


@settings(max_examples=15, deadline=None)
@given(**problems, method=st.sampled_from(SOLVERS))
def test_cost_counters_are_positive_and_monotone_in_the_tolerance(B, d, gain, seed, scale, method):
    A, c, h0, hstar = contraction(B, d, gain, seed, scale)
    bad = torch.zeros(B, dtype=torch.bool)
    prev = None
    for tol in (1e-3, 1e-6, 1e-9, 1e-12):
        r = solve(AFFINE, (A, c, bad), h0=h0, method=method, tol=tol, max_iter=2000)
        assert r.status == ["converged"] * B, (method, tol, r.reason)
        assert bool((r.nfe >= 1).all() and (r.iterations >= 1).all())
        assert bool((r.n_jvp >= 0).all() and (r.n_vjp >= 0).all())
        assert bool((r.nfe >= r.iterations).all())
        assert bool((r.r_rel < tol).all())
        if method == "newton_krylov":  # every Newton step solves with jvps
            assert bool(((r.n_jvp >= 1) | (r.nfe == 1)).all())
        if prev is not None:  # a tighter tolerance never costs less
            assert bool((r.nfe >= prev.nfe).all()), (method, tol, prev.nfe, r.nfe)
            assert bool((r.n_jvp >= prev.n_jvp).all())
            assert bool((r.iterations >= prev.iterations).all())
        prev = r
