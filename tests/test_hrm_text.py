"""HF HRM-Text through TransformerBridge: Loops equal HF's own forward, (h, l) labels,
recurrence identity, patch locality, exact state restoration, alias de-duplication."""

from __future__ import annotations

import warnings

import pytest
import torch

import loopscope as ls
from loopscope.core.capture import count_firings, warn_looped_hooks
from loopscope.core.errors import LoopedHookWarning
from loopscope.models import bridge_hrm_text, build_tiny_hrm_text, capture_forward, hrm_text_loop

H, L = 3, 4


@pytest.fixture(scope="module")
def hrm():
    model, tok = build_tiny_hrm_text(seed=0)
    bridge = bridge_hrm_text(model, tok)
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    return model, bridge, ids, ref


EXPECTED_L = [(h, j) for h in range(H) for j in range(L)]


def test_slow_loop_equals_hf_forward_with_hl_labels(hrm):
    model, bridge, ids, ref = hrm
    loops = hrm_text_loop(bridge)
    tr = ls.unroll(
        loops.slow, ids, H, capture=["L_blocks.0.hook_out", "H_blocks.0.hook_out"], decode=True
    )
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0
    assert tr.labels["L_blocks.0.hook_out"] == EXPECTED_L
    assert tr.labels["H_blocks.0.hook_out"] == [(h, 0) for h in range(H)]
    assert tr["L_blocks.0.hook_out"].shape == (H * L, 2, 10, 64)


def test_fast_loop_is_the_L_pass_with_z_H_fixed(hrm):
    model, bridge, ids, _ = hrm
    loops = hrm_text_loop(bridge)
    slow = ls.unroll(loops.slow, ids, 1, capture=["L_ln_final.hook_out"])
    fast = ls.unroll(loops.fast, ids, L)  # z_H held at the embedding = slow cycle 0
    assert torch.equal(fast.states[1:], slow["L_ln_final.hook_out"])


def test_capture_forward_schedule_and_last_firing_equals_run_with_cache(hrm):
    model, bridge, ids, ref = hrm
    names = [
        "L_blocks.0.hook_in",
        "L_blocks.0.hook_out",
        "H_blocks.0.hook_out",
        "L_blocks.0.attn.hook_pattern",
    ]
    tr = capture_forward(bridge, ids, capture=names)
    assert tr.labels["L_blocks.0.hook_in"] == EXPECTED_L
    assert tr.labels["H_blocks.0.hook_out"] == [(h, -1) for h in range(H)]
    assert tr["L_blocks.0.attn.hook_pattern"].shape == (H * L, 2, 4, 10, 10)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=names)
    for n in names:
        assert torch.equal(tr[n][-1], cache[n]), n  # TL keeps only this last firing
    assert torch.equal(tr.logits[-1], ref)


def test_recurrence_identity(hrm):
    _, bridge, ids, _ = hrm
    tr = capture_forward(bridge, ids, capture=["L_blocks.0.hook_in", "L_ln_final.hook_out"])
    z_H = tr.states  # [H+1, ...]: embedding, then z_H after each cycle
    z_L_prev = torch.zeros_like(z_H[0])  # z_L_init is zero
    err = 0.0
    for k, (h, _j) in enumerate(tr.labels["L_blocks.0.hook_in"]):
        err = max(err, (tr["L_blocks.0.hook_in"][k] - (z_L_prev + z_H[h])).abs().max().item())
        z_L_prev = tr["L_ln_final.hook_out"][k]
    assert err == 0.0


def test_patch_one_firing_is_local(hrm):
    _, bridge, ids, _ = hrm
    name = "L_blocks.0.hook_out"
    clean = capture_forward(bridge, ids, capture=[name])
    value = torch.full_like(clean[name][6], 0.5)
    pt = capture_forward(
        bridge, ids, capture=[name], interventions=[ls.Patch(name, (1, 2), value=value)]
    )
    k = EXPECTED_L.index((1, 2))
    assert k == 6
    assert torch.equal(pt[name][:k], clean[name][:k])
    assert torch.equal(pt[name][k], value)
    assert all(not torch.equal(pt[name][j], clean[name][j]) for j in range(k + 1, H * L))


