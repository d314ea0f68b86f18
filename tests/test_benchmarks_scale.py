"""``benchmarks/scale.py --small`` runs end to end on CPU (so the GPU-scale benchmark never rots):
its capture reproduces HF's logits, every layer's firings are counted and sized, the patching
sweep, the ARPACK spectrum and the solve report finite numbers, and the JSON holds them."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("loopscope_bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_small_runs_and_reports_finite_figures(scale, tmp_path, capsys):
    out = tmp_path / "scale.json"
    scale.main(["--small", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "small" in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and len(data["results"]) == 1
    r = data["results"][0]
    size = scale.SIZES["small"]
    H, L, n_layers, d = r["H_cycles"], r["L_cycles"], r["layers_per_stack"], r["d_model"]
    c = r["capture"]
    assert c["final_logits_vs_hf_max_abs"] == 0.0  # the Loop is HF's forward, bit for bit
    assert c["firings"] == (H * L + H) * n_layers  # every L pass and H cycle of every layer
    assert c["captured_bytes"] == c["firings"] * r["batch"] * r["pos"] * d * 4
    assert all(math.isfinite(v) and v > 0 for v in c["best_s"].values())
    assert math.isfinite(c["capture_ratio_best"]) and c["capture_ratio_best"] > 0
    p = r["patching"]
    assert p["rows"] == H * size["patch_pos"] * r["batch"]  # iterations x positions x examples
    assert p["recovery_finite_fraction"] == 1.0
    s = r["spectrum"]
    assert s["status"] == "ok" and s["n"] == 2 * size["spectrum_pos"] * d
    assert math.isfinite(s["rho"]) and s["rho"] > 0 and s["matvecs"] >= size["k"]
    v = r["solve"]
    assert len(v["status"]) == 1 and math.isfinite(v["median_r_rel"])
    assert r["params"] > 0 and r["weights_bytes"] == 4 * r["params"]
