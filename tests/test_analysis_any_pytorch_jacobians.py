"""Jacobians on any PyTorch code: a plain-PyTorch looped transformer with nn.MultiheadAttention
(fast path on, default SDPA), an FnLoop whose step closes over a float32 module, an op without
a forward-AD formula; the float64 analysis reaches every parameter; checked against finite
differences."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from loopscope import FnLoop
from loopscope.analysis import LoopMap, find_fixed_points, solve, spectrum
from loopscope.core.errors import LoopscopeError

F64 = torch.float64


class LoopedTransformer(nn.Module):
    """Embedding, one weight-tied pre-norm block applied T times with input injection."""

    def __init__(self, vocab=7, d=8, heads=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out = nn.Linear(d, vocab)
        with torch.no_grad():  # a contraction-ish block: small output projections
            self.attn.out_proj.weight.mul_(0.3)
            self.mlp[2].weight.mul_(0.3)

    def block(self, h, e):
        x = h + e
        a = self.ln1(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))

    def forward(self, tokens, T=8):
        e = self.emb(tokens)
        h = torch.zeros_like(e)
        for _ in range(T):
            h = self.block(h, e)
        return self.out(h)


def make_loop(model):
    # a user's FnLoop: the functions close over the (float32) model; nothing is registered
    return FnLoop(
        step=lambda h, e: model.block(h, e),
        encode=lambda tokens: model.emb(tokens),
        init_state=lambda e, g: torch.zeros_like(e),
        decode=lambda h, e: model.out(h),
    )


def fd_jacobian(step, z, eps=1e-6):
    """Central finite differences of a flat map on one sample, float64."""
    n = z.numel()
    cols = []
    for j in range(n):
        dz = torch.zeros_like(z)
        dz.view(-1)[j] = eps
        cols.append(((step(z + dz) - step(z - dz)) / (2 * eps)).reshape(-1))
    return torch.stack(cols, 1)


@pytest.fixture(scope="module")
def transformer():
    model = LoopedTransformer().eval()
    tokens = torch.tensor([[1, 2, 3, 4], [4, 0, 6, 2]])
    return model, tokens


def test_mha_looped_transformer_spectrum_matches_finite_differences(transformer):
    model, tokens = transformer
    loop = make_loop(model)
    with torch.no_grad():
        e = model.emb(tokens)
        h = e.clone()
        for _ in range(6):
            h = model.block(h, e)
    with pytest.raises(NotImplementedError, match="forward AD"):  # what a bare jvp hits here
        m64 = copy.deepcopy(model).double()
        e64 = m64.emb(tokens).detach()
        torch.func.jvp(lambda z: m64.block(z, e64), (e64,), (e64,))
    sp = spectrum(loop, tokens, h)
    assert sp.status == ["ok", "ok"]
    assert sp.meta["jacobian_path"] in ("forward (math attention)", "reverse")
    # the reference: a float64 copy of the model, plain forward evaluations (fast path included)
    ref = copy.deepcopy(model).double()
    e64, h64 = ref.emb(tokens), h.double()
    for b in range(2):
        with torch.no_grad():
            J = fd_jacobian(lambda z, b=b: ref.block(z, e64[b : b + 1]), h64[b : b + 1])
        rho = float(np.abs(np.linalg.eigvals(J.numpy())).max())
        assert abs(sp.rho[b] - rho) < 1e-6 * max(1.0, rho), (sp.rho[b], rho)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is untouched


def test_mha_fast_path_is_restored_after_the_analysis(transformer):
    model, tokens = transformer
    before = torch.backends.mha.get_fastpath_enabled()
    m = LoopMap(make_loop(model), tokens)
    z = m.init()
    m.jacobian(z)
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert m.extra_modules and m.extra_modules[0] is model


def test_closure_over_a_float32_module_runs_in_float64_for_solve_and_census():
    torch.manual_seed(3)
    net = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5), nn.Tanh())
    with torch.no_grad():
        net[1].weight.mul_(0.5)
    loop = FnLoop(step=lambda h, x: 0.5 * net(h) + x)
    x = torch.randn(2, 5)
    r = solve(loop, x, h0=torch.zeros(2, 5), tol=1e-13, max_iter=200)
    assert r.status == ["converged", "converged"] and r.z_best.dtype == F64
    # converged to 1e-13 relative: only possible if every parameter computed in float64
    ref = copy.deepcopy(net).double().requires_grad_(False)
    hs = r.z_best
    assert float((0.5 * ref(hs) + x.double() - hs).norm()) < 1e-11
    c = find_fixed_points(loop, x, torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    assert (c.kind == ["fixed", "fixed"]) and bool(c.stable.all())
    J = fd_jacobian(lambda z: 0.5 * ref(z) + x[:1].double(), hs[:1])
    rho = float(np.abs(np.linalg.eigvals(J.numpy())).max())
    sp = spectrum(loop, x, hs)
    assert abs(sp.rho[0] - rho) < 1e-6 * max(1.0, rho)
    assert net[1].weight.dtype == torch.float32


def test_spectrum_accepts_float32():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    loop = FnLoop(step=lambda h: net(h))
    h = torch.randn(2, 6)
    s64 = spectrum(loop, None, h)
    s32 = spectrum(loop, None, h, dtype=torch.float32)
    assert np.allclose(s32.rho, s64.rho, rtol=1e-4)


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward formula only (like a fused kernel without a jvp)."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_an_op_without_forward_ad_falls_back_to_reverse_mode():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 6, generator=g, dtype=F64) / 6**0.5
    loop = FnLoop(step=lambda h: _NoForwardAD.apply(h @ W.T))
    h = torch.randn(2, 6, generator=g, dtype=F64)
    sp = spectrum(loop, None, h)
    assert sp.meta["jacobian_path"] == "reverse"
    for b in range(2):
        J = torch.func.jacrev(lambda z: torch.tanh(z @ W.T))(h[b])
        assert abs(sp.rho[b] - float(np.abs(np.linalg.eigvals(J.numpy())).max())) < 1e-12
    arp = spectrum(loop, None, h, method="arpack", k=2)  # matrix-free products on the same path
    assert np.allclose(arp.rho, sp.rho, atol=1e-10)


def test_hrm_text_fast_loop_spectrum_runs_in_float64_through_its_unregistered_bridge():
    from loopscope.models import bridge_hrm_text, build_tiny_hrm_text, hrm_text_loop

    model, tok = build_tiny_hrm_text(seed=0)
    loops = hrm_text_loop(bridge_hrm_text(model, tok))
    ids = torch.randint(0, 60, (1, 3), generator=torch.Generator().manual_seed(1))
    from loopscope import unroll

    h = unroll(loops.fast, ids, 2).final
    s64 = spectrum(loops.fast, ids, h, sigma=False)  # was: "double != float" in the bridge
    s32 = spectrum(loops.fast, ids, h, sigma=False, dtype=torch.float32)
    assert s64.status == ["ok"] and abs(s64.rho[0] - s32.rho[0]) < 1e-4 * s64.rho[0]
    assert s64.rho[0] != s32.rho[0]  # the float64 run really computed in float64
    assert next(model.parameters()).dtype == torch.float32


def test_mha_looped_transformer_lyapunov_and_census_run_through_the_fallback(transformer):
    from loopscope.analysis import lyapunov

    model, tokens = transformer
    loop = make_loop(model)
    res = lyapunov(loop, tokens, n_steps=30, warmup=5, k=2, bootstrap=0)
    lam = res.to_frame()
    # it ran on the fallback path (a bare jvp raises here, see the spectrum test) for every sample
    assert len(lam) == 4 and np.isfinite(lam["exponent"]).all() and not lam["diverged"].any()
    c = find_fixed_points(loop, tokens[:1], 2, max_iter=5, spectra=True)
    assert c.meta["jacobian_path"] in ("forward (math attention)", "reverse")
    assert len(c.seeds_frame()) == 2


def test_input_sensitivity_without_forward_ad_matches_the_implicit_function_formula():
    from loopscope.analysis import input_sensitivity

    g = torch.Generator().manual_seed(6)
    W = 0.5 * torch.randn(4, 4, generator=g, dtype=F64) / 2
    loop = FnLoop(step=lambda h, x: _NoForwardAD.apply(h @ W.T + x))
    x = torch.randn(2, 4, generator=g, dtype=F64)
    hs = solve(loop, x, h0=torch.zeros(2, 4, dtype=F64), tol=1e-15, max_iter=300).z_best
    S = input_sensitivity(loop, x, hs)
    assert S.meta["jacobian_path"] == "reverse"
    v = torch.randn(2, 4, generator=g, dtype=F64)
    Sv = input_sensitivity(loop, x, hs, direction=v).dh_dx
    for b in range(2):
        D = torch.diag(1 - hs[b] ** 2)
        ref = torch.linalg.solve(torch.eye(4, dtype=F64) - D @ W, D)  # (I - J)^-1 df/dx
        assert torch.allclose(S.dh_dx[b], ref, atol=1e-12)
        assert torch.allclose(Sv[b], ref @ v[b], atol=1e-12)


class _Registry:
    lin = nn.Linear(4, 4)  # a class attribute: no closure, attribute or global search reaches it


def test_a_module_the_float64_copy_cannot_reach_fails_up_front_naming_the_tensor():
    loop = FnLoop(step=lambda h: torch.tanh(_Registry.lin(h)))
    with pytest.raises(LoopscopeError, match=r"Linear\.weight is torch\.float32 but the analysis"):
        spectrum(loop, None, torch.zeros(1, 4))
    assert spectrum(loop, None, torch.zeros(1, 4), dtype=torch.float32).status == ["ok"]


def test_a_float64_analysis_of_a_step_closing_over_a_bridge_block_leaves_it_float32():
    # TransformerLens bridge components register one HF layer under two paths; swapping both
    # (torch's tie_weights=True) left the float64 copy in the user's model
    from loopscope.models import bridge_hrm_text, build_tiny_hrm_text

    model, tok = build_tiny_hrm_text(seed=0)
    attn = bridge_hrm_text(model, tok).L_blocks[0].attn  # q_proj is also reachable as attn.q
    loop = FnLoop(step=lambda h: torch.tanh(attn.q(h)))
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    m = LoopMap(loop, None, state_shape=(64,), batch_size=1)
    z = h.double()
    J = m.jacobian(z)[0]
    with torch.no_grad():
        ref = fd_jacobian(lambda x: m._raw(x.reshape(1, 64), None), z)
    assert torch.allclose(J, ref, rtol=1e-6, atol=1e-9)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _closure_loop():
    torch.manual_seed(3)
    net = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5), nn.Tanh())
    with torch.no_grad():
        net[1].weight.mul_(0.5)
    return FnLoop(step=lambda h, x: 0.5 * net(h) + x), net, torch.randn(2, 5)


@pytest.mark.parametrize("which", ["mha_fast_path", "fnloop_closure"])
def test_every_jacobian_analysis_runs_in_float64_and_the_jacobian_matches_finite_differences(
    which, transformer
):
    from loopscope.analysis import lyapunov

    if which == "mha_fast_path":  # nn.MultiheadAttention, fast path on, default SDPA
        model, x = transformer
        loop, mods = make_loop(model), model
    else:  # an FnLoop whose lambda closes over a float32 module (LayerNorm + Linear)
        loop, mods, x = _closure_loop()
    state = (*x.shape, model.emb.embedding_dim) if which == "mha_fast_path" else tuple(x.shape)
    m = LoopMap(loop, x, state_shape=state[1:])
    g = torch.Generator().manual_seed(0)
    z = 0.5 * torch.randn(m.B, m.n, generator=g, dtype=F64)  # a generic state
    J = m.jacobian(z)
    eps = 3e-5  # central differences: truncation and roundoff both ~1e-11 at this step
    with torch.no_grad():
        cols = []
        for j in range(m.n):
            dz = torch.zeros_like(z)
            dz[:, j] = eps
            cols.append((m._raw(z + dz, m.ctx) - m._raw(z - dz, m.ctx)) / (2 * eps))
    fd = torch.stack(cols, 2)
    assert J.dtype == F64 and torch.allclose(J, fd, rtol=1e-6, atol=1e-10)
    h0 = m.unflatten(z).to(torch.float32)
    r = solve(loop, x, h0=h0, tol=1e-12, max_iter=200)
    assert r.z_best.dtype == F64 and r.status == ["converged", "converged"]
    assert spectrum(loop, x, r.z_best).status == ["ok", "ok"]
    lam = lyapunov(loop, x, h0=h0, n_steps=20, warmup=2, k=1, bootstrap=0).to_frame()
    assert len(lam) == 2 and np.isfinite(lam["exponent"]).all()
    seeds = r.z_best[:1] + 1e-3 * torch.randn(3, *r.z_best.shape[1:], generator=g, dtype=F64)
    c = find_fixed_points(loop, x[:1], seeds, max_iter=50, spectra=True)
    assert c.end_states.dtype == F64 and (c.seed_class == "fixed").all()
    assert abs(float(c.rho[0]) - spectrum(loop, x[:1], r.z_best[:1]).rho[0]) < 1e-8
    assert {p.dtype for p in mods.parameters()} == {torch.float32}
