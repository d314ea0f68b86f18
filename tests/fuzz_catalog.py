"""A catalog of bad inputs to loopscope's Python API and command line, with what each must get.

Every case is a bad input: a refusal (a one-line :class:`~loopscope.LoopscopeError` naming the
argument) or, where the input is legal but surely not meant, a warning naming it. Each case
lists words that the message must contain (the argument's name, usually its value too).

Outcomes (:func:`outcome_api`, :func:`outcome_cli`):

* ``error``: a LoopscopeError (CLI: exit code 2) whose message is one line and names the words;
* ``warning``: the case expects a warning, and one naming the words was emitted;
* ``unclear``: refused cleanly, but the message is several lines or does not name the words;
* ``raw``: any other exception (CLI: exit code 1, or a traceback printed);
* ``silent``: returned normally with nothing said.

``tests/test_fuzz_api.py`` and ``tests/test_fuzz_cli.py`` run every case (each must be
``error`` or ``warning``); ``benchmarks/fuzz_counts.py`` prints the counts for docs/reliability.md.
The models are tiny (an FnLoop and the zoo's s3_fprm), so the whole catalog runs in seconds.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Case", "API_CASES", "CLI_CASES", "outcome_api", "outcome_cli", "counts"]


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(fx, tmp)`` runs it (API), or returns the argv (CLI).

    ``mentions``: words the one-line message must contain; ``expect``: "error" or "warn";
    ``error``: the name of the LoopscopeError subclass expected (API)."""

    name: str
    call: Callable[[Any, Path], Any]
    mentions: tuple[str, ...]
    expect: str = "error"
    error: str = "LoopscopeError"
    exit_code: int = 2


# -- fixtures -------------------------------------------------------------------------------------
def _tanh_step(h, x):
    return torch.tanh(2.0 * h + x)


def _wide(h, x):
    return h.repeat(1, 2000)  # a readout far larger than the state


@dataclass
class Fixtures:
    """The models and inputs the cases use (built once)."""

    s3: Any
    task: Any
    tokens: torch.Tensor
    tiny: Any
    x: torch.Tensor
    trace: Any
    tiny_trace: Any


@functools.cache
def fixtures() -> Fixtures:
    import loopscope as ls

    s3 = ls.zoo.load("s3_fprm")
    task = ls.zoo.task_of("s3_fprm")
    tokens = task.sample(4, split="id", seed=0).tokens
    tiny = ls.FnLoop(step=_tanh_step, init_state=torch.zeros(3, dtype=torch.float64))
    x = torch.full((2, 3), 0.1, dtype=torch.float64)
    trace = ls.unroll(s3, tokens, 6, decode=True, capture="hook_state")
    tiny_trace = ls.unroll(tiny, x, 30)
    return Fixtures(s3, task, tokens, tiny, x, trace, tiny_trace)


def _ls():
    import loopscope as ls

    return ls


# -- the Python API -------------------------------------------------------------------------------
def _unroll(fx: Fixtures, **kw: Any):
    return _ls().unroll(fx.s3, fx.tokens, kw.pop("n_iter", 4), **kw)


def _zero(iteration: Any, hook: str = "hook_state"):
    return _ls().Zero(hook, iteration=iteration)


def _state(fx: Fixtures) -> torch.Tensor:
    return fx.trace.final


def _bad_ckpt(tmp: Path, how: str) -> Path:
    """A copy of the zoo's s3_fprm checkpoint, damaged one way."""
    import shutil

    from loopscope import zoo

    d = tmp / f"ckpt_{how}"
    shutil.copytree(zoo.checkpoint_dir("s3_fprm"), d)
    cfg = json.loads((d / "config.json").read_text())
    if how == "d_mlp":
        cfg["config"]["d_mlp"] += 8
    elif how == "missing_field":
        del cfg["config"]["d_model"]
    elif how == "unknown_field":
        cfg["config"]["d_modl"] = 3
    elif how == "bad_value":
        cfg["config"]["n_heads"] = "four"
    elif how == "flip":
        p = d / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[-100] ^= 0xFF  # a payload byte: the header is intact
        p.write_bytes(bytes(data))
    elif how == "truncate":
        p = d / "model.safetensors"
        p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _bad_trace(fx: Fixtures, tmp: Path, how: str) -> Path:
    base = tmp / f"tr_{how}"
    js = fx.trace.save(base)
    st = js.with_name(js.name[: -len(".json")] + ".safetensors")
    meta = json.loads(js.read_text())
    if how == "no_labels":
        del meta["labels"]
    elif how == "labels_list":
        meta["labels"] = [1, 2]
    elif how == "status_short":
        meta["status"] = meta["status"][:1]
    elif how == "flip":
        data = bytearray(st.read_bytes())
        data[-50] ^= 0xFF
        st.write_bytes(bytes(data))
    elif how == "truncate":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    js.write_text(json.dumps(meta))
    return js


def _zoo_card_case(fx: Fixtures, tmp: Path):
    """A zoo folder whose card's accuracy is a list: the table names the card and the field."""
    import shutil

    from loopscope import zoo

    root = tmp / "zoo"
    shutil.copytree(zoo.checkpoint_dir("s3_fprm"), root / "s3_fprm")
    card = json.loads((root / "s3_fprm" / "card.json").read_text())
    card["accuracy"] = [0.5, 0.9]
    (root / "s3_fprm" / "card.json").write_text(json.dumps(card))
    old = zoo.ROOT
    zoo.ROOT = root
    try:
        return zoo.table()
    finally:
        zoo.ROOT = old


def _flipped_chunk(fx: Fixtures, tmp: Path):
    from loopscope.core.io import ChunkCheckpoint

    ck = ChunkCheckpoint(tmp / "chunks", "patch_sweep", {"a": 1})
    path = ck.save("k0", {"x": torch.arange(64.0)}, {"m": "1"})
    ck.close()
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF
    path.write_bytes(bytes(data))
    return ChunkCheckpoint(tmp / "chunks", "patch_sweep", {"a": 1}).load("k0")


def _short(fx: Fixtures):
    return _ls().unroll(fx.s3, fx.tokens, 3)


def _exp(name: str):
    import importlib

    return importlib.import_module(f"loopscope.experiments.{name}")


def _big_loop(n: int):
    return _ls().FnLoop(step=lambda h, x: 0.5 * h, init_state=torch.zeros(n, dtype=torch.float64))


def _metric(logits: torch.Tensor, idx: Any) -> torch.Tensor:
    return logits[:, -1, 0] - logits[:, -1, 1]


