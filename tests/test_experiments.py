"""The experiments layer reproduces what `loopscope stability`, `halting` and `paper` measured
before they moved out of the CLI: the numbers below were measured by the CLI-embedded versions
(`loopscope stability s3_fprm --split id,ood --n 8 --n-dyn 2`, `loopscope halting s3_act --n 16`,
seed 0) and must not move."""

from __future__ import annotations

import math

import pytest

from loopscope import zoo
from loopscope.experiments.halting import halting_study
from loopscope.experiments.stability import StabilityResult, stability

STABILITY_BEFORE = {  # split -> column -> value
    "id": {
        "n_iter": 15, "seq_acc": 1.0, "converged_fraction": 1.0, "t_conv_mean": 10.125,
        "residual_at_budget": 1.0264291937408305e-05, "rho_median": 0.4666032769322639,
        "rho_max": 0.4692333802593568, "lambda1_median": -0.760630382588241,
        "correct_basin_fraction": 1.0,
    },
    "ood": {
        "n_iter": 99, "seq_acc": 0.75, "converged_fraction": 1.0, "t_conv_mean": 35.25,
        "residual_at_budget": 2.977183928863603e-07, "rho_median": 0.5472801237872513,
        "rho_max": 0.6408067632160032, "lambda1_median": -0.44555168097334225,
        "correct_basin_fraction": 0.5,
    },
}  # fmt: skip

HALTING_BEFORE = [  # split, criterion, threshold, mean_steps, accuracy, saturation_gap
    ("id", "residual", 0.001, 9.9375, 1.0, 8.1875),
    ("id", "q_head", 0.0, 1.0, 0.25, -0.75),
    ("id", "kl", 0.001, 3.5625, 1.0, 1.8125),
    ("ood", "residual", 0.001, 67.0, 0.4375, 59.4375),
    ("ood", "fixed", 50.0, 50.0, 0.4375, 42.4375),
    ("ood", "predicted", 0.001, 15.0625, 0.0625, 7.5),
]


def test_stability_numbers_are_those_the_cli_measured_before():
    res = stability(zoo.load("s3_fprm"), zoo.task_of("s3_fprm"), n=8, n_dyn=2, seed=0)
    assert isinstance(res, StabilityResult)
    table = res.to_frame().set_index("split")
    for split, cols in STABILITY_BEFORE.items():
        for col, want in cols.items():
            # counts and fractions are exact; the model runs in float32, whose rounding moves
            # with the CPU's kernels: rho / lambda1 agree to ~1e-6, and a relative residual
            # (a difference of near-equal states) only down to the float32 floor, ~1e-6
            exact = col in {"n_iter", "seq_acc", "converged_fraction", "t_conv_mean",
                            "correct_basin_fraction"}  # fmt: skip
            if exact:
                tol = pytest.approx(want, rel=0, abs=0)
            elif col == "residual_at_budget":
                tol = pytest.approx(want, rel=5e-3, abs=1e-6)
            else:
                tol = pytest.approx(want, rel=1e-5)
            assert table.loc[split, col] == tol, (split, col)
    s = res.summary()
    assert s["ood/seq_acc"] == 0.75 and all(isinstance(v, float) for v in s.values())
    assert res.meta["seed"] == 0 and res.meta["model"] == "s3_fprm"
    # one per-sample row per example and split; its correctness averages to seq_acc
    assert len(res.per_sample) == 16
    assert res.per_sample.groupby("split")["correct"].mean()["ood"] == 0.75


def test_halting_numbers_are_those_the_cli_measured_before():
    res = halting_study(zoo.load("s3_act"), zoo.task_of("s3_act"), n=16, seed=0)
    df = res.to_frame()
    for split, crit, thr, steps, acc, gap in HALTING_BEFORE:
        row = df[(df.split == split) & (df.criterion == crit) & (df.threshold == thr)]
        assert len(row) == 1, (split, crit, thr)
        got = row.iloc[0]
        assert (got.mean_steps, got.accuracy, got.saturation_gap) == pytest.approx(
            (steps, acc, gap), rel=1e-12
        ), (split, crit)
    assert math.isfinite(res.summary()["mean_accuracy"])


def test_stability_refuses_an_unknown_split_in_one_line():
    from loopscope.core.errors import LoopscopeError

    with pytest.raises(LoopscopeError, match="no split 'oood'; splits: "):
        stability(zoo.load("s3_fprm"), zoo.task_of("s3_fprm"), splits=["oood"], n=2)