def test_state_restoration_exact_with_off_by_one_control(hrm):
    _, bridge, ids, _ = hrm
    corrupt_ids = ids.flip(1)
    names = ["L_ln_final.hook_out", "H_ln_final.hook_out"]
    clean = capture_forward(bridge, ids, capture=names)
    corrupt = capture_forward(bridge, corrupt_ids, capture=names)

    def restored(l_label):
        ivs = [
            ls.Patch("L_ln_final.hook_out", l_label, value=clean),
            ls.Patch("H_ln_final.hook_out", (1, -1), value=clean),
        ]
        return capture_forward(bridge, corrupt_ids, interventions=ivs).logits[-1]

    # the full state after cycle 1 is (z_H, z_L) = (H pass 1, last L pass of cycle 1)
    assert (restored((1, L - 1)) - clean.logits[-1]).abs().max().item() == 0.0
    off = (restored((1, L - 2)) - clean.logits[-1]).abs().max().item()
    unpatched = (corrupt.logits[-1] - clean.logits[-1]).abs().max().item()
    assert off > 1e-6 and unpatched > 1e-3


def test_alias_double_attach_records_one_series(hrm):
    _, bridge, ids, _ = hrm
    tr = capture_forward(bridge, ids, capture=["L_blocks.0.hook_in", "L_blocks.0.hook_resid_pre"])
    assert list(tr.acts) == ["L_blocks.0.hook_in"] and len(tr.labels["L_blocks.0.hook_in"]) == H * L
    assert torch.equal(tr["L_blocks.0.hook_resid_pre"], tr["L_blocks.0.hook_in"])


def test_counting_pass_warns_on_looped_hooks(hrm):
    _, bridge, ids, _ = hrm
    counts = count_firings(
        bridge, ids, names=["L_blocks.0.hook_out", "H_blocks.0.hook_out", "embed.hook_out"]
    )
    assert counts == {"L_blocks.0.hook_out": 12, "H_blocks.0.hook_out": 3, "embed.hook_out": 1}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        looped = warn_looped_hooks(counts)
    assert looped == ["H_blocks.0.hook_out", "L_blocks.0.hook_out"]
    assert any(issubclass(x.category, LoopedHookWarning) for x in w)


def test_float64_slow_loop_and_both_patch_routes_agree():
    model, tok = build_tiny_hrm_text(seed=0)
    bridge = bridge_hrm_text(model.double(), tok)
    ids = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    assert ref.dtype == torch.float64
    loops = hrm_text_loop(bridge)
    name = "L_blocks.0.hook_out"
    tr = ls.unroll(loops.slow, ids, H, capture=[name], decode=True)
    assert tr.logits.dtype == torch.float64
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0
    # the slow Loop's z_H after each cycle is the state capture_forward reads off the forward
    cf = capture_forward(bridge, ids, capture=[name])
    assert torch.equal(tr.states[:, :, 0], cf.states)
    # a patch at firing (1, 2) gives the same run whether it goes through unroll or the HF forward
    value = torch.full((2, 10, 64), 0.25, dtype=torch.float64)
    patch = ls.Patch(name, (1, 2), value=value)
    via_loop = ls.unroll(loops.slow, ids, H, capture=[name], decode=True, interventions=[patch])
    via_hf = capture_forward(bridge, ids, capture=[name], interventions=[patch])
    assert torch.equal(via_loop[name], via_hf[name])
    assert torch.equal(via_loop.logits[-1], via_hf.logits[-1])
    assert not torch.equal(via_hf.logits[-1], ref)


def test_bad_input_raises_one_line_loopscope_errors(hrm):
    _, bridge, ids, _ = hrm
    with pytest.raises(ls.LoopscopeError, match="HrmTextForCausalLM"):
        hrm_text_loop(object())
    with pytest.raises(ls.LoopscopeError, match="str"):
        capture_forward(bridge, ids, interventions=["L_blocks.0.hook_out"])
    with pytest.raises(ls.LoopscopeError, match="nope.hook"):
        capture_forward(bridge, ids, capture=["nope.hook"])
    with pytest.raises(ls.LoopscopeError, match="99"):
        ls.unroll(hrm_text_loop(bridge).slow, torch.full((1, 5), 99), 1)
    with pytest.raises(ls.LoopscopeError, match="H_cylces"):
        build_tiny_hrm_text(H_cylces=2)  # HF's config would silently keep the typo
