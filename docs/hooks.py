"""MkDocs hooks of the loopscope site (mkdocs.yml ``hooks:``).

* **Notebooks.** They live in ``notebooks/`` (outside ``docs/``): each is added to the site as the
  page ``notebooks/NAME.ipynb`` (rendered by mkdocs-jupyter) and listed, in file order, under the
  nav section "Investigations". ``LOOPSCOPE_DOCS_NOTEBOOKS`` names another folder called
  ``notebooks`` to take them from: already executed copies (the test suite executes every notebook once and builds the
  site from those with ``LOOPSCOPE_DOCS_EXECUTE=false``).
* **Links.** The Markdown pages link to notebooks the way GitHub shows the repository
  (``../notebooks/NAME.ipynb`` from ``docs/``); on the site those pages sit one folder lower.
* **Paper report.** When ``loopscope paper`` has written a report (``paper_out/report.md``, or
  the folder ``LOOPSCOPE_DOCS_PAPER`` names), the page ``paper.md`` shows it with its figures;
  otherwise ``paper.md`` says how to make one.
* **API reference.** pyproject maps the top-level folders ``analysis/``, ``probes/`` and
  ``circuits/`` into the package (``package-dir``), which griffe's static analysis cannot
  follow. The hook lays out the installed package tree (symlinks in a temporary folder) and
  points mkdocstrings at it, so the reference is read from the sources without importing them.
  :class:`DocstringMarkdown` (a griffe extension, mkdocs.yml ``extensions``): the docstrings are
  written for ``help()`` with reST roles and bare doctests; it shows the roles as code and
  fences the doctests, so Markdown neither prints the roles nor reads a doctest's ``[...]``
  output as a link.
* **Every page reachable.** A Markdown page under ``docs/`` that the nav does not list is
  appended to "Guides".
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path

import griffe
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Investigations"
GUIDES = "Guides"
PACKAGE_DIR = {"analysis": "analysis", "probes": "probes", "circuits": "circuits"}
PAPER_PAGE = "paper.md"


def notebook_dir() -> Path:
    """Where the site's notebooks come from: a folder named ``notebooks``."""
    d = Path(os.environ.get("LOOPSCOPE_DOCS_NOTEBOOKS") or ROOT / "notebooks").resolve()
    if d.name != "notebooks":
        raise ValueError(f"LOOPSCOPE_DOCS_NOTEBOOKS must name a folder called notebooks, not {d}")
    return d


def paper_dir() -> Path | None:
    """The folder of a ``loopscope paper`` report to show, if there is one."""
    d = Path(os.environ.get("LOOPSCOPE_DOCS_PAPER") or ROOT / "paper_out")
    return d.resolve() if (d / "report.md").is_file() else None


def _notebooks() -> list[Path]:
    return sorted(notebook_dir().glob("*.ipynb"))


def _nav_paths(nav) -> set[str]:
    out: set[str] = set()
    for item in nav or []:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            out |= _nav_paths(value)
        elif isinstance(value, str):
            out.add(value)
    return out


def _section(nav: list, name: str) -> list:
    for item in nav:
        if isinstance(item, dict) and name in item:
            return item[name]
    raise KeyError(f"mkdocs.yml nav has no section {name!r}")


def _package_tree() -> str:
    """A folder holding ``loopscope/`` as installed: the package plus the mapped subpackages."""
    tmp = Path(tempfile.mkdtemp(prefix="loopscope-docs-src-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    pkg = tmp / "loopscope"
    pkg.mkdir()
    for entry in (ROOT / "loopscope").iterdir():
        if entry.name not in ("__pycache__", "__main__.py"):
            (pkg / entry.name).symlink_to(entry)
    for name, folder in PACKAGE_DIR.items():
        (pkg / name).symlink_to(ROOT / folder)
    return str(tmp)


@event_priority(100)  # before mkdocstrings creates its handler from the paths set here
def on_config(config):
    python = config["plugins"]["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [_package_tree()]
    nav = config["nav"]
    _section(nav, SECTION)[:] = [f"notebooks/{p.name}" for p in _notebooks()]
    listed = _nav_paths(nav)
    docs = Path(config["docs_dir"])
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    extra = [p for p in pages if p not in listed]
    _section(nav, GUIDES).extend(extra)
    return config


@event_priority(100)  # before mkdocs-jupyter turns the .ipynb files into pages
def on_files(files, config):
    for p in _notebooks():  # a real File: mkdocs-jupyter reads it from src_dir / src_uri
        files.append(
            File(
                f"notebooks/{p.name}",
                src_dir=str(p.parent.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    paper = paper_dir()
    if paper is not None:
        for png in sorted(paper.glob("*.png")):
            files.append(File.generated(config, f"paper/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri
    depth = src.count("/")
    github, site = "../" * (depth + 1) + "notebooks/", "../" * depth + "notebooks/"
    markdown = markdown.replace(f"]({github}", f"]({site}")
    paper = paper_dir()
    if src == PAPER_PAGE and paper is not None:
        report = (paper / "report.md").read_text(encoding="utf-8")
        report = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](paper/\2)", report)
        markdown = f"{report}\n\n---\n\n*Shown from `{paper}`.*\n"
    return markdown


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def docstring_markdown(text: str) -> str:
    """reST roles as code spans; each doctest run (``>>>`` lines up to a blank line) fenced."""
    text = _ROLE.sub(r"`\1`", text)
    out: list[str] = []
    fence = None  # indentation of the open fence
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(">>>"):
            fence = line[: len(line) - len(stripped)]
            out.append(f"{fence}```pycon")
        elif fence is not None and not stripped:
            out.append(f"{fence}```")
            fence = None
        out.append(line)
    if fence is not None:
        out.append(f"{fence}```")
    return "\n".join(out)


def _objects(obj):
    """``obj`` and every object defined under it (aliases are not followed)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class DocstringMarkdown(griffe.Extension):
    """Once a package is loaded: every docstring through :func:`docstring_markdown`, and every
    exported name that is also a submodule's name (``probes.steer``, the function, imported over
    the module ``probes/steer.py``) documented as what the import binds, as Python sees it."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = docstring_markdown(obj.docstring.value)
        shadowed = [
            (mod, name, target)
            for mod in _objects(pkg)
            if mod.is_module
            for name, target in mod.imports.items()
            if name in (mod.exports or ())
            and name in mod.members
            and not mod.members[name].is_alias
            and mod.members[name].is_module
            and target != mod.members[name].path
        ]
        for mod, name, target in shadowed:
            obj = loader.modules_collection.get_member(target)
            mod.members[name] = griffe.Alias(name, obj, parent=mod)
