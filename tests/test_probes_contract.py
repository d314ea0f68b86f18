"""The probes package keeps the analysis contract: every fit and measurement is a Result (meta,
a tidy frame, a summary of floats); every option is an explicit keyword whose default agrees
with fit_probes wherever it is forwarded; a misspelt keyword names its neighbour; an option of
one input kind is refused on the other."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import pytest
import torch

import loopscope as ls
from loopscope.core.errors import LoopscopeError, UnknownOptionError
from loopscope.core.result import Result
from loopscope.probes import (
    LinearProbe,
    collect,
    dose_response,
    fit_probes,
    fit_trace,
    inductive_bias_probe,
    interchange_intervention_accuracy,
    linear_head,
    logit_lens,
    onset,
    onset_regression,
    probe_trace,
    selectivity,
    steer,
    transfer_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")

B, P, D, T = 96, 3, 4, 4


def _loop():
    """State [B, P, D]: the input bit along e_0 from iteration 2 on, plus seeded noise."""

    def step(h, ctx, t):
        g = torch.Generator().manual_seed(10 + t)
        on = 1.0 if t + 1 >= 2 else 0.0
        bit = (2 * ctx.double() - 1).unsqueeze(-1) * torch.eye(D, dtype=h.dtype)[0]
        return torch.randn(h.shape, generator=g, dtype=h.dtype) + 3 * on * bit

    def decode(h, ctx):
        return torch.stack([-h[..., 0], h[..., 0]], -1)

    return ls.FnLoop(step=step, init_state=torch.zeros(P, D, dtype=torch.float64), decode=decode)


@pytest.fixture(scope="module")
def run():
    z = torch.randint(0, 2, (B, P), generator=torch.Generator().manual_seed(0))
    return _loop(), z, ls.unroll(_loop(), z, T)


def _check(res, *, samples: bool = False):
    assert isinstance(res, Result)
    df = res.to_frame()
    assert type(df) is pd.DataFrame and len(df) > 0
    assert not any(n in ("sample", "iteration", "site") for n in df.index.names if n)
    if samples:
        assert "sample" in df.columns
    s = res.summary()
    assert s and all(isinstance(k, str) and type(v) is float for k, v in s.items())
    assert isinstance(res.meta, dict)
    return df, s


def test_every_probe_fit_and_measurement_is_a_result(run):
    loop, z, tr = run
    res = fit_probes(tr, z, probe="logistic", seed=0)
    df, s = _check(res)
    assert {"site", "iteration", "position"} <= set(df.columns)
    assert s["n_sites"] == (T + 1) * P and s["max_test_acc"] == pytest.approx(df.test_acc.max())
    assert res.meta["seed"] == 0 and "loopscope_version" in res.meta
    pt = probe_trace(tr, z, pooled=False)
    pdf, ps = _check(pt)
    assert ps["first_iteration_near_max"] == 2  # the bit is written at iteration 2
    on = onset(pdf, threshold=0.9)
    _, os_ = _check(on)
    assert os_["n_reached"] == P and os_["mean_onset"] == 2.0
    X = tr.states[1:, :, 0]
    _check(transfer_matrix(fit_probes(X, z[:, 0], seed=0), X, z[:, 0]))
    _check(collect(tr))
    _check(logit_lens(tr, z))
    sel = selectivity(X, z[:, 0], 1 - z[:, 0].roll(1), probe="ridge", n_boot=50)
    _check(sel)
    _check(onset_regression(pd.DataFrame({"position": [0, 1, 2], "onset": [1, 3, 5]}), "position"))
    e0 = torch.eye(D, dtype=torch.float64)[0]
    _check(steer(loop, z, n_iter=T, iteration=3, direction=e0, value=-3.0))
    _check(dose_response(loop, z, n_iter=T, iteration=3, direction=e0, values=[0.0, -6.0]))
    cf = torch.full((B, P), -100)
    cf[:, 0] = z.roll(1, 0)[:, 0]
    iia = interchange_intervention_accuracy(
        loop, z, z.roll(1, 0), n_iter=T, iteration=3, counterfactual=cf, subspace=e0
    )
    _check(iia)
    states = torch.arange(8).repeat(12)
    feats = torch.nn.functional.one_hot(states, 8).double().unsqueeze(0)
    _check(inductive_bias_probe(feats, states, n_datasets=4, n_train=40, seed=0))


def _fit_defaults():
    return {k: p.default for k, p in inspect.signature(fit_probes).parameters.items()}


@pytest.mark.parametrize("fn", [fit_trace, selectivity, LinearProbe.__init__, linear_head])
def test_forwarded_options_have_fit_probes_defaults(fn):
    ref = _fit_defaults()
    params = inspect.signature(fn).parameters
    shared = [k for k in params if k in ref and k not in ("seed",)]
    assert len(shared) >= 12, shared  # every solver hyperparameter is forwarded
    for k in shared:
        assert params[k].default == ref[k], k
        assert params[k].kind is inspect.Parameter.KEYWORD_ONLY, k
    kind = params.get("kind") or params.get("probe")
    assert kind.default == ref["probe"]


def test_misspelt_keywords_name_their_neighbour(run):
    _, z, tr = run
    X = tr.states[1:, :, 0]
    for call, near in (
        (lambda: fit_probes(X, z[:, 0], alhpa=1.0), "alpha"),
        (lambda: fit_trace(tr, z, pooling=True), "pooled"),
        (lambda: LinearProbe(weight_decy=0.1), "weight_decay"),
        (lambda: selectivity(X, z[:, 0], z[:, 0], n_bot=10), "n_boot"),
        (lambda: linear_head(max_iters=5), "max_iter"),
        (lambda: onset(pd.DataFrame(), treshold=0.5), "threshold"),
    ):
        with pytest.raises(UnknownOptionError, match=f"did you mean: {near}"):
            call()


def test_options_of_one_input_kind_are_refused_on_the_other(run):
    _, z, tr = run
    X = tr.states[1:, :, 0]
    with pytest.raises(LoopscopeError, match="sites= applies to a Trace"):
        fit_probes(X, z[:, 0], sites=["state"])
    with pytest.raises(LoopscopeError, match="pooled= applies to a Trace"):
        fit_probes(X, z[:, 0], pooled=True)
    with pytest.raises(UnknownOptionError, match="'site_labels' for a Trace"):
        fit_probes(tr, z, site_labels=[{}])
    t = fit_probes(X, z[:, 0], probe="ridge")
    c = fit_probes(X, 1 - z[:, 0], probe="ridge")
    with pytest.raises(LoopscopeError, match=r"takes no fit options \(got C=\)"):
        selectivity(t, c, C=2.0)
    with pytest.raises(LoopscopeError, match="needs control_y"):
        selectivity(X, z[:, 0])


def test_trace_meta_and_user_meta_reach_the_result(run):
    _, z, tr = run
    tr.meta.update(model="planted", split="ood")
    try:
        res = fit_probes(tr, z, probe="ridge", meta={"task": "bits"}, iterations=[2])
    finally:
        tr.meta.pop("model")
        tr.meta.pop("split")
    assert res.meta["model"] == "planted" and res.meta["split"] == "ood"
    df = res.to_frame()
    assert (df["model"] == "planted").all() and (df["task"] == "bits").all()
    assert (df["split"] == "ood").all() and (df["iteration"] == 2).all()
    assert res.meta["n_diverged_excluded"] == 0


def test_a_split_without_held_out_rows_summarises_to_nan_not_a_warning(run):
    _, z, tr = run
    X = tr.states[1:, :, 0]
    with np.testing.suppress_warnings() as sup:
        log = sup.record(RuntimeWarning)
        res = fit_probes(X, z[:, 0], probe="ridge", split="all")
        s = res.summary()
        acc = res.accuracy
    assert not log
    assert np.isnan(acc).all() and math.isnan(s["mean_test_acc"])
    assert math.isnan(s["max_test_acc"]) and math.isnan(s["best_site"])
    assert s["mean_train_acc"] == pytest.approx(float(res.train_acc.mean()))
