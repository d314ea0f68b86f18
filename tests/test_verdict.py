"""analysis.verdict on hand-built loops with known character: a step-by-step parallel-carry loop
(algorithmic) vs a lookup that ignores the loop (answers at once, fixed after step 1)."""

from __future__ import annotations

import torch

import loopscope as ls
from loopscope import tasks
from loopscope.analysis import confident_wrong, verdict


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


def test_lookup_loop_reads_memorized_and_confidently_wrong():
    task = tasks.get("addition")
    v = verdict(CarryLoop(lookup=True), task, n=64).to_frame()
    acc = v[v.evidence == "sequence accuracy"].set_index("split")["value"]
    assert acc["ood"] < 0.7
    assert v[v.evidence == "ID - OOD accuracy gap"]["supports"].item() == "memorized/heuristic"
    batch = task.sample(64, "ood", seed=0)
    tr = ls.unroll(CarryLoop(lookup=True), batch.tokens, 40, decode=True)
    cw = confident_wrong(tr, batch.targets)
    assert cw["n_wrong"] > 0 and cw["settled_given_wrong"] == 1.0  # wrong AND converged
