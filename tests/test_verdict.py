"""analysis.verdict on hand-built loops with known character: a step-by-step parallel-carry loop
(algorithmic) vs a lookup that ignores the loop (answers at once, fixed after step 1), and a
multiplication memorizer whose correctness is set by whether it saw the pair in training."""

from __future__ import annotations

import numpy as np
import torch

import loopscope as ls
from loopscope import tasks
from loopscope.analysis import confident_wrong
from loopscope.experiments.verdict import verdict


class CarryLoop(ls.Loop):
    """Hand-wired parallel carry: state = carry bits [B, P, 1]; answer digit = (a+b+c) mod 10."""

    def __init__(self, lookup: bool = False) -> None:
        super().__init__()
        self.lookup = lookup
        self.setup()

    def encode(self, tokens):
        return {"a": tokens // 10, "b": tokens % 10, "tokens": tokens}

    def init_state(self, ctx, generator=None):
        return torch.zeros(*ctx["a"].shape, 1, dtype=torch.float64)

    def step(self, h, ctx, t=None):
        h = h[..., 0]
        s = ctx["a"] + ctx["b"]
        if self.lookup:  # "memorized": only the local generate bit, never propagates a chain
            c = (s >= 10).double()
        else:
            c = ((s + h) >= 10).double()
        return torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1).unsqueeze(-1)

    def decode(self, h, ctx):
        d = (ctx["a"] + ctx["b"] + h[..., 0].long()) % 10
        return torch.nn.functional.one_hot(d, 10).double() * 10


def test_algorithmic_loop_reads_algorithmic():
    v = verdict(CarryLoop(), tasks.get("addition"), n=64).to_frame()
    acc = v[v.evidence == "sequence accuracy"].set_index("split")["value"]
    assert acc["id"] == 1.0 and acc["ood"] == 1.0
    aa = v[v.evidence.str.startswith("path independence")]["value"]
    assert (aa > 0.999).all()
    gap = v[v.evidence == "ID - OOD accuracy gap"]
    assert gap["supports"].item() == "algorithm"
    # the parallel carry settles each digit exactly when its carry chain has arrived
    settle = v[v.evidence == "answer settling step vs depth (Spearman)"]["value"]
    assert (settle > 0.9).all() and len(settle) == 2
    # the carry register is a shift: any init is flushed out, the correct answer is the only basin
    basin = v[v.evidence == "correct-basin fraction (noise inits)"]
    assert len(basin) == 2 and (basin["value"] == 1.0).all()
    assert (basin["supports"] == "algorithm").all()
    assert not v.evidence.str.startswith("correctness vs subgraph").any()  # no training pairs


def test_lookup_loop_reads_memorized_and_confidently_wrong():
    task = tasks.get("addition")
    v = verdict(CarryLoop(lookup=True), task, n=64).to_frame()
    acc = v[v.evidence == "sequence accuracy"].set_index("split")["value"]
    assert acc["ood"] < 0.7
    assert v[v.evidence == "ID - OOD accuracy gap"]["supports"].item() == "memorized/heuristic"
    # the lookup ignores the state, so every init ends on the same (often wrong) answer
    basin = v[v.evidence == "correct-basin fraction (noise inits)"].set_index("split")
    assert basin.loc["ood", "value"] == acc["ood"]
    expected = "memorized/heuristic" if acc["ood"] < 0.5 else "neutral"
    assert basin.loc["ood", "supports"] == expected
    batch = task.sample(64, "ood", seed=0)
    tr = ls.unroll(CarryLoop(lookup=True), batch.tokens, 40, decode=True)
    cw = confident_wrong(tr, batch.targets).summary()
    assert cw["n_wrong"] > 0 and cw["settled_given_wrong"] == 1.0  # wrong AND converged