def _patch(fx: Fixtures, **kw: Any):
    from loopscope.circuits import patch_sweep

    clean = kw.pop("clean", fx.tokens)
    corrupt = kw.pop("corrupt", fx.tokens.flip(0))
    sites = kw.pop("sites", "hook_state")
    return patch_sweep(
        fx.s3, clean, corrupt, sites, metric=_metric, n_iter=kw.pop("n_iter", 4), **kw
    )


A = Case  # short alias for the table below

API_CASES: list[Case] = [
    # unroll: the loop, the iterations, the options
    A("unroll: loop not a Loop", lambda fx, tmp: _ls().unroll(object(), fx.tokens, 3), ("Loop",)),
    A("unroll: n_iter=0", lambda fx, tmp: _unroll(fx, n_iter=0), ("n_iter", "0")),
    A("unroll: n_iter=-3", lambda fx, tmp: _unroll(fx, n_iter=-3), ("n_iter", "-3")),
    A("unroll: n_iter=2.5", lambda fx, tmp: _unroll(fx, n_iter=2.5), ("n_iter", "2.5")),
    A("unroll: n_iter='4'", lambda fx, tmp: _unroll(fx, n_iter="4"), ("n_iter", "'4'")),
    A("unroll: n_iter=True", lambda fx, tmp: _unroll(fx, n_iter=True), ("n_iter", "True")),
    A(
        "unroll: n_iter=10**12 without capture (states over budget)",
        lambda fx, tmp: _unroll(fx, n_iter=10**12),
        ("n_iter", "states", "budget"),
        error="CaptureMemoryError",
    ),
    A(
        "unroll: decode=True logits over budget",
        lambda fx, tmp: _ls().unroll(
            _ls().FnLoop(step=_tanh_step, init_state=torch.zeros(3), decode=_wide),
            fx.x.float(),
            100,
            decode=True,
            max_bytes=2**20,
        ),
        ("decode", "budget"),
        error="CaptureMemoryError",
    ),
    A("unroll: capture=123", lambda fx, tmp: _unroll(fx, capture=123), ("capture", "123")),
    A(
        "unroll: unknown hook",
        lambda fx, tmp: _unroll(fx, capture="hook_stat"),
        ("hook_stat",),
        error="UnknownHookError",
    ),
    A(
        "unroll: glob matching nothing",
        lambda fx, tmp: _unroll(fx, capture="core.nothing.*"),
        ("core.nothing.*",),
        error="UnknownHookError",
    ),
    A(
        "unroll: store_dtype='float16' (a string)",
        lambda fx, tmp: _unroll(fx, capture="hook_state", store_dtype="float16"),
        ("store_dtype", "float16"),
    ),
    A(
        "unroll: store_dtype=torch.long",
        lambda fx, tmp: _unroll(fx, capture="hook_state", store_dtype=torch.long),
        ("store_dtype", "int64"),
    ),
    A(
        "unroll: positions=[99] past the sequence",
        lambda fx, tmp: _unroll(fx, capture="hook_state", positions=[99]),
        ("positions", "99"),
    ),
    A(
        "unroll: positions='a'",
        lambda fx, tmp: _unroll(fx, capture="hook_state", positions="a"),
        ("positions", "'a'"),
    ),
    A(
        "unroll: positions=[] (empty)",
        lambda fx, tmp: _unroll(fx, capture="hook_state", positions=[]),
        ("positions", "empty"),
    ),
    A(
        "unroll: positions=[0.5]",
        lambda fx, tmp: _unroll(fx, capture="hook_state", positions=[0.5]),
        ("positions", "0.5"),
    ),
    A(
        "unroll: offload='gpu9'",
        lambda fx, tmp: _unroll(fx, capture="hook_state", offload="gpu9"),
        ("offload", "gpu9"),
    ),
    A(
        "unroll: init of the wrong batch",
        lambda fx, tmp: _unroll(fx, init=torch.zeros(3, *_state(fx).shape[1:])),
        ("init", "(3,"),
    ),
    A(
        "unroll: init of the wrong width",
        lambda fx, tmp: _unroll(fx, init=torch.zeros(*_state(fx).shape[:-1], 5)),
        ("init", "5)"),
    ),
    A(
        "unroll: init with NaN-free wrong rank",
        lambda fx, tmp: _unroll(fx, init=torch.zeros(4)),
        ("init", "(4,)"),
    ),
    A("unroll: init=[0, 1] (a list)", lambda fx, tmp: _unroll(fx, init=[0, 1]), ("init", "list")),
    A(
        "unroll: init of integer dtype",
        lambda fx, tmp: _unroll(fx, init=torch.zeros(_state(fx).shape, dtype=torch.long)),
        ("init", "int64"),
    ),
    A(
        "unroll: interventions=[1]",
        lambda fx, tmp: _unroll(fx, interventions=[1]),
        ("interventions", "int"),
    ),
    A(
        "unroll: interventions='Zero'",
        lambda fx, tmp: _unroll(fx, interventions="Zero"),
        ("interventions", "str"),
    ),
    A(
        "unroll: intervention at iteration >= n_iter never fires",
        lambda fx, tmp: _unroll(fx, interventions=[_zero([1, 99])]),
        ("99", "never"),
        expect="warn",
    ),
    A(
        "unroll: intervention on an unknown hook",
        lambda fx, tmp: _unroll(fx, interventions=[_zero(1, hook="hook_stat")]),
        ("hook_stat",),
        error="UnknownHookError",
    ),
    A("unroll: Zero(iteration=-1)", lambda fx, tmp: _zero(-1), ("iteration", "-1")),
    A("unroll: Zero(iteration=1.5)", lambda fx, tmp: _zero(1.5), ("iteration", "1.5")),
    A(
        "unroll: Patch without a value",
        lambda fx, tmp: _ls().Patch("hook_state", 1),
        ("Patch", "value"),
    ),
    A(
        "unroll: Patch value of the wrong shape",
        lambda fx, tmp: _unroll(
            fx, interventions=[_ls().Patch("hook_state", 1, value=torch.zeros(2, 2))]
        ),
        ("Patch", "shape"),
    ),
    A("unroll: blowup=-1", lambda fx, tmp: _unroll(fx, blowup=-1), ("blowup", "-1")),
    A("unroll: blowup=0", lambda fx, tmp: _unroll(fx, blowup=0), ("blowup", "0")),
    A("unroll: blowup=nan", lambda fx, tmp: _unroll(fx, blowup=math.nan), ("blowup", "nan")),
    A("unroll: blowup='big'", lambda fx, tmp: _unroll(fx, blowup="big"), ("blowup", "'big'")),
    A("unroll: seed='a'", lambda fx, tmp: _unroll(fx, seed="a"), ("seed", "'a'")),
    A("unroll: seed=-1", lambda fx, tmp: _unroll(fx, seed=-1), ("seed", "-1")),
    A("unroll: halt=3 (not callable)", lambda fx, tmp: _unroll(fx, halt=3), ("halt", "int")),
    A("unroll: max_bytes=-5", lambda fx, tmp: _unroll(fx, max_bytes=-5), ("max_bytes", "-5")),
    A("unroll: max_bytes='1GB'", lambda fx, tmp: _unroll(fx, max_bytes="1GB"), ("max_bytes",)),
    A("unroll: meta=[1]", lambda fx, tmp: _unroll(fx, meta=[1]), ("meta", "list")),
    A(
        "unroll: generator=0 (not a Generator)",
        lambda fx, tmp: _unroll(fx, generator=0),
        ("generator", "int"),
    ),
    A(
        "unroll: misspelt option",
        lambda fx, tmp: _unroll(fx, captur="x"),
        ("captur", "capture"),
        error="UnknownOptionError",
    ),
    A(
        "unroll: token id out of vocabulary",
        lambda fx, tmp: _ls().unroll(fx.s3, fx.tokens + 100, 3),
        ("token id", "vocab"),
    ),
    A(
        "unroll: float tokens",
        lambda fx, tmp: _ls().unroll(fx.s3, fx.tokens.float(), 3),
        ("token", "float"),
    ),
    A(
        "unroll: 3-D tokens",
        lambda fx, tmp: _ls().unroll(fx.s3, fx.tokens[None], 3),
        ("token", "shape"),
    ),
    # Trace: load, save, index
    A(
        "Trace.load: missing file",
        lambda fx, tmp: _ls().Trace.load(tmp / "nope"),
        ("not found", "nope"),
        error="CheckpointError",
    ),
    A(
        "Trace.load: JSON without labels",
        lambda fx, tmp: _ls().Trace.load(_bad_trace(fx, tmp, "no_labels")),
        ("labels", "tr_no_labels"),
        error="CheckpointError",
    ),
    A(
        "Trace.load: labels a list",
        lambda fx, tmp: _ls().Trace.load(_bad_trace(fx, tmp, "labels_list")),
        ("labels", "tr_labels_list"),
        error="CheckpointError",
    ),
    A(
        "Trace.load: status of the wrong length",
        lambda fx, tmp: _ls().Trace.load(_bad_trace(fx, tmp, "status_short")),
        ("status", "tr_status_short"),
        error="CheckpointError",
    ),
    A(
        "Trace.load: a flipped payload byte",
        lambda fx, tmp: _ls().Trace.load(_bad_trace(fx, tmp, "flip")),
        ("tr_flip", "hash"),
        error="CheckpointError",
    ),
    A(
        "Trace.load: truncated tensors",
        lambda fx, tmp: _ls().Trace.load(_bad_trace(fx, tmp, "truncate")),
        ("tr_truncate",),
        error="CheckpointError",
    ),
    A(
        "Trace.load: a .pt file",
        lambda fx, tmp: _ls().Trace.load(tmp / "x.pt"),
        ("x.pt",),
        error="CheckpointError",
    ),
    A(
        "Trace.save: into a path under a file",
        lambda fx, tmp: fx.trace.save((tmp / "afile").touch() or tmp / "afile" / "t"),
        ("afile",),
        error="OutputError",
    ),
    A(
        "Trace[hook]: not captured",
        lambda fx, tmp: fx.trace["hook_stat"],
        ("hook_stat",),
        error="UnknownHookError",
    ),
    A("Trace.decode: t out of range", lambda fx, tmp: fx.tiny_trace.decode(99), ("99",)),
    A(
        "Trace.firing: unknown label",
        lambda fx, tmp: fx.trace.firing("hook_state", (77,)),
        ("hook_state", "77"),
    ),
    # checkpoints and the zoo
    A(
        "load_model: config d_mlp disagrees with the weights",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "d_mlp")),
        ("d_mlp",),
        error="CheckpointError",
    ),
    A(
        "load_model: config missing d_model (loads with the default, said aloud)",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "missing_field")),
        ("d_model", "default"),
        expect="warn",
    ),
    A(
        "load_model: config with an unknown field",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "unknown_field")),
        ("d_modl",),
        error="CheckpointError",
    ),
    A(
        "load_model: config n_heads='four'",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "bad_value")),
        ("n_heads",),
        error="CheckpointError",
    ),
    A(
        "load_model: a flipped payload byte",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "flip")),
        ("model.safetensors", "hash"),
        error="CheckpointError",
    ),
    A(
        "load_model: truncated weights",
        lambda fx, tmp: _ls().models.checkpoint.load_model(_bad_ckpt(tmp, "truncate")),
        ("model.safetensors",),
        error="CheckpointError",
    ),
    A(
        "load_model: a missing directory",
        lambda fx, tmp: _ls().models.checkpoint.load_model(tmp / "nothing"),
        ("nothing",),
        error="CheckpointError",
    ),
    A(
        "load_model: a pickle file",
        lambda fx, tmp: _ls().models.checkpoint.load_model(
            (tmp / "m.pt").write_bytes(b"\x80\x04K\x01.") and tmp / "m.pt"
        ),
        ("pickle",),
        error="CheckpointError",
    ),
    A("zoo.load: unknown name", lambda fx, tmp: _ls().zoo.load("s3_fprn"), ("s3_fprn", "s3_fprm")),
    A(
        "zoo.table: a card whose accuracy is a list",
        _zoo_card_case,
        ("accuracy", "card.json"),
        error="CheckpointError",
    ),
    A(
        "ChunkCheckpoint: a flipped payload byte",
        _flipped_chunk,
        ("chunk-k0", "hash"),
        error="CheckpointError",
    ),
    A(
        "LoopedConfig: d_model=-1",
        lambda fx, tmp: _ls().models.LoopedConfig(d_model=-1),
        ("d_model", "-1"),
    ),
    A(
        "LoopedConfig: norm='nope'",
        lambda fx, tmp: _ls().models.LoopedConfig(norm="nope"),
        ("norm", "nope"),
    ),
    # tasks
    A("tasks.get: unknown", lambda fx, tmp: _ls().tasks.get("s4"), ("s4",)),
    A("task.sample: n=0", lambda fx, tmp: fx.task.sample(0, split="id"), ("n", "0")),
    A("task.sample: split='oops'", lambda fx, tmp: fx.task.sample(4, split="oops"), ("oops",)),
    A("task.sample: seed=-1", lambda fx, tmp: fx.task.sample(4, split="id", seed=-1), ("seed",)),
    # analyses of a trace
    A("metrics: not a Trace", lambda fx, tmp: _ls().analysis.metrics([1, 2]), ("trace", "list")),
    A("metrics: p_max=0", lambda fx, tmp: _ls().analysis.metrics(fx.trace, p_max=0), ("p_max",)),
    A("metrics: eps=-1", lambda fx, tmp: _ls().analysis.metrics(fx.trace, eps=-1), ("eps", "-1")),
    A(
        "metrics: window=0",
        lambda fx, tmp: _ls().analysis.metrics(fx.trace, window=0),
        ("window", "0"),
    ),
    A(
        "detect_cycle: p_max=0",
        lambda fx, tmp: _ls().analysis.detect_cycle(fx.trace, p_max=0),
        ("p_max", "0"),
    ),
    A(
        "classify: tol=-1",
        lambda fx, tmp: _ls().analysis.classify(fx.trace, tol=-1),
        ("tol", "-1"),
    ),
    A(
        "calibration: correct of another length",
        lambda fx, tmp: _ls().analysis.calibration(fx.trace, torch.ones(7, dtype=torch.bool)),
        ("correct", "7"),
    ),
    A(
        "calibration: n_bins=0",
        lambda fx, tmp: _ls().analysis.calibration(
            fx.trace, torch.ones(4, dtype=torch.bool), n_bins=0
        ),
        ("n_bins", "0"),
    ),
    A(
        "halting.evaluate: unknown criterion",
        lambda fx, tmp: _ls().analysis.halting.evaluate(fx.trace, ["resid"]),
        ("resid",),
    ),
    A(
        "halting.evaluate: targets of another batch",
        lambda fx, tmp: _ls().analysis.halting.evaluate(
            fx.trace, None, torch.zeros(9, fx.tokens.shape[1], dtype=torch.long)
        ),
        ("targets", "9"),
    ),
    A(
        "confident_wrong: targets of another batch",
        lambda fx, tmp: _ls().analysis.confident_wrong(
            fx.trace, torch.zeros(9, fx.tokens.shape[1], dtype=torch.long)
        ),
        ("targets", "9"),
    ),
    # analyses of a loop
    A(
        "solve: h0 of the wrong shape",
        lambda fx, tmp: _ls().analysis.solve(fx.tiny, fx.x, torch.zeros(2, 4)),
        ("h0", "(2, 4)"),
    ),
    A(
        "solve: unknown method",
        lambda fx, tmp: _ls().analysis.solve(fx.tiny, fx.x, method="newtn"),
        ("newtn",),
    ),
    A("solve: tol=0", lambda fx, tmp: _ls().analysis.solve(fx.tiny, fx.x, tol=0), ("tol", "0")),
    A(
        "solve: max_iter=0",
        lambda fx, tmp: _ls().analysis.solve(fx.tiny, fx.x, max_iter=0),
        ("max_iter", "0"),
    ),
    A(
        "spectrum: state of the wrong shape",
        lambda fx, tmp: _ls().analysis.spectrum(fx.tiny, fx.x, torch.zeros(2, 4)),
        ("state", "(2, 4)"),
    ),
    A(
        "spectrum: state of another batch",
        lambda fx, tmp: _ls().analysis.spectrum(fx.tiny, fx.x, torch.zeros(5, 3)),
        ("state", "5"),
    ),
    A(
        "spectrum: k=0",
        lambda fx, tmp: _ls().analysis.spectrum(fx.tiny, fx.x, fx.tiny_trace.final, k=0),
        ("k", "0"),
    ),
    A(
        "spectrum: k > state dimension",
        lambda fx, tmp: _ls().analysis.spectrum(fx.tiny, fx.x, fx.tiny_trace.final, k=9),
        ("k", "9"),
    ),
    A(
        "spectrum: unknown method",
        lambda fx, tmp: _ls().analysis.spectrum(
            fx.tiny, fx.x, fx.tiny_trace.final, method="lanczos"
        ),
        ("lanczos",),
    ),
    A(
        "spectrum: method='dense' at n = 100000 (memory; 80 GB per Jacobian)",
        lambda fx, tmp: _ls().analysis.spectrum(
            _big_loop(100_000),
            torch.zeros(1, 1),
            torch.zeros(1, 100_000, dtype=torch.float64),
            method="dense",
            dense_max=10**6,
        ),
        ("dense", "100000", "GiB", "arpack"),
        error="CaptureMemoryError",
    ),
    A(
        "find_fixed_points: seeds=0",
        lambda fx, tmp: _ls().analysis.find_fixed_points(fx.tiny, fx.x, 0),
        ("seeds", "0"),
    ),
    A(
        "find_fixed_points: seeds of the wrong width",
        lambda fx, tmp: _ls().analysis.find_fixed_points(fx.tiny, fx.x, torch.zeros(3, 2, 5)),
        ("seeds", "5"),
    ),
    A(
        "lyapunov: n_steps=0",
        lambda fx, tmp: _ls().analysis.lyapunov(fx.tiny, fx.x, n_steps=0),
        ("n_steps", "0"),
    ),
    A(
        "lyapunov: k > state dimension",
        lambda fx, tmp: _ls().analysis.lyapunov(fx.tiny, fx.x, n_steps=10, warmup=0, k=7),
        ("k", "7"),
    ),
    A(
        "lyapunov: h0 of the wrong shape",
        lambda fx, tmp: _ls().analysis.lyapunov(fx.tiny, fx.x, torch.zeros(2, 5), n_steps=10),
        ("h0", "5"),
    ),
    A(
        "basins: zero seeds",
        lambda fx, tmp: _ls().analysis.basins(
            fx.tiny, fx.x, torch.zeros(0, 2, 3, dtype=torch.float64), n_iter=5
        ),
        ("seeds",),
    ),
    A(
        "basins: n_iter=0",
        lambda fx, tmp: _ls().analysis.basins(fx.tiny, fx.x, n_iter=0),
        ("n_iter", "0"),
    ),
    A(
        "basins: GridSeeds(resolution=3000) (memory; 9M seeds x 4 inputs x 1024)",
        lambda fx, tmp: _ls().analysis.basins(
            _big_loop(1024),
            torch.zeros(4, 1),
            _ls().analysis.attractors.GridSeeds(
                center=torch.zeros(1024, dtype=torch.float64), resolution=3000
            ),
            n_iter=5,
        ),
        ("seeds", "GiB"),
        error="CaptureMemoryError",
    ),
    A(
        "basins: targets transposed [pos, B]",
        lambda fx, tmp: _ls().analysis.basins(
            fx.s3,
            fx.tokens,
            n_iter=3,
            targets=torch.zeros(fx.tokens.shape[1], 4, dtype=torch.long),
        ),
        ("targets",),
    ),
    A(
        "path_independence: unknown init",
        lambda fx, tmp: _ls().analysis.path_independence(fx.tiny, fx.x, inits=("default", "swp")),
        ("swp",),
    ),
    A(
        "path_independence: n_iter=0",
        lambda fx, tmp: _ls().analysis.path_independence(fx.tiny, fx.x, n_iter=0),
        ("n_iter", "0"),
    ),
    A(
        "logit_lens: n_iter=0",
        lambda fx, tmp: _ls().analysis.logit_lens(fx.s3, fx.tokens, n_iter=0),
        ("n_iter", "0"),
    ),
    A(
        "input_sensitivity: h_star of the wrong shape",
        lambda fx, tmp: _ls().analysis.input_sensitivity(fx.tiny, fx.x, torch.zeros(2, 7)),
        ("h_star", "7"),
    ),
    # circuits
    A(
        "patch_sweep: clean and corrupt of different shapes",
        lambda fx, tmp: _patch(fx, corrupt=fx.tokens[:2]),
        ("corrupt", "shape"),
    ),
    A(
        "patch_sweep: unknown site",
        lambda fx, tmp: _patch(fx, sites="hook_stat"),
        ("hook_stat",),
        error="UnknownHookError",
    ),
    A(
        "patch_sweep: iteration past n_iter",
        lambda fx, tmp: _patch(fx, iterations=[1, 99]),
        ("iterations", "99"),
    ),
    A("patch_sweep: n_iter=0", lambda fx, tmp: _patch(fx, n_iter=0), ("n_iter", "0")),
    A(
        "patch_sweep: positions past the sequence",
        lambda fx, tmp: _patch(fx, positions=[99]),
        ("positions", "99"),
    ),
    A(
        "patch_sweep: unknown direction",
        lambda fx, tmp: _patch(fx, direction="sideways"),
        ("direction", "sideways"),
    ),
    A("patch_sweep: batch_size=0", lambda fx, tmp: _patch(fx, batch_size=0), ("batch_size", "0")),
    A(
        "patch_sweep: checkpoint_dir is a file",
        lambda fx, tmp: _patch(
            fx, checkpoint_dir=(tmp / "f").write_text("x") and tmp / "f", iterations=[1]
        ),
        ("f",),
    ),
    A(
        "state_transplant: n_iter=0",
        lambda fx, tmp: _ls().circuits.state_transplant(
            fx.s3, fx.tokens, fx.tokens.flip(0), _metric, n_iter=0
        ),
        ("n_iter", "0"),
    ),
    A(
        "state_transplant: iterations past n_iter",
        lambda fx, tmp: _ls().circuits.state_transplant(
            fx.s3, fx.tokens, fx.tokens.flip(0), _metric, n_iter=4, iterations=[9]
        ),
        ("iterations", "9"),
    ),
    A(
        "attribution: unknown method",
        lambda fx, tmp: _ls().circuits.attribution(
            fx.s3, fx.tokens, fx.tokens.flip(0), "hook_state", n_iter=3, method="grad"
        ),
        ("method", "grad"),
    ),
    A(
        "str_pairs: n=0",
        lambda fx, tmp: _ls().circuits.str_pairs(fx.task, 0),
        ("n", "0"),
    ),
    # more interventions and loops
    A(
        "unroll: Zero at positions past the sequence",
        lambda fx, tmp: _unroll(fx, interventions=[_ls().Zero("hook_state", 1, positions=[99])]),
        ("positions", "99"),
    ),
    A(
        "unroll: Transplant from a shorter trace",
        lambda fx, tmp: _unroll(
            fx, n_iter=8, interventions=[_ls().Transplant(iteration=7, source=_short(fx))]
        ),
        ("Transplant", "7"),
    ),
    A(
        "unroll: Patch from a trace without that hook",
        lambda fx, tmp: _ls().unroll(
            fx.s3,
            fx.tokens,
            3,
            interventions=[_ls().Patch("core.blocks.0.hook_resid_post", 1, value=fx.trace)],
        ),
        ("core.blocks.0.hook_resid_post",),
        error="UnknownHookError",
    ),
    A(
        "unroll: Add without a delta",
        lambda fx, tmp: _unroll(fx, interventions=[_ls().Add("hook_state", 1)]),
        ("Add", "delta"),
    ),
    A("FnLoop: step=3", lambda fx, tmp: _ls().FnLoop(step=3), ("step", "int")),
    A(
        "FnLoop: init_state='zeros'",
        lambda fx, tmp: _ls().FnLoop(step=_tanh_step, init_state="zeros"),
        ("init", "str"),
    ),
    A(
        "unroll: FnLoop without init_state and no init",
        lambda fx, tmp: _ls().unroll(_ls().FnLoop(step=_tanh_step), fx.x, 3),
        ("init",),
    ),
    A(
        "unroll: step returning another shape",
        lambda fx, tmp: _ls().unroll(
            _ls().FnLoop(step=lambda h, x: h[:, :2], init_state=torch.zeros(3)), fx.x.float(), 3
        ),
        ("step", "shape"),
    ),
    A(
        "LoopedConfig: n_heads not dividing d_model",
        lambda fx, tmp: _ls().models.LoopedConfig(d_model=64, n_heads=5),
        ("n_heads", "5"),
    ),
    A(
        "tasks.get: unknown parameter",
        lambda fx, tmp: _ls().tasks.get("s3", lenght=4),
        ("lenght",),
    ),
    A(
        "load_hf: a folder without config.json",
        lambda fx, tmp: _ls().models.hf.load_hf(tmp),
        ("config.json",),
    ),
    # more analyses
    A(
        "find_fixed_points: unknown method",
        lambda fx, tmp: _ls().analysis.find_fixed_points(fx.tiny, fx.x, 4, method="newtn"),
        ("newtn",),
    ),
    A(
        "lyapunov: unknown mode",
        lambda fx, tmp: _ls().analysis.lyapunov(fx.tiny, fx.x, n_steps=5, mode="qr2"),
        ("mode", "qr2"),
    ),
    A(
        "lyapunov: warmup=-1",
        lambda fx, tmp: _ls().analysis.lyapunov(fx.tiny, fx.x, n_steps=5, warmup=-1),
        ("warmup", "-1"),
    ),
    A(
        "path_independence: noise_std=-1",
        lambda fx, tmp: _ls().analysis.path_independence(fx.tiny, fx.x, noise_std=-1.0),
        ("noise_std", "-1"),
    ),
    A(
        "logit_lens: targets of another batch",
        lambda fx, tmp: _ls().analysis.logit_lens(
            fx.s3, fx.tokens, n_iter=3, targets=torch.zeros(9, dtype=torch.long)
        ),
        ("targets", "9"),
    ),
    A(
        "power_iteration_rho: n_iter=0",
        lambda fx, tmp: _ls().analysis.power_iteration_rho(
            fx.tiny, fx.x, fx.tiny_trace.final, n_iter=0
        ),
        ("n_iter", "0"),
    ),
    A(
        "layer_metrics: unknown hook",
        lambda fx, tmp: _ls().analysis.layer_metrics(fx.trace, "hook_stat"),
        ("hook_stat",),
        error="UnknownHookError",
    ),
    A(
        "solve: dtype=torch.long",
        lambda fx, tmp: _ls().analysis.solve(fx.tiny, fx.x, dtype=torch.long),
        ("dtype", "int64"),
    ),
    # more circuits
    A(
        "gaussian_noise: scale=-1",
        lambda fx, tmp: _ls().circuits.gaussian_noise(
            fx.s3, fx.tokens, scale=-1.0, replication=True
        ),
        ("scale", "-1"),
    ),
    A(
        "mean_ablation: n_iter=0",
        lambda fx, tmp: _ls().circuits.mean_ablation(fx.s3, fx.tokens, "hook_state", 0),
        ("n_iter", "0"),
    ),
    A(
        "patch_sweep: measure_at before n_iter",
        lambda fx, tmp: _patch(fx, measure_at=2),
        ("measure_at", "2"),
    ),
    # experiments
    A(
        "experiments.stability: unknown split",
        lambda fx, tmp: _exp("stability").stability(fx.s3, fx.task, splits=["oops"], n=4),
        ("oops",),
    ),
    A(
        "experiments.stability: iter_factor=0",
        lambda fx, tmp: _exp("stability").stability(fx.s3, fx.task, iter_factor=0, n=4),
        ("iter_factor", "0"),
    ),
    A(
        "experiments.halting_study: n=0",
        lambda fx, tmp: _exp("halting").halting_study(fx.s3, fx.task, n=0),
        ("n", "0"),
    ),
    A(
        "experiments.verdict: n=1",
        lambda fx, tmp: _exp("verdict").verdict(fx.s3, fx.task, n=1),
        ("n", "1"),
    ),
    A(
        "experiments.patch_study: position past the sequence",
        lambda fx, tmp: _exp("patching").patch_study(fx.s3, fx.task, position=99, n=1),
        ("position", "99"),
    ),
    A(
        "experiments.probe_study: unknown target",
        lambda fx, tmp: _exp("probing").probe_study(fx.s3, fx.task, target="carry_bit", n=8),
        ("carry_bit",),
    ),
    # probes
    A(
        "fit_probes: seed='a'",
        lambda fx, tmp: _ls().probes.fit_probes(torch.zeros(1, 8, 3), torch.zeros(8), seed="a"),
        ("seed", "'a'"),
    ),
    A(
        "fit_probes: y of another length",
        lambda fx, tmp: _ls().probes.fit_probes(torch.zeros(1, 8, 3), torch.zeros(5)),
        ("y", "5"),
    ),
    A(
        "fit_probes: unknown probe",
        lambda fx, tmp: _ls().probes.fit_probes(torch.zeros(1, 8, 3), torch.zeros(8), probe="svm"),
        ("probe", "svm"),
    ),
    A(
        "fit_trace: targets of longer positions (another batch)",
        lambda fx, tmp: _ls().probes.fit_trace(
            fx.trace, torch.arange(4 * (fx.tokens.shape[1] + 3)).reshape(4, -1) % 2
        ),
        ("targets", "shape"),
    ),
]


