"""HF Inkling2Loop as a loopscope Loop: HF's own forward equals the unroll, every per-pass layer
output is captured with its (pass, layer) label, patch locality, float64 end to end, from_hf /
load_hf errors."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope.models import from_hf, load_hf
from loopscope.models.inkling2 import Inkling2Loop, build_tiny_inkling2, promote_float32

P, NL = 3, 2  # passes, loop layers of the tiny model


@pytest.fixture(scope="module")
def ink():
    hf = build_tiny_inkling2(seed=0)
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits  # HF's defaults: grouped_mm experts, a KV cache
    return hf, from_hf(hf), ids, ref


def _hf_layer_outputs(hf, ids):
    """Every loop-layer output of HF's own forward, in call order (forward hooks on HF)."""
    outs, handles = [], []
    cfg = hf.config
    for layer in hf.model.layers[cfg.loop_layer_index_start : cfg.loop_layer_index_end]:
        handles.append(layer.register_forward_hook(lambda m, a, o: outs.append(o.detach())))
    try:
        with torch.no_grad():
            logits = hf(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return torch.stack(outs), logits


def test_unroll_reproduces_hf_logits_exactly_in_float32(ink):
    hf, loop, ids, ref = ink
    assert isinstance(loop, Inkling2Loop)
    tr = ls.unroll(loop, ids, P, decode=True)
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0
    assert tr.states.shape == (P + 1, 2, loop.n_blocks, 10, 32)
    # earlier passes decode to different logits: the loop matters in the tiny model
    assert (tr.logits[1] - ref).abs().max().item() > 1e-3
    assert (tr.logits[P - 1] - ref).abs().max().item() > 0


def test_every_pass_layer_output_captured_with_pass_layer_labels(ink):
    hf, loop, ids, _ = ink
    tr = ls.unroll(loop, ids, P, capture=["core.hook_resid_post", "core.hook_messages"])
    expected = [(p, j) for p in range(P) for j in range(NL)]
    assert tr.labels["core.hook_resid_post"] == expected
    assert tr.labels["core.hook_messages"] == [(p, j) for p in range(1, P) for j in range(NL)]
    hf_outs, _ = _hf_layer_outputs(hf, ids)
    assert hf_outs.shape[0] == P * NL
    assert torch.equal(tr["core.hook_resid_post"], hf_outs)
    # the state after pass p ends with that pass's output
    for p in range(P):
        assert torch.equal(tr.states[p + 1][:, -1], hf_outs[p * NL + NL - 1])


def test_patching_pass_one_leaves_pass_zero_bit_identical(ink):
    _, loop, ids, ref = ink
    name = "core.hook_resid_post"
    clean = ls.unroll(loop, ids, P, capture=[name], decode=True)
    value = torch.full((2, 10, 32), 0.3)
    pt = ls.unroll(
        loop,
        ids,
        P,
        capture=[name],
        decode=True,
        interventions=[ls.Patch(name, (1, 0), value=value)],
    )
    k = 1 * NL + 0
    assert torch.equal(pt[name][:k], clean[name][:k])
    assert torch.equal(pt.states[:2], clean.states[:2])
    assert torch.equal(pt[name][k], value)
    assert all(not torch.equal(pt[name][j], clean[name][j]) for j in range(k + 1, P * NL))
    assert not torch.equal(pt.logits[-1], ref)


def test_float64_loop_equals_hf_float64_forward_to_1e_12():
    hf = build_tiny_inkling2(seed=0).double()
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError):  # HF's own float32 casts break a plain .double() model
        with torch.no_grad():
            hf(ids, use_cache=False)
    hf.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad(), promote_float32():
        ref = hf(ids, use_cache=False).logits
    assert ref.dtype == torch.float64
    tr = ls.unroll(Inkling2Loop(hf), ids, P, decode=True)
    assert tr.logits.dtype == torch.float64
    assert (tr.logits[-1] - ref).abs().max().item() <= 1e-12
    # and it is a float64 computation, not float32 in disguise: float32 differs by ~1e-7
    ref32 = build_tiny_inkling2(seed=0)(ids).logits.detach().double()
    d = (ref - ref32).abs().max().item()
    assert 1e-9 < d < 1e-4


def test_float64_spectrum_and_jacobian_match_finite_differences(ink):
    _, loop, ids, _ = ink
    from loopscope.analysis.loopmap import LoopMap

    x = ids[:1, :6]
    tr = ls.unroll(loop, x, P)
    h = tr.states[-1]
    sp = ls.analysis.spectrum(loop, x, h)
    assert len(sp.rho) == 1 and 0.0 < sp.rho[0] < 10.0
    m = LoopMap(loop, x, state_shape=tuple(h.shape[1:]), batch_size=1)
    z = m.flatten(h.double())
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, jv = m.jvp(z, v)
    eps = 1e-6
    fd = (m._raw(z + eps * v, m.ctx) - m._raw(z - eps * v, m.ctx)) / (2 * eps)
    assert torch.allclose(jv, fd, rtol=1e-6, atol=1e-8)


def test_from_hf_rejects_unsupported_models_in_one_line():
    with pytest.raises(ls.LoopscopeError, match="Inkling2LoopForCausalLM, HrmTextForCausalLM"):
        from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ls.LoopscopeError, match="n_routed_expert"):
        build_tiny_inkling2(overrides={"n_routed_expert": 2})


def test_load_hf_round_trips_a_safetensors_dir_and_refuses_bin(ink, tmp_path):
    hf, _, ids, ref = ink
    hf.save_pretrained(tmp_path / "ok")
    loop = load_hf(tmp_path / "ok")
    tr = ls.unroll(loop, ids, P, decode=True)
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ls.LoopscopeError, match="safetensors only"):
        load_hf(bad)
