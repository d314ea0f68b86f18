"""Self-improvement rounds: the filters on constructed cases, bad settings, and a tiny run that is
finite, deterministic and resumes bit-identically after kill -9 mid-round."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from loopscope.core.errors import LoopscopeError
from loopscope.experiments.self_improve import (
    SelfImproveConfig,
    inject_noise,
    length_filter,
    majority_vote,
    self_improve,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    d0=2,
    rounds=2,
    base_steps=20,
    round_steps=8,
    batch_size=16,
    n_models=2,
    n_label=16,
    margin=1,
    n_eval=16,
    n_dynamics=8,
    n_basin=2,
    basin_seeds=2,
    n_rho=1,
)


def tiny(**changes):
    return SelfImproveConfig(**{**TINY, **changes})


# -- filters ---------------------------------------------------------------------------------------
def _votes(outputs_per_model):
    """[K][N] lists of digit rows -> [K, N, P] tensor."""
    return torch.tensor(outputs_per_model)


def test_majority_vote_keeps_inputs_whose_top_output_reaches_the_threshold():
    a, b, c = [1, 2, 0], [3, 4, 1], [5, 5, 0]
    # 5 models, 3 inputs: input 0 has 4 votes for a, input 1 has 3 for b, input 2 has 2/2/1
    labels = _votes(
        [
            [a, b, a],
            [a, b, a],
            [a, b, c],
            [a, c, c],
            [b, c, b],
        ]
    )
    lab, votes, keep = majority_vote(labels, threshold=0.7)  # needs >= 3.5 votes
    assert lab.tolist() == [a, b, a]  # input 2: a and c tie at 2; the lowest model's wins
    assert votes.tolist() == [4, 3, 2]
    assert keep.tolist() == [True, False, False]
    _, _, keep_half = majority_vote(labels, threshold=0.5)  # needs >= 2.5 votes
    assert keep_half.tolist() == [True, True, False]
    _, _, keep_all = majority_vote(labels, threshold=1.0)
    assert keep_all.tolist() == [False, False, False]


def test_majority_vote_counts_full_outputs_not_digits():
    # every model agrees on digit 0 but no two agree on the whole output: one vote each
    labels = _votes([[[7, 1]], [[7, 2]], [[7, 3]]])
    _, votes, keep = majority_vote(labels, threshold=0.5)
    assert votes.tolist() == [1] and keep.tolist() == [False]


def test_length_filter_compares_significant_digits_with_the_true_sum():
    # LSB first: true sums 0+0 = 0 (1 digit), 95 + 5 = 100 (3 digits), 12 + 30 = 42 (2 digits)
    targets = torch.tensor([[0, 0, 0], [0, 0, 1], [2, 4, 0]])
    pred = torch.tensor([[3, 0, 0], [9, 9, 0], [2, 4, 1]])
    # right length / too short (99) / too long (142)
    assert length_filter(pred, targets=targets).tolist() == [True, False, False]
    assert length_filter(targets, targets=targets).all()


def test_length_filter_without_labels_rejects_a_carry_out_above_one():
    pred = torch.tensor([[4, 0], [4, 1], [4, 2], [4, 9]])
    assert length_filter(pred).tolist() == [True, True, False, False]


def test_perturb_noise_changes_exactly_one_digit_of_every_hit_row():
    labels = torch.randint(0, 10, (400, 6), generator=torch.Generator().manual_seed(0))
    noisy, hit = inject_noise(labels, kind="perturb", rate=0.3, seed=1)
    changed = (noisy != labels).sum(1)
    assert torch.equal(changed[hit], torch.ones(int(hit.sum()), dtype=changed.dtype))
    assert int(changed[~hit].sum()) == 0
    assert 0.2 < hit.double().mean() < 0.4
    same, none = inject_noise(labels, kind="uniform", rate=0.0, seed=1)
    assert torch.equal(same, labels) and not none.any()
    full, all_hit = inject_noise(labels, kind="uniform", rate=1.0, seed=1)
    assert all_hit.all() and (full != labels).any(1).double().mean() > 0.99


# -- bad settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(rounds=0), "rounds must be a positive integer"),
        (dict(rounds=200, step_digits=3), "model has 512 positions"),
        (dict(vote_threshold=0.0), "vote_threshold"),
        (dict(noise="flip"), "noise must be one of"),
        (dict(recipe="s3_fprm"), "addition recipes"),
        (dict(recipe="nope"), "unknown zoo recipe"),
    ],
)
def test_bad_settings_raise_one_line_errors(changes, words):
    with pytest.raises(LoopscopeError) as e:
        tiny(**changes)
    assert words in str(e.value) and "\n" not in str(e.value)


# -- a tiny run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    return self_improve(tiny(), run_dir=tmp_path_factory.mktemp("si") / "run", progress=False)


def test_every_round_and_length_has_a_finite_row(tiny_run):
    f = tiny_run.to_frame()
    cfg = tiny()
    assert len(f) == (cfg.rounds + 1) * cfg.max_digits
    assert sorted(f["round"].unique()) == [0, 1, 2]
    for col in ("acc", "acc_models", "converged_fraction", "cycle_fraction", "conv_wrong"):
        assert np.isfinite(f[col]).all() and f[col].between(0, 1).all(), col
    assert np.isfinite(f["rho"]).all() and (f["rho"] >= 0).all()
    assert np.isfinite(f["correct_basin"]).all()
    # label statistics exactly on the lengths each round added
    labelled = f[f["label_error"].notna()]
    assert list(zip(labelled["round"], labelled["length"], strict=True)) == [(1, 3), (2, 4)]
    assert labelled["filter_yield"].le(labelled["vote_yield"]).all()
    # conv_correct + conv_wrong is the settled share: never above 1
    assert (f["conv_correct"] + f["conv_wrong"]).le(1 + 1e-12).all()
    s = tiny_run.summary()
    assert s["rounds"] == 2.0 and all(isinstance(v, float) for v in s.values())


def test_same_seed_gives_the_same_table(tiny_run):
    again = self_improve(tiny(), progress=False)
    pd.testing.assert_frame_equal(again.to_frame(), tiny_run.to_frame())


def _state(models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def _assert_same_models(a, b):
    for sa, sb in zip(_state(a), _state(b), strict=True):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


_KILLER = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    import loopscope.experiments.self_improve as si
    measure = si._measure
    def killing_measure(models, cfg, r):
        if r == 2:  # round 2 trained, not yet measured nor checkpointed: die mid-round
            os.kill(os.getpid(), signal.SIGKILL)
        return measure(models, cfg, r)
    si._measure = killing_measure
    si.self_improve(si.SelfImproveConfig(**{tiny}), run_dir=sys.argv[1], progress=False)
    """
)


