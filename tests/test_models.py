"""Looped transformer family: every preset unrolled in float64 equals a hand-written unrolled
computation that uses the model's weights directly (exact)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import loopscope as ls
from loopscope.core.errors import LoopscopeError
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


SINGLE = [n for n in preset_names() if n not in ("hrm", "trm", "fam")]  # fam: tests/test_fam.py


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
    for prm in model.parameters():
        prm.data += 0.05 * torch.randn_like(prm)
    tokens = torch.randint(0, 9, (2, 8))
    L, T = cfg.L_cycles, 3
    layer = "net.blocks.0" if cfg.shared else "L.blocks.0"
    hooks = ["L.hook_in", "H.hook_in", f"{layer}.hook_resid_pre", "L.blocks.0.hook_resid_post"]
    hooks = [h for h in hooks if h in model.hook_dict]
    tr = ls.unroll(model, tokens, T, capture=hooks, decode=True)
    p = dict(model.named_parameters())
    e = p["embed.weight"][tokens] + p["pos_embed"][:8]
    zH, zL = tr.states[0][:, 0], tr.states[0][:, 1]
    pre_L = "net" if cfg.shared else "L"
    pre_H = "net" if cfg.shared else "H"
    for t in range(T):
        for ell in range(L):
            x = zL + zH + e
            assert torch.allclose(tr["L.hook_in"][t * L + ell], x, atol=1e-12, rtol=0)
            zL = ref_block(x, p, f"{pre_L}.blocks.0", cfg, "post")
        assert torch.allclose(tr["H.hook_in"][t], zH + zL, atol=1e-12, rtol=0)
        zH = ref_block(zH + zL, p, f"{pre_H}.blocks.0", cfg, "post")
        assert torch.allclose(tr.states[t + 1][:, 0], zH, atol=1e-12, rtol=0)
        assert torch.allclose(tr.states[t + 1][:, 1], zL, atol=1e-12, rtol=0)
    ref_logits = rms(zH, p["ln_final.weight"], cfg.norm_eps) @ p["unembed.weight"].T
    assert torch.allclose(tr.logits[-1], ref_logits + p["unembed.bias"], atol=1e-12, rtol=0)
    # L-role hooks fire L_cycles times per H-cycle, labelled (h_cycle, l_cycle); H-role once
    assert tr.labels["L.hook_in"] == [(h, ell) for h in range(T) for ell in range(L)]
    assert tr.labels["H.hook_in"] == [(h, 0) for h in range(T)]
    if cfg.shared:  # TRM: the shared net fires in both roles; its last firing per step is H's
        lay = tr[f"{layer}.hook_resid_pre"]
        assert tr.labels[f"{layer}.hook_resid_pre"] == [
            (h, k) for h in range(T) for k in range(L + 1)
        ]
        assert torch.equal(lay[L :: L + 1], tr["H.hook_in"])
        idx = [t * (L + 1) + k for t in range(T) for k in range(L)]
        assert torch.equal(lay[idx], tr["L.hook_in"])
        assert "H.blocks.0.hook_resid_pre" not in model.hook_dict
    else:
        assert tr.labels["L.blocks.0.hook_resid_post"] == tr.labels["L.hook_in"]


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


@pytest.mark.parametrize("name", ["universal", "huginn"])
def test_patch_on_core_hook_leaves_earlier_iterations_identical(name):
    model = build(preset(name, vocab_size=9, n_classes=5, d_model=32, d_mlp=64)).double()
    tokens = torch.randint(0, 9, (2, 6))
    hook, post = "core.blocks.0.hook_resid_mid", "core.blocks.0.hook_resid_post"
    value = torch.randn(2, 6, 32, dtype=torch.float64)
    clean = ls.unroll(model, tokens, 6, capture=[hook, post], seed=5, decode=True)
    pt = ls.unroll(
        model,
        tokens,
        6,
        capture=[hook, post],
        seed=5,
        decode=True,
        interventions=[ls.Patch(hook, 3, value=value)],
    )
    assert torch.equal(pt.states[:4], clean.states[:4])
    assert torch.equal(pt.logits[:4], clean.logits[:4])
    assert torch.equal(pt[hook][:3], clean[hook][:3]) and torch.equal(pt[post][:3], clean[post][:3])
    assert torch.equal(pt[hook][3], value)  # recorders see the post-patch value
    assert not torch.allclose(pt.states[4], clean.states[4])
    assert not torch.allclose(pt.states[6], clean.states[6])


def test_zero_ablation_at_one_iteration():
    model = build(preset("universal", vocab_size=9, n_classes=5)).double()
    tokens = torch.randint(0, 9, (2, 6))
    hook = "core.blocks.0.hook_attn_out"
    clean = ls.unroll(model, tokens, 6, capture=[hook])
    pt = ls.unroll(model, tokens, 6, capture=[hook], interventions=[ls.Zero(hook, 3)])
    assert torch.equal(pt.states[:4], clean.states[:4])
    assert (pt[hook][3] == 0).all() and not (pt[hook][4] == 0).all()
    assert not torch.equal(pt.states[4], clean.states[4])


CAUSAL = [n for n in SINGLE if preset(n).causal]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_model_ignores_future_tokens(name):
    torch.manual_seed(4)
    model = build(preset(name, vocab_size=9, n_classes=5, d_model=32, d_mlp=64)).double()
    a = torch.randint(0, 9, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 9
    la = ls.unroll(model, a, 6, seed=0, decode=True).logits
    lb = ls.unroll(model, b, 6, seed=0, decode=True).logits
    assert torch.equal(la[:, 0, :7], lb[:, 0, :7])  # every iterate, bit for bit
    assert not torch.allclose(la[-1, 0, 7:], lb[-1, 0, 7:])


def test_bidirectional_model_sees_future_tokens():
    model = build(preset("maze_conv", vocab_size=9, n_classes=5, d_model=32, d_mlp=64))
    a = torch.randint(0, 9, (1, 16))
    b = a.clone()
    b[0, 15] = (b[0, 15] + 1) % 9
    la, lb = model(a, n_iter=3), model(b, n_iter=3)
    assert not torch.allclose(la[0, 0], lb[0, 0])


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
    from loopscope.models.checkpoint import load_model, save_model

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


BLOCK_HOOKS = [
    "hook_resid_pre",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
]


def test_hook_names_exist_and_fire_once_per_iteration():
    from loopscope.core.capture import count_firings

    cfg = preset("huginn", vocab_size=9, n_classes=5, d_model=32, d_mlp=48, mixer="conv1d")
    model = build(cfg)
    once = ["hook_embed", "hook_readout", "hook_logits"]
    once += [f"{s}.blocks.0.{h}" for s in ("prelude", "coda") for h in BLOCK_HOOKS]
    per_iter = ["hook_state", "core.hook_inject", "core.hook_mix", "core.hook_out"]
    per_iter += [f"core.blocks.{i}.{h}" for i in range(2) for h in BLOCK_HOOKS]
    assert set(once + per_iter) == set(model.hook_dict)  # nothing missing, nothing extra
    assert model.hook_dict["core.blocks.1.attn.hook_pattern"].pos_dim == 2
    T, tokens = 4, torch.randint(0, 9, (2, 5))
    counts = count_firings(model, tokens, n_iter=T)
    assert {n: counts[n] for n in once} == dict.fromkeys(once, 1)
    assert {n: counts[n] for n in per_iter} == dict.fromkeys(per_iter, T)
    tr = ls.unroll(model, tokens, T, capture="core.blocks.*.attn.hook_*", seed=0)
    assert tr.labels["core.blocks.1.attn.hook_z"] == [(t, 0) for t in range(T)]
    assert tr["core.blocks.0.attn.hook_pattern"].shape == (T, 2, 4, 5, 5)
    assert tr["core.blocks.0.attn.hook_v"].shape == (T, 2, 5, 4, 8)
    pattern = tr["core.blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()))  # rows are distributions
    assert (pattern.triu(1) == 0).all()  # causal


def test_swiglu_neurons_and_hook_shapes():
    model = build(preset("universal", act="swiglu", vocab_size=9, n_classes=5, d_mlp=24))
    tr = ls.unroll(
        model,
        torch.randint(0, 9, (3, 7)),
        2,
        capture=["core.blocks.0.mlp.hook_post", "core.blocks.0.attn.hook_q"],
    )
    assert tr["core.blocks.0.mlp.hook_post"].shape == (2, 3, 7, 24)
    assert tr["core.blocks.0.attn.hook_q"].shape == (2, 3, 7, 4, 16)


def test_plain_forward_and_float64():
    m32 = build(preset("fprm", vocab_size=9, n_classes=5))
    tokens = torch.randint(0, 9, (2, 6))
    g = torch.Generator().manual_seed(7)
    ctx32 = m32.encode(tokens)
    h32 = m32.init_state(ctx32, g)
    m64 = build(preset("fprm", vocab_size=9, n_classes=5))
    m64.load_state_dict(m32.state_dict())
    m64.double()
    assert m32.dtype == torch.float32 and m64.dtype == torch.float64
    ctx64 = m64.encode(tokens)
    h64 = m64.init_state(ctx64, torch.Generator().manual_seed(7))
    # random init drawn in float64 then cast: the float32 draw is the rounded float64 draw
    assert h64.dtype == torch.float64 and torch.equal(h64.float(), h32)
    assert h64.abs().max() <= 2 * 6.0  # trunc-normal(0, 6) on [-2 std, 2 std]
    out = m64(tokens, n_iter=3, h0=h64)
    tr = ls.unroll(m64, tokens, 3, init=h64, decode=True)
    assert out.dtype == torch.float64 and torch.equal(out, tr.logits[-1])
    assert torch.allclose(m32(tokens, n_iter=3, h0=h32).double(), out, atol=1e-4)


def test_ctx_select_subsets_every_tensor():
    model = build(preset("universal", vocab_size=9, n_classes=5)).double()
    tokens = torch.randint(0, 9, (4, 4))  # batch == pos: select must still use the batch axis
    ctx = model.encode(tokens)
    assert ctx["mask"].shape == (4, 4, 4) and ctx["grid"] is None
    idx = torch.tensor([2, 0])
    sub = model.select(ctx, idx)
    h = model.init_state(ctx) + torch.randn(4, 4, 64, dtype=torch.float64)
    assert torch.equal(model.step(h[idx], sub), model.step(h, ctx)[idx])
    assert model.batch_size(sub) == 2


def test_fast_loop_decode_and_given_slow_state():
    model = build(preset("trm", vocab_size=9, n_classes=5, d_model=32, d_mlp=64)).double()
    tokens = torch.randint(0, 9, (2, 8))
    zH = torch.randn(2, 8, 32, dtype=torch.float64)
    fast = model.fast_loop(zH)
    tr = ls.unroll(fast, tokens, 3, decode=True, capture=["L.hook_out", "H.hook_out"])
    ctx = model.encode(tokens)
    zL = model.init_state(ctx)[:, 1]
    for _ in range(3):
        zL = model.l_step(zL, zH, ctx["e"], ctx["mask"])
    assert torch.equal(tr.states[-1], zL)
    full = torch.stack([model.h_update(zH, zL, ctx["e"]), zL], dim=1)
    assert torch.equal(tr.logits[-1], model.decode(full, ctx))
    assert tr.labels["L.hook_out"] == [(t, 0) for t in range(3)]
    assert model.slow_loop() is model
    with pytest.raises(LoopscopeError, match="z_H has shape"):
        model.fast_loop(torch.zeros(3, 8, 32)).encode(tokens)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=0), "d_model"),
        (dict(n_heads=3), "n_heads"),
        (dict(d_mlp=2.5), "d_mlp"),
        (dict(n_core=0), "n_core"),
        (dict(n_prelude=-1), "n_prelude"),
        (dict(conv_kernel=0), "conv_kernel"),
        (dict(damping=0.0), "damping"),
        (dict(damping=1.5), "damping"),
        (dict(alpha_init=(1.0, 0.5)), "alpha_init"),
        (dict(init_std=-1.0), "init_std"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(causal="yes"), "causal"),
        (dict(init="ones"), "init"),
        (dict(injection="mul"), "injection"),
        (dict(mixer="conv3d"), "mixer"),
        (dict(halting="ponder"), "halting"),
        (dict(act="relu"), "act"),
        (dict(positions="alibi"), "positions"),
        (dict(d_model=12, n_heads=4, positions="rope"), "positions"),
        (dict(residual_scale="fprm", norm="post", injection="convex"), "norm"),
        (dict(residual_scale="fprm", norm="pre", injection="add"), "injection"),
        (dict(mixer="conv2d", causal=True), "causal"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    from loopscope.models import LoopedConfig

    with pytest.raises(LoopscopeError, match=rf"LoopedConfig\.{field}\b"):
        LoopedConfig(**kwargs)


def test_hierarchical_config_and_model_errors():
    from loopscope.models import HierarchicalConfig

    with pytest.raises(LoopscopeError, match=r"HierarchicalConfig\.L_cycles"):
        HierarchicalConfig(L_cycles=0)
    with pytest.raises(LoopscopeError, match=r"HierarchicalConfig\.halting"):
        HierarchicalConfig(halting="exit_gate")
    with pytest.raises(LoopscopeError, match=r"HierarchicalConfig\.shared"):
        HierarchicalConfig(shared=1)
    with pytest.raises(LoopscopeError, match="needs a HierarchicalConfig"):
        HierarchicalLoopedTransformer(preset("universal"))
    with pytest.raises(LoopscopeError, match="needs a LoopedConfig"):
        LoopedTransformer(preset("hrm"))
    m = build(preset("hrm", vocab_size=5, n_classes=5, max_pos=8, halting="act"))
    with pytest.raises(LoopscopeError, match="token id 5 out of vocabulary"):
        m.encode(torch.tensor([[0, 5]]))
    with pytest.raises(LoopscopeError, match="exceeds max_pos=8"):
        m.encode(torch.zeros(1, 9, dtype=torch.long))
    ctx = m.encode(torch.zeros(3, 4, dtype=torch.long))
    q = m.q_head(m.init_state(ctx), ctx)
    assert q.shape == (3, 2) and torch.allclose(q, torch.full_like(q, -5.0))
    with pytest.raises(LoopscopeError, match="no exit gate"):
        build(preset("act")).exit_gate(torch.zeros(1, 2, 64))


@pytest.mark.parametrize("name", preset_names())
def test_config_json_roundtrip(name):
    import json

    cfg = preset(name, vocab_size=11)
    back = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.vocab_size == 11
    with pytest.raises(LoopscopeError, match="unknown"):
        type(cfg).from_dict({**cfg.to_dict(), "d_modle": 3})


def test_ctx_mask_is_the_attention_mask():
    # a prefix-LM mask placed in the ctx (bidirectional over the first 3 tokens) is obeyed
    model = build(preset("universal", vocab_size=9, n_classes=5)).double()
    P = 7
    prefix = torch.ones(P, P, dtype=torch.bool).tril()
    prefix[:3, :3] = True

    def logits(tokens):
        ctx = model.encode(tokens)
        ctx["mask"] = prefix.expand(1, P, P)
        h = model.init_state(ctx)
        for _ in range(3):
            h = model.step(h, ctx)
        return model.decode(h, ctx)[0]

    a = torch.randint(0, 9, (1, P))
    b, c = a.clone(), a.clone()
    b[0, 2] = (b[0, 2] + 1) % 9  # inside the prefix: visible to position 0
    c[0, 5] = (c[0, 5] + 1) % 9  # after the prefix: invisible to positions < 5
    la = logits(a)
    assert not torch.allclose(la[0], logits(b)[0])
    assert torch.equal(la[:5], logits(c)[:5])
    assert torch.equal(model(a, n_iter=3)[0, 0], model(b, n_iter=3)[0, 0])  # causal default
