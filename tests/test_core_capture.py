"""Core capture: the buffer pool never hands out memory a tensor still uses; recorders grow,
overflow and respect the memory guard; unroll's one-pass divergence bound agrees with the exact
float64 test."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import loopscope as ls
from loopscope.core.capture import BufferPool, Recorder, buffers, release_buffers
from loopscope.core.errors import CaptureMemoryError, LoopscopeError

MiB = 2**20


def test_pool_reuses_dropped_memory_only():
    pool = BufferPool(max_bytes=64 * MiB)
    a = pool.empty((4, MiB // 4), dtype=torch.float32)
    ptr = a.data_ptr()
    view = a[2]
    del a
    b = pool.empty((4, MiB // 4), dtype=torch.float32)
    assert b.data_ptr() != ptr  # a view keeps the first buffer alive
    arr = view.numpy()
    del view
    c = pool.empty((4, MiB // 4), dtype=torch.float32)
    assert c.data_ptr() not in (ptr, b.data_ptr())  # so does a NumPy array over it
    del arr
    d = pool.empty((4, MiB // 4), dtype=torch.float32)
    assert d.data_ptr() == ptr  # nothing references it any more: recycled


def test_pool_keeps_at_most_max_bytes_and_clear_releases_idle():
    pool = BufferPool(max_bytes=3 * MiB)
    kept = [pool.empty((MiB,), dtype=torch.uint8) for _ in range(5)]
    assert pool.held_bytes == 3 * MiB  # the two over the cap are plain maps, not pooled
    assert all(torch.equal(k, k) for k in kept)
    del kept
    gc.collect()
    assert pool.clear() == 3 * MiB and pool.held_bytes == 0


def test_pool_size_classes_dtypes_and_small_buffers():
    pool = BufferPool(max_bytes=64 * MiB)
    a = pool.empty((2, MiB // 16), dtype=torch.float64)  # 1 MiB
    ptr = a.data_ptr()
    del a
    big = pool.empty((3 * MiB,), dtype=torch.uint8)  # > 2x the idle map: a new one
    assert big.data_ptr() != ptr
    half = pool.empty((MiB // 2,), dtype=torch.int16)  # same size class, another dtype
    assert half.data_ptr() == ptr and half.dtype == torch.int16 and half.shape == (MiB // 2,)
    small = pool.empty((10, 10), dtype=torch.float32)
    assert small.shape == (10, 10) and pool.held_bytes == 4 * MiB  # small ones never pooled
    with pytest.raises(LoopscopeError, match="max_bytes"):
        BufferPool(max_bytes=-1)


def _wide_loop(d: int = 4096):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, generator=g) * 0.5
    return ls.FnLoop(step=lambda h, x: torch.tanh(h * w + x), init_state=torch.zeros(d))


def test_kept_traces_are_never_overwritten_by_later_unrolls():
    loop = _wide_loop()
    x1, x2 = torch.randn(64, 4096), torch.randn(64, 4096)  # 1 MiB per firing: pooled buffers
    first = ls.unroll(loop, x1, 4, capture="hook_state")
    expected = first["hook_state"].clone(), first.states.clone()
    row = first["hook_state"][2]
    arr = first.states[3].numpy()
    row_copy, arr_copy = row.clone(), arr.copy()
    for _ in range(3):
        other = ls.unroll(loop, x2, 4, capture="hook_state")
        del other
        gc.collect()
    assert torch.equal(first["hook_state"], expected[0]) and torch.equal(first.states, expected[1])
    del first
    gc.collect()
    for _ in range(3):  # the trace is gone but a row of it and a NumPy view of a state live on
        ls.unroll(loop, x2, 4, capture="hook_state")
    assert torch.equal(row, row_copy) and np.array_equal(arr, arr_copy)


def test_dropped_trace_memory_serves_the_next_unroll_with_equal_values():
    loop = _wide_loop()
    x = torch.randn(64, 4096)
    a = ls.unroll(loop, x, 4, capture="hook_state")
    ref, ptr = a["hook_state"].clone(), a["hook_state"].data_ptr()
    del a
    b = ls.unroll(loop, x, 4, capture="hook_state")
    assert b["hook_state"].data_ptr() == ptr  # recycled, and recorded afresh
    assert torch.equal(b["hook_state"], ref) and torch.equal(b["hook_state"], b.states[:-1])
    assert release_buffers() >= 0 and buffers.held_bytes >= b["hook_state"].nbytes


def test_recorder_grows_for_several_firings_per_iteration_and_keeps_labels():
    from transformer_lens.hook_points import HookPoint

    class Twice(ls.Loop):
        def __init__(self):
            super().__init__()
            self.hook_mid = HookPoint()
            self.setup()

        def init_state(self, ctx, generator=None):
            return torch.zeros_like(ctx)

        def step(self, h, ctx, t=None):
            return self.hook_mid(self.hook_mid(h + ctx) * 0.5)

    x = torch.randn(64, 4096)
    tr = ls.unroll(Twice(), x, 5, capture="hook_mid")
    assert tr["hook_mid"].shape == (10, 64, 4096)
    assert tr.labels["hook_mid"] == [(t, k) for t in range(5) for k in range(2)]
    h = torch.zeros_like(x)
    for t in range(5):
        a = h + x
        assert torch.equal(tr["hook_mid"][2 * t], a)
        h = a * 0.5
        assert torch.equal(tr["hook_mid"][2 * t + 1], h)


def test_recorder_without_capacity_and_overflow_stack_in_firing_order():
    r = Recorder("h")
    for i in range(3):
        r.record(torch.full((2, 3), float(i)), (i, 0))
    r.reserve(4)
    for i in range(3, 6):  # two more than reserved: kept apart, joined at the end
        r.record(torch.full((2, 3), float(i)), (i, 0))
    assert r.stacked()[:, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    r2 = Recorder("h", capacity=2)
    r2.record(torch.zeros(2, 3), (0, 0))
    r2.record(torch.zeros(2, 4), (1, 0))
    with pytest.raises(LoopscopeError, match="varying shapes"):
        r2.stacked()


def test_first_buffer_respects_the_memory_guard():
    loop = _wide_loop()
    with pytest.raises(CaptureMemoryError, match="MiB"):
        ls.unroll(loop, torch.randn(64, 4096), 50, capture="hook_state", max_bytes=8 * MiB)
    r = Recorder("h", capacity=1000, allowance=lambda device: 1000)
    r.record(torch.zeros(4, 4), (0, 0))
    assert r.buf is None and len(r.extra) == 1  # over its share: waits for the check


def test_store_dtype_offload_and_positions_go_through_the_buffer():
    loop = _wide_loop()
    x = torch.randn(64, 4096)
    full = ls.unroll(loop, x, 3, capture="hook_state")
    half = ls.unroll(loop, x, 3, capture="hook_state", store_dtype=torch.float16, offload="cpu")
    assert half["hook_state"].dtype == torch.float16
    assert torch.equal(half["hook_state"], full["hook_state"].half())
    pos = ls.unroll(loop, x, 3, capture="hook_state", positions=[5, 7])
    assert torch.equal(pos["hook_state"], full["hook_state"][:, :, [5, 7]])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_one_pass_bound_flags_divergence_exactly_where_the_float64_test_does(dtype):
    # gains around the blow-up bound: the one-pass test must defer to the exact one
    gains = torch.tensor([[0.9], [3.0], [10.0], [float("inf")]], dtype=dtype)
    loop = ls.FnLoop(step=lambda h, g: g * h, init_state=torch.ones(16, dtype=dtype))
    tr = ls.unroll(loop, gains, 12, blowup=1e3)
    # ||h_0|| = 4, bound 4e3: 3^t * 4 > 4e3 first at t = 7; 10^t at t = 4; inf * 1 at t = 1
    assert tr.diverged_at.tolist() == [-1, 7, 4, 1]
    assert torch.isfinite(tr.states.double()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_a_bound_only_nan_and_inf_diverge(dtype):
    gains = torch.tensor([[10.0], [float("nan")], [float("inf")]], dtype=dtype)
    loop = ls.FnLoop(step=lambda h, g: g * h, init_state=torch.ones(4, dtype=dtype))
    tr = ls.unroll(loop, gains, 6, blowup=None)  # 10^6 * ||h_0|| is large but finite
    assert tr.diverged_at.tolist() == [-1, 1, 1]


def test_norm_overflowing_float16_but_finite_elements_is_not_diverged():
    loop = ls.FnLoop(step=lambda h: h, init_state=torch.full((64,), 300.0, dtype=torch.float16))
    tr = ls.unroll(loop, torch.zeros(2, 64, dtype=torch.float16), 3, blowup=1e8)
    assert tr.status == ["max_iter", "max_iter"]  # float16 norm = inf, float64 norm = 2400
