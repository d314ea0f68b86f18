"""Every notebook in notebooks/ is stored without outputs, forces no matplotlib backend, and
executes headless (nbclient, inline backend) without an error and with its figures in the
outputs. The executed copies are shared with tests/test_docs_site.py (tests/notebook_runs.py)."""

from __future__ import annotations

import nbformat
import pytest
from notebook_runs import NOTEBOOKS, executed, shared_dir


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.fixture(scope="session")
def notebook_folder(tmp_path_factory):
    return shared_dir(tmp_path_factory)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        "strip outputs before committing (nbstripout)"
    )
    assert not any("matplotlib.use(" in c.source for c in code), (
        "no backend forced: figures must display inline"
    )
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), (
        "a notebook opens with its title (the page title on the site)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_shows_figures(path, notebook_folder):
    run = executed(path, notebook_folder)
    assert run.error is None, run.error
    outputs = [o for c in run.notebook().cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook shows no figure"
