"""Core: FnLoop, unroll, Trace, interventions, divergence flags, capture errors."""

import pytest
import torch

import loopscope as ls
from loopscope.core.errors import CaptureMemoryError, LoopscopeError, UnknownHookError


def linear_loop():
    A = torch.tensor([[0.5, 0.1], [0.0, 0.3]], dtype=torch.float64)
    return ls.FnLoop(
        step=lambda h, x: h @ A.T + x, init_state=torch.zeros(2, dtype=torch.float64)
    ), A


def test_unroll_matches_hand_iteration_exactly():
    loop, A = linear_loop()
    x = torch.randn(4, 2, dtype=torch.float64)
    tr = ls.unroll(loop, x, 7)
    h = torch.zeros(4, 2, dtype=torch.float64)
    ref = [h]
    for _ in range(7):
        h = h @ A.T + x
        ref.append(h)
    assert torch.equal(tr.states, torch.stack(ref))
    assert tr.n_iter == 7 and tr.status == ["max_iter"] * 4


def test_patch_at_t_leaves_earlier_iterations_identical_and_sets_t():
    loop, _ = linear_loop()
    x = torch.randn(3, 2, dtype=torch.float64)
    clean = ls.unroll(loop, x, 6, capture=["hook_state"])
    v = torch.full((3, 2), 7.0, dtype=torch.float64)
    pt = ls.unroll(
        loop, x, 6, capture=["hook_state"], interventions=[ls.Patch("hook_state", 3, value=v)]
    )
    assert torch.equal(pt.states[:3], clean.states[:3])
    assert torch.equal(pt.states[3], v)
    assert torch.equal(pt["hook_state"][3], v)
    assert not torch.equal(pt.states[4], clean.states[4])


def test_transplant_full_state_reproduces_clean_run():
    loop, _ = linear_loop()
    x_clean = torch.randn(3, 2, dtype=torch.float64)
    x_corr = torch.randn(3, 2, dtype=torch.float64)
    # an autonomous loop (no injection after t): transplant makes the rest identical
    loop2 = ls.FnLoop(step=lambda h: torch.tanh(1.5 * h))
    c = ls.unroll(loop2, None, 8, init=x_clean)
    r = ls.unroll(loop2, None, 8, init=x_corr, interventions=[ls.Transplant(iteration=4, source=c)])
    assert torch.equal(r.states[4:], c.states[4:])
    assert not torch.equal(r.states[3], c.states[3])


def test_divergent_sample_flagged_and_frozen_rest_carries_on():
    loop = ls.FnLoop(step=lambda h, g: g * h, init_state=torch.ones(3, dtype=torch.float64))
    gains = torch.tensor([[0.5], [10.0], [float("nan")]], dtype=torch.float64)
    tr = ls.unroll(loop, gains, 20, blowup=1e6)
    assert tr.status == ["max_iter", "diverged", "diverged"]
    assert tr.diverged_at.tolist() == [-1, 7, 1]
    assert torch.isfinite(tr.states).all()
    assert torch.allclose(tr.states[-1, 0], torch.full((3,), 0.5**20, dtype=torch.float64))


def test_halting_freezes_and_stops():
    loop = ls.FnLoop(step=lambda h, x: 0.5 * h, init_state=torch.ones(1))
    x = torch.zeros(2, 1)
    halt = lambda t, h, hn, ctx: (h - hn).abs().flatten(1).amax(1) < torch.tensor([0.1, 0.01])  # noqa: E731
    tr = ls.unroll(loop, x, 50, halt=halt)
    assert tr.halted_at.tolist() == [4, 7]
    assert tr.n_iter == 7
    assert tr.states[-1, 0].item() == 0.5**4


def test_bad_inputs_give_clear_errors():
    loop, _ = linear_loop()
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(LoopscopeError, match="n_iter"):
        ls.unroll(loop, x, 0)
    with pytest.raises(LoopscopeError, match="unknown option 'captur'.*capture"):
        ls.unroll(loop, x, 2, captur=["hook_state"])
    with pytest.raises(UnknownHookError, match="did you mean: hook_state"):
        ls.unroll(loop, x, 2, capture=["hook_stat"])
    with pytest.raises(LoopscopeError, match="iteration"):
        ls.Patch("hook_state", -1, value=x)


def test_memory_guard_refuses_with_estimate():
    loop, _ = linear_loop()
    x = torch.zeros(1000, 2, dtype=torch.float64)
    # the states (1.6 MB) fit the budget; the capture of hook_state (1.6 MB more) does not
    with pytest.raises(CaptureMemoryError, match="MiB.*positions="):
        ls.unroll(loop, x, 100, capture=["hook_state"], max_bytes=2_000_000)


def test_trace_save_load_roundtrip(tmp_path):
    loop, _ = linear_loop()
    tr = ls.unroll(
        loop, torch.randn(2, 2, dtype=torch.float64), 5, capture=True, meta={"model": "lin"}
    )
    tr.save(tmp_path / "t")
    back = ls.Trace.load(tmp_path / "t.json")
    assert torch.equal(back.states, tr.states)
    assert torch.equal(back["hook_state"], tr["hook_state"])
    assert back.labels == tr.labels and back.meta["model"] == "lin"


def test_corrupted_trace_file_named_in_error(tmp_path):
    loop, _ = linear_loop()
    tr = ls.unroll(loop, torch.randn(2, 2, dtype=torch.float64), 3)
    tr.save(tmp_path / "t")
    p = tmp_path / "t.safetensors"
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(LoopscopeError, match="t.safetensors"):
        ls.Trace.load(tmp_path / "t")
