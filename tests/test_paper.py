"""`loopscope paper --quick` writes every listed figure with a non-empty, finite data table, the
report, and resumes without recomputing finished figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from loopscope.paper import EXPECTED_FIGURES, run_paper


def test_paper_quick_writes_every_figure(tmp_path):
    recs = run_paper(tmp_path, quick=True, progress=False)
    assert [r.name for r in recs] == EXPECTED_FIGURES
    assert {
        "convergence",
        "spectra",
        "basins",
        "halting",
        "hierarchical",
        "probes",
        "patching",
        "memorization",
        "verdict",
    } <= set(EXPECTED_FIGURES)
    for name in EXPECTED_FIGURES:
        for ext in ("pdf", "png", "csv", "json"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0, (name, ext)
        df = pd.read_csv(tmp_path / f"{name}.csv")
        assert len(df) > 0, name
        num = df.select_dtypes("number").to_numpy(dtype=float)
        assert np.isfinite(num[~np.isnan(num)]).all(), name
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert "seed 0" in meta["caption"] and "loopscope paper" in meta["caption"]
    report = (tmp_path / "report.md").read_text()
    assert all(f"{n}.png" in report for n in EXPECTED_FIGURES)
    # resume: a second run finds every figure done and rewrites nothing
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    run_paper(tmp_path, quick=True, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.png")}
    # the recipes moved into loopscope.experiments: a few numbers pinned from before the move
    # (float32 models: rho and lambda1 agree to float32 rounding, which moves with the CPU)
    sp = pd.read_csv(tmp_path / "spectra.csv")
    first = sp[(sp.model == "s3_fprm") & (sp.split == "id") & (sp["sample"] == 0)].iloc[0]
    assert first.rho == pytest.approx(0.46923202232040784, rel=1e-6)
    assert first.lambda1 == pytest.approx(-0.7554915315881042, rel=1e-6)
    cv = pd.read_csv(tmp_path / "convergence.csv")
    assert cv.iloc[0]["median"] == pytest.approx(1.0154121737502977, rel=1e-6)
    assert cv.iloc[0]["accuracy"] == pytest.approx(0.234375)
    vd = pd.read_csv(tmp_path / "verdict.csv")
    sp_row = vd[(vd.model == "s3_fprm") & (vd.split == "id")]
    spearman = sp_row[sp_row.evidence == "T_conv vs depth (Spearman)"]["value"].item()
    assert spearman == pytest.approx(0.8900378976545481, rel=1e-9)


def test_paper_workers_give_the_numbers_of_one_process_and_write_timings(tmp_path):
    only = ["memorization", "convergence"]  # a whole figure and one computed in parts
    one = run_paper(tmp_path / "one", quick=True, progress=False, only=only, jobs=1)
    two = run_paper(tmp_path / "two", quick=True, progress=False, only=only, jobs=2)
    assert [r.name for r in one] == [r.name for r in two] == only
    for name in only:
        a = (tmp_path / "one" / f"{name}.csv").read_text()
        assert a == (tmp_path / "two" / f"{name}.csv").read_text(), name
    t = json.loads((tmp_path / "two" / "timings.json").read_text())
    assert t["jobs"] == 2 and set(t["figures_s"]) == set(only) and t["skipped"] == []
    assert all(v > 0 for v in t["figures_s"].values()) and t["wall_s"] > 0
    again = run_paper(tmp_path / "two", quick=True, progress=False, only=only, jobs=2)
    assert [r.name for r in again] == only  # resumed: nothing recomputed
    assert json.loads((tmp_path / "two" / "timings.json").read_text())["skipped"] == only


def test_paper_bad_jobs_and_a_failing_worker_are_errors(tmp_path, monkeypatch):
    import sys

    from loopscope.core.errors import LoopscopeError
    from loopscope.experiments import paper_figures

    with pytest.raises(LoopscopeError, match="jobs must be a positive integer"):
        run_paper(tmp_path, quick=True, progress=False, only=["memorization"], jobs=0)
    if not sys.platform.startswith("linux"):
        return  # the patched recipe reaches forked workers only

    def boom(ctx):
        raise RuntimeError("recipe failed")

    monkeypatch.setitem(paper_figures.FIGURES, "memorization", boom)
    with pytest.raises(RuntimeError, match="recipe failed"):
        run_paper(tmp_path, quick=True, progress=False, only=["memorization", "patching"], jobs=2)
