"""loopscope.wrap: hook points on an unmodified looped module, labelled per call, patchable per
call; the wrapped model is a Loop for unroll and the dynamics analyses; Huginn- and Ouro-shaped
local stand-ins (their remote code is not run here)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import loopscope as ls
from loopscope.core.errors import LoopscopeError, UnknownHookError
from tests.fixtures.mymodel import LoopedLM, make_loop
from tests.fixtures.remote_like import HuginnLike, OuroLike

pytestmark = pytest.mark.usefixtures("one_thread")
T = 5


@pytest.fixture(scope="module")
def lm():
    model = LoopedLM(T=T).eval()
    tokens = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]])
    return model, tokens


def hand_unrolled(model, tokens):
    """The block's internals, computed by hand (no hooks): the reference capture."""
    rec = {"in": [], "attn": [], "ln1": [], "mlp": [], "out": []}
    with torch.no_grad():
        e = model.emb(tokens)
        h = torch.zeros_like(e)
        blk = model.block
        P = tokens.shape[1]
        causal = torch.triu(torch.ones(P, P, dtype=torch.bool), 1)
        for _ in range(T):
            rec["in"].append(h)
            x = h + e
            a = blk.ln1(x)
            at = blk.attn(a, a, a, attn_mask=causal, need_weights=False)[0]
            x = x + at
            m = blk.mlp(blk.ln2(x))
            h = x + m
            rec["ln1"].append(a)
            rec["attn"].append(at)
            rec["mlp"].append(m)
            rec["out"].append(h)
    return {k: torch.stack(v) for k, v in rec.items()}, model.out(h)


def test_wrap_reproduces_a_hand_unrolled_capture_of_the_blocks_internals_exactly(lm):
    model, tokens = lm
    ref, logits = hand_unrolled(model, tokens)
    w = ls.wrap(model, loop="block")
    out, tr = w.run(tokens, capture=["block.attn", "block.ln1", "block.mlp", "block"])
    assert torch.equal(out, logits)  # the model's own forward, untouched
    for key, name in [("attn", "block.attn"), ("ln1", "block.ln1"), ("mlp", "block.mlp"),
                      ("out", "block")]:  # fmt: skip
        assert torch.equal(tr[name], ref[key]), name
        assert tr.labels[f"{name}.hook_out"] == [(t, 0) for t in range(T)]
    assert torch.equal(tr.states, torch.cat([ref["in"], ref["out"][-1:]]))
    assert tr.meta["n_calls"] == T and tr.n_iter == T


def test_patching_call_t_leaves_earlier_calls_bit_identical(lm):
    model, tokens = lm
    w = ls.wrap(model, loop="block")
    _, base = w.run(tokens, capture="block.mlp")
    value = torch.full((2, 6, 16), 0.25)
    out, pt = w.run(
        tokens, capture=["block.mlp", "block.attn"],
        interventions=[ls.Patch("block.attn", 2, value=value)],
    )  # fmt: skip
    assert torch.equal(pt["block.mlp"][:2], base["block.mlp"][:2])  # calls 0, 1: bit-identical
    assert torch.equal(pt["block.attn"][2], value)  # call 2: the patched value is what flows on
    assert not torch.equal(pt["block.mlp"][2], base["block.mlp"][2])
    assert all(not torch.equal(pt["block.mlp"][t], base["block.mlp"][t]) for t in range(2, T))
    with torch.no_grad():
        assert not torch.equal(out, model(tokens))


def test_the_wrapped_model_is_a_loop_whose_unroll_equals_its_own_forward(lm):
    model, tokens = lm
    w = make_loop(model)
    _, own = w.run(tokens, capture="block.attn")
    tr = ls.unroll(w, tokens, T, capture="block.attn", decode=True)
    assert torch.equal(tr["block.attn"], own["block.attn"])
    assert torch.equal(tr.states, own.states)
    with torch.no_grad():  # the same (fast) attention path as the run
        assert torch.equal(tr.logits[-1], model(tokens))
    pt = ls.unroll(w, tokens, T, capture="block.mlp",
                   interventions=[ls.Zero("block.attn", 3)])  # fmt: skip
    base = ls.unroll(w, tokens, T, capture="block.mlp")
    assert torch.equal(pt["block.mlp"][:3], base["block.mlp"][:3])
    assert not torch.equal(pt["block.mlp"][3], base["block.mlp"][3])


