"""circuits.path_patching: path patching across iterations.

1. nothing frozen: sender -> readout is ordinary ``patch_sweep`` (exact, same rows), and so is the
   path through the whole later state;
2. a linear two-route loop with known path effects: the state-only route, the route through a
   same-step component and the routes through the component at later iterations, which sum to
   the total effect;
3. pass 1 leaves iterations before the sender bit-identical and holds the frozen sites at base;
   pass 2 changes nothing before the receivers' iteration and only the receivers' slices there;
4. batched rows equal one path per forward and an independent two-pass reference;
5. bad input gives one-line LoopscopeErrors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from toy_pairs import lp0, tiny_pair
from transformer_lens.hook_points import HookPoint

import loopscope as ls
from loopscope.circuits import (
    PathNode,
    patch_sweep,
    path_patch,
    path_patch_sweep,
    path_traces,
    toys,
)
from loopscope.core.errors import LoopscopeError

Z, POST = "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"
FREEZE = [Z, POST]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- 1. nothing frozen = activation patching ------------------------------------------------------


def test_nothing_frozen_readout_path_is_patch_sweep_exactly():
    model, clean, corrupt = tiny_pair()
    T, units = 3, {Z: 2}
    ps = patch_sweep(
        model, clean, corrupt, ["hook_state", Z], "all", lp0, n_iter=T, direction="both",
        units=units, batch_size=7,
    ).to_frame()  # fmt: skip
    pp = path_patch_sweep(
        model, clean, corrupt, [("hook_state", "all", "all"), (Z, "all", "all", "all")],
        "readout", lp0, n_iter=T, freeze=[], direction="both", units=units, batch_size=7,
    ).to_frame()  # fmt: skip
    assert len(pp) == len(ps) == 2 * (3 * 4 * 2 + 3 * 4 * 2 * 2)
    assert (pp["receiver"] == "readout").all() and (pp["receiver_iteration"] == T).all()
    pd.testing.assert_frame_equal(pp[list(ps.columns)], ps, check_exact=True)
    # effect = recovery when denoising, 1 - recovery when noising
    den, noi = pp.direction == "denoise", pp.direction == "noise"
    assert np.allclose(pp.effect[den], pp.recovery[den])
    assert np.allclose(pp.effect[noi], 1 - pp.recovery[noi])
    # with nothing frozen every route from a sender at t < 2 crosses the state h_2: the path to
    # the receiver h_2 (then the whole model) is the total effect again
    via = path_patch_sweep(
        model, clean, corrupt, [("hook_state", [0, 1], "all")], [("hook_state", 2)], lp0,
        n_iter=T, freeze=[],
    ).to_frame()  # fmt: skip
    ref = ps[(ps.direction == "denoise") & (ps.site == "hook_state") & (ps.iteration < 2)]
    assert np.array_equal(via["metric"].to_numpy(), ref["metric"].to_numpy())


# -- 2. analytic two-route loop -------------------------------------------------------------------


class TwoRoutes(ls.Loop):
    """h' = lam h + c m + e n with m = hook_m(k h + u x) and n = hook_n(q m) (n fires after m in
    the step); readout h. A change dm of m at t_s reaches h_T through the state alone (c lam^..),
    through n at t_s (e q) and through m at every later iteration (k)."""

    lam, c, e, q, k, u = 0.5, 0.7, 0.3, 1.5, 0.8, 1.0

    def __init__(self) -> None:
        super().__init__()
        self.hook_m, self.hook_n = HookPoint(), HookPoint()
        self.setup()

    def encode(self, x):
        return torch.as_tensor(x, dtype=torch.float64).reshape(-1, 1)

    def init_state(self, ctx, generator=None):
        return torch.zeros_like(ctx)

    def step(self, h, ctx, t=None):
        m = self.hook_m(self.k * h + self.u * ctx)
        n = self.hook_n(self.q * m)
        return self.lam * h + self.c * m + self.e * n


def test_linear_two_route_loop_path_effects_are_analytic_and_sum_to_the_total():
    loop, T, ts = TwoRoutes(), 5, 1
    clean, corrupt = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    tc = ls.unroll(loop, clean, T, capture=["hook_m"])
    tk = ls.unroll(loop, corrupt, T, capture=["hook_m"])
    dm = (tc["hook_m"][ts] - tk["hook_m"][ts])[:, 0].numpy()  # sender change (denoising)
    y_k = tk.final[:, 0].numpy()
    L, a, lam = loop.lam, loop.c + loop.e * loop.q, loop.lam
    lam_full = lam + a * loop.k  # the whole loop's gain per iteration

    def run(receivers, freeze, direction="denoise"):
        df = path_patch(
            loop, clean, corrupt, ("hook_m", ts), receivers, toys.first_logit, n_iter=T,
            freeze=freeze, direction=direction,
        ).to_frame()  # fmt: skip
        return df["metric"].to_numpy()

    total = run("readout", [])
    assert np.allclose(total - y_k, a * dm * lam_full ** (T - 1 - ts), rtol=1e-12)
    # state-only route to the readout: every m and n after the sender frozen
    direct = run("state", ["hook_m", "hook_n"])
    assert np.allclose(direct - y_k, loop.c * dm * L ** (T - 1 - ts), rtol=1e-12)
    assert np.all(np.abs(total - direct) > 0.1)  # the component routes are excluded
    # noising: the same route removed from the clean run
    noised = run("readout", ["hook_m", "hook_n"], direction="noise")
    assert np.allclose(noised - tc.final[:, 0].numpy(), -loop.c * dm * L ** (T - 1 - ts))
    # through n in the sender's own step (n fires after m), then the whole model
    via_n = run(("hook_n", ts), ["hook_m", "hook_n"])
    assert np.allclose(via_n - y_k, loop.e * loop.q * dm * lam_full ** (T - 1 - ts), rtol=1e-12)
    # through the state alone to m at iteration t, then the whole model
    parts = [direct - y_k, via_n - y_k]
    for t in range(ts + 1, T):
        via_m = run(("hook_m", t), ["hook_m", "hook_n"])
        want = loop.k * loop.c * L ** (t - ts - 1) * dm * a * lam_full ** (T - 1 - t)
        assert np.allclose(via_m - y_k, want, rtol=1e-12)
        parts.append(via_m - y_k)
    # first-hit decomposition of a linear loop: the paths partition the total effect
    assert np.allclose(np.sum(parts, axis=0), total - y_k, rtol=1e-12)


# -- 3. locality of both passes -------------------------------------------------------------------


def _same(a, b):
    return torch.equal(a, b)


def test_passes_leave_earlier_iterations_bit_identical_and_receivers_change_only_there():
    model, clean, corrupt = tiny_pair(B=3)
    T, ts, tr_ = 4, 1, 2
    # receiver at the sender's position: with attention frozen, the state route cannot move
    # information to another position
    sender, recv = (Z, ts, 2, 0), (POST, tr_, 2)
    pt = path_traces(
        model, clean, corrupt, sender, [recv], n_iter=T, freeze=FREEZE, units={Z: 2},
        capture=["hook_state", Z, POST],
    )  # fmt: skip
    base, src, p1, p2 = pt.base, pt.source, pt.pass1, pt.pass2
    assert _same(base.states, ls.unroll(model, corrupt, T).states)  # base = corrupted run
    # pass 1: nothing before the sender moves; the sender slice is the source's
    assert _same(p1.states[: ts + 1], base.states[: ts + 1])
    for s in ("hook_state", Z, POST):
        assert _same(p1[s][:ts], base[s][:ts])
    z = base[Z][ts].clone()
    z[:, 2, 0] = src[Z][ts][:, 2, 0]
    assert _same(p1[Z][ts], z)
    # frozen: every later z and every mlp firing up to the receiver's iteration (the one in the
    # sender's own step fires after it), except the receiver slice, which moved
    for t in range(ts + 1, tr_ + 1):
        assert _same(p1[Z][t], base[Z][t])
    assert _same(p1[POST][ts], base[POST][ts])
    keep = torch.ones_like(base[POST][tr_], dtype=torch.bool)
    keep[:, 2] = False
    assert _same(p1[POST][tr_][keep], base[POST][tr_][keep])
    assert not _same(p1[POST][tr_][:, 2], base[POST][tr_][:, 2])
    assert not _same(p1.states[ts + 1], base.states[ts + 1])  # the state route is open
    # pass 2: identical to base up to the receiver's firing; there only the receiver slice moves
    assert _same(p2.states[: tr_ + 1], base.states[: tr_ + 1])
    for s in ("hook_state", Z, POST):
        assert _same(p2[s][:tr_], base[s][:tr_])
    assert _same(p2[Z][tr_], base[Z][tr_])  # z fires before the mlp in the step
    want = base[POST][tr_].clone()
    want[:, 2] = p1[POST][tr_][:, 2]
    assert _same(p2[POST][tr_], want)
    assert not _same(p2.states[tr_ + 1], base.states[tr_ + 1])
    # the readout receiver has no second pass; its pass 1 freezes to the end
    pr = path_traces(model, clean, corrupt, sender, "readout", n_iter=T, freeze=FREEZE,
                     units={Z: 2}, capture=FREEZE)  # fmt: skip
    assert pr.pass2 is None
    assert _same(pr.pass1[POST][ts:], base[POST][ts:]) and _same(
        pr.pass1[Z][ts + 1 :], base[Z][ts + 1 :]
    )


# -- 4. batched = one path per forward = an independent two-pass reference ------------------------


def _reference(model, x_base, base, src, node, rset, freeze, T, b):
    """Two passes with plain unroll + Patch, one example, one path, from iteration 0."""
    x = x_base[b : b + 1]

    def sl(n):  # [1, pos, unit-or-feature, ...]
        every = slice(None)
        return (every, n.position if n.position >= 0 else every, n.unit if n.unit >= 0 else every)

    hi = max(r.iteration for r in rset) if rset else T - 1
    ivs = []
    for f in freeze:
        for t in range(node.iteration, hi + 1):

            def frz(a, lab, f=f, t=t):
                out = base[f][t][b : b + 1].clone()
                for r in rset:
                    if r.site == f and r.iteration == t:
                        out[sl(r)] = a[sl(r)]
                return out

            ivs.append(ls.Patch(f, t, value=frz))

    def snd(a, lab):
        out = a.clone()
        out[sl(node)] = src[node.site][node.iteration][b : b + 1][sl(node)]
        return out

    ivs.append(ls.Patch(node.site, node.iteration, value=snd))
    sites = sorted({r.site for r in rset})
    p1 = ls.unroll(model, x, T, interventions=ivs, capture=sites)
    if not rset:
        return lp0(p1.decode(), torch.tensor([b])).item()
    ivs2 = []
    for r in rset:

        def rcv(a, lab, r=r):
            out = a.clone()
            out[sl(r)] = p1[r.site][r.iteration][sl(r)]
            return out

        ivs2.append(ls.Patch(r.site, r.iteration, value=rcv))
    return lp0(ls.unroll(model, x, T, interventions=ivs2).decode(), torch.tensor([b])).item()


def test_batched_rows_equal_one_path_per_forward_and_a_reference():
    model, clean, corrupt = tiny_pair(B=2)
    T = 4
    senders = [(Z, [0, 1], [1, 3], "all"), ("hook_state", 1, 2), (POST, 0)]
    sets = ["readout", [(POST, 2, 3)], [(Z, 3, None, 1), ("hook_state", 3)], [(POST, 1)]]
    kw = dict(n_iter=T, freeze=FREEZE, units={Z: 2}, direction="both")
    fast = path_patch_sweep(
        model, clean, corrupt, senders, sets, lp0, batch_size=5, **kw
    ).to_frame()
    slow = path_patch_sweep(
        model, clean, corrupt, senders, sets, lp0, batch_size=1, reuse_prefix=False, **kw
    ).to_frame()
    # 2 directions x 10 senders (8 z heads / positions, one state position, one mlp) x 4 sets x 2
    assert len(fast) == 2 * 10 * 4 * 2
    assert np.array_equal(fast["metric"].to_numpy(), slow["metric"].to_numpy())
    assert set(fast["receiver"]) == {
        "readout", f"{POST}@2:p3", f"{Z}@3:u1 + hook_state@3", f"{POST}@1",
    }  # fmt: skip
    refs = {
        "clean": ls.unroll(model, clean, T, capture=["hook_state", *FREEZE]),
        "corrupt": ls.unroll(model, corrupt, T, capture=["hook_state", *FREEZE]),
    }
    rsets = {
        "readout": (),
        f"{POST}@2:p3": (PathNode(POST, 2, 3),),
        f"{Z}@3:u1 + hook_state@3": (PathNode(Z, 3, -1, 1), PathNode("hook_state", 3)),
        f"{POST}@1": (PathNode(POST, 1),),
    }
    for r in fast.sample(40, random_state=0).itertuples():
        den = r.direction == "denoise"
        base, src = (refs["corrupt"], refs["clean"]) if den else (refs["clean"], refs["corrupt"])
        node = PathNode(r.site, r.iteration, r.position, r.unit)
        want = _reference(
            model, corrupt if den else clean, base, src, node, rsets[r.receiver], FREEZE, T,
            r.example,
        )  # fmt: skip
        assert want == r.metric, (r, want)


# -- 5. bad input ---------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_loopscope_errors():
    model, clean, corrupt = tiny_pair()
    kw = dict(n_iter=3, freeze=FREEZE)

    def pp(sender, receivers="readout", **extra):
        return path_patch(model, clean, corrupt, sender, receivers, lp0, **{**kw, **extra})

    cases = [
        (lambda: pp(("blocks.0.attn.hook_zz", 1)), r"unknown hook name .*did you mean.*hook_z"),
        (lambda: pp((Z, 1), freeze=["blocks.0.mlp.hook_pots"]), "did you mean"),
        (lambda: pp((Z, 2), [(POST, 1)]), "before the sender"),
        (lambda: pp((POST, 1), [(Z, 1)]), "does not fire after the sender"),
        (lambda: pp((Z, 1), [(Z, 1, 2)]), "does not fire after the sender"),
        (lambda: pp((Z, 5)), "iteration 5 out of range 0..2"),
        (lambda: pp((Z, 1), [(POST, 7)]), "iteration 7 out of range 0..2"),
        (lambda: pp((Z, 1), [(POST, 2)], measure_at=2), "cannot reach the readout"),
        (lambda: pp((Z, 1), batchsize=4), "unknown option 'batchsize'"),
        (lambda: pp((Z, 1), direction="sideways"), "direction"),
        (lambda: pp((Z, 1), freeze=None), "freeze is required"),
        (lambda: pp((Z, 1), freeze=["hook_state"]), "must not contain hook_state"),
        (lambda: pp((Z, 1, 0, 1)), "no unit axis"),
        (lambda: pp((Z, 1, 9)), "position 9 out of range"),
        (lambda: pp((Z, 1), "logits"), "receivers must be"),
        (lambda: pp((Z,)), "must be a node"),
        (lambda: pp((Z, 1), [(POST, [2, 3])]), "receiver iteration must be an int"),
        (lambda: path_traces(model, clean, corrupt, (Z, "all"), **kw), "one sender node"),
    ]
    for call, match in cases:
        with pytest.raises(LoopscopeError, match=match) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)
