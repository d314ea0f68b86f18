"""circuits.compgraph: golden #17 (RelativeIG), #18 (DAG metrics), #20 (taxonomy), #21 (df toy),
#22 (null model); the isomorphism check behind WL hashes; the repo's num_hit; OPS agree with the
multiplication builder; logistic slope vs scikit-learn's unpenalised fit; digit df vs brute force."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from loopscope import tasks
from loopscope.circuits import compgraph as cgm
from loopscope.circuits.compgraph import (
    NullModel,
    SubgraphIndex,
    apply_op,
    digit_df,
    document_frequency,
    entropy,
    graph_metrics,
    logistic_slope,
    node_taxonomy,
    null_model,
    num_hit,
    relative_ig,
    relative_ig_table,
    taxonomy_by_layer,
    taxonomy_frame,
)
from loopscope.core.errors import LoopscopeError


def toy(a, b, c=None, first="add"):
    """s = a + b (or a * b), o = s * c (if c given); Faith-and-Fate convention."""
    G = nx.DiGraph()
    G.add_node("a", op="input", value=a)
    G.add_node("b", op="input", value=b)
    s = a + b if first == "add" else a * b
    G.add_node("s", op=first, value=s)
    G.add_edge("a", "s", arg=0)
    G.add_edge("b", "s", arg=1)
    if c is not None:
        G.add_node("c", op="input", value=c)
        G.add_node("o", op="multiply", value=s * c)
        G.add_edge("s", "o", arg=0)
        G.add_edge("c", "o", arg=1)
    return G


def test_golden18_dag_metrics():
    G = nx.DiGraph([("a", "s"), ("b", "s"), ("s", "o"), ("c", "o")])
    m = graph_metrics(G)
    assert m["layers"] == {"a": 0, "b": 0, "c": 0, "s": 1, "o": 2}
    assert (m["depth"], m["width"], m["avg_parallelism"], m["longest_path_nodes"]) == (2, 3, 2.5, 3)
    assert m["repo_avg_parallelism"] == 5 / 3
    with pytest.raises(LoopscopeError, match="DAG"):
        graph_metrics(nx.DiGraph([(0, 1), (1, 0)]))


@pytest.mark.parametrize(
    "pred,labels",
    [
        ((5, 20), ("correct", "correct")),
        ((6, 24), ("local", "propagation")),
        ((6, 20), ("local", "restoration")),
        ((5, 21), ("correct", "local")),
    ],
)
def test_golden20_taxonomy(pred, labels):
    G = toy(2, 3, 4)
    lab = node_taxonomy(G, {"s": pred[0], "o": pred[1]})
    assert (lab["s"], lab["o"]) == labels
    assert lab["a"] == lab["b"] == lab["c"] == "correct"


def test_taxonomy_frame_by_layer_and_null_model_fit():
    preds = [{"s": 5, "o": 20}, {"s": 6, "o": 24}, {"s": 6, "o": 20}, {"s": 5, "o": 21}]
    graphs = [toy(2, 3, 4)] * 4
    f = taxonomy_frame(graphs, preds, df=[{"s": 2, "o": 1}] * 4)
    assert len(f) == 8 and set(f["layer"]) == {1, 2} and (f["df"].isin([1, 2])).all()
    by = taxonomy_by_layer(f)
    assert by.loc[1].to_dict() == {
        "correct": 0.5,
        "local": 0.5,
        "propagation": 0.0,
        "restoration": 0.0,
    }
    assert by.loc[2].to_dict() == {
        "correct": 0.25,
        "local": 0.25,
        "propagation": 0.25,
        "restoration": 0.25,
    }
    assert f.groupby("example")["example_correct"].first().tolist() == [True, False, False, False]
    nm = NullModel.fit(f)
    assert nm.eps == {"add": 0.5, "multiply": 0.25}  # local-error rate per op
    assert nm.predict(toy(1, 1, 1)) == pytest.approx(0.5 * 0.75)
    with pytest.raises(LoopscopeError, match="no predicted value"):
        node_taxonomy(toy(2, 3, 4), {"s": 5})


def test_golden22_null_model():
    assert null_model(0.01, 100) == pytest.approx(0.366032, abs=1e-6)
    assert null_model(0.05, 50) == pytest.approx(0.076945, abs=1e-6)
    assert np.allclose(null_model(0.1, np.arange(4)), 0.9 ** np.arange(4))
    with pytest.raises(LoopscopeError, match="eps"):
        null_model(1.5, 3)


def test_golden21_subgraph_document_frequency():
    train = [toy(2, 3, 4), toy(2, 3)]
    df4 = document_frequency(toy(2, 3, 4), train)
    df7 = document_frequency(toy(2, 3, 7), train)
    assert (df4["s"], df4["o"]) == (2, 1)
    assert (df7["s"], df7["o"]) == (2, 0)
    # the same step 5 * 4 = 20 reached from 1 + 4 is a different ancestral computation
    idx = SubgraphIndex([toy(2, 3, 4), toy(2, 3), toy(1, 4, 4)])
    assert idx.df(toy(2, 3, 4))["o"] == 1 and idx.df(toy(1, 4, 4))["o"] == 1
    assert idx.df(toy(2, 3, 4))["c"] == 2  # the source 4 appears in examples 0 and 2


def test_isomorphism_check_resolves_hash_collisions(monkeypatch):
    monkeypatch.setattr(cgm, "_wl", lambda sub, iterations: "same")  # every subgraph collides
    idx = SubgraphIndex([toy(2, 3, 4), toy(2, 3)])
    assert idx.n_collisions > 0
    df = idx.df(toy(2, 3, 7))
    assert (df["s"], df["o"], df["c"]) == (2, 0, 0)
    assert idx.df(toy(3, 2, 4))["s"] == 0  # argument order matters (edge attribute arg)
    assert idx.df(toy(2, 3, first="multiply"))["s"] == 0  # op is part of the node label


def test_num_hit_repo_variant():
    train = [toy(2, 3, 4), toy(2, 3), toy(1, 4, 4)]
    nh = num_hit(toy(2, 3, 4), train)
    assert (nh["a"], nh["s"], nh["o"]) == (3, 2, 1)  # example 2 has 5*4=20, but not from 2+3
    assert num_hit(toy(2, 3, 7), train)["o"] == 0


def test_ops_agree_with_the_multiplication_builder():
    from loopscope.tasks import multiplication_graph

    n_prop = 0
    for x, y in [(35, 47), (99, 99), (123, 45)]:
        G = multiplication_graph(x, y)
        for v in G.nodes:
            ps = cgm._parents(G, v)
            if ps:
                assert apply_op(G, v, [G.nodes[u]["value"] for u in ps]) == G.nodes[v]["value"]
        truth = {v: G.nodes[v]["value"] for v in G.nodes}
        assert set(node_taxonomy(G, truth).values()) == {"correct"}
        wrong = dict(truth, p0_0=truth["p0_0"] + 1)
        child = next(iter(G.successors("p0_0")))
        lab = node_taxonomy(G, wrong)
        assert lab["p0_0"] == "local" and lab[child] == "restoration"  # right value, wrong input
        ps = cgm._parents(G, child)
        wrong[child] = apply_op(G, child, [wrong[u] for u in ps])
        if wrong[child] != truth[child]:
            assert (
                node_taxonomy(G, wrong)[child] == "propagation"
            )  # recomputed from the wrong product
            n_prop += 1
    assert n_prop >= 2


def test_golden17_relative_ig():
    x, y = np.meshgrid(np.arange(10, 100), np.arange(10, 100), indexing="ij")
    x, y = x.ravel(), y.ravel()
    p = x * y
    last = p % 10
    first = np.array([int(str(v)[0]) for v in p])
    nd = np.array([len(str(v)) for v in p])
    assert relative_ig(last, np.stack([x % 10, y % 10], 1)) == pytest.approx(1.0, abs=1e-12)
    assert relative_ig(last, x % 10) == pytest.approx(0.22295, abs=1e-4)
    assert relative_ig(first, np.stack([x // 10, y // 10], 1)) == pytest.approx(0.67270, abs=1e-4)
    assert relative_ig(first, x // 10) == pytest.approx(0.06061, abs=1e-4)
    assert relative_ig(nd, np.stack([x // 10, y // 10], 1)) == pytest.approx(0.80620, abs=1e-4)
    assert entropy(last) == pytest.approx(3.0340, abs=1e-4)
    assert entropy(first) == pytest.approx(2.9349, abs=1e-4)
    tab = relative_ig_table(
        {"x1": x // 10, "x0": x % 10, "y1": y // 10, "y0": y % 10}, {"last": last, "first": first}
    )
    assert len(tab) == 2 * (4 + 3 + 2)  # singletons, adjacent pairs, adjacent triples
    row = tab[(tab.output == "first") & (tab.inputs == "x1")].iloc[0]
    assert row.relative_ig == pytest.approx(0.06061, abs=1e-4) and row.order == 1


def test_logistic_slope_matches_unpenalised_sklearn_and_covers_truth():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n = 4000
    df = rng.poisson(3.0, n)
    depth = rng.integers(1, 6, n)
    op = rng.choice(["add", "mul", "mod"], n)
    z = -0.5 + 0.8 * np.log1p(df) - 0.3 * depth + np.where(op == "mul", 0.7, 0.0)
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    fit = logistic_slope(y, df, depth, op=op)
    X = np.stack([np.log1p(df), depth, op == "mod", op == "mul"], 1).astype(float)
    sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(X, y)
    assert fit.slope == pytest.approx(sk.coef_[0, 0], abs=1e-4)
    assert fit.depth_coef == pytest.approx(sk.coef_[0, 1], abs=1e-4)
    assert fit.ci_low < 0.8 < fit.ci_high and fit.ci_high - fit.ci_low < 0.5
    flat = logistic_slope(np.ones(5), np.arange(5), np.ones(5))
    assert np.isnan(flat.slope)


def test_logistic_slope_categorical_control_removes_a_position_confound():
    # accuracy depends on the digit position only (high at both ends), never on df; df is large
    # only at digit 0 (as for a product's units digit). A linear digit term leaves the digit-0
    # contrast to df (a spurious slope); one dummy per digit (depth=None, op=digit) does not.
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    n = 1000
    digit = np.tile(np.arange(4), n)
    df = np.where(digit == 0, rng.integers(60, 100, 4 * n), rng.integers(0, 2, 4 * n))
    p_digit = np.array([0.99, 0.35, 0.6, 0.95])
    y = rng.random(4 * n) < p_digit[digit]
    fit = logistic_slope(y, df, None, op=digit)
    assert abs(fit.slope) < 3 * fit.se  # no df effect (true slope 0)
    assert np.isnan(fit.depth_coef)
    X = np.stack([np.log1p(df)] + [digit == k for k in (1, 2, 3)], 1).astype(float)
    sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(X, y)
    assert fit.slope == pytest.approx(sk.coef_[0, 0], abs=1e-4)
    linear = logistic_slope(y, df, digit)
    assert linear.ci_low > 1.0  # the confound the categorical control removes


def test_digit_df_vs_brute_force():
    rng = np.random.default_rng(1)
    tx, ty = rng.integers(10, 100, 300), rng.integers(10, 100, 300)
    x, y = rng.integers(10, 100, 20), rng.integers(10, 100, 20)
    d = digit_df(x, y, 4, tx, ty)
    for i in range(20):
        for k in range(4):
            m = 10 ** (k + 1)
            assert d[i, k] == int(np.sum((tx % m == x[i] % m) & (ty % m == y[i] % m)))


def test_df_on_task_graphs():
    t = tasks.get("multiplication")
    train = t.sample(12, "train", seed=0).graphs
    test = t.sample(3, "id", seed=0).graphs
    idx = SubgraphIndex(train)
    for G in train[:3]:
        df = idx.df(G)
        assert all(v >= 1 for v in df.values())  # every training node is seen at least once
    f = taxonomy_frame(
        test, [{v: G.nodes[v]["value"] for v in G} for G in test], df=[idx.df(G) for G in test]
    )
    assert isinstance(f, pd.DataFrame) and f["correct"].all() and (f["df"] >= 0).all()
