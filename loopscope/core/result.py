"""The one result contract: every analysis, probe and circuit returns a :class:`Result`.

A Result is a plain dataclass holding what was measured, plus

* ``meta``: where it came from (``seed``, ``model``, ``split``, ``loopscope_version`` and the
  analysis's own settings), JSON-serialisable;
* ``to_frame()``: a tidy :class:`pandas.DataFrame`, one row per observation, in which ``sample``,
  ``iteration`` and ``site`` are always *columns* (never the index) when they apply;
* ``summary()``: a flat ``dict[str, float]`` of headline numbers (fractions, means, counts).

Results compose frames; they never subclass :class:`~pandas.DataFrame`.

Example::

    res = loopscope.analysis.metrics(trace)
    res.to_frame().query("iteration == 3")
    res.summary()["converged_fraction"]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["Result", "FrameResult", "result_meta", "tidy", "float_summary"]

#: Columns that are always columns of a tidy frame, never its index.
TIDY_COLUMNS = ("sample", "iteration", "site")


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``sample`` / ``iteration`` / ``site`` moved from the index into columns."""
    names = [n for n in (frame.index.names or []) if n is not None]
    if any(n in TIDY_COLUMNS for n in names):
        frame = frame.reset_index()
    return frame


def float_summary(values: dict[str, Any]) -> dict[str, float]:
    """Coerce a summary's values to plain floats (bools and ints too; None -> nan)."""
    out: dict[str, float] = {}
    for key, v in values.items():
        if v is None:
            out[key] = math.nan
        elif isinstance(v, (bool, np.bool_)):
            out[key] = float(bool(v))
        else:
            out[key] = float(v)
    return out


def result_meta(
    loop: Any = None,
    *,
    seed: int | None = None,
    split: str | None = None,
    model: str | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta`` every result carries: version, model name, seed, split, and its settings.

    ``model`` defaults to the loop's ``name`` attribute (the zoo sets it) or its class name.
    """
    from loopscope import __version__

    if model is None and loop is not None:
        model = getattr(loop, "name", None) or type(loop).__name__
    meta: dict[str, Any] = {
        "loopscope_version": __version__,
        "model": model,
        "seed": seed,
        "split": split,
    }
    if settings:
        meta.update({k: _jsonable(v) for k, v in settings.items()})
    return meta


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


@dataclass(kw_only=True)
class Result:
    """Base of every analysis / probe / circuit result (see the module docstring)."""

    meta: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """A tidy frame (``sample`` / ``iteration`` / ``site`` as columns where they apply)."""
        raise NotImplementedError(f"{type(self).__name__}.to_frame")

    def summary(self) -> dict[str, float]:
        """Headline numbers as ``{name: float}``."""
        raise NotImplementedError(f"{type(self).__name__}.summary")

    def _repr_fields(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            if f.name == "meta" or not f.repr:
                continue
            v = getattr(self, f.name)
            if hasattr(v, "shape"):
                shown.append(f"{f.name}={type(v).__name__}{tuple(v.shape)}")
            elif isinstance(v, (int, float, str, bool)) or v is None:
                shown.append(f"{f.name}={v!r}")
        return ", ".join(shown)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_fields()})"


@dataclass(kw_only=True, repr=False)
class FrameResult(Result):
    """A result that is one tidy table; ``summary()`` is the means of its numeric columns.

    ``summary_columns`` narrows which columns are averaged (default: every numeric column that is
    not ``sample`` / ``iteration``); ``headline`` adds numbers computed by the analysis itself.
    """

    frame: pd.DataFrame
    summary_columns: tuple[str, ...] | None = None
    headline: dict[str, float] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return tidy(self.frame.copy())

    def summary(self) -> dict[str, float]:
        frame = self.to_frame()
        cols = self.summary_columns
        if cols is None:
            cols = tuple(
                c
                for c in frame.columns
                if c not in ("sample", "iteration") and pd.api.types.is_numeric_dtype(frame[c])
            )
        out = {f"mean_{c}": float(frame[c].astype(float).mean()) for c in cols if c in frame}
        out.update(float_summary(self.headline))
        out.setdefault("n_rows", float(len(frame)))
        return out

    def __len__(self) -> int:
        return len(self.frame)
