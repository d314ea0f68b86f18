"""The CLI on a local HF checkpoint directory: trace with a text task, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from loopscope.cli import main
from loopscope.core.trace import Trace
from loopscope.models.hf import local_tokenizer
from loopscope.models.inkling2 import build_tiny_inkling2


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ink")
    build_tiny_inkling2(seed=0).save_pretrained(d)
    local_tokenizer(64).save_pretrained(d)
    return d


def test_trace_on_an_hf_directory_records_every_pass(hf_dir, tmp_path, capsys):
    argv = ["trace", str(hf_dir), "--task", "text_kv_recall", "--n", "3", "--n-iter", "3"]
    argv += ["--capture", "core.hook_resid_post", "--out", str(tmp_path / "t")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["n_iter"] == 3 and info["batch"] == 3
    tr = Trace.load(info["trace"])
    assert tr.labels["core.hook_resid_post"] == [(p, j) for p in range(3) for j in range(2)]
    assert tr.logits is not None and torch.isfinite(tr.logits).all()


def test_bin_checkpoint_and_missing_tokenizer_are_one_line_errors(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    code, _, err = run(["trace", str(bad), "--inputs", "1 2", "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "safetensors only" in err and "Traceback" not in err
    notok = tmp_path / "notok"
    build_tiny_inkling2(seed=0).save_pretrained(notok)
    argv = ["trace", str(notok), "--task", "text_addition", "--out", str(tmp_path / "t2")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "needs a tokenizer" in err and "Traceback" not in err


# -- --device / --dtype / --max-memory -------------------------------------------------------------
def _weights_bytes(d) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(d / "model.safetensors").values())


def test_max_memory_splits_the_checkpoint_over_cpu_and_disk_and_gives_hf_logits(
    hf_dir, tmp_path, capsys
):
    pytest.importorskip("accelerate")
    from loopscope.models.hf import load_hf

    budget = str(_weights_bytes(hf_dir) // 2)  # half the weights: the rest goes to disk
    argv = ["trace", str(hf_dir), "--inputs", "1 5 9 13; 2 6 10 14", "--n-iter", "3"]
    argv += ["--capture", "core.hook_resid_post", "--max-memory", budget]
    code, out, err = run([*argv, "--out", str(tmp_path / "split")], capsys)
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert set(info["placement"]) == {"cpu", "disk"}, info  # really split
    code, out, err = run([*argv[:-2], "--out", str(tmp_path / "whole")], capsys)
    assert code == 0 and "placement" not in json.loads(out.strip().splitlines()[-1])
    split, whole = Trace.load(tmp_path / "split"), Trace.load(tmp_path / "whole")
    # streamed weights, the same math: equal to float32 rounding
    assert (split.logits - whole.logits).abs().max().item() < 1e-5
    diff = split["core.hook_resid_post"] - whole["core.hook_resid_post"]
    assert diff.abs().max().item() < 1e-5
    ids = torch.tensor([[1, 5, 9, 13], [2, 6, 10, 14]])
    ref = load_hf(hf_dir).hf(ids).logits.detach()
    assert (whole.logits[-1] - ref).abs().max().item() == 0.0


def test_patch_and_stability_run_on_a_checkpoint_split_over_cpu_and_disk(hf_dir, tmp_path, capsys):
    pytest.importorskip("accelerate")
    budget = str(_weights_bytes(hf_dir) // 2)
    base = [str(hf_dir), "--task", "text_kv_recall", "--max-memory", budget]
    code, out, err = run(["patch", *base, "--n", "1", "--iterations", "0,1",
                          "--out", str(tmp_path / "p")], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["rows"] > 0
    code, _, err = run(["stability", *base, "--n", "2", "--split", "id",
                        "--out", str(tmp_path / "s")], capsys)  # fmt: skip
    assert code == 0, err
    note = (tmp_path / "s" / "stability.csv").read_text()
    assert "offloaded" in note  # the Jacobian columns say why they are empty


def test_dtype_flag_loads_the_checkpoint_in_that_dtype(hf_dir, tmp_path, capsys):
    argv = ["trace", str(hf_dir), "--inputs", "1 5 9", "--n-iter", "2", "--dtype", "float64"]
    code, _, err = run([*argv, "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    assert Trace.load(tmp_path / "t").states.dtype == torch.float64


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "gpu"], "--device 'gpu'"),
        (["--dtype", "float8"], "--dtype must be one of"),
        (["--max-memory", "lots"], "--max-memory: 'lots' is not a size"),
        (["--max-memory", "gpu=1GiB"], "DEVICE=SIZE"),
        (["--max-memory", "1GiB", "--device", "cuda"], "--device"),
    ],
)
def test_bad_placement_flags_are_one_line_errors(hf_dir, tmp_path, capsys, flags, words):
    argv = ["trace", str(hf_dir), "--inputs", "1 2", *flags, "--out", str(tmp_path / "t")]
    code, _, err = run(argv, capsys)
    assert code == 2 and words in err and "\n" not in err.strip(), err


def test_placement_flags_on_a_zoo_model_are_refused(tmp_path, capsys):
    code, _, err = run(["stability", "s3_fprm", "--dtype", "float64",
                        "--out", str(tmp_path / "s")], capsys)  # fmt: skip
    assert code == 2 and "--dtype apply to an HF checkpoint directory" in err


@pytest.mark.parametrize("cmd", ["trace", "stability", "probe", "patch", "verdict"])
def test_every_model_command_documents_the_placement_flags(cmd, capsys):
    code, out, _ = run([cmd, "--help"], capsys)
    assert code == 0
    for flag in ("--device", "--dtype", "--max-memory"):
        assert flag in out, (cmd, flag)