class MultMemorizer(ls.Loop):
    """Answers x*y digit by digit; digit k is right with probability 0.9 on training pairs and
    0.3 on held-out ones (a fixed hash of (x, y, k)), so df explains correctness by design."""

    def __init__(self, task, exact: bool = False) -> None:
        super().__init__()
        self.exact = exact
        self.nd = task.nd
        self.train = set(task.pairs["train"].tolist())
        self.setup()

    def encode(self, tokens):
        nd = self.nd
        w = 10 ** torch.arange(nd)
        x = (tokens[:, :nd] * w).sum(1)
        y = (tokens[:, nd + 1 : 2 * nd + 1] * w).sum(1)
        return {"x": x, "y": y, "L": tokens.shape[1]}

    def init_state(self, ctx, generator=None):
        return torch.zeros(len(ctx["x"]), ctx["L"], 10, dtype=torch.float64)

    def step(self, h, ctx, t=None):
        nd2 = 2 * self.nd
        digits = torch.zeros(len(ctx["x"]), ctx["L"], dtype=torch.long)
        for i, (x, y) in enumerate(zip(ctx["x"].tolist(), ctx["y"].tolist(), strict=True)):
            seen = (x * 10**self.nd + y) in self.train
            for k in range(nd2):
                d = (x * y // 10**k) % 10
                u = ((x * 7919 + y * 104729 + k * 1299709) % 1000) / 1000
                ok = self.exact or u < (0.9 if seen else 0.3)
                digits[i, ctx["L"] - nd2 + k] = d if ok else (d + 1) % 10
        return torch.nn.functional.one_hot(digits, 10).double() * 10

    def decode(self, h, ctx):
        return h


def test_memorizer_reads_df_explained_and_exact_multiplier_does_not():
    task = tasks.get("multiplication")
    v = verdict(MultMemorizer(task), task, n=128, splits=("id",), n_basin=0).to_frame()
    mem = v[v.evidence.str.startswith("correctness vs subgraph frequency")]
    assert len(mem) == 1 and mem["split"].item() == "train+id"
    assert mem["ci_low"].item() > 0.5 and mem["supports"].item() == "memorized/heuristic"
    assert not (v.evidence == "correct-basin fraction (noise inits)").any()  # n_basin=0
    exact = verdict(MultMemorizer(task, exact=True), task, n=32, splits=("id",), n_basin=0)
    row = exact.to_frame().query("evidence.str.startswith('correctness vs subgraph')")
    assert np.isnan(row["value"].item()) and row["supports"].item() == "neutral"
    assert "every digit right" in row["reading"].item()


class Z5Wavefront(ls.Loop):
    """Running sum mod 5 by a shift register: s_{t+1}[i] = s_t[i-1] + g_i, so s_t[i] is the
    running sum exactly from iteration t = i on (depth = position); ``lookup`` writes every
    running sum at iteration 1 (no wavefront); ``surface`` holds only the current token."""

    def __init__(self, lookup: bool = False, surface: bool = False) -> None:
        super().__init__()
        self.lookup, self.surface = lookup, surface
        self.setup()

    def encode(self, tokens):
        g = tokens.clone()
        g[:, 0] = 0  # BOS acts as the identity
        return {"g": g}

    def init_state(self, ctx, generator=None):
        return torch.zeros(*ctx["g"].shape, 5, dtype=torch.float64)

    def step(self, h, ctx, t=None):
        g = ctx["g"]
        if self.surface:  # holds only the current token: blind to the running state
            return torch.nn.functional.one_hot(g, 5).double()
        if self.lookup:
            new = g.cumsum(1) % 5
        else:
            prev = torch.cat([torch.zeros_like(g[:, :1]), h.argmax(-1)[:, :-1]], dim=1)
            new = (prev + g) % 5
            new[:, 0] = 0
        return torch.nn.functional.one_hot(new, 5).double()

    def decode(self, h, ctx):
        return h * 10


def test_probe_onset_reads_the_wavefront_and_its_absence():
    task = tasks.get("z5")
    v = verdict(Z5Wavefront(), task, n=16, splits=("ood",), n_basin=0, n_probe=96).to_frame()
    row = v[v.evidence == "probe onset vs depth (Spearman)"]
    assert len(row) == 1 and row["value"].item() == 1.0  # onset at position i is iteration i
    assert row["supports"].item() == "algorithm"
    assert "0 of 32 positions never reach" in row["reading"].item()
    lk = verdict(Z5Wavefront(lookup=True), task, n=16, splits=("ood",), n_basin=0, n_probe=96)
    row = lk.to_frame().query("evidence == 'probe onset vs depth (Spearman)'")
    assert np.isnan(row["value"].item()) and row["supports"].item() == "memorized/heuristic"
    assert "decodable at iteration 1 at every depth" in row["reading"].item()
    # carry depth varies across sequences at a position: no per-position onset row
    carry = verdict(CarryLoop(), tasks.get("addition"), n=16, n_basin=0).to_frame()
    assert not (carry.evidence == "probe onset vs depth (Spearman)").any()


def test_inductive_bias_rows_separate_state_from_surface_representations():
    task = tasks.get("z5")
    kw = dict(n=16, splits=("ood",), n_basin=0, n_probe=96)

    def ib(loop):
        v = verdict(loop, task, **kw).to_frame()
        return v[v.evidence.str.startswith("inductive bias")].set_index("evidence")

    good = ib(Z5Wavefront())
    # the end state is the one-hot running sum: a linear head extrapolates exactly by state
    assert len(good) == 2 and (good["value"] > 0.95).all()
    assert (good["supports"] == "algorithm").all()
    # holding only the last token: same-state inputs are split and different states merged
    bad = ib(Z5Wavefront(surface=True))
    d = bad.loc["inductive bias D-IB (normalised) at the end state"]
    assert d["value"] < 0.5 and d["supports"] == "memorized/heuristic"
    assert bad.loc["inductive bias R-IB (normalised) at the end state", "value"] < 0.9
    # not a state-tracking task: no inductive-bias rows
    carry = verdict(CarryLoop(), tasks.get("addition"), n=16, n_basin=0).to_frame()
    assert not carry.evidence.str.startswith("inductive bias").any()
