"""The analyses run on both published looped LMs (tiny random-weight Inkling2Loop and HRM-Text
built offline), and a checkpoint split across CPU and disk by accelerate gives HF's logits."""

from __future__ import annotations

import pytest
import torch

import loopscope as ls
from loopscope.models import build_tiny_hrm_text, from_hf, load_hf
from loopscope.models.inkling2 import build_tiny_inkling2

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(1))


def _loops():
    ink = build_tiny_inkling2(seed=0)
    hrm, _ = build_tiny_hrm_text(seed=0)
    return {"inkling2": (from_hf(ink), 3), "hrm_text": (from_hf(hrm), hrm.config.H_cycles)}


@pytest.fixture(scope="module")
def loops():
    return _loops()


@pytest.mark.parametrize("name", ["inkling2", "hrm_text_fast"])
def test_census_finds_fixed_points_that_the_loop_maps_to_themselves(loops, name):
    loop = loops["inkling2"][0] if name == "inkling2" else loops["hrm_text"][0].fast_loop()
    x = IDS[:1, :4]
    census = ls.analysis.find_fixed_points(loop, x, 4, spectra=True, decode=False, max_iter=60)
    frame = census.to_frame()  # one row per unique point
    assert len(frame) >= 1 and (frame["sample"] == 0).all()
    assert census.seed_class.shape == (1, 4)
    # every point the census calls fixed is a fixed point of the float64 step, checked here by
    # one independent application of the step
    from loopscope.analysis.loopmap import LoopMap

    m = LoopMap(loop, x)
    fixed = [i for i, k in enumerate(census.kind) if k == "fixed"]
    assert fixed, "these tiny loops contract: the census must find their fixed point"
    for i in fixed:
        z = m.flatten(census.points[i].unsqueeze(0).double())
        r = (m.f(z) - z).norm() / z.norm().clamp_min(1e-300)
        assert r.item() < 1e-8
        assert census.rho[i] < 1.0  # every seed reached it by iteration: a stable point


def test_census_calls_the_drifting_hrm_text_slow_loop_slow_never_fixed(loops):
    loop, _ = loops["hrm_text"]
    x = IDS[:1, :4]
    tr = ls.unroll(loop, x, 20)
    step = [(tr.states[t + 1] - tr.states[t]).norm() / tr.states[t + 1].norm() for t in (10, 19)]
    assert min(step) > 1e-3  # iteration shows no convergence: the H-cycle map keeps moving
    census = ls.analysis.find_fixed_points(loop, x, 2, spectra=False, decode=False, max_iter=8)
    assert "fixed" not in census.kind
    assert (census.r_rel > 1e-5).all()


HOOK = {"inkling2": "core.hook_resid_post", "hrm_text": "L_blocks.0.hook_out"}


@pytest.mark.parametrize("name", ["inkling2", "hrm_text"])
def test_probes_read_the_input_token_from_every_pass(loops, name):
    loop, n = loops[name]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 8, (256, 5), generator=g)  # a small vocabulary: 8 classes per position
    tr = ls.unroll(loop, ids, n, capture=HOOK[name])
    res = ls.probes.fit_trace(tr, ids, sites=[HOOK[name]], positions=[2])
    df = res.to_frame()
    assert {"iteration", "site"} <= set(df.columns) and len(df) >= n
    # the residual stream of a random-weight LM still carries its own input token linearly
    assert df["test_acc"].min() > 0.5 > 1 / 8


def _answer_metric(clean):
    """Logit of the clean last token at the last position, per row."""
    tok = clean[:, -1]

    def metric(readout, idx):
        return readout[torch.arange(len(idx)), -1, tok[idx]]

    return metric