# -- the command line ------------------------------------------------------------------------------
def _cli(*argv: str) -> Callable[[Any, Path], list[str]]:
    def make(fx: Any, tmp: Path) -> list[str]:
        return [a.replace("{tmp}", str(tmp)) for a in argv]

    return make


def _cli_file(*argv: str) -> Callable[[Any, Path], list[str]]:
    """Argv where ``{file}`` is a plain file (an unusable output folder)."""

    def make(fx: Any, tmp: Path) -> list[str]:
        (tmp / "file").write_text("x")
        return [a.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "file")) for a in argv]

    return make


C = Case
CLI_CASES: list[Case] = [
    C("trace: unknown model", _cli("trace", "s3_fprn", "--inputs", "1 2", "--out", "{tmp}/t"), ("s3_fprn",)),
    C("trace: --n-iter 0", _cli("trace", "s3_fprm", "--inputs", "6 1", "--n-iter", "0", "--out", "{tmp}/t"), ("--n-iter", "0")),
    C(
        "trace: --n-iter 10**12 (states over budget)",
        _cli("trace", "s3_fprm", "--inputs", "6 1", "--n-iter", "1000000000000", "--out", "{tmp}/t"),
        ("n_iter", "budget"),
    ),
    C("trace: --inputs junk", _cli("trace", "s3_fprm", "--inputs", "a b", "--out", "{tmp}/t"), ("--inputs", "a b")),
    C("trace: --inputs ragged", _cli("trace", "s3_fprm", "--inputs", "1 2; 3", "--out", "{tmp}/t"), ("--inputs",)),
    C("trace: token out of vocabulary", _cli("trace", "s3_fprm", "--inputs", "1 99", "--out", "{tmp}/t"), ("99", "vocab")),
    C("trace: --capture unknown hook", _cli("trace", "s3_fprm", "--inputs", "6 1", "--capture", "hook_stat", "--out", "{tmp}/t"), ("hook_stat",)),
    C("trace: both --inputs and --task", _cli("trace", "s3_fprm", "--inputs", "6 1", "--task", "s3", "--out", "{tmp}/t"), ("--inputs", "--task")),
    C("trace: unknown --task", _cli("trace", "s3_fprm", "--task", "s4", "--out", "{tmp}/t"), ("s4",)),
    C("trace: unknown --split", _cli("trace", "s3_fprm", "--task", "s3", "--split", "oops", "--out", "{tmp}/t"), ("oops",)),
    C("trace: --n 0", _cli("trace", "s3_fprm", "--task", "s3", "--n", "0", "--out", "{tmp}/t"), ("--n", "0")),
    C("trace: --seed -1", _cli("trace", "s3_fprm", "--task", "s3", "--seed", "-1", "--out", "{tmp}/t"), ("--seed", "-1")),
    C("trace: --out under a file", _cli_file("trace", "s3_fprm", "--inputs", "6 1", "--out", "{file}/t"), ("--out", "file")),
    C("trace: no model and no --loop", _cli("trace", "--inputs", "6 1", "--out", "{tmp}/t"), ("model", "--loop")),
    C("trace: --loop not module:attr", _cli("trace", "--loop", "nocolon", "--inputs", "6 1", "--out", "{tmp}/t"), ("--loop", "nocolon")),
    C("trace: --loop module missing", _cli("trace", "--loop", "no_such_mod_x:f", "--inputs", "6 1", "--out", "{tmp}/t"), ("--loop", "no_such_mod_x")),
    C("trace: a pickle checkpoint", _cli_file("trace", "{tmp}/m.pt", "--inputs", "6 1", "--out", "{tmp}/t"), ("m.pt",)),
    C("stability: --iter-factor -1", _cli("stability", "s3_fprm", "--iter-factor", "-1", "--out", "{tmp}/s"), ("--iter-factor", "-1")),
    C("stability: --iter-factor 0", _cli("stability", "s3_fprm", "--iter-factor", "0", "--out", "{tmp}/s"), ("--iter-factor", "0")),
    C("stability: --iter-factor nan", _cli("stability", "s3_fprm", "--iter-factor", "nan", "--out", "{tmp}/s"), ("--iter-factor", "nan")),
    C("stability: --n 0", _cli("stability", "s3_fprm", "--n", "0", "--out", "{tmp}/s"), ("--n", "0")),
    C("stability: --split oops", _cli("stability", "s3_fprm", "--split", "id,oops", "--out", "{tmp}/s"), ("oops",)),
    C("stability: --split empty", _cli("stability", "s3_fprm", "--split", ",", "--out", "{tmp}/s"), ("--split",)),
    C("stability: model / task mismatch", _cli("stability", "s3_fprm", "--task", "addition", "--out", "{tmp}/s"), ("s3_fprm", "addition")),
    C("stability: --out is a file", _cli_file("stability", "s3_fprm", "--out", "{file}"), ("--out", "file")),
    C("stability: --n-dyn 0", _cli("stability", "s3_fprm", "--n-dyn", "0", "--out", "{tmp}/s"), ("--n-dyn", "0")),
    C("stability: --seed x", _cli("stability", "s3_fprm", "--seed", "x", "--out", "{tmp}/s"), ("--seed", "x")),
    C("stability: unknown option", _cli("stability", "s3_fprm", "--nn", "3"), ("--nn",)),
    C("halting: --iter-factor -1", _cli("halting", "s3_act", "--iter-factor", "-1", "--out", "{tmp}/h"), ("--iter-factor", "-1")),
    C("halting: --split oops", _cli("halting", "s3_act", "--split", "oops", "--out", "{tmp}/h"), ("oops",)),
    C("halting: --out is a file", _cli_file("halting", "s3_act", "--out", "{file}"), ("--out", "file")),
    C("probe: --iterations x", _cli("probe", "s3_fprm", "--iterations", "x", "--out", "{tmp}/p"), ("--iterations", "x")),
    C("probe: --iterations 0", _cli("probe", "s3_fprm", "--iterations", "0", "--out", "{tmp}/p"), ("--iterations", "0")),
    C("probe: unknown --target", _cli("probe", "s3_fprm", "--target", "carry_bit", "--out", "{tmp}/p"), ("carry_bit",)),
    C("probe: unknown --site", _cli("probe", "s3_fprm", "--site", "hook_stat", "--out", "{tmp}/p"), ("hook_stat",)),
    C("probe: --n 3", _cli("probe", "s3_fprm", "--n", "3", "--out", "{tmp}/p"), ("--n", "3")),
    C("probe: --out is a file", _cli_file("probe", "s3_fprm", "--out", "{file}"), ("--out", "file")),
    C("patch: --iterations 99", _cli("patch", "s3_fprm", "--iterations", "1,99", "--out", "{tmp}/q"), ("iterations", "99")),
    C("patch: --iterations a,b", _cli("patch", "s3_fprm", "--iterations", "a,b", "--out", "{tmp}/q"), ("--iterations", "a,b")),
    C("patch: --position 99", _cli("patch", "s3_fprm", "--position", "99", "--out", "{tmp}/q"), ("position", "99")),
    C("patch: unknown --site", _cli("patch", "s3_fprm", "--site", "hook_stat", "--out", "{tmp}/q"), ("hook_stat",)),
    C("patch: --batch-size 0", _cli("patch", "s3_fprm", "--batch-size", "0", "--out", "{tmp}/q"), ("--batch-size", "0")),
    C("patch: --out is a file", _cli_file("patch", "s3_fprm", "--out", "{file}"), ("--out", "file")),
    C("verdict: --n 1", _cli("verdict", "s3_fprm", "--n", "1"), ("--n", "1")),
    C("verdict: model / task mismatch", _cli("verdict", "s3_fprm", "--task", "addition"), ("s3_fprm", "addition")),
    C("verdict: --out under a file", _cli_file("verdict", "s3_fprm", "--out", "{file}/v.csv"), ("--out", "file")),
    C("verdict: --n-basin -1", _cli("verdict", "s3_fprm", "--n-basin", "-1"), ("--n-basin", "-1")),
    C("train: unknown --task", _cli("train", "--task", "s4", "--preset", "fprm", "--out", "{tmp}/r"), ("s4",)),
    C("train: unknown --preset", _cli("train", "--task", "s3", "--preset", "fprn", "--out", "{tmp}/r"), ("fprn",)),
    C("train: --steps 0", _cli("train", "--task", "s3", "--preset", "fprm", "--steps", "0", "--out", "{tmp}/r"), ("--steps", "0")),
    C("train: --lr -1", _cli("train", "--task", "s3", "--preset", "fprm", "--lr", "-1", "--out", "{tmp}/r"), ("lr", "-1")),
    C("train: --seed -1", _cli("train", "--task", "s3", "--preset", "fprm", "--seed", "-1", "--out", "{tmp}/r"), ("seed", "-1")),
    C("train: --config missing", _cli("train", "--task", "s3", "--preset", "fprm", "--config", "{tmp}/none.json", "--out", "{tmp}/r"), ("none.json",)),
    C("train: --out is a file", _cli_file("train", "--task", "s3", "--preset", "fprm", "--out", "{file}"), ("--out", "file")),
    C("paper: unknown --only", _cli("paper", "--quick", "--only", "spectrum", "--out", "{tmp}/pp"), ("spectrum",)),
    C("paper: --out is a file", _cli_file("paper", "--quick", "--out", "{file}"), ("--out", "file")),
    C("paper: --seed -1", _cli("paper", "--quick", "--seed", "-1", "--out", "{tmp}/pp"), ("--seed", "-1")),
    C("sweep: missing study file", _cli("sweep", "{tmp}/none.toml"), ("none.toml",)),
    C("sweep: --max-parallel 0", _cli("sweep", "studies/seeds.toml", "--max-parallel", "0"), ("--max-parallel", "0")),
    C("sweep: --out is a file", _cli_file("sweep", "studies/seeds.toml", "--quick", "--sequential", "--out", "{file}"), ("--out", "file")),
    C("self-improve: --rounds -1", _cli("self-improve", "--quick", "--rounds", "-1", "--out", "{tmp}/si"), ("--rounds", "-1")),
    C("self-improve: --length-filter bogus", _cli("self-improve", "--quick", "--length-filter", "bogus", "--out", "{tmp}/si"), ("length_filter", "bogus")),
    C("self-improve: --noise-rate 2", _cli("self-improve", "--quick", "--noise", "uniform", "--noise-rate", "2", "--out", "{tmp}/si"), ("noise_rate", "2")),
    C("self-improve: --out is a file", _cli_file("self-improve", "--quick", "--out", "{file}"), ("--out", "file")),
    C("zoo build: unknown recipe", _cli("zoo", "build", "s3_fprn", "--out", "{tmp}/z"), ("s3_fprn",)),
    C("stability: --max-memory on a zoo model", _cli("stability", "s3_fprm", "--max-memory", "1GiB", "--out", "{tmp}/s"), ("--max-memory", "s3_fprm")),
    C("trace: --dtype float8", _cli("trace", "s3_fprm", "--inputs", "6 1", "--dtype", "float8", "--out", "{tmp}/t"), ("--dtype", "float8")),
    C("probe: --device gpu", _cli("probe", "s3_fprm", "--device", "gpu", "--out", "{tmp}/p"), ("--device", "gpu")),
    C("patch: --max-memory lots", _cli("patch", "s3_fprm", "--max-memory", "lots", "--out", "{tmp}/q"), ("--max-memory", "lots")),
    C("verdict: --loop with --dtype", _cli("verdict", "--loop", "x:y", "--dtype", "float64"), ("--dtype", "--loop")),
    C("unknown command", _cli("stabilty"), ("stabilty",)),
]  # fmt: skip


