"""Study tables -> tidy frames and figures: the architecture knobs with CIs over seeds, and the
headline findings per seed."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from loopscope import figures
from loopscope.core.errors import LoopscopeError
from loopscope.experiments import study_figures as S

matplotlib.use("Agg")


def _arch_table() -> pd.DataFrame:
    rows = []
    for L in (1, 2):
        for norm in ("pre", "post"):
            for seed in (0, 1, 2):
                rows.append(
                    {
                        "status": "ok", "seed": seed, "model.n_core": L, "model.injection": "add",
                        "model.norm": norm, "id.seq_acc": 0.5 + 0.1 * seed,
                        "ood.seq_acc": 0.1 * L, "ood.rho_median": 0.9 + 0.05 * seed,
                        "id.n_iter": 40,
                    }
                )  # fmt: skip
    rows.append({**rows[0], "status": "failed", "id.seq_acc": np.nan})
    return pd.DataFrame(rows)


def test_mean_ci_is_the_t_interval():
    v = [0.5, 0.6, 0.7]
    m, lo, hi, n = S.mean_ci(v)
    half = stats.t.ppf(0.975, 2) * np.std(v, ddof=1) / np.sqrt(3)
    assert (m, n) == (pytest.approx(0.6), 3)
    assert (lo, hi) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert np.isnan(S.mean_ci([1.0, np.nan])[1])  # one finite value: no interval


def test_architecture_long_and_summary_keep_finished_jobs_per_config():
    long = S.architecture_long(_arch_table())
    assert set(long["metric"]) == {"seq_acc", "rho_median"}  # n_iter is not a study metric
    assert len(long) == 12 * 3  # 12 finished jobs x (id acc, ood acc, ood rho)
    assert long["config"].iloc[0] == "L=1 inj=add norm=pre"
    summ = S.architecture_summary(long)
    row = summ[(summ.config == "L=1 inj=add norm=pre") & (summ.split == "id")].iloc[0]
    assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(0.6)
    fig = figures.knob_effects(long, summ, S.ARCH_METRICS)
    assert fig.axes[0].get_title() == "sequence accuracy"
    with pytest.raises(LoopscopeError, match="knob columns"):
        S.architecture_long(pd.DataFrame({"status": ["ok"], "seed": [0]}))


def test_seeds_long_reads_each_finding_against_its_rule():
    t = pd.DataFrame(
        {
            "status": "ok",
            "recipe": ["s3_rope"] * 3 + ["s3_fprm"] * 3,
            "seed": [0, 1, 2] * 2,
            "ood.seq_acc": [0.05, 0.1, 0.3, 0.8, 0.4, 0.9],
            "verdict.ood.confident_wrong": [0.9, 0.8, 0.2, 0.0, 0.1, 0.0],
        }
    )
    long = S.seeds_long(t)
    summ = S.seeds_summary(long).set_index("finding")
    assert summ.loc["s3_rope OOD sequence accuracy", "holds_on"] == "2/3"
    assert summ.loc["s3_fprm OOD sequence accuracy", "per_seed"] == "0: 0.800, 1: 0.400, 2: 0.900"
    assert not summ["every_seed"].any()
    fig = figures.seed_spread(long)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][
        0
    ] == "s3_fprm OOD sequence accuracy"


def test_a_missing_study_table_is_a_one_line_error(tmp_path):
    with pytest.raises(LoopscopeError, match="loopscope sweep studies/nope.toml"):
        S.study_table("nope", path=tmp_path / "nope.csv")
