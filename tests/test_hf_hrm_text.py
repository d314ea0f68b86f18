"""HRM-Text behind from_hf: no tokenizer download, float64 spectrum on both of its Loops,
repeated analysis copies, the same logits as HF."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope.models import build_tiny_hrm_text, from_hf


@pytest.fixture(scope="module")
def hrm():
    model, _ = build_tiny_hrm_text(seed=0)
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    slow = from_hf(model)  # no tokenizer given: a local stand-in, offline
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    return model, slow, ids, ref


def test_from_hf_without_tokenizer_reproduces_hf_logits(hrm):
    model, slow, ids, ref = hrm
    assert slow.label_names == ("h_cycle", "l_cycle")
    assert slow.bridge.tokenizer is not None
    tr = ls.unroll(slow, ids, model.config.H_cycles, decode=True)
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0


def test_fast_loop_spectrum_runs_in_float64_twice_without_touching_the_model(hrm):
    model, slow, ids, _ = hrm
    fast = slow.fast_loop()
    h = ls.unroll(fast, ids, 4).states[-1]
    a = ls.analysis.spectrum(fast, ids, h)  # was: RuntimeError double != float
    b = ls.analysis.spectrum(fast, ids, h)  # a second analysis copy of the same bridge
    assert a.rho == b.rho and 0.0 < a.rho[0] < 10.0
    assert model.dtype == torch.float32  # the analysis ran on a copy


def test_fast_loop_float64_jacobian_matches_finite_differences(hrm):
    _, slow, ids, _ = hrm
    from loopscope.analysis.loopmap import LoopMap

    fast = slow.fast_loop()
    h = ls.unroll(fast, ids, 4).states[-1]
    m = LoopMap(fast, ids, state_shape=tuple(h.shape[1:]), batch_size=1)
    z = m.flatten(h.double())
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, jv = m.jvp(z, v)
    eps = 1e-6
    fd = (m._raw(z + eps * v, m.ctx) - m._raw(z - eps * v, m.ctx)) / (2 * eps)
    assert torch.allclose(jv, fd, rtol=1e-6, atol=1e-8)


def test_loop_cast_to_float64_equals_hf_float64_forward_to_1e_12(hrm):
    model, _, ids, ref = hrm
    from loopscope.models.hf import promote_float32

    slow = from_hf(build_tiny_hrm_text(seed=0)[0]).double()  # as an analysis copy is cast
    assert slow.promote
    hf64 = build_tiny_hrm_text(seed=0)[0].double()
    with torch.no_grad(), promote_float32():
        ref64 = hf64(ids, use_cache=False).logits
    tr = ls.unroll(slow, ids, model.config.H_cycles, decode=True)
    assert (tr.logits[-1] - ref64).abs().max().item() <= 1e-12
    assert 1e-9 < (ref64 - ref.double()).abs().max().item() < 1e-4  # float64, not float32