def test_dynamics_run_on_the_wrapped_loop_in_float64_and_match_finite_differences(lm):
    from loopscope.analysis import LoopMap, find_fixed_points, lyapunov, solve, spectrum

    model, tokens = lm
    w = make_loop(model)
    h = ls.unroll(w, tokens, 8).final
    m = LoopMap(w, tokens)
    z = m.flatten(h.double())
    J = m.jacobian(z)
    eps = 1e-4  # central differences: truncation ~1e-11 here, roundoff ~1e-9 at eps = 1e-6
    with torch.no_grad():
        cols = []
        for j in range(m.n):
            dz = torch.zeros_like(z)
            dz[:, j] = eps
            cols.append((m._raw(z + dz, m.ctx) - m._raw(z - dz, m.ctx)) / (2 * eps))
    fd = torch.stack(cols, 2)
    assert torch.allclose(J, fd, rtol=1e-6, atol=1e-10)
    assert spectrum(w, tokens, h).status == ["ok", "ok"]
    assert lyapunov(w, tokens, n_steps=10, warmup=2, k=1, bootstrap=0).to_frame().shape[0] == 2
    r = solve(w, tokens, h0=h, tol=1e-10, max_iter=100)
    assert r.z_best.dtype == torch.float64
    assert len(find_fixed_points(w, tokens[:1], 2, max_iter=20).seeds_frame()) == 2
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_capturing_an_unknown_path_names_the_near_match_and_what_wrap_does(lm):
    model, tokens = lm
    w = ls.wrap(model, loop="block")
    with pytest.raises(UnknownHookError) as e:
        w.run(tokens, capture="block.atn")
    msg = str(e.value)
    assert "block.attn" in msg and "also=" in msg and "\n" not in msg

    class Step(nn.Module):  # the user's first try: a module around the model, no hook points
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, h, e):
            return self.m.block(h, e)

    loop = ls.FnLoop(step=Step(model), encode=model.emb, init_state=lambda e, g: 0 * e)
    with pytest.raises(UnknownHookError) as e:
        ls.unroll(loop, tokens, 2, capture="block.attn")
    msg = str(e.value)
    assert "ls.wrap(model, loop=" in msg and "step_fn.m.block.attn" in msg and "\n" not in msg


def test_bad_wrap_arguments_get_one_line_errors(lm):
    model, tokens = lm
    with pytest.raises(LoopscopeError, match="did you mean: block"):
        ls.wrap(model, loop="blok")
    with pytest.raises(TypeError, match="did you mean: loop"):
        ls.wrap(model, loops="block")
    nested = nn.Module()
    nested.layers = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(LoopscopeError, match=r"loop='layers\.\*'"):
        ls.wrap(nested, loop="layers")
    w = ls.wrap(OuroLike(), loop="model.layers.*")  # two modules: no step to derive
    with pytest.raises(LoopscopeError, match="has no step"):
        ls.unroll(w, torch.zeros(1, 3, 16), 2, init=torch.zeros(1, 3, 16))


def test_unwrap_removes_every_hook_and_leaves_outputs_unchanged(lm):
    model, tokens = lm
    model = copy.deepcopy(model)
    with torch.no_grad():
        before = model(tokens)
        w = ls.wrap(model, loop="block")
        w.unwrap()
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all("_loopscope_points" not in vars(m) for m in model.modules())
        assert torch.equal(model(tokens), before)


def test_a_deep_copy_of_a_wrapped_loop_fires_its_own_hook_points(lm):
    model, tokens = lm
    w = make_loop(copy.deepcopy(model))
    c = copy.deepcopy(w).double()
    tr = ls.unroll(c, tokens, 2, capture="block.attn")
    assert tr["block.attn"].dtype == torch.float64
    assert c.hook_dict["block.attn"] is not w.hook_dict["block.attn"]
    assert next(w.model.parameters()).dtype == torch.float32


