"""Bad input to the Python API: every case of tests/fuzz_catalog.py gets a one-line
LoopscopeError of the expected type naming the argument (or, where the input is legal but surely
not meant, a warning naming it); hypothesis properties over the shapes and values the analyses
take: a LoopscopeError naming the argument or a correct result, never another exception."""

from __future__ import annotations

import functools
import json
import math
import warnings

import pytest
import torch
from fuzz_catalog import API_CASES, outcome_api
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import loopscope as ls
from loopscope.core.errors import CheckpointError, LoopscopeError, NeverFiresWarning

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("case", API_CASES, ids=[c.name for c in API_CASES])
def test_bad_api_input_is_refused_in_one_line_naming_the_argument(case, tmp_path):
    outcome, message = outcome_api(case, tmp_path)
    assert outcome == ("warning" if case.expect == "warn" else "error"), message


# -- properties ----------------------------------------------------------------------------------
D = 3


def _loop():
    return ls.FnLoop(
        step=lambda h, x: torch.tanh(0.5 * h + x), init_state=torch.zeros(D, dtype=torch.float64)
    )


X = torch.linspace(-1, 1, 2 * D, dtype=torch.float64).reshape(2, D)
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _one_line_naming(e: BaseException, word: str) -> None:
    msg = str(e)
    assert "\n" not in msg and word in msg, msg


@FAST
@given(b=st.integers(0, 4), d=st.integers(0, 5), extra=st.booleans())
def test_an_init_of_any_shape_runs_exactly_when_it_fits_else_is_refused_naming_init(b, d, extra):
    shape = (b, d, 1) if extra else (b, d)
    init = torch.full(shape, 0.25, dtype=torch.float64)
    try:
        tr = ls.unroll(_loop(), X, 3, init=init)
    except LoopscopeError as e:
        assert shape != (2, D)
        _one_line_naming(e, "init")
        return
    assert shape == (2, D)
    assert torch.equal(tr.states[0], init)


@FAST
@given(pos=st.lists(st.integers(-12, 12), max_size=4))
def test_capture_positions_keep_exactly_those_positions_or_are_refused_naming_them(pos):
    loop = ls.FnLoop(
        step=lambda h, x: torch.tanh(h + x),
        init_state=torch.zeros(5, 2, dtype=torch.float64),
        state_axes=("batch", "pos", "d_model"),
    )
    x = torch.ones(2, 5, 2, dtype=torch.float64)
    try:
        tr = ls.unroll(loop, x, 2, capture="hook_state", positions=pos)
    except LoopscopeError as e:
        assert not pos or any(p >= 5 or p < -5 for p in pos)
        _one_line_naming(e, "positions")
        return
    assert pos and all(-5 <= p < 5 for p in pos)
    assert torch.equal(tr["hook_state"], tr.states[:-1][:, :, pos])


@FAST
@given(its=st.lists(st.integers(0, 9), min_size=1, max_size=3), n_iter=st.integers(1, 6))
def test_an_intervention_warns_exactly_when_some_iteration_never_fires(its, n_iter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = ls.unroll(_loop(), X, n_iter, interventions=[ls.Zero("hook_state", iteration=its)])
    late = sorted({t for t in its if t >= n_iter})
    said = [w for w in caught if issubclass(w.category, NeverFiresWarning)]
    assert bool(said) == bool(late)
    if late:
        assert str(late) in str(said[0].message)
    for t in its:  # the reachable ones did fire
        if t < n_iter:
            assert tr.states[t].abs().max().item() == 0.0


@FAST
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
@example(shape=[2, 2, 3])  # the step would broadcast it: found by this test
@example(shape=[2, 3, 3])
def test_spectrum_of_a_state_of_any_shape_is_measured_or_refused_naming_state(shape):
    state = torch.full(shape, 0.1, dtype=torch.float64)
    try:
        sp = ls.analysis.spectrum(_loop(), X, state)
    except LoopscopeError as e:
        assert tuple(shape) != (2, D)
        _one_line_naming(e, "state")
        return
    assert tuple(shape) == (2, D) and len(sp.rho) == 2


@functools.cache
def _s3_trace():
    b = ls.zoo.task_of("s3_fprm").sample(3, split="id", seed=0)
    return ls.unroll(ls.zoo.load("s3_fprm"), b.tokens, 4, decode=True), b.tokens.shape[1]


@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3))
def test_halting_targets_of_any_shape_are_scored_or_refused_naming_targets(shape):
    tr, n_pos = _s3_trace()
    targets = torch.zeros(shape, dtype=torch.long)
    try:
        ls.analysis.halting.evaluate(tr, None, targets)
    except LoopscopeError as e:
        _one_line_naming(e, "targets")
        return
    assert shape[0] == 3 and math.prod(shape[1:]) == n_pos


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=3),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
    max_leaves=6,
)


@FAST
@given(field=st.sampled_from(["labels", "status", "aliases", "meta", "format", "sha256"]),
       value=JSONS | st.just("<drop>"))  # fmt: skip
def test_a_trace_json_with_any_field_damaged_loads_equal_or_is_refused_naming_the_file(
    tmp_path_factory, field, value
):
    tmp = tmp_path_factory.mktemp("t")
    tr = ls.unroll(_loop(), X, 3, capture="hook_state")
    js = tr.save(tmp / "t")
    meta = json.loads(js.read_text())
    if value == "<drop>":
        meta.pop(field)
    else:
        meta[field] = value
    js.write_text(json.dumps(meta))
    try:
        back = ls.Trace.load(js)
    except CheckpointError as e:
        _one_line_naming(e, str(tmp / "t"))
        return
    assert torch.equal(back.states, tr.states) and torch.equal(back["hook_state"], tr["hook_state"])
