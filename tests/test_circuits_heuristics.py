"""circuits.heuristics: golden #29 (range / modulo scores, argmax and all matches >= 0.6), the
configurable grids, a census of a loop built from known heuristic neurons, and knockouts by
heuristic and prompt-guided vs equal-size random baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loopscope.circuits import toys
from loopscope.circuits.heuristics import (
    Heuristic,
    OperandGrid,
    classify_heuristics,
    default_heuristics,
    direct_grid,
    grid_activations,
    heuristic_census,
    heuristic_knockout,
    heuristic_score,
    modulo_heuristics,
    pattern_heuristics,
    prompt_guided_knockout,
    range_heuristics,
)
from loopscope.core.errors import LoopscopeError

pytestmark = pytest.mark.usefixtures("one_thread")


def golden29():
    grid = OperandGrid(np.arange(300), np.arange(300), "+")
    rng = np.random.default_rng(0)
    res = grid.result
    act1 = ((res >= 150) & (res < 180)).astype(float) + 0.1 * rng.standard_normal((300, 300))
    logits = np.zeros(600)
    logits[150:180] = 1
    logits = logits + 0.05 * rng.standard_normal(600)
    act2 = (grid.op1 % 7 == 3).astype(float) + 0.1 * rng.standard_normal((300, 300))
    return grid, direct_grid(act1, logits, grid), act2


def test_golden29_scores():
    grid, A1, A2 = golden29()
    H = {
        "r150": Heuristic("range", "result", (150, 180), "r150"),
        "r140": Heuristic("range", "result", (140, 170), "r140"),
        "r100": Heuristic("range", "result", (100, 200), "r100"),
        "op1_150": Heuristic("range", "op1", (150, 180), "op1_150"),
        "even": Heuristic("modulo", "result", (2, 0), "even"),
    }
    got = {k: heuristic_score(A1, h.mask(grid)) for k, h in H.items()}
    assert got["r150"] == 1.0
    assert got["r140"] == pytest.approx(0.640, abs=1e-3)
    assert got["r100"] == pytest.approx(0.419, abs=1e-3)
    assert got["op1_150"] == pytest.approx(0.094, abs=1e-3)
    assert got["even"] == pytest.approx(0.499, abs=1e-3)
    c = classify_heuristics(A1, grid, list(H.values()))
    assert c.best.name == "r150" and c.best_score == 1.0
    assert {h.name for h in c.matches} == {"r150", "r140"}  # overlapping ranges also pass
    m7 = Heuristic("modulo", "op1", (7, 3), "m7")
    m14 = Heuristic("modulo", "op1", (14, 3), "m14")
    assert heuristic_score(A2, m7.mask(grid)) == 1.0
    assert heuristic_score(A2, m14.mask(grid)) == pytest.approx(0.512, abs=0.02)
    # the default families find the same answers
    c2 = classify_heuristics(
        A2, grid, modulo_heuristics(grid, "op1") + range_heuristics(grid, "op1")
    )
    assert c2.best.name == "op1 = 3 mod 7" and c2.matches == [c2.best]
    c1 = classify_heuristics(A1, grid, range_heuristics(grid, "result", lengths=[30]))
    assert c1.best.name == "result in [150, 180)"
    assert {h.name for h in c1.matches} == {
        "result in [140, 170)",
        "result in [150, 180)",
        "result in [160, 190)",
    }
    assert c1.to_frame()["matched"].sum() == 3


def test_configurable_grids_and_families():
    g = OperandGrid(np.arange(10, 40), np.arange(5), "*")
    assert g.result.shape == (30, 5) and g.result[1, 2] == 22
    hs = range_heuristics(g, "op1", lengths=[10], step=5)
    assert [h.params for h in hs] == [(10, 20), (15, 25), (20, 30), (25, 35), (30, 40)]
    assert len(range_heuristics(g, "op1", lengths=[10])) == 3  # default step max(10 // 3, 10)
    assert len(modulo_heuristics(g, "op2", moduli=[2, 3])) == 5
    pat = pattern_heuristics(g, "result", n_digits=2)
    assert pat[3].name == "result ~ _3" and pat[13].name == "result ~ 3_"
    assert (pat[3].mask(g) == (g.result % 10 == 3)).all()
    assert any(h.family == "identical" for h in default_heuristics(g))
    custom = Heuristic(
        "custom", "op1", (), "op1 = op2 + 10", mask_fn=lambda gr: gr.op1 == gr.op2 + 10
    )
    assert custom.mask(g).sum() == 5 and custom.mask(g)[0, 0] and custom.mask(g)[4, 4]
    assert np.isnan(heuristic_score(np.zeros((30, 5)), np.zeros((30, 5), bool)))
    with pytest.raises(LoopscopeError, match="op must be"):
        OperandGrid(np.arange(3), np.arange(3), "^")
    with pytest.raises(LoopscopeError, match="does not match"):
        classify_heuristics(np.zeros((2, 2)), g)


def _adder_setup():
    model = toys.HeuristicAdder(max_operand=30, width=10)
    grid = OperandGrid(np.arange(30), np.arange(30), "+")
    tokens = torch.as_tensor(np.stack([grid.op1.ravel(), grid.op2.ravel()], 1))
    answers = torch.as_tensor(grid.result.ravel())
    hs = range_heuristics(grid, "result", lengths=[10], step=10, stop=60)
    hs += modulo_heuristics(grid, "result", moduli=[10])
    hs += pattern_heuristics(grid, "result", n_digits=1)
    return model, grid, tokens, answers, hs


def test_census_of_known_heuristic_neurons():
    model, grid, tokens, answers, hs = _adder_setup()
    acts = grid_activations(model, tokens, grid, "hook_post", 1)
    assert acts.shape == (1, model.n_units, 30, 30)
    census = heuristic_census(acts, grid, hs).to_frame()
    assert len(census) == model.n_units and census["classified"].all()
    for r in census.itertuples():
        if r.neuron < model.n_ranges:
            assert (
                r.best == f"result in [{10 * r.neuron}, {10 * r.neuron + 10})"
                and r.best_score == 1.0
            )
        else:
            k = r.neuron - model.n_ranges
            assert r.best == f"result = {k} mod 10" and r.n_matches == 2  # and the pattern __k


def test_knockout_by_heuristic_vs_random():
    model, grid, tokens, answers, hs = _adder_setup()
    census = heuristic_census(grid_activations(model, tokens, grid, "hook_post", 1), grid, hs)
    h = next(x for x in hs if x.name == "result in [20, 30)")
    ko = heuristic_knockout(
        model,
        tokens,
        answers,
        grid,
        "hook_post",
        census,
        h,
        n_iter=1,
        n_units=model.n_units,
        n_random=4,
        seed=0,
    ).to_frame()
    heur = ko[ko.condition == "heuristic"].set_index("prompts")
    assert (heur["baseline"] == 1.0).all()
    assert heur.loc["associated", "drop"] == 1.0 and heur.loc["other", "drop"] == 0.0
    rand = ko[ko.condition.str.startswith("random") & (ko.prompts == "associated")]
    assert len(rand) == 4 and (rand["drop"] < 0.5).all() and (ko["n_neurons"] == 1).all()


def test_prompt_guided_knockout_vs_random():
    model, grid, tokens, answers, hs = _adder_setup()
    census = heuristic_census(grid_activations(model, tokens, grid, "hook_post", 1), grid, hs)
    ko = (
        prompt_guided_knockout(
            model, tokens, answers, grid, "hook_post", census, hs, n_iter=1, n_units=model.n_units
        )
        .to_frame()
        .set_index("condition")
    )
    # every prompt loses its range and digit neuron: only 0 + 0 (argmax of all-zero logits) survives
    assert ko.loc["prompt_guided", "accuracy"] == pytest.approx(1 / 900)
    assert ko.loc["prompt_guided", "mean_neurons"] == 2.0
    assert ko.loc["random", "drop"] < ko.loc["prompt_guided", "drop"]
    with pytest.raises(LoopscopeError, match="no neuron is classified"):
        heuristic_knockout(
            model,
            tokens,
            answers,
            grid,
            "hook_post",
            census,
            Heuristic("modulo", "op1", (7, 3), "op1 = 3 mod 7"),
            n_iter=1,
            n_units=model.n_units,
        )