# -- running a case --------------------------------------------------------------------------------
def _one_line(msg: str) -> bool:
    return bool(msg.strip()) and "\n" not in msg.strip()


def _names(msg: str, words: tuple[str, ...]) -> bool:
    low = msg.lower()
    return all(w.lower() in low for w in words)


def outcome_api(case: Case, tmp: Path) -> tuple[str, str]:
    """``(outcome, message)`` of an API case (see the module docstring); an error of another
    LoopscopeError subclass than ``case.error`` is "unclear"."""
    from loopscope.core import errors

    fx = fixtures()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.call(fx, tmp)
        except errors.LoopscopeError as e:
            msg = str(e)
            ok = _one_line(msg) and _names(msg, case.mentions)
            ok = ok and isinstance(e, getattr(errors, case.error))
            return ("error" if ok else "unclear"), f"{type(e).__name__}: {msg}"
        except Exception as e:  # noqa: BLE001 - the point is to classify anything
            return "raw", f"{type(e).__name__}: {str(e)[:300]}"
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if case.expect == "warn" and any(_one_line(m) and _names(m, case.mentions) for m in msgs):
        return "warning", msgs[-1]
    return "silent", "; ".join(msgs)[:300] or "(returned normally, nothing said)"


def _heavy_entry_points_stopped():
    """The CLI cases are bad inputs: the heavy entry points must never be reached (they raise
    if they are, so a case that slips through the door is 'silent', not a long run)."""
    import loopscope.experiments.self_improve
    import loopscope.experiments.sweep
    import loopscope.paper
    import loopscope.train
    import loopscope.zoo.recipes

    class Reached(Exception):
        pass

    def stop(*a: Any, **k: Any) -> None:
        raise Reached("the work started")

    stack = contextlib.ExitStack()
    for mod, name in (
        (loopscope.paper, "run_paper"),
        (loopscope.train, "train"),
        (loopscope.zoo.recipes, "build"),
        (loopscope.experiments.sweep, "run_sweep"),
        (loopscope.experiments.self_improve, "self_improve"),
    ):
        old = getattr(mod, name)
        setattr(mod, name, stop)
        stack.callback(setattr, mod, name, old)
    return stack, Reached


def outcome_cli(case: Case, tmp: Path) -> tuple[str, str]:
    """``(outcome, message)`` of a CLI case run in-process (stderr captured)."""
    import os

    from loopscope.cli import main

    argv = case.call(None, tmp)
    out, err = io.StringIO(), io.StringIO()
    stack, reached = _heavy_entry_points_stopped()
    old_env = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "200"
    code: Any = 0
    try:
        with stack, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        if old_env is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_env
    text = err.getvalue().strip()
    if "Traceback" in text or "Traceback" in out.getvalue() or reached.__name__ in text:
        return "raw", text[-300:]
    if code in (0, None):
        return "silent", (text or out.getvalue().strip())[-300:]
    if code != case.exit_code:
        return "raw", f"exit {code}: {text[-300:]}"
    ok = _one_line(text) and _names(text, case.mentions)
    return ("error" if ok else "unclear"), text


def counts(outcomes: list[str]) -> dict[str, int]:
    """Tally of outcomes in the fixed column order of docs/reliability.md."""
    keys = ["error", "warning", "unclear", "raw", "silent"]
    return {"tried": len(outcomes), **{k: outcomes.count(k) for k in keys}}
