"""Looped transformer family: every preset unrolled in float64 equals a hand-written unrolled
computation that uses the model's weights directly (exact)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import loopscope as ls
from loopscope.errors import LoopscopeError
from loopscope.models import (
    HierarchicalLoopedTransformer,
    LoopedTransformer,
    build,
    preset,
    preset_names,
)


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x):  # x [B, P, H, Dh], base 10000, rotate-half
    B, P, H, D = x.shape
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    return x * ang.cos()[None, :, None] + rot * ang.sin()[None, :, None]


def ref_attn(x, p, pre, cfg):
    B, P, d = x.shape
    H = cfg.n_heads
    q = (x @ p[f"{pre}.attn.W_Q.weight"].T).view(B, P, H, -1)
    k = (x @ p[f"{pre}.attn.W_K.weight"].T).view(B, P, H, -1)
    v = (x @ p[f"{pre}.attn.W_V.weight"].T).view(B, P, H, -1)
    if cfg.positions == "rope":
        q, k = rope(q), rope(k)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // H)
    if cfg.causal:
        s = s + torch.triu(torch.full((P, P), float("-inf")), 1)
    z = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, P, d)
    return z @ p[f"{pre}.attn.W_O.weight"].T


def ref_mlp(x, p, pre, cfg):
    if cfg.act == "swiglu":
        a = F.silu(x @ p[f"{pre}.mlp.W_gate.weight"].T) * (
            x @ p[f"{pre}.mlp.W_in.weight"].T + p[f"{pre}.mlp.W_in.bias"]
        )
    else:
        a = F.gelu(x @ p[f"{pre}.mlp.W_in.weight"].T + p[f"{pre}.mlp.W_in.bias"])
    return a @ p[f"{pre}.mlp.W_out.weight"].T + p[f"{pre}.mlp.W_out.bias"]


def ref_block(x, p, pre, cfg, norm, a1=None, b1=None):
    eps = cfg.norm_eps
    n = lambda i, y: rms(y, p[f"{pre}.ln{i}.weight"], eps)  # noqa: E731
    if norm == "post":
        x = n(1, x + ref_attn(x, p, pre, cfg))
        return n(2, x + ref_mlp(x, p, pre, cfg))
    if norm == "pre":
        x = x + ref_attn(n(1, x), p, pre, cfg)
        return x + ref_mlp(n(2, x), p, pre, cfg)
    if norm == "sandwich":
        x = n(2, ref_attn(n(1, x), p, pre, cfg) + x)
        return n(4, ref_mlp(n(3, x), p, pre, cfg) + x)
    x = a1 * x + b1 * ref_attn(n(1, x), p, pre, cfg)
    return a1 * x + b1 * ref_mlp(n(2, x), p, pre, cfg)


def ref_unroll(model, tokens, T, h0):
    """Independent re-implementation of LoopedTransformer.step/decode from its weights."""
    cfg, p = model.cfg, dict(model.named_parameters())
    e = p["embed.weight"][tokens]
    if cfg.positions == "learned":
        e = e + p["pos_embed"][: tokens.shape[1]]
    for i in range(cfg.n_prelude):
        e = ref_block(e, p, f"prelude.blocks.{i}", cfg, "pre")
    h, states = h0, [h0]
    for _ in range(T):
        h_in = h
        a1 = b1 = None
        if cfg.residual_scale == "fprm":
            a1 = torch.sigmoid(p["core.alpha1_logit"])
            a2 = torch.sigmoid(p["core.alpha2_logit"])
            K2 = 2 * cfg.n_core
            b2 = 1 - a2 * a1**K2
            b1 = b2 * (1 - a1) / (1 - a1**K2)
            h = a2 * h + b2 * e
        elif cfg.injection == "add":
            h = h + e
        elif cfg.injection == "convex":
            a = torch.sigmoid(p["core.mix_logit"])
            h = a * h + (1 - a) * e
        elif cfg.injection == "concat":
            h = torch.cat([h, e], -1) @ p["core.adapter.weight"].T + p["core.adapter.bias"]
        if cfg.mixer == "conv1d":
            w = p["core.conv.weight"][:, 0]  # [d, k]
            k = w.shape[1]
            hp = F.pad(h, (0, 0, k - 1, 0))
            h = h + sum(hp[:, j : j + h.shape[1]] * w[:, j] for j in range(k)) + p["core.conv.bias"]
        elif cfg.mixer == "conv2d":
            B, P, d = h.shape
            S = int(math.isqrt(P))
            g = F.pad(h.view(B, S, S, d), (0, 0, 1, 1, 1, 1))
            w = p["core.conv.weight"][:, 0]  # [d, 3, 3]
            acc = sum(g[:, i : i + S, j : j + S] * w[:, i, j] for i in range(3) for j in range(3))
            h = h + (acc + p["core.conv.bias"]).view(B, P, d)
        norm = "fprm" if cfg.residual_scale == "fprm" else cfg.norm
        for i in range(cfg.n_core):
            h = ref_block(h, p, f"core.blocks.{i}", cfg, norm, a1, b1)
        if cfg.damping != 1.0:
            h = cfg.damping * h + (1 - cfg.damping) * h_in
        states.append(h)
    y = h
    for i in range(cfg.n_coda):
        y = ref_block(y, p, f"coda.blocks.{i}", cfg, "pre")
    logits = rms(y, p["ln_final.weight"], cfg.norm_eps) @ p["unembed.weight"].T + p["unembed.bias"]
    return torch.stack(states), logits


SINGLE = [n for n in preset_names() if n not in ("hrm", "trm")]


@pytest.mark.parametrize("name", SINGLE + ["swiglu_damped"])
def test_preset_matches_hand_unrolled_float64(name):
    torch.manual_seed(1)
    if name == "swiglu_damped":
        cfg = preset(
            "huginn",
            act="swiglu",
            damping=0.7,
            positions="learned",
            vocab_size=9,
            n_classes=5,
            d_model=32,
            d_mlp=64,
        )
    else:
        cfg = preset(name, vocab_size=9, n_classes=5, d_model=32, d_mlp=64)
    model = build(cfg).double()
    for prm in model.parameters():  # move gates/biases off their init so every term matters
        prm.data += 0.05 * torch.randn_like(prm)
    tokens = torch.randint(0, 9, (3, 16))
    tr = ls.unroll(model, tokens, 5, capture=["core.blocks.0.hook_resid_post"], seed=3, decode=True)
    ref_states, ref_logits = ref_unroll(model, tokens, 5, tr.states[0])
    assert torch.allclose(tr.states, ref_states, atol=1e-12, rtol=0)
    assert torch.allclose(tr.logits[-1], ref_logits, atol=1e-12, rtol=0)
    if cfg.n_core == 1:
        assert torch.allclose(
            tr["core.blocks.0.hook_resid_post"], ref_states[1:], atol=1e-12, rtol=0
        )
    assert tr.labels["core.blocks.0.hook_resid_post"] == [(t, 0) for t in range(5)]


def test_fprm_betas_satisfy_the_tying_identity():
    m = build(preset("fprm", n_core=2, alpha_init=(0.75, 0.25))).double()
    a1, b1, a2, b2 = m.fprm_gates()
    assert torch.allclose(b1 * sum(a1**k for k in range(4)), b2)
    assert torch.allclose(a1, torch.full_like(a1, 0.75)) and torch.allclose(
        a2, torch.full_like(a2, 0.25)
    )


@pytest.mark.parametrize("name", ["hrm", "trm"])
def test_hierarchical_matches_hand_unrolled_with_hl_labels(name):
    torch.manual_seed(2)
    cfg = preset(name, vocab_size=9, n_classes=5, d_model=32, d_mlp=64)
    model = HierarchicalLoopedTransformer(cfg).double()
    tokens = torch.randint(0, 9, (2, 8))
    hook = "net.hook_in" if cfg.shared else "L.hook_in"
    tr = ls.unroll(model, tokens, 3, capture=[hook])
    p = dict(model.named_parameters())
    e = p["embed.weight"][tokens] + p["pos_embed"][:8]
    zH, zL = tr.states[0][:, 0], tr.states[0][:, 1]
    pre_L = "net" if cfg.shared else "L"
    pre_H = "net" if cfg.shared else "H"
    for t in range(3):
        for _ in range(cfg.L_cycles):
            zL = ref_block(zL + zH + e, p, f"{pre_L}.blocks.0", cfg, "post")
        zH = ref_block(zH + zL, p, f"{pre_H}.blocks.0", cfg, "post")
        assert torch.allclose(tr.states[t + 1][:, 0], zH, atol=1e-12)
        assert torch.allclose(tr.states[t + 1][:, 1], zL, atol=1e-12)
    per_step = cfg.L_cycles + (1 if cfg.shared else 0)
    assert tr.labels[hook] == [(h, k) for h in range(3) for k in range(per_step)]


def test_fast_loop_holds_slow_state_fixed():
    model = build(preset("hrm", vocab_size=9, n_classes=5, d_model=32, d_mlp=64)).double()
    tokens = torch.randint(0, 9, (2, 8))
    fast = model.fast_loop()
    tr = ls.unroll(fast, tokens, 4, capture=["L.hook_out"])
    ctx = model.encode(tokens)
    zH, zL = model.init_state(ctx)[:, 0], model.init_state(ctx)[:, 1]
    for t in range(4):
        zL = model.l_step(zL, zH, ctx["e"])
        assert torch.equal(tr.states[t + 1], zL)
    assert "L.hook_out" in fast.hook_dict and tr.labels["L.hook_out"] == [(t, 0) for t in range(4)]


def test_patch_on_core_hook_leaves_earlier_iterations_identical():
    model = build(preset("universal", vocab_size=9, n_classes=5)).double()
    tokens = torch.randint(0, 9, (2, 6))
    hook = "core.blocks.0.hook_attn_out"
    clean = ls.unroll(model, tokens, 6, capture=[hook, "core.blocks.0.hook_resid_post"])
    pt = ls.unroll(
        model,
        tokens,
        6,
        capture=[hook, "core.blocks.0.hook_resid_post"],
        interventions=[ls.Zero(hook, 3)],
    )
    assert torch.equal(pt.states[:4], clean.states[:4])
    assert torch.equal(
        pt["core.blocks.0.hook_resid_post"][:3], clean["core.blocks.0.hook_resid_post"][:3]
    )
    assert (pt[hook][3] == 0).all() and not torch.equal(pt.states[4], clean.states[4])


def test_causal_model_ignores_future_tokens():
    model = build(preset("fprm", vocab_size=9, n_classes=5)).double()
    a = torch.randint(0, 9, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 9
    la = ls.unroll(model, a, 6, seed=0, decode=True).logits[-1]
    lb = ls.unroll(model, b, 6, seed=0, decode=True).logits[-1]
    assert torch.allclose(la[0, :7], lb[0, :7], atol=1e-12)
    assert not torch.allclose(la[0, 7:], lb[0, 7:])


def test_halting_heads_initialised_to_continue():
    m = build(preset("act", vocab_size=9, n_classes=5))
    ctx = m.encode(torch.randint(0, 9, (2, 4)))
    q = m.q_head(m.init_state(ctx), ctx)
    assert q.shape == (2, 2) and torch.allclose(q, torch.full_like(q, -5.0))
    g = build(preset("ouro", vocab_size=9, n_classes=5))
    ctx = g.encode(torch.randint(0, 9, (2, 4)))
    assert torch.allclose(
        torch.sigmoid(g.exit_gate(g.init_state(ctx), ctx)), torch.sigmoid(torch.tensor(-5.0))
    )


def test_bad_inputs():
    m = build(preset("maze_conv", vocab_size=4, n_classes=2))
    with pytest.raises(LoopscopeError, match="token id 7 out of vocabulary"):
        m.encode(torch.tensor([[1, 7, 0, 1]]))
    with pytest.raises(LoopscopeError, match="dtype"):
        m.encode(torch.zeros(1, 4))
    with pytest.raises(LoopscopeError, match="shape"):
        m.encode(torch.zeros(4, dtype=torch.long))
    with pytest.raises(LoopscopeError, match="perfect square"):
        m.encode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(LoopscopeError, match="unknown preset"):
        preset("fprn")
    with pytest.raises(LoopscopeError, match="norm must be one of"):
        preset("fprm", norm="postt")
    with pytest.raises(LoopscopeError, match="unknown LoopedConfig field"):
        preset("fprm", d_modle=3)


def test_checkpoint_roundtrip(tmp_path):
    from loopscope.io import load_model, save_model

    m = build(preset("huginn", vocab_size=9, n_classes=5))
    save_model(m, tmp_path / "ck", card={"x": 1})
    back = load_model(tmp_path / "ck")
    assert isinstance(back, LoopedTransformer)
    tok = torch.randint(0, 9, (2, 5))
    assert torch.equal(
        ls.unroll(m.eval(), tok, 3, seed=1).states, ls.unroll(back, tok, 3, seed=1).states
    )
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoopscopeError, match="model.safetensors"):
        load_model(tmp_path / "ck")
