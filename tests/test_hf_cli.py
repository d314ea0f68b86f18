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
