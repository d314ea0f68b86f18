"""Scale: loopscope on HRM-Text at the 1B configuration (and a smaller one), random weights, offline.

Builds ``HrmTextForCausalLM`` from a config (no download, random weights) on whatever device is
present (CUDA if available, else CPU) and measures, per configuration:

* **capture**: ``unroll`` of the slow Loop recording every firing of every layer's
  ``hook_out`` (``L_blocks.*`` fire H x L times, ``H_blocks.*`` H times) against the bare forward
  of the same Loop and HF's own forward; best-of-N, interleaved; ratios against the Loop's forward;
* **patching**: ``circuits.patch_sweep`` of ``hook_state`` over every H-cycle at the last
  positions (rows per second);
* **spectrum**: ``analysis.spectrum`` of the step's Jacobian at the end state, ARPACK through
  jvps (float64 analysis by default): spectral radius, matvecs, seconds;
* **solve**: ``analysis.solve`` of the slow Loop's fixed point (Anderson): residual, status,
  evaluations, seconds.

Prints a table and writes JSON. ``--small`` runs a tiny configuration on CPU in seconds (the test
suite runs it); the default runs ``medium`` (~60 M parameters) and ``1b`` (HrmTextConfig's
defaults: 1.45 B parameters, d = 1536, 16 layers per stack, H = 2, L = 3, vocab 151 808).

    python benchmarks/scale.py --small --json scale_small.json
    python benchmarks/scale.py --configs medium 1b --json scale.json       # a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import loopscope as ls

CONFIGS: dict[str, dict[str, Any]] = {
    # tiny: seconds on a CPU (the test suite runs it)
    "small": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1 * 2 * 4,
        num_layers_per_stack=1, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        H_cycles=2, L_cycles=3, max_position_embeddings=128,
    ),
    "medium": dict(
        vocab_size=32_000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4 * 2 * 4,
        num_layers_per_stack=4, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
        H_cycles=2, L_cycles=3, max_position_embeddings=2048,
    ),
    "1b": {},  # HrmTextConfig() defaults = the 1B configuration
}  # fmt: skip

#: batch, positions, timing repeats, solver iterations, positions patched, positions of the
#: spectrum and solve input (one sample), ARPACK's eigenvalues kept, subspace and tolerance
SIZES = {
    "small": dict(batch=2, pos=8, reps=3, solve_iter=5, patch_pos=2, spectrum_pos=4, k=2, ncv=12,
                  tol=1e-4),
    "medium": dict(batch=4, pos=256, reps=5, solve_iter=30, patch_pos=4, spectrum_pos=32, k=4,
                   ncv=64, tol=1e-8),
    "1b": dict(batch=4, pos=256, reps=5, solve_iter=30, patch_pos=4, spectrum_pos=32, k=4,
               ncv=64, tol=1e-8),
}  # fmt: skip


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A random-weight ``HrmTextForCausalLM`` of configuration ``name`` on ``device``."""
    from transformers import HrmTextConfig, HrmTextForCausalLM

    cfg = HrmTextConfig(**CONFIGS[name])
    cfg.architectures = ["HrmTextForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = HrmTextForCausalLM(cfg)
    return model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def bench_capture(loop, hf, ids, device, reps: int) -> dict[str, Any]:
    H, n = hf.config.H_cycles, hf.config.num_layers_per_stack
    names = [f"{s}_blocks.{i}.hook_out" for s in "LH" for i in range(n)]  # each layer's output

    def loop_forward():
        with torch.no_grad():
            return loop(ids, H)

    def hf_forward():
        with torch.no_grad():
            return hf(ids, use_cache=False).logits

    def capture():
        return ls.unroll(loop, ids, H, capture=names)

    variants = {"loop forward": loop_forward, "hf forward": hf_forward, "capture": capture}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        _timed(fn, device)  # warm-up
    keys = list(variants)
    for r in range(reps):
        for k in keys[r % 3 :] + keys[: r % 3]:
            times[k].append(_timed(variants[k], device)[0])
    tr = capture()
    with torch.no_grad():
        same = float((tr.decode() - hf_forward()).abs().max())
    n_firings = sum(v.shape[0] for v in tr.acts.values())
    captured = sum(v.numel() * v.element_size() for v in tr.acts.values())
    base = min(times["loop forward"])
    return {
        "best_s": {k: min(v) for k, v in times.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "capture_ratio_best": min(times["capture"]) / base,
        "hf_ratio_best": min(times["hf forward"]) / base,
        "firings": n_firings,
        "captured_bytes": captured,
        "final_logits_vs_hf_max_abs": same,
    }


def bench_patching(loop, ids, device, n_pos: int) -> dict[str, Any]:
    from loopscope.circuits import patch_sweep

    H = loop.hf.config.H_cycles
    corrupt = ids.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % loop.hf.config.vocab_size

    def metric(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0] - logits[:, -1, 1]

    P = ids.shape[1]
    positions = list(range(P - n_pos, P))
    sec, res = _timed(
        lambda: patch_sweep(
            loop, ids, corrupt, ["hook_state"], "all", metric, n_iter=H, positions=positions
        ),
        device,
    )
    rows = len(res.frame)
    rec = res.frame["recovery"].astype(float) if "recovery" in res.frame else None
    return {
        "seconds": sec,
        "rows": rows,
        "rows_per_s": rows / sec,
        "recovery_finite_fraction": None if rec is None else float(rec.notna().mean()),
    }


def bench_spectrum(loop, ids, state, device, dtype: torch.dtype, size: dict) -> dict[str, Any]:
    sec, sp = _timed(
        lambda: ls.analysis.spectrum(
            loop, ids, state, k=size["k"], method="arpack", dtype=dtype, sigma=False,
            ncv=size["ncv"], tol=size["tol"],
        ),
        device,
    )  # fmt: skip
    return {
        "seconds": sec,
        "n": sp.n,
        "k": size["k"],
        "ncv": size["ncv"],
        "rho": float(sp.rho[0]),
        "matvecs": int(sp.matvecs[0]) if sp.matvecs else None,
        "status": sp.status[0],
    }


def bench_solve(loop, ids, device, dtype: torch.dtype, max_iter: int) -> dict[str, Any]:
    sec, res = _timed(
        lambda: ls.analysis.solve(loop, ids, method="anderson", tol=1e-4, max_iter=max_iter, dtype=dtype),
        device,
    )  # fmt: skip
    return {
        "seconds": sec,
        "status": list(res.status),
        "median_r_rel": res.summary()["median_r_rel"],
        "median_nfe": res.summary()["median_nfe"],
    }


def run_config(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from loopscope.models import from_hf

    size = dict(SIZES[name])
    for key in ("batch", "pos", "reps", "spectrum_pos", "k"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    model_dtype = getattr(torch, args.dtype)
    analysis_dtype = getattr(torch, args.analysis_dtype)
    t0 = time.perf_counter()
    hf = build(name, device, model_dtype, args.seed)
    loop = from_hf(hf)
    build_s = time.perf_counter() - t0
    cfg = hf.config
    n_params = sum(p.numel() for p in hf.parameters())
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (size["batch"], size["pos"]), generator=g).to(device)
    out: dict[str, Any] = {
        "config": name,
        "params": n_params,
        "weights_bytes": sum(p.numel() * p.element_size() for p in hf.parameters()),
        "d_model": cfg.hidden_size,
        "layers_per_stack": cfg.num_layers_per_stack,
        "H_cycles": cfg.H_cycles,
        "L_cycles": cfg.L_cycles,
        "vocab": cfg.vocab_size,
        "batch": size["batch"],
        "pos": size["pos"],
        "model_dtype": args.dtype,
        "analysis_dtype": args.analysis_dtype,
        "build_s": build_s,
    }
    out["capture"] = bench_capture(loop, hf, ids, device, size["reps"])
    out["patching"] = bench_patching(loop, ids, device, size["patch_pos"])
    one = ids[:1, : size["spectrum_pos"]]
    end = ls.unroll(loop, one, cfg.H_cycles).final
    out["spectrum"] = bench_spectrum(loop, one, end, device, analysis_dtype, size)
    out["solve"] = bench_solve(loop, one, device, analysis_dtype, size["solve_iter"])
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def print_table(results: list[dict[str, Any]], device: str) -> None:
    print(f"HRM-Text, random weights, device {device}")
    head = (
        f"{'config':8s} {'params':>8s} {'B x pos':>9s} {'fwd s':>8s} {'capture':>8s} "
        f"{'MiB':>7s} {'patch r/s':>10s} {'rho':>7s} {'n':>8s} {'mv':>5s} {'spec s':>7s} "
        f"{'solve r_rel':>11s} {'solve s':>8s}"
    )
    print(head)
    for r in results:
        c, p, s, v = r["capture"], r["patching"], r["spectrum"], r["solve"]
        print(
            f"{r['config']:8s} {r['params'] / 1e6:7.1f}M {r['batch']:>3d} x {r['pos']:<3d} "
            f"{c['best_s']['loop forward']:8.3f} x{c['capture_ratio_best']:6.3f} "
            f"{c['captured_bytes'] / 2**20:7.1f} {p['rows_per_s']:10.2f} {s['rho']:7.3f} "
            f"{s['n']:>8d} {s['matvecs'] or 0:>5d} {s['seconds']:7.2f} "
            f"{v['median_r_rel']:11.2e} {v['seconds']:8.2f}"
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="the tiny configuration only, on CPU")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["medium", "1b"])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--analysis-dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--pos", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--k", type=int, default=None, help="eigenvalues kept by ARPACK")
    ap.add_argument("--spectrum-pos", type=int, default=None, help="positions of spectrum/solve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("scale.json"))
    args = ap.parse_args(argv)
    if args.small:
        args.configs, args.device = ["small"], args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for name in args.configs:
        r = run_config(name, args, device)
        results.append(r)
        args.json.write_text(json.dumps(_meta(device, results), indent=1, default=str))
    print_table(results, str(device))
    print(f"wrote {args.json}")
    return results


def _meta(device: torch.device, results: list[dict[str, Any]]) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loopscope": ls.__version__,
        "results": results,
    }


if __name__ == "__main__":
    main()