def test_resume_after_kill_9_mid_round_is_bit_identical(tiny_run, tmp_path):
    run = tmp_path / "killed"
    code = _KILLER.replace("{tiny}", repr(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(run)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (run / "round-001" / "round.json").exists()
    assert not (run / "round-002" / "round.json").exists()
    resumed = self_improve(tiny(), run_dir=run, progress=False)
    pd.testing.assert_frame_equal(resumed.to_frame(), tiny_run.to_frame())
    _assert_same_models(resumed.models, tiny_run.models)


def test_a_full_disk_mid_run_is_a_one_line_error_and_the_rerun_resumes_bit_identically(
    tiny_run, tmp_path, monkeypatch
):
    from loopscope.core.errors import OutputError

    real, calls = os.replace, []

    def fills_up(src, dst):
        calls.append(dst)
        if len(calls) > 9:  # round 0 and part of round 1 written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fills_up)
    with pytest.raises(OutputError, match="No space left on device") as e:
        self_improve(tiny(), run_dir=tmp_path / "r", progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert not list((tmp_path / "r").rglob("*.tmp"))  # no temporary left behind
    resumed = self_improve(tiny(), run_dir=tmp_path / "r", progress=False)
    pd.testing.assert_frame_equal(resumed.to_frame(), tiny_run.to_frame())
    _assert_same_models(resumed.models, tiny_run.models)


def test_a_damaged_round_checkpoint_is_refused_naming_the_file(tmp_path):
    from loopscope.core.errors import CheckpointError

    self_improve(tiny(), run_dir=tmp_path / "r", progress=False, stop_after_round=0)
    p = tmp_path / "r" / "round-000" / "models.safetensors"
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"round-000/models\.safetensors is damaged"):
        self_improve(tiny(), run_dir=tmp_path / "r", progress=False, stop_after_round=0)


def test_a_run_stopped_after_a_round_resumes_to_the_same_result(tiny_run, tmp_path):
    part = self_improve(tiny(), run_dir=tmp_path / "r", progress=False, stop_after_round=0)
    assert sorted(part.to_frame()["round"].unique()) == [0]
    resumed = self_improve(tiny(), run_dir=tmp_path / "r", progress=False)
    pd.testing.assert_frame_equal(resumed.to_frame(), tiny_run.to_frame())
    _assert_same_models(resumed.models, tiny_run.models)


def test_a_run_dir_of_another_config_is_refused(tiny_run, tmp_path):
    self_improve(tiny(), run_dir=tmp_path / "r", progress=False, stop_after_round=0)
    with pytest.raises(LoopscopeError, match="another config"):
        self_improve(tiny(seed=1), run_dir=tmp_path / "r", progress=False)


# -- figures and CLI -------------------------------------------------------------------------------
def test_figures_draw_one_line_per_round_from_the_table(tiny_run):
    import matplotlib.pyplot as plt

    from loopscope.experiments import self_improve_figures as figs

    fig = figs.accuracy_by_length(tiny_run)
    lines = fig.axes[0].get_lines()
    solid = [ln for ln in lines if ln.get_linestyle() == "-"]
    assert len(solid) == 3  # rounds 0, 1, 2
    assert list(solid[2].get_ydata()) == list(
        tiny_run.to_frame().query("round == 2").sort_values("length")["acc"]
    )
    p = figs.panels(tiny_run, noisy=tiny_run)
    assert len(p.axes) == 4
    plt.close("all")


def test_frontier_is_the_longest_prefix_of_accurate_lengths():
    from loopscope.experiments.self_improve import frontier

    f = pd.DataFrame(
        {
            "round": [0, 0, 0, 1, 1, 1],
            "length": [1, 2, 3, 3, 1, 2],  # unsorted on purpose
            "acc": [1.0, 0.5, 1.0, 0.995, 0.2, 1.0],
        }
    )
    assert frontier(f).to_dict() == {0: 1, 1: 0}


def _cli(argv, capsys):
    from loopscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_help_has_an_example_and_bad_rounds_are_a_one_line_error(capsys, tmp_path):
    code, out, _ = _cli(["self-improve", "--help"], capsys)
    assert code == 0 and "Example:" in out
    code, _, err = _cli(["self-improve", "--rounds", "0", "--out", str(tmp_path)], capsys)
    assert code == 2 and "rounds must be a positive integer" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_quick_writes_table_summary_and_figures(capsys, tmp_path):
    code, out, _ = _cli(["self-improve", "--quick", "--quiet", "--out", str(tmp_path)], capsys)
    assert code in (0, None)
    f = pd.read_csv(tmp_path / "table.csv")
    cfg = SelfImproveConfig.quick()
    assert len(f) == (cfg.rounds + 1) * cfg.max_digits
    for name in ("accuracy", "fixed_points", "labels", "panels"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_label_noise_corrupts_exactly_the_kept_labels_from_its_round(tiny_run):
    from loopscope.experiments.self_improve import _label

    cfg = tiny(noise="perturb", noise_rate=1.0, noise_from_round=2, vote_threshold=0.5)
    _, before = _label(tiny_run.models, cfg, 1)
    data, after = _label(tiny_run.models, cfg, 2)
    assert before[0]["noise_hit"] == 0.0
    assert after[0]["noise_hit"] == 1.0 and after[0]["kept_label_error"] == 1.0
    tokens, labels = data[4]
    assert len(tokens) == len(labels) == after[0]["n_kept"] > 0


def test_mixture_draws_the_newest_round_half_the_time_and_old_data_by_difficulty_levels():
    from loopscope.experiments.self_improve import _batch

    cfg = tiny(d0=2, rounds=3)
    # self-labelled lengths 3 (round 1), 4 (round 2), 5 (round 3, the newest), marked by token value
    data = {
        D: (torch.full((4, D + 1), D), torch.zeros(4, D + 1, dtype=torch.long)) for D in (3, 4, 5)
    }
    counts = {"truth": 0, 3: 0, 4: 0, 5: 0}
    for s in range(2000):
        g = torch.Generator().manual_seed(s)
        b = _batch(cfg, data, 3, g, seed=s)
        D = b.tokens.shape[1] - 1
        counts[D if D in data and bool((b.tokens == D).all()) else "truth"] += 1
    share = {k: v / 2000 for k, v in counts.items()}
    # newest 0.5; the other half split 2 : 1 : 1 (round 0 has d0 = 2 difficulty levels)
    assert abs(share[5] - 0.5) < 0.04
    assert abs(share["truth"] - 0.25) < 0.03
    assert abs(share[3] - 0.125) < 0.025 and abs(share[4] - 0.125) < 0.025


def test_a_misspelt_keyword_names_its_neighbour():
    from loopscope.core.errors import UnknownOptionError

    with pytest.raises(UnknownOptionError, match="did you mean: run_dir"):
        self_improve(tiny(), run_dri="x")
    with pytest.raises(UnknownOptionError, match="did you mean: threshold"):
        majority_vote(torch.zeros(3, 1, 2, dtype=torch.long), threshhold=0.5)