@pytest.mark.parametrize("name", ["inkling2", "hrm_text"])
def test_patch_sweep_over_passes_matches_hand_runs(loops, name):
    loop, n = loops[name]
    clean, corrupt = IDS[:2], IDS[2:4]
    metric = _answer_metric(clean)
    res = ls.circuits.patch_sweep(
        loop, clean, corrupt, "hook_state", "all", metric, n_iter=n, positions=[5]
    )
    df = res.to_frame()
    assert sorted(df["iteration"].unique()) == list(range(n))
    # the reference columns are the metric of the plain clean and corrupt runs (a slow reference)
    idx = torch.arange(2)
    want_clean = metric(ls.unroll(loop, clean, n, decode=True).logits[-1], idx)
    want_corrupt = metric(ls.unroll(loop, corrupt, n, decode=True).logits[-1], idx)
    for ex in range(2):
        rows = df[df["example"] == ex]
        assert rows["clean"].to_numpy() == pytest.approx(want_clean[ex].item(), abs=1e-5)
        assert rows["corrupt"].to_numpy() == pytest.approx(want_corrupt[ex].item(), abs=1e-5)
    assert df["metric"].notna().all() and not df["diverged"].any()
    if name == "inkling2":  # pass 0 reads no messages: h_0 is unused, so patching it is a no-op
        first = df[df["iteration"] == 0]
        assert (first["metric"] - first["corrupt"]).abs().max() < 1e-5
    # a later patch of the state does move the answer
    assert (df["metric"] - df["corrupt"]).abs().max() > 1e-4


def _hf_dir(model, tmp_path):
    model.save_pretrained(tmp_path)
    return tmp_path, sum(p.numel() * p.element_size() for p in model.parameters())


def test_inkling2_split_over_cpu_and_disk_gives_hf_logits_and_captures_every_pass(tmp_path):
    pytest.importorskip("accelerate")
    hf = build_tiny_inkling2(seed=0)
    ref = hf(IDS).logits.detach()
    path, size = _hf_dir(hf, tmp_path / "ckpt")
    loop = load_hf(path, max_memory=size // 2, offload_folder=tmp_path / "off")
    placed = set(loop.hf.hf_device_map.values())
    assert placed == {"cpu", "disk"}, loop.hf.hf_device_map  # really split
    tr = ls.unroll(loop, IDS, 3, decode=True, capture="core.hook_resid_post")
    assert (tr.logits[-1] - ref).abs().max().item() == 0.0
    assert tr.labels["core.hook_resid_post"] == [(p, j) for p in range(3) for j in range(2)]
    resident = ls.unroll(from_hf(hf), IDS, 3, capture="core.hook_resid_post")
    assert torch.equal(tr["core.hook_resid_post"], resident["core.hook_resid_post"])
    # Jacobians need the weights in memory: a one-line refusal, not a crash inside autograd
    with pytest.raises(ls.LoopscopeError, match="offloaded"):
        ls.analysis.spectrum(loop, IDS[:1], tr.states[-1][:1])


def test_hrm_text_split_over_cpu_and_disk_gives_hf_logits(tmp_path):
    pytest.importorskip("accelerate")
    model, _ = build_tiny_hrm_text(seed=0)
    with torch.no_grad():
        ref = model(IDS, use_cache=False).logits
    path, size = _hf_dir(model, tmp_path / "ckpt")
    loop = load_hf(path, max_memory=size // 2, offload_folder=tmp_path / "off")
    assert "disk" in set(loop.bridge.original_model.hf_device_map.values())
    tr = ls.unroll(loop, IDS, model.config.H_cycles, decode=True)
    # float32: the offloaded bridge agrees with HF to rounding (streamed weights, same math)
    assert (tr.logits[-1] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"device_map": 3}, "device_map must be"),
        ({"max_memory": [1]}, "max_memory must be"),
        ({"max_memory": "1GiB", "dtype": "float64"}, "float64 is for Jacobian"),
        ({"max_memory": "1GiB", "device": "cuda:0"}, "not both"),
    ],
)
def test_bad_placement_settings_are_one_line_errors(tmp_path, kwargs, words):
    pytest.importorskip("accelerate")
    path, _ = _hf_dir(build_tiny_inkling2(seed=0), tmp_path / "ckpt")
    with pytest.raises(ls.LoopscopeError, match=words) as e:
        load_hf(path, **kwargs)
    assert "\n" not in str(e.value)