# -- Huginn- and Ouro-shaped stand-ins (their remote code is not run here) -----------------------
def test_huginn_pattern_labels_every_core_block_call_and_runs_spectrum_on_iterate_one_step():
    model = HuginnLike().eval()
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    w = ls.wrap(
        model,
        loop=["transformer.adapter", "transformer.core_block.*"],
        encode=lambda ids: model.embed_inputs(ids)[0],
        init_state=lambda e, g: torch.zeros_like(e),
        step=lambda h, e: model.core_block_forward(h, e, None, None, None, torch.tensor(0), 0)[0],
        decode=lambda h, e: model.predict_from_latents(h),
        state_axes=("batch", "pos", "d_model"),
    )
    torch.manual_seed(1)
    blocks = [f"transformer.core_block.{i}" for i in range(4)]
    out, tr = w.run(ids, model_kwargs={"num_steps": 6}, capture=blocks)
    assert set(tr.keys()) == {f"transformer.core_block.{i}.hook_out" for i in range(4)}
    assert tr.labels["transformer.core_block.3.hook_out"] == [(t, 0) for t in range(6)]
    assert torch.equal(tr["transformer.core_block.3"][-1], out["latent_states"])
    # the state entering each step is the adapter's input minus the embedding half
    assert tr.states.shape == (6, 2, 5, 32)  # adapter inputs cat[x, e]: not a state -> state map
    assert tr.meta["states"] == "boundary inputs"
    # the dynamics: one step = iterate_one_step's computation (core_block_forward)
    h = ls.unroll(w, ids, 30).final
    sp = ls.analysis.spectrum(w, ids, h)
    assert sp.status == ["ok", "ok"] and all(0 < r < 10 for r in sp.rho)
    step1 = lambda h, e: model.iterate_one_step(e, h)[0]  # noqa: E731  (the @no_grad helper)
    w1 = ls.wrap(model, loop="transformer.adapter", encode=w._fns["encode"],
                 init_state=w._fns["init"], step=step1)  # fmt: skip
    rho1 = ls.analysis.spectrum(w1, ids, h).rho  # forward AD runs under its @torch.no_grad
    assert max(abs(a - b) for a, b in zip(rho1, sp.rho, strict=True)) < 1e-12


def test_ouro_pattern_gives_every_step_and_the_halting_gate_per_step():
    model = OuroLike().eval()
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    w = ls.wrap(model, loop="model.layers.*", also=["model.norm", "model.early_exit_gate"])
    out, tr = w.run(ids, capture=["model.norm", "model.early_exit_gate", "model.layers.1"])
    assert tr.labels["model.norm.hook_out"] == [(t, 0) for t in range(4)]
    assert torch.equal(tr["model.norm"], torch.stack(out["hidden_states_list"]))
    assert torch.equal(tr["model.early_exit_gate"], torch.stack(out["gate_list"]))
    # patch step 2's last layer: steps 0 and 1 of every hook stay bit-identical
    _, pt = w.run(ids, capture=["model.norm"],
                  interventions=[ls.Zero("model.layers.1", 2)])  # fmt: skip
    assert torch.equal(pt["model.norm"][:2], tr["model.norm"][:2])
    assert not torch.equal(pt["model.norm"][2], tr["model.norm"][2])


def test_the_call_clock_labels_a_transformerlens_bridge_per_step():
    # TransformerLens's looped bridges (ouro / raven adapters; HRM-Text here, offline) fire their
    # block hooks once per step without an index: the same clock labels them
    from loopscope.core.capture import HookSession
    from loopscope.core.wrap import CallClock
    from loopscope.models import bridge_hrm_text, build_tiny_hrm_text

    model, tok = build_tiny_hrm_text(seed=0)
    bridge = bridge_hrm_text(model, tok)
    ids = torch.randint(0, 60, (1, 4), generator=torch.Generator().manual_seed(0))
    clock = CallClock(bridge.hook_dict["L_blocks.0.hook_in"])
    s = HookSession(bridge, capture="L_blocks.0.hook_out", clock=clock)
    with torch.no_grad(), s:
        bridge(ids)
    n = model.config.H_cycles * model.config.L_cycles
    assert s.labels()["L_blocks.0.hook_out"] == [(t, 0) for t in range(n)]
