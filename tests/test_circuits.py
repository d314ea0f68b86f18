"""circuits patching: golden #26 (AND/OR denoise/noise table), #27 (single differing component
recovers exactly 1), #30 (transplant bound with injection, persistence without); batched sweeps
equal one forward per patch bit for bit; metric columns; corruptions (STR pairs, resample, mean /
zero ablation, flagged Gaussian noise); bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from toy_pairs import lp0, tiny_pair

import loopscope as ls
from loopscope import tasks
from loopscope.circuits import (
    SweepResult,
    gaussian_noise,
    logit_diff_metric,
    mean_ablation,
    patch_sweep,
    resample,
    state_transplant,
    str_pairs,
    toys,
    zero_ablation,
)
from loopscope.core.errors import LoopscopeError

# the CI box is shared: one BLAS thread is faster than two contended ones
pytestmark = pytest.mark.usefixtures("one_thread")


def gate_table(kind, clean, corrupt):
    df = patch_sweep(
        toys.GateLoop(kind),
        torch.tensor([clean]),
        torch.tensor([corrupt]),
        ["hook_A", "hook_B", "hook_C"],
        "all",
        toys.gate_metric,
        n_iter=1,
        direction="both",
    ).to_frame()
    assert len(df) == 6 and (df["position"] == -1).all()  # [B, 1] hooks are patched whole
    return {(r.site[-1], r.direction): r.recovery for r in df.itertuples()}


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("and", {"A": (0, 0), "B": (0, 0), "C": (1, 0)}),
        ("or", {"A": (1, 1), "B": (1, 1), "C": (1, 0)}),
    ],
)
def test_golden26_and_or_denoise_noise_table(kind, expected):
    t = gate_table(kind, [1, 1], [0, 0])
    for comp, (den, noi) in expected.items():
        assert t[(comp, "denoise")] == den and t[(comp, "noise")] == noi


def test_golden27_single_differing_component():
    t = gate_table("and", [1, 1], [0, 1])
    assert (t[("A", "denoise")], t[("A", "noise")]) == (1.0, 0.0)
    assert (t[("B", "denoise")], t[("B", "noise")]) == (0.0, 1.0)
    assert (t[("C", "denoise")], t[("C", "noise")]) == (1.0, 0.0)


def test_batched_sweep_equals_one_forward_per_patch_exactly():
    model, clean, corrupt = tiny_pair()
    T = 3
    sites = ["hook_state", "blocks.0.attn.hook_z"]
    fast = patch_sweep(
        model,
        clean,
        corrupt,
        sites,
        "all",
        lp0,
        n_iter=T,
        direction="both",
        units={"blocks.0.attn.hook_z": 2},
        batch_size=7,
    ).to_frame()
    # 3 iterations x 4 positions x 2 examples (+ x 2 heads for hook_z), both directions
    assert len(fast) == 2 * (3 * 4 * 2 + 3 * 4 * 2 * 2)
    refs = {
        "clean": ls.unroll(model, clean, T, capture=sites),
        "corrupt": ls.unroll(model, corrupt, T, capture=sites),
    }
    for r in fast.itertuples():
        src = refs["clean" if r.direction == "denoise" else "corrupt"][r.site][r.iteration]
        run_in = corrupt if r.direction == "denoise" else clean

        def value(x, lab, r=r, src=src):
            out = x.clone()
            if r.unit < 0:
                out[:, r.position] = src[r.example, r.position]
            else:
                out[:, r.position, r.unit] = src[r.example, r.position, r.unit]
            return out

        one = ls.unroll(
            model,
            run_in[r.example : r.example + 1],
            T,
            interventions=[ls.Patch(r.site, r.iteration, value=value)],
        )
        assert lp0(one.decode(), torch.tensor([0])).item() == r.metric  # bit for bit
    # an unpatched reference equals the base columns, and recovery is the normalised metric
    assert np.allclose(
        fast["recovery"], (fast["metric"] - fast["corrupt"]) / (fast["clean"] - fast["corrupt"])
    )
    res = patch_sweep(model, clean, corrupt, sites, [0], lp0, n_iter=T, batch_size=7)
    assert isinstance(res, SweepResult) and type(res.to_frame()) is pd.DataFrame


def _one_patch(model, inputs, r, src, T, read_at=None):
    def value(x, lab):
        out = x.clone()
        out[:, r.position] = src[r.example, r.position]
        return out

    one = ls.unroll(
        model,
        inputs[r.example : r.example + 1],
        max(T, read_at or T),
        interventions=[ls.Patch(r.site, r.iteration, value=value)],
    )
    return one.decode(read_at or T)


def test_measure_at_reads_out_later():
    model, clean, corrupt = tiny_pair(B=2)
    res = patch_sweep(model, clean, corrupt, ["hook_state"], [1], lp0, n_iter=2, measure_at=5)
    df = res.to_frame()
    src = ls.unroll(model, clean, 5, capture=["hook_state"])["hook_state"][1]
    for r in df.itertuples():
        assert (
            lp0(_one_patch(model, corrupt, r, src, 2, read_at=5), torch.tensor([0])).item()
            == r.metric
        )
    assert res.meta["measured_at"] == 5


def test_answer_metric_columns_match_a_direct_computation():
    model, clean, corrupt = tiny_pair(B=3)
    ans, wrong = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    metric = logit_diff_metric(ans, wrong, position=-1)
    df = patch_sweep(model, clean, corrupt, ["hook_state"], [0, 2], metric, n_iter=3).to_frame()
    cols = ("metric", "recovery", "logprob", "prob", "logprob_wrong", "kl", "kl_delta", "accuracy")
    for col in (*cols, "nl", "effect_E"):
        assert col in df and df[col].notna().all()
    lp_clean = ls.unroll(model, clean, 3).decode()[:, -1].double().log_softmax(-1)
    lp_corr = ls.unroll(model, corrupt, 3).decode()[:, -1].double().log_softmax(-1)
    src = ls.unroll(model, clean, 3, capture=["hook_state"])["hook_state"]
    for r in df.sample(6, random_state=0).itertuples():
        lg = _one_patch(model, corrupt, r, src[r.iteration], 3)[0, -1].double()
        lp = lg.log_softmax(-1)
        b = r.example
        kl = float((lp_clean[b].exp() * (lp_clean[b] - lp)).sum())
        kl_co = float((lp_clean[b].exp() * (lp_clean[b] - lp_corr[b])).sum())
        assert r.metric == pytest.approx(float(lg[ans[b]] - lg[wrong[b]]), abs=1e-12)
        assert r.logprob == pytest.approx(float(lp[ans[b]]), abs=1e-12)
        assert r.logprob_wrong == pytest.approx(float(lp[wrong[b]]), abs=1e-12)
        assert r.kl == pytest.approx(kl, abs=1e-12)
        assert r.kl_delta == pytest.approx(kl_co - kl, abs=1e-12)
        assert r.accuracy == float(int(lg.argmax()) == int(ans[b]))
        assert r.nl == pytest.approx(float(lg[ans[b]] / lg.max()), abs=1e-12)
        # denoising: the run is the corrupted one (answer r'), the patch source the clean one (r)
        pre, post = lp_corr[b].exp(), lp.exp()
        a, s = wrong[b], ans[b]
        E = 0.5 * ((post[s] - pre[s]) / pre[s] + (pre[a] - post[a]) / post[a])
        assert r.effect_E == pytest.approx(float(E), rel=1e-10)


def test_generic_metric_gets_kl_columns_and_position_whole_for_flat_states():
    W = 0.5 * torch.eye(3, dtype=torch.float64)
    # the input sets h_0 only (no injection): restoring the whole state restores the run
    loop = ls.FnLoop(step=lambda h: torch.tanh(h @ W + 0.1), init_state=lambda x, gen: x.clone())
    clean = torch.ones(2, 3, dtype=torch.float64)
    df = patch_sweep(
        loop, clean, -clean, ["hook_state"], "all", lambda lg, i: lg[:, 0], n_iter=2
    ).to_frame()
    assert (df["position"] == -1).all() and len(df) == 2 * 2
    assert {"kl", "kl_delta"} <= set(df.columns)
    assert (df["recovery"] == 1.0).all() and (df["kl"].abs() < 1e-15).all()


def test_golden30_transplant_persists_without_injection_and_obeys_bound_with_it():
    d = 6
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g, dtype=torch.float64)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)  # Lipschitz <= 0.5 (tanh is 1-Lipschitz)
    clean = torch.randn(3, d, generator=g, dtype=torch.float64)
    corrupt = torch.randn(3, d, generator=g, dtype=torch.float64)

    def metric(lg, i):
        return lg[:, 0] - lg[:, 1]

    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    # no injection: an orthogonal map carries the state, the input only sets h_0
    no_inj = ls.FnLoop(step=lambda h, x: h @ Q, init_state=lambda x, gen: x.clone())
    rec = state_transplant(no_inj, clean, corrupt, metric, n_iter=5, extra=4).to_frame()
    assert len(rec) == 5 * 2 * 3 and np.allclose(rec["recovery"], 1.0)
    inj = ls.FnLoop(
        step=lambda h, x: torch.tanh(h @ W.T + x), init_state=lambda x, gen: torch.zeros_like(x)
    )
    T = 10
    rec = state_transplant(inj, clean, corrupt, metric, n_iter=T, extra=5).to_frame()
    for r in rec.itertuples():
        assert r.dist_corrupt <= 0.5 ** (r.measured_at - r.t) * r.gap + 1e-12
    # the transplanted effect decays back to the corrupted attractor
    late = rec[(rec.t == 2) & (rec.measured_at == T + 5)]
    assert (late["gap"] > 0.1).all()
    assert (late["dist_corrupt"] < 1e-3 * late["gap"]).all()


def test_str_pairs_groups_addition_multiplication():
    s3 = tasks.get("s3", train_len=(6, 6))
    p = str_pairs(s3, 8, seed=0)
    diff = (p.clean != p.corrupt).sum(1)
    assert (diff == 1).all() and (p.answer != p.wrong).all()
    assert (p.answer_position == p.clean.shape[1] - 1).all()  # every later prefix product changes
    assert torch.equal(p.clean, str_pairs(s3, 8, seed=0).clean)  # deterministic
    table = torch.as_tensor(s3.table)
    s = torch.zeros(8, dtype=torch.long)
    for i in range(1, p.corrupt.shape[1]):
        s = table[p.corrupt[:, i], s]
    assert torch.equal(s, p.wrong)

    add = tasks.get("addition", train_digits=(4, 4))
    pa = str_pairs(add, 6, seed=1)
    from loopscope.tasks.addition import add_digits

    c1 = add_digits(pa.clean.numpy() // 10, pa.clean.numpy() % 10)
    c2 = add_digits(pa.corrupt.numpy() // 10, pa.corrupt.numpy() % 10)
    assert ((c1["carry"] != c2["carry"]).sum(1) == 1).all()  # exactly one carry flips
    rows = np.arange(6)
    assert (c1["sum"][rows, pa.answer_position] == pa.answer.numpy()).all()
    assert (c2["sum"][rows, pa.answer_position] == pa.wrong.numpy()).all()
    assert all(v.startswith("carry") for v in pa.variable)

    mul = tasks.get("multiplication")
    pm = str_pairs(mul, 5, seed=2)
    assert ((pm.clean != pm.corrupt).sum(1) == 1).all() and (pm.answer != pm.wrong).all()
    assert set(pm.to_frame().columns) >= {"variable", "answer", "wrong", "answer_position"}


def test_str_pairs_generic_labeler_and_unknown_task():
    with pytest.raises(LoopscopeError, match="no STR builder"):
        str_pairs(tasks.get("maze_reach"), 2)
    z5 = tasks.get("z5", train_len=(4, 4))

    def label(tok):  # running sum mod 5, the same labels as the task
        out = np.full(tok.shape, -100)
        out[:, 1:] = np.cumsum(tok[:, 1:], 1) % 5
        return out

    p = str_pairs(z5, 4, labeler=label, positions=[2], vocab=range(5), seed=3)
    assert (p.changed_position == 2).all() and (p.answer != p.wrong).all()


def test_sweep_with_str_pairs_metric_and_model():
    s3 = tasks.get("s3", train_len=(4, 4))
    p = str_pairs(s3, 3, seed=0)
    model = toys.TinyLoopedTransformer(
        vocab_size=s3.vocab_size, n_ctx=8, d_model=16, n_heads=2, d_mlp=16, n_classes=6
    )
    res = patch_sweep(model, p.clean, p, ["hook_state"], [1], n_iter=2)
    df = res.to_frame()
    assert {"logprob", "accuracy"} <= set(df.columns) and len(df) == 5 * 3
    assert res.meta["corruption"] == "str"


def test_resample_and_ablation_corruptions():
    x = torch.arange(10).reshape(5, 2)
    c = resample(x, seed=0, answers=torch.tensor([0, 0, 1, 1, 2]))
    perm = np.array(c.meta["partner"])
    assert (perm != np.arange(5)).all() and torch.equal(c.inputs, x[perm])
    assert (np.array([0, 0, 1, 1, 2])[perm] != np.array([0, 0, 1, 1, 2])).all()
    with pytest.raises(LoopscopeError, match="partner"):
        resample(x, answers=torch.zeros(5))

    model, clean, _ = tiny_pair(B=3)
    z = zero_ablation(clean, ["blocks.0.hook_mlp_out"])
    df = patch_sweep(
        model, clean, z, ["blocks.0.hook_mlp_out"], [0], lp0, n_iter=2, direction="noise"
    ).to_frame()
    # noising with the zero source = zeroing one position of mlp_out at iteration 0
    r = df.iloc[5]

    def zero_one(x, lab):
        out = x.clone()
        out[:, r.position] = 0
        return out

    one = ls.unroll(
        model,
        clean[r.example : r.example + 1],
        2,
        interventions=[ls.Patch("blocks.0.hook_mlp_out", 0, value=zero_one)],
    )
    assert lp0(one.decode(), torch.tensor([0])).item() == r.metric
    m = mean_ablation(model, clean, ["blocks.0.hook_mlp_out"], 2)
    tr = ls.unroll(
        model,
        clean,
        2,
        capture=["blocks.0.hook_mlp_out"],
        interventions=m.interventions(torch.arange(3)),
    )
    ref = ls.unroll(model, clean, 2, capture=["blocks.0.hook_mlp_out"])["blocks.0.hook_mlp_out"][
        0
    ].mean(0)
    assert torch.allclose(tr["blocks.0.hook_mlp_out"][0], ref.expand(3, *ref.shape))


def test_gaussian_noise_needs_replication_flag():
    model, clean, _ = tiny_pair(B=2)
    with pytest.raises(LoopscopeError, match="replication"):
        gaussian_noise(model, clean)
    c = gaussian_noise(model, clean, positions=[1], replication=True, seed=0)
    assert c.flagged and c.meta["nu"] > 0
    res = patch_sweep(model, clean, c, ["hook_state"], [0], lp0, n_iter=2)
    assert res.meta["flagged"] and res.meta["corruption"] == "gaussian"
    tr = ls.unroll(
        model, clean, 1, capture=["hook_embed"], interventions=c.interventions(torch.arange(2))
    )
    base = ls.unroll(model, clean, 1, capture=["hook_embed"])
    delta = (tr["hook_embed"] - base["hook_embed"])[0]
    assert delta[:, [0, 2, 3]].abs().max() == 0 and delta[:, 1].abs().max() > 0


def test_bad_inputs():
    gate = toys.GateLoop("and")
    one, two = torch.tensor([[1, 1]]), torch.tensor([[0, 0]])
    with pytest.raises(LoopscopeError, match="same shape"):
        patch_sweep(
            gate, one, torch.tensor([[1, 1, 0]]), ["hook_A"], [0], toys.gate_metric, n_iter=1
        )
    with pytest.raises(LoopscopeError, match="out of range"):
        patch_sweep(gate, one, two, ["hook_A"], [3], toys.gate_metric, n_iter=1)
    with pytest.raises(LoopscopeError, match="direction"):
        patch_sweep(
            gate, one, two, ["hook_A"], [0], toys.gate_metric, n_iter=1, direction="sideways"
        )
    with pytest.raises(LoopscopeError, match="unknown option 'batchsize'"):
        patch_sweep(gate, one, two, ["hook_A"], [0], toys.gate_metric, n_iter=1, batchsize=3)
    with pytest.raises(LoopscopeError, match="hook_Q"):
        patch_sweep(gate, one, two, ["hook_Q"], [0], toys.gate_metric, n_iter=1)
    with pytest.raises(LoopscopeError, match="metric is required"):
        patch_sweep(gate, one, two, ["hook_A"], [0], n_iter=1)
    with pytest.raises(LoopscopeError, match="no position axis"):
        from loopscope.circuits.engine import Elements, Source, row_patch, site_info

        src = Source.from_trace(ls.unroll(gate, one, 1, capture=["hook_A"]), ["hook_A"])
        el = Elements()
        el.add(0, 0, pos=0)
        row_patch("hook_A", el, torch.tensor([0]), src, site_info(gate, src, "hook_A"))
    model, clean, corrupt = tiny_pair()
    with pytest.raises(LoopscopeError, match="position 9 out of range"):
        patch_sweep(model, clean, corrupt, ["hook_state"], [0], lp0, n_iter=1, positions=[9])
    assert math.isfinite(
        patch_sweep(model, clean, corrupt, ["hook_state"], [0], lp0, n_iter=1, positions=[-1])
        .to_frame()["metric"]
        .iloc[0]
    )


def test_prefix_reuse_on_a_looped_transformer_with_random_init_and_encode_hooks():
    from loopscope.models import build, preset

    torch.manual_seed(0)
    model = (
        build(preset("fprm", vocab_size=7, n_classes=6, d_model=16, n_heads=2, d_mlp=32))
        .double()
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 7, (2, 5), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % 7
    sites = ["core.blocks.0.hook_resid_pre", "hook_embed"]  # hook_embed fires in encode
    fast = patch_sweep(
        model, clean, corrupt, sites, "all", lp0, n_iter=4, seed=3, batch_size=9
    ).to_frame()
    slow = patch_sweep(
        model, clean, corrupt, sites, "all", lp0, n_iter=4, seed=3, reuse_prefix=False
    ).to_frame()
    assert len(fast) == (4 + 1) * 5 * 2 and set(fast[fast.site == "hook_embed"].iteration) == {0}
    # equal up to float64 rounding of batched vs single-row BLAS matmuls
    assert np.allclose(fast["metric"], slow["metric"], rtol=1e-12, atol=1e-12)
    refs = ls.unroll(model, clean, 4, capture=sites, seed=3)
    h0 = model.init_state(model.encode(corrupt), torch.Generator().manual_seed(3))  # random init
    for r in fast.sample(8, random_state=1).itertuples():
        src = refs[r.site][r.iteration][r.example, r.position]

        def value(x, lab, src=src, p=r.position):
            out = x.clone()
            out[:, p] = src
            return out

        one = ls.unroll(
            model,
            corrupt[r.example : r.example + 1],
            4,
            init=h0[r.example : r.example + 1],
            interventions=[ls.Patch(r.site, r.iteration, value=value)],
        )
        assert lp0(one.decode(), torch.tensor([0])).item() == pytest.approx(
            r.metric, rel=1e-12, abs=1e-12
        )


def test_prefix_reuse_keeps_absolute_iterations_for_non_autonomous_loops():
    # h' = h + (t + 1) x: the step reads t, so a run resumed at s must still see t = s, s + 1 ...
    loop = ls.FnLoop(
        step=lambda h, x, t: h + (t + 1) * x, init_state=lambda x, gen: torch.zeros_like(x)
    )
    clean = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    corrupt = -clean

    def m(lg, i):
        return lg[:, 0]

    fast = patch_sweep(
        loop, clean, corrupt, ["hook_state"], "all", m, n_iter=4, direction="both"
    ).to_frame()
    slow = patch_sweep(
        loop,
        clean,
        corrupt,
        ["hook_state"],
        "all",
        m,
        n_iter=4,
        direction="both",
        reuse_prefix=False,
    ).to_frame()
    assert np.array_equal(fast["metric"].to_numpy(), slow["metric"].to_numpy())
    # denoising h_t restores sum_{s<t}(s+1) x_clean, the rest comes from the corrupted input
    for r in fast[fast.direction == "denoise"].itertuples():
        t, x = r.iteration, clean[r.example, 0].item()
        want = sum(s + 1 for s in range(t)) * x - sum(s + 1 for s in range(t, 4)) * x
        assert r.metric == want


def test_diverging_rows_are_flagged_not_raised():
    # h' = h * x, h_0 = 1: x = 1 is stable, x = 1e5 blows up past 1e8 |h_0| at the second step
    loop = ls.FnLoop(step=lambda h, x: h * x, init_state=lambda x, gen: torch.ones_like(x))
    clean = torch.ones(1, 1, dtype=torch.float64)
    corrupt = torch.full((1, 1), 1e5, dtype=torch.float64)

    def m(lg, i):
        return torch.log(lg[:, 0])

    for reuse in (True, False):
        df = patch_sweep(
            loop,
            clean,
            corrupt,
            ["hook_state"],
            "all",
            m,
            n_iter=3,
            direction="both",
            reuse_prefix=reuse,
        ).to_frame()
        den = df[df.direction == "denoise"].sort_values("iteration")
        # the corrupted run blows up at its second step, before any patch at t >= 2 can act
        assert den["diverged"].tolist() == [True, True, True]
        # the corrupted reference froze at h_1 = 1e5: every number read off it or sourced from
        # it (the corrupt metric, the noising patches) is flagged and NaN, never a plausible value
        noi = df[df.direction == "noise"].sort_values("iteration")
        assert noi["diverged"].all()
        assert df[["metric", "corrupt", "recovery"]].isna().all(axis=None)
        assert (df["clean"] == 0.0).all()  # the clean run itself is healthy: log(1) = 0
