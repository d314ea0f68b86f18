"""Figure output conventions for the paper and the CLI: one seaborn style, PDF + PNG + CSV data
table per figure, a caption naming the command and seed, and a Markdown/HTML report.

Analyses never draw and figures never compute: a figure function takes result frames and returns
a matplotlib Figure; :class:`FigureWriter` saves it with its data table.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from loopscope.core.io import atomic_savefig, atomic_write_text

__all__ = ["set_style", "FigureWriter", "FigureRecord"]


def set_style() -> None:
    """The one plotting style of loopscope figures (the backend is left alone)."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)


@dataclass
class FigureRecord:
    """One saved figure: its files, data table and caption."""

    name: str
    title: str
    caption: str
    files: list[str]
    data: str
    rows: int
    meta: dict[str, Any] = field(default_factory=dict)
    #: the settings that made it (a rerun with other settings redoes it)
    settings: dict[str, Any] = field(default_factory=dict)
    #: SHA-256 of every file it wrote (a damaged or truncated file is redone)
    sha256: dict[str, str] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FigureWriter:
    """Saves figures (PDF + PNG) with their data tables (CSV) and captions; writes the report.

    Args:
        out_dir: output folder.
        command: the command line that produced the figures (goes into every caption).
        seed: the seed used (goes into every caption).
        settings: what makes the figures (recorded with each; default: the seed and the command
            without its ``--out``). A figure made with other settings is redone, never reused.
    """

    def __init__(
        self, out_dir: str | Path, command: str, seed: int, settings: dict | None = None
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.seed = seed
        if settings is None:
            settings = {"seed": seed, "command": re.sub(r"\s--out(=|\s+)\S+", "", command)}
        self.settings = json.loads(json.dumps(settings, default=str))
        self.records: list[FigureRecord] = []

    def done(self, name: str) -> bool:
        """Whether figure ``name`` is complete on disk and was made with these settings (resume
        after an interruption): its JSON reads back, its settings are this writer's, and every
        file it lists is there with the SHA-256 it recorded (a truncated CSV is redone)."""
        meta = self.out / f"{name}.json"
        if not meta.exists():
            return False
        try:
            rec = FigureRecord(**json.loads(meta.read_text()))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return False
        if rec.settings != self.settings:
            return False
        for f in rec.files + [rec.data]:
            path = self.out / f
            if f not in rec.sha256 or not path.is_file() or _sha256(path) != rec.sha256[f]:
                return False
        self.records.append(rec)
        return True

    def _record(self, rec: FigureRecord, name: str) -> FigureRecord:
        rec.settings = self.settings
        rec.sha256 = {f: _sha256(self.out / f) for f in rec.files + [rec.data]}
        atomic_write_text(
            self.out / f"{name}.json", json.dumps(rec.__dict__, indent=1, default=str)
        )  # written last: a figure is done only once every file is
        self.records.append(rec)
        return rec

    def save(
        self, name: str, fig: Any, data: pd.DataFrame, title: str, caption: str, **meta: Any
    ) -> FigureRecord:
        """Write ``name.pdf``, ``name.png``, ``name.csv`` and ``name.json`` (written last, atomically)."""
        import matplotlib.pyplot as plt

        full_caption = f"{caption} Made by `{self.command}` (seed {self.seed})."
        files = []
        for ext in ("pdf", "png"):
            path = self.out / f"{name}.{ext}"
            atomic_savefig(fig, path, bbox_inches="tight", dpi=130)
            files.append(path.name)
        plt.close(fig)
        csv = self.out / f"{name}.csv"
        atomic_write_text(csv, data.to_csv(index=False))
        rec = FigureRecord(
            name=name,
            title=title,
            caption=full_caption,
            files=files,
            data=csv.name,
            rows=len(data),
            meta=meta,
        )
        return self._record(rec, name)

    def save_table(
        self, name: str, data: pd.DataFrame, title: str, caption: str, **meta: Any
    ) -> FigureRecord:
        """A table-only result (CSV + Markdown), e.g. the verdict table."""
        full_caption = f"{caption} Made by `{self.command}` (seed {self.seed})."
        csv = self.out / f"{name}.csv"
        atomic_write_text(csv, data.to_csv(index=False))
        md = self.out / f"{name}.md"
        atomic_write_text(
            md, data.to_markdown(index=False) if _has_tabulate() else data.to_string(index=False)
        )
        rec = FigureRecord(
            name=name,
            title=title,
            caption=full_caption,
            files=[md.name],
            data=csv.name,
            rows=len(data),
            meta=meta,
        )
        return self._record(rec, name)

    def write_report(self, title: str, intro: str = "") -> tuple[Path, Path]:
        """``report.md`` and ``report.html`` putting every figure with its caption together."""
        md = [f"# {title}", "", intro, ""]
        body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
        for r in self.records:
            md += [f"## {r.title}", ""]
            body.append(f"<h2>{html.escape(r.title)}</h2>")
            pngs = [f for f in r.files if f.endswith(".png")]
            if pngs:
                md += [f"![{r.title}]({pngs[0]})", ""]
                body.append(f'<img src="{html.escape(pngs[0])}" style="max-width:900px">')
            else:
                table = (self.out / r.files[0]).read_text()
                md += [table, ""]
                body.append(f"<pre>{html.escape(table)}</pre>")
            md += [f"*{r.caption}* Data: `{r.data}` ({r.rows} rows).", ""]
            body.append(
                f"<p><em>{html.escape(r.caption)}</em> Data: <code>{html.escape(r.data)}</code> ({r.rows} rows).</p>"
            )
        md_path = atomic_write_text(self.out / "report.md", "\n".join(md))
        html_path = atomic_write_text(
            self.out / "report.html",
            "<!doctype html><meta charset='utf-8'><title>"
            + html.escape(title)
            + "</title><body style='font-family:sans-serif'>"
            + "\n".join(body)
            + "</body>",
        )
        return md_path, html_path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False
