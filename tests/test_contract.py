"""The analysis contract: explicit keyword parameters everywhere, one Result type, thin faces."""

from __future__ import annotations

import importlib
import inspect

import pytest

FACES = ("loopscope", "loopscope.analysis", "loopscope.probes", "loopscope.circuits")


def _public(module_name: str):
    mod = importlib.import_module(module_name)
    for name in getattr(mod, "__all__", [n for n in dir(mod) if not n.startswith("_")]):
        obj = getattr(mod, name)
        if inspect.ismodule(obj):
            continue
        yield f"{module_name}.{name}", obj


def _callables():
    seen = set()
    for face in FACES:
        for qual, obj in _public(face):
            if id(obj) in seen or not callable(obj):
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                if obj.__module__.startswith("loopscope"):
                    if "__init__" in vars(obj):  # exceptions keep BaseException's
                        yield qual, obj.__init__
                    for mname, m in vars(obj).items():
                        if not mname.startswith("_") and inspect.isfunction(m):
                            yield f"{qual}.{mname}", m
            elif getattr(obj, "__module__", "").startswith("loopscope"):
                yield qual, obj


CALLABLES = sorted(_callables(), key=lambda x: x[0])


def test_the_walk_covers_the_public_api():
    names = {q for q, _ in CALLABLES}
    assert len(names) > 80
    for must in ("loopscope.unroll", "loopscope.analysis.find_fixed_points",
                 "loopscope.probes.fit_probes", "loopscope.circuits.patch_sweep"):  # fmt: skip
        assert must in names


@pytest.mark.parametrize("qual,fn", CALLABLES, ids=[q for q, _ in CALLABLES])
def test_no_public_callable_takes_a_keyword_bag(qual, fn):
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        pytest.skip(f"{qual}: no signature")
    bags = [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert not bags, f"{qual} takes **{bags[0]}"


def test_a_misspelt_keyword_is_a_type_error_with_a_suggestion():
    import torch

    import loopscope as ls
    from loopscope.core.errors import LoopscopeError

    loop = ls.FnLoop(step=lambda h: 0.5 * h, init_state=torch.zeros(3))
    with pytest.raises(TypeError, match="did you mean: capture") as e:
        ls.unroll(loop, torch.zeros(2, 3), 4, captur=True)
    assert isinstance(e.value, LoopscopeError)


def test_importing_the_package_loads_neither_torch_nor_matplotlib_backends():
    import subprocess
    import sys

    code = (
        "import sys, loopscope, loopscope.cli;"
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_importing_figures_keeps_the_notebook_backend():
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('svg'); import loopscope.figures, loopscope.report;"
        "loopscope.report.set_style(); print(matplotlib.get_backend())"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MPLBACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "svg"


def test_importing_loopscope_installs_no_warning_filter():
    import subprocess
    import sys

    code = (
        "import torch, numpy, scipy.special, scipy.linalg, scipy.sparse.linalg, pandas, seaborn;"
        "import transformer_lens, networkx, safetensors;"
        "import warnings; n = len(warnings.filters);"
        "import loopscope.analysis, loopscope.probes, loopscope.circuits, loopscope.paper;"
        "print(len(warnings.filters) - n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_lazy_namespace_gives_the_subpackages():
    import loopscope as ls

    for name in ("zoo", "tasks", "analysis", "probes", "circuits", "models", "experiments"):
        assert inspect.ismodule(getattr(ls, name))
    assert ls.Result.__module__ == "loopscope.core.result"
    with pytest.raises(AttributeError):
        ls.not_a_name  # noqa: B018


def test_the_core_imports_no_model_task_or_analysis():
    import ast
    from pathlib import Path

    core = Path(importlib.import_module("loopscope.core.loop").__file__).parent
    for f in core.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for banned in ("loopscope.models", "loopscope.tasks", "loopscope.analysis",
                               "loopscope.probes", "loopscope.circuits", "loopscope.zoo"):  # fmt: skip
                    assert not node.module.startswith(banned), f"{f.name} imports {node.module}"


def test_analyses_import_no_particular_model_or_task():
    import ast
    from pathlib import Path

    root = Path(importlib.import_module("loopscope.analysis").__file__).parent
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            mods = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            for m in mods:
                assert not m.startswith(("loopscope.models", "loopscope.tasks")), f"{f.name}: {m}"


def test_subpackage_faces_import_their_names_plainly():
    from pathlib import Path

    for face in ("loopscope.analysis", "loopscope.probes", "loopscope.circuits"):
        src = Path(importlib.import_module(face).__file__).read_text()
        assert "def __getattr__" not in src, f"{face} hides its imports behind __getattr__"
