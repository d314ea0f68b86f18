"""Figures as a new user sees them: every legend entry is a drawn line with data, no colour
names two things, no dropped point goes unmarked."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from loopscope import figures, zoo

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_stability_residual_curves_draw_period2_and_accuracy():
    from loopscope.experiments.stability import stability, stability_figures

    res = stability(zoo.load("s3_rope"), zoo.task_of("s3_rope"), splits=["id"], n=4, dynamics=False)
    assert res.curves["token_acc"].notna().all() and res.curves["rel_residual_p2"].notna().any()
    fig = stability_figures(res)["residual_curves"]
    top, bottom = fig.axes[0], fig.axes[1]
    legend = [t.get_text() for t in top.get_legend().get_texts()]
    assert legend == ["id 1-step", "id period-2"]
    for line in top.lines + bottom.lines:  # every line drawn has finite points
        assert np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any(), line.get_label()
    acc = np.asarray(bottom.lines[0].get_ydata(), dtype=float)
    assert acc[-1] == pytest.approx(res.table["token_acc"].item())  # the table's end accuracy


def test_convergence_curves_leave_unmeasured_lines_out_of_the_legend():
    df = pd.DataFrame(
        {
            "model": "m", "split": "id", "iteration": [0, 1, 2], "median": [1.0, 0.1, 0.01],
            "q25": [1.0, 0.1, 0.01], "q75": [1.0, 0.1, 0.01], "median_p2": np.nan,
            "accuracy": np.nan,
        }
    )  # fmt: skip
    fig = figures.convergence_curves(df)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["id 1-step"]
    assert not fig.axes[1].lines and "no accuracy measured" in fig.axes[1].texts[0].get_text()


def test_halting_legend_gives_every_criterion_its_own_colour():
    crits = [f"c{i}" for i in range(13)]  # more criteria than one 10-colour cycle
    df = pd.DataFrame(
        [
            {"criterion": c, "split": sp, "mean_steps": k + t, "accuracy": 0.5, "threshold": t}
            for k, c in enumerate(crits)
            for sp in ("id", "ood")
            for t in (1, 2)
        ]
    )
    fig = figures.halting_tradeoff(df)
    ax = fig.axes[0]
    colour = {}
    for line in ax.lines:  # one line per (criterion, split), its x identifies the criterion
        crit = crits[int(min(line.get_xdata()) - 1)]
        colour.setdefault(crit, set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert all(len(v) == 1 for v in colour.values())  # a criterion keeps its colour across splits
    assert len({next(iter(v)) for v in colour.values()}) == len(crits)  # never reused
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == crits + ["split: id", "split: ood"]


def test_probe_wavefront_marks_positions_that_never_reach_onset_and_thins_ticks():
    rows = [
        {
            "split": "ood",
            "iteration": t,
            "position": p,
            "test_acc": 1.0 if t > p and p < 30 else 0.3,
        }
        for t in range(1, 41)
        for p in range(1, 33)
    ]
    df = pd.DataFrame(rows)
    on = pd.DataFrame({"split": "ood", "position": range(1, 33)})
    on["onset"] = np.where(on["position"] < 30, on["position"] + 1, -1)
    fig = figures.probe_wavefront(df, on)
    heat, ax_on = fig.axes[0], fig.axes[1]
    assert len(heat.get_xticklabels()) <= 12 and len(heat.get_yticklabels()) <= 12
    crosses = [ln for ln in ax_on.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [30, 31, 32]
    labels = [t.get_text() for t in ax_on.get_legend().get_texts()]
    assert any(lb.startswith("ood: never >= 0.9 (final acc 0.30") for lb in labels)


def test_transplant_lines_differ_in_style_and_the_setting_is_stated():
    tp = pd.DataFrame(
        [
            {"t": t, "recovery": 0.0, "measured_at": at, "example": e}
            for t in range(5)
            for at in (10, 20)
            for e in range(3)
        ]
    )
    heat = pd.DataFrame({"iteration": [0, 1], "position": [0, 0], "recovery": [0.0, 1.0]})
    fig = figures.patching_panels(heat, tp, setting="n = 3 pairs, T = 10, position 3 corrupted")
    lines = [ln for ln in fig.axes[1].lines if ln.get_label().startswith("measured")]
    assert len(lines) == 2  # identical data: told apart by style, not hidden
    a, b = lines
    assert (a.get_linestyle(), a.get_marker(), a.get_color()) != (
        b.get_linestyle(),
        b.get_marker(),
        b.get_color(),
    )
    assert all("(n = 3)" in ln.get_label() for ln in lines)
    assert "position 3 corrupted" in fig._suptitle.get_text()


def test_spectra_figure_draws_every_eigenvalue_and_counts_per_split():
    rho = pd.DataFrame(
        {"model": ["a", "a", "b", "b"], "split": ["id", "ood"] * 2, "sample": 0, "rho": 0.5}
    )
    lyap = rho.rename(columns={"rho": "lambda1"}).assign(lambda1=-0.5)
    eig = pd.DataFrame(
        [
            {"model": m, "split": sp, "sample": 0, "real": 0.1 * k, "imag": 0.0}
            for m in "ab"
            for sp in ("id", "ood")
            for k in range(6)
        ]
    )
    fig = figures.spectra_lyapunov(rho, lyap, eig)
    planes = fig.axes[:2]
    assert all(sum(len(c.get_offsets()) for c in ax.collections) == 12 for ax in planes)
    ticks = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert ticks == ["a\n(n = 1 + 1)", "b\n(n = 1 + 1)"]
