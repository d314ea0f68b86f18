"""Task generators: labels checked by independent slow solvers, splits without leakage,
determinism by seed, golden #16 chain lengths, clear errors."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch

from loopscope import tasks
from loopscope.core.errors import LoopscopeError
from loopscope.tasks.sudoku import all_grids, count_solutions


def compose(g, s):
    return tuple(g[s[k]] for k in range(len(s)))


@pytest.mark.parametrize("name,n", [("s3", 3), ("a4", 4)])
def test_group_labels_by_brute_force_composition(name, n):
    t = tasks.get(name)
    perms = list(itertools.permutations(range(n)))
    if name == "a4":
        perms = [
            p for p in perms if sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2 == 0
        ]
    b = t.sample(16, "id", seed=3)
    for row_t, row_y in zip(b.tokens.tolist(), b.targets.tolist(), strict=True):
        s = tuple(range(n))
        assert row_t[0] == t.bos and row_y[0] == -100
        for g, y in zip(row_t[1:], row_y[1:], strict=True):
            s = compose(perms[g], s)
            assert perms[y] == s


def test_parity_and_z5_running_sums():
    for name, mod in (("parity", 2), ("z5", 5)):
        b = tasks.get(name).sample(8, "ood", seed=1)
        g = b.tokens[:, 1:]
        assert torch.equal(b.targets[:, 1:], torch.cumsum(g, 1) % mod)


def test_group_splits_lengths_and_no_leakage():
    t = tasks.get("s3", train_len=(1, 16))
    assert t.sample(4, "ood", 0).tokens.shape[1] == 33
    assert t.sample(4, "ood_len64", 0).tokens.shape[1] == 65
    train = {
        tuple(r) for s in range(20) for r in t.sample(64, "train", s).tokens.tolist() if len(r) > 9
    }
    ood = {tuple(r) for r in t.sample(64, "ood", 0).tokens.tolist()}
    idl = {tuple(r) for s in range(5) for r in t.sample(64, "id", s).tokens.tolist() if len(r) > 9}
    assert not (train & ood) and not (train & idl)


def test_determinism_by_seed():
    for name in tasks.names():
        t = tasks.get(name)
        a, b, c = t.sample(4, "train", 7), t.sample(4, "train", 7), t.sample(4, "train", 8)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
        assert not (a.tokens.shape == c.tokens.shape and torch.equal(a.tokens, c.tokens))


def test_addition_against_python_ints():
    b = tasks.get("addition").sample(32, "ood", seed=2)
    for tok, y, carry in zip(
        b.tokens.tolist(), b.targets.tolist(), b.intermediates["carry"].tolist(), strict=True
    ):
        a_d, b_d = [x // 10 for x in tok], [x % 10 for x in tok]
        a = sum(d * 10**i for i, d in enumerate(a_d))
        bb = sum(d * 10**i for i, d in enumerate(b_d))
        assert sum(d * 10**i for i, d in enumerate(y)) == a + bb
        # carry out of position i = 1 iff the low i+1 digits overflow
        for i, c in enumerate(carry):
            assert c == int((a % 10 ** (i + 1)) + (bb % 10 ** (i + 1)) >= 10 ** (i + 1))


@pytest.mark.parametrize("a,b,iters", [(999, 1, 3), (5555, 4445, 4), (19, 81, 2), (1234, 4321, 0)])
def test_golden16_parallel_carry_iterations(a, b, iters):
    da = [(a // 10**i) % 10 for i in range(4)]
    db = [(b // 10**i) % 10 for i in range(4)]
    assert tasks.parallel_carry_iterations(da, db) == iters


def test_multiplication_graphs_evaluate_to_the_product_and_splits_disjoint():
    t = tasks.get("multiplication")
    assert not set(t.pairs["train"].tolist()) & set(t.pairs["id"].tolist())
    for split in ("train", "ood"):
        b = t.sample(16, split, seed=0)
        for G, x, y, tg in zip(
            b.graphs, b.meta["x"].tolist(), b.meta["y"].tolist(), b.targets.tolist(), strict=True
        ):
            assert nx.is_directed_acyclic_graph(G)
            vals = tasks.evaluate_graph(G)
            assert all(vals[v] == G.nodes[v]["value"] for v in G)
            sinks = [v for v in G if G.out_degree(v) == 0]
            assert sinks == ["out"] and vals["out"] == x * y
            digits = [d for d in tg if d != -100]
            assert sum(d * 10**i for i, d in enumerate(digits)) == x * y
    # value-dependent: a carry split exists only when a digit product is >= 10
    assert "c0_0" not in tasks.multiplication_graph(2, 3) and "c0_0" in tasks.multiplication_graph(
        5, 3
    )


def test_sudoku_grids_puzzles_unique_and_solutions_valid():
    grids = all_grids()
    assert len(grids) == 288
    t = tasks.get("sudoku4")
    for split in ("train", "ood"):
        b = t.sample(12, split, seed=1)
        for p, s in zip(
            b.tokens.view(-1, 4, 4).numpy(), (b.targets + 1).view(-1, 4, 4).numpy(), strict=True
        ):
            assert count_solutions(p) == 1
            assert ((p == 0) | (p == s)).all()
            assert any((s == g).all() for g in grids)
    ood = t.sample(32, "ood", 0).meta["difficulty"]
    easy = t.sample(32, "train", 0).meta["difficulty"]
    assert ood.min() > easy.max()


def test_maze_reachability_against_networkx_bfs():
    for name in ("maze_reach", "maze_path"):
        b = tasks.get(name).sample(6, "ood", seed=4)
        S = b.meta["grid"][0]
        for tok, y, d in zip(
            b.tokens.tolist(),
            b.targets.tolist(),
            b.intermediates["bfs_distance"].tolist(),
            strict=True,
        ):
            G = nx.grid_2d_graph(S, S)
            G.remove_nodes_from([(i // S, i % S) for i, v in enumerate(tok) if v == 0])
            start = next((i // S, i % S) for i, v in enumerate(tok) if v == 2)
            dist = nx.single_source_shortest_path_length(G, start)
            for i, v in enumerate(tok):
                cell = (i // S, i % S)
                if v == 0:
                    assert y[i] == -100
                    continue
                assert d[i] == dist.get(cell, -1)
                if name == "maze_reach":
                    assert y[i] == int(cell in dist)
            if name == "maze_path":
                goal = next((i // S, i % S) for i, v in enumerate(tok) if v == 3)
                path = set(nx.shortest_path(G, start, goal))
                assert {(i // S, i % S) for i, v in enumerate(y) if v == 1} == path


def test_bad_task_inputs():
    with pytest.raises(LoopscopeError, match="did you mean: .*s3"):
        tasks.get("s4")
    with pytest.raises(LoopscopeError, match="no split 'od'"):
        tasks.get("s3").sample(2, "od")
    with pytest.raises(LoopscopeError, match="positive integer"):
        tasks.get("s3").sample(0)
    with pytest.raises(LoopscopeError, match="bad parameters"):
        tasks.get("s3", train_length=3)
    with pytest.raises(LoopscopeError, match="train_len"):
        tasks.get("s3", train_len=(5, 2))
    np.testing.assert_equal(len(tasks.names()), 13)  # + passkey, assoc_recall


def test_sudoku6_valid_unique_and_split_by_difficulty():
    from loopscope.tasks.sudoku import UNITS6, count_solutions6

    t = tasks.get("sudoku6", pool_size=24)
    easy = t.sample(6, "train", seed=0)
    hard = t.sample(6, "ood", seed=0)
    for b in (easy, hard):
        for p, s in zip(
            b.tokens.view(-1, 6, 6).numpy(), (b.targets + 1).view(-1, 6, 6).numpy(), strict=True
        ):
            assert all(sorted(s[r, c] for r, c in u) == [1, 2, 3, 4, 5, 6] for u in UNITS6)
            assert ((p == 0) | (p == s)).all()
            assert count_solutions6(p) == 1
    assert hard.meta["difficulty"].min() > easy.meta["difficulty"].max()
