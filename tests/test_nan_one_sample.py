"""NaN in one sample of a batch: every analysis flags that sample and gives the other samples
exactly what a clean run of them alone gives (metrics, cycles, Lyapunov, basins, path
independence, probes, patching, transplant; solve, census and spectrum are in
test_analysis_numerics_hardening.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import loopscope as ls
from loopscope import FnLoop

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
N = 6


def _loop(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.8 * torch.randn(N, N, generator=g, dtype=F64) / N**0.5
    R = torch.randn(3, N, generator=g, dtype=F64)
    return FnLoop(
        step=lambda h, x: torch.tanh(h @ W.T + x),
        init_state=torch.zeros(N, dtype=F64),
        decode=lambda h, x: (h @ R.T).unsqueeze(1),  # [B, 1, 3]: one position, 3 classes
    )


def _inputs(seed=1):
    x = torch.randn(3, N, generator=torch.Generator().manual_seed(seed), dtype=F64)
    bad = x.clone()
    bad[1, 2] = float("nan")
    return x, bad


def _rows(df: pd.DataFrame, samples, col="sample") -> pd.DataFrame:
    out = df[df[col].isin(samples)].copy()
    return out.reset_index(drop=True)


def _same_numbers(a: pd.DataFrame, b: pd.DataFrame) -> None:
    num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and c in b.columns]
    np.testing.assert_array_equal(a[num].to_numpy(float), b[num].to_numpy(float))


def test_metrics_flag_the_nan_sample_and_keep_the_others():
    loop = _loop()
    x, bad = _inputs()
    clean = ls.analysis.metrics(ls.unroll(loop, x, 30, decode=True)).to_frame()
    got = ls.analysis.metrics(ls.unroll(loop, bad, 30, decode=True)).to_frame()
    _same_numbers(_rows(got, [0, 2]), _rows(clean, [0, 2]))
    tr = ls.unroll(loop, bad, 30)
    assert tr.status[1] == "diverged" and tr.status[0] != "diverged"


def test_cycles_and_classes_flag_the_nan_sample_and_keep_the_others():
    loop = _loop()
    x, bad = _inputs()
    tr_c, tr_b = ls.unroll(loop, x, 40), ls.unroll(loop, bad, 40)
    cls_c = ls.analysis.classify(tr_c).to_frame()
    cls_b = ls.analysis.classify(tr_b).to_frame()
    assert cls_b.loc[cls_b["sample"] == 1, "class"].item() == "divergent"
    assert list(_rows(cls_b, [0, 2])["class"]) == list(_rows(cls_c, [0, 2])["class"])
    cyc_b = ls.analysis.detect_cycle(tr_b).to_frame()
    cyc_c = ls.analysis.detect_cycle(tr_c).to_frame()
    _same_numbers(_rows(cyc_b, [0, 2]), _rows(cyc_c, [0, 2]))


def test_lyapunov_is_nan_for_the_nan_sample_and_exact_for_the_others():
    loop = _loop()
    x, bad = _inputs()
    kw = dict(n_steps=60, warmup=10, bootstrap=20, k=2)
    clean = ls.analysis.lyapunov(loop, x, **kw)
    got = ls.analysis.lyapunov(loop, bad, **kw)
    assert np.isnan(got.lambda1[1])
    np.testing.assert_array_equal(got.lambda1[[0, 2]], clean.lambda1[[0, 2]])
    assert got.to_frame().query("sample == 1")["diverged"].all()
    assert not got.to_frame().query("sample != 1")["diverged"].any()


def test_basins_flag_the_nan_sample_and_keep_the_others():
    loop = _loop()
    x, bad = _inputs()
    seeds = torch.randn(5, N, generator=torch.Generator().manual_seed(2), dtype=F64)
    clean = ls.analysis.basins(loop, x, seeds, n_iter=60)
    got = ls.analysis.basins(loop, bad, seeds, n_iter=60)
    fc, fb = clean.to_frame(), got.to_frame()
    _same_numbers(_rows(fb, [0, 2]), _rows(fc, [0, 2]))
    bad_rows = fb[fb["sample"] == 1]
    assert len(bad_rows) > 0 and not bad_rows.filter(like="stable").any().any()


def test_path_independence_is_nan_for_the_nan_sample_and_exact_for_the_others():
    loop = _loop()
    x, bad = _inputs()
    inits = [torch.zeros(3, N, dtype=F64), torch.ones(3, N, dtype=F64)]
    clean = ls.analysis.path_independence(loop, x, inits, n_iter=40).to_frame()
    got = ls.analysis.path_independence(loop, bad, inits, n_iter=40).to_frame()
    _same_numbers(_rows(got, [0, 2]), _rows(clean, [0, 2]))
    num = got[got["sample"] == 1].select_dtypes("number").drop(columns=["sample"])
    assert num.isna().any(axis=None)


def test_probes_skip_nan_rows_and_fit_the_rest_exactly():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(2, 200, 5, generator=g, dtype=F64)  # [sites, N, d]
    y = (X[..., 0] > 0).long()
    Xb = X.clone()
    Xb[0, 7, 3] = float("nan")
    clean = ls.probes.fit_probes(X, y, probe="ridge", seed=0)
    got = ls.probes.fit_probes(Xb, y, probe="ridge", seed=0)
    fc, fb = clean.to_frame(), got.to_frame()
    # the site without NaN is untouched; the site with it is fitted without that row and says so
    _same_numbers(
        fb[fb["site"] == 1].reset_index(drop=True), fc[fc["site"] == 1].reset_index(drop=True)
    )
    assert np.isfinite(fb[fb["site"] == 0]["test_acc"]).all()
    assert list(fb["n_nonfinite"]) == [1, 0]
    assert fb.loc[0, "n_train"] + fb.loc[0, "n_test"] == 199  # the NaN row is left out


def _metric(readout, idx):
    return readout[:, 0, 0]


def test_patch_sweep_flags_the_nan_example_and_keeps_the_others():
    loop = _loop()
    x, bad = _inputs()
    corrupt = torch.randn(3, N, generator=torch.Generator().manual_seed(5), dtype=F64)
    clean = ls.circuits.patch_sweep(loop, x, corrupt, "hook_state", "all", _metric, n_iter=8)
    got = ls.circuits.patch_sweep(loop, bad, corrupt, "hook_state", "all", _metric, n_iter=8)
    fc, fb = clean.to_frame(), got.to_frame()
    _same_numbers(_rows(fb, [0, 2]), _rows(fc, [0, 2]))
    one = fb[fb["sample"] == 1]
    assert one["diverged"].all() and one[["metric", "clean", "recovery"]].isna().all(axis=None)
    assert one["corrupt"].notna().all()  # the corrupted run of that example is healthy


def test_state_transplant_flags_the_nan_example_and_keeps_the_others():
    loop = _loop()
    x, bad = _inputs()
    corrupt = torch.randn(3, N, generator=torch.Generator().manual_seed(5), dtype=F64)
    clean = ls.circuits.state_transplant(loop, x, corrupt, _metric, n_iter=8).to_frame()
    got = ls.circuits.state_transplant(loop, bad, corrupt, _metric, n_iter=8).to_frame()
    _same_numbers(_rows(got, [0, 2]), _rows(clean, [0, 2]))
    one = got[got["sample"] == 1]
    assert one["diverged"].all() and one[["metric", "clean", "recovery"]].isna().all(axis=None)
    assert not got[got["sample"] != 1]["diverged"].any()
