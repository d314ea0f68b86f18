"""The CLI on the user's own model: --loop module:factory and --task module:MyTask on every
command, generic save / load of a Loop that declares its constructor config, --version."""

from __future__ import annotations

import json

import pytest
import torch

import loopscope as ls
from loopscope.core.errors import CheckpointError
from loopscope.models.checkpoint import load_model, save_model
from tests.fixtures.mymodel import MyLoop, make_loop

OWN = ["--loop", "tests.fixtures.mymodel:make_loop", "--task", "tests.fixtures.mymodel:MyTask"]
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv, capsys):
    from loopscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_stability_runs_on_the_users_loop_and_task_from_the_cli(capsys, tmp_path):
    code, out, err = cli(
        ["stability", *OWN, "--split", "id", "--n", "4", "--n-dyn", "1", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "stability.json").read_text())
    assert rows[0]["model"] == "tests.fixtures.mymodel:make_loop" and rows[0]["n"] == 4
    assert 0.0 < rows[0]["rho_median"] < 10.0  # the Jacobian spectrum ran on the wrapped model


@pytest.mark.parametrize(
    "argv",
    [
        ["trace", "--n", "2", "--n-iter", "3", "--capture", "block.attn", "--out", "{tmp}/t"],
        ["halting", "--split", "id", "--n", "4", "--out", "{tmp}/h"],
        ["probe", "--split", "id", "--n", "16", "--out", "{tmp}/p"],
        ["patch", "--n", "1", "--iterations", "0,2", "--out", "{tmp}/pa"],
        ["verdict", "--n", "4", "--n-basin", "0", "--n-probe", "0"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_takes_the_users_loop_and_task(argv, capsys, tmp_path):
    code, out, err = cli([a.format(tmp=tmp_path) for a in argv[:1] + OWN + argv[1:]], capsys)
    assert code == 0, err
    assert out.strip()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loop", "no_such_module:make", "--task", "s3"], "cannot import 'no_such_module'"),
        (["--loop", "tests.fixtures.mymodel:make_lop", "--task", "s3"], "did you mean: make_loop"),
        (["--loop", "tests.fixtures.mymodel:MyTask", "--task", "s3"], "not a loopscope Loop"),
        (["--loop", "make_loop", "--task", "s3"], "must be 'module:attribute'"),
        (["--loop", "tests.fixtures.mymodel:make_loop"], "--task is required with --loop"),
        (["s3_fprm", "--loop", "tests.fixtures.mymodel:make_loop"], "not both"),
        (["--loop", "tests.fixtures.mymodel:make_loop", "--task", "tests.fixtures.mymodel:Block"],
         "without sample"),
    ],
)  # fmt: skip
def test_bad_loop_and_task_specs_get_one_line_errors(argv, message, capsys, tmp_path):
    code, _, err = cli(["stability", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and message in err and err.count("\n") <= 2, err


def test_a_loop_that_declares_its_config_saves_and_loads_generically(tmp_path):
    loop = MyLoop(d=8, heads=2, seed=3).eval()
    save_model(loop, tmp_path / "ck")
    spec = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert spec["class"] == "tests.fixtures.mymodel:MyLoop" and spec["config"]["d"] == 8
    again = load_model(tmp_path / "ck")
    ids = torch.tensor([[1, 0, 1, 1]])
    a = ls.unroll(loop, ids, 4, decode=True).logits
    b = ls.unroll(again, ids, 4, decode=True).logits
    assert type(again) is MyLoop and torch.equal(a, b)


def test_shared_tensors_are_stored_once_and_tied_again(tmp_path):
    class Tied(MyLoop):
        def __init__(self, d=8, heads=2, seed=0):
            super().__init__(d=d, heads=heads, seed=seed)
            self.alias = self.lm.emb  # the same module at a second path

    loop = Tied()
    save_model(loop, tmp_path / "ck")
    spec = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert spec["tied"] == {"alias.weight": "lm.emb.weight"}
    again = load_model(tmp_path / "ck", cls=Tied)
    assert torch.equal(again.alias.weight, loop.lm.emb.weight)


def test_a_loop_without_a_declared_config_gets_a_checkpoint_error(tmp_path):
    with pytest.raises(
        CheckpointError, match=r"WrappedLoop declares no constructor config: give it config\(\)"
    ):
        save_model(make_loop(), tmp_path / "ck")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(
        json.dumps({"format": "loopscope.model/1", "class": "os:system", "config": {}})
    )
    with pytest.raises(CheckpointError, match="not a loopscope Loop class; refusing to call it"):
        load_model(tmp_path / "bad")


def test_the_cli_runs_on_a_saved_folder_of_the_users_loop(capsys, tmp_path):
    save_model(MyLoop(d=8).eval(), tmp_path / "ck")
    code, out, err = cli(
        ["stability", str(tmp_path / "ck"), "--task", "tests.fixtures.mymodel:MyTask",
         "--split", "id", "--n", "4", "--no-dynamics", "--out", str(tmp_path / "s")], capsys,
    )  # fmt: skip
    assert code == 0, err


def test_version_and_help_answer(capsys):
    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"loopscope {ls.__version__}"
    code, out, _ = cli(["stability", "--help"], capsys)
    assert code == 0 and "--loop" in out and "module:MyTask" in out
