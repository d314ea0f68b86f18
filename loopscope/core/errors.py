"""Exceptions and input validation shared by every loopscope module.

Every user-facing error is a :class:`LoopscopeError` subclass with a one-line message that names
the offending value, so the CLI can print it without a traceback (exit code 2).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class LoopscopeError(ValueError):
    """Base class of loopscope's user-facing errors (bad input, impossible settings)."""


class UnknownHookError(LoopscopeError, KeyError):
    """A hook name that the loop does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CaptureMemoryError(LoopscopeError, MemoryError):
    """A capture, sweep or analysis whose estimated size exceeds the memory budget (refused
    before allocating, with the estimate and the way out)."""


class CheckpointError(LoopscopeError):
    """A checkpoint that is missing, corrupted, truncated or not safetensors + JSON."""


class UnknownOptionError(LoopscopeError, TypeError):
    """A keyword argument that a function does not take (a ``TypeError``, with a did-you-mean)."""


class LoopedHookWarning(UserWarning):
    """Stock TransformerLens caching/patching would keep only the last firing of a looped hook."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' (did you mean: a, b?)' for the closest matches of ``name``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def reject_unknown_kwargs(
    where: str, kwargs: Mapping[str, Any], allowed: Iterable[str] = ()
) -> None:
    """Raise on keyword options that a function does not know (never silently ignored).

    >>> reject_unknown_kwargs("solve", {}, ["tol"])
    >>> reject_unknown_kwargs("solve", {"tl": 1}, ["tol"])
    Traceback (most recent call last):
    ...
    loopscope.core.errors.LoopscopeError: solve() got an unknown option 'tl' (did you mean: tol?)
    """
    allowed = list(allowed)
    for key in kwargs:
        if key not in allowed:
            raise LoopscopeError(f"{where}() got an unknown option {key!r}{suggest(key, allowed)}")


def did_you_mean(fn: F) -> F:
    """Decorate a function (or a class's ``__init__``) so an unknown keyword names its neighbours.

    The signature stays the function's own (``inspect.signature`` and ``help()`` see every
    parameter); only the error for a misspelt keyword changes, from Python's bare ``TypeError``
    to :class:`UnknownOptionError` (a ``TypeError`` too) with the closest parameter names.

    >>> @did_you_mean
    ... def solve(x, *, tol=1e-6): return x
    >>> solve(1, tl=1)
    Traceback (most recent call last):
    ...
    loopscope.core.errors.UnknownOptionError: solve() got an unknown option 'tl' (did you mean: tol?)
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn  # it takes anything: nothing to check
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    where = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for key in kwargs:
            if key not in params:
                raise UnknownOptionError(
                    f"{where}() got an unknown option {key!r}{suggest(key, names)}"
                )
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_positive_int(name: str, value: Any) -> int:
    """Validate ``value`` as an int >= 1 and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoopscopeError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_seed(value: Any, name: str = "seed") -> int:
    """Validate ``value`` as a seed (an int >= 0, numpy ints accepted) and return it as int."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
        raise LoopscopeError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


class NeverFiresWarning(UserWarning):
    """An intervention or option that can never take effect in the run it was given to."""


class OutputError(LoopscopeError, OSError):
    """An output that cannot be written (disk full, read-only, a file where a folder should be,
    another process writing the same folder)."""


def check_number(
    name: str, value: Any, *, low: float | None = None, strict: bool = False, finite: bool = True
) -> float:
    """Validate ``value`` as a real number (not bool), finite unless ``finite=False``, and
    ``> low`` (``strict``) or ``>= low``; return it as float.

    >>> check_number("blowup", -1.0, low=0, strict=True)
    Traceback (most recent call last):
    ...
    loopscope.core.errors.LoopscopeError: blowup must be a number > 0, got -1.0
    """
    import math
    import numbers

    cond = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LoopscopeError(f"{name} must be a number{cond}, got {value!r}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise LoopscopeError(f"{name} must be a finite number{cond}, got {value!r}")
    if low is not None and (v <= low if strict else v < low):
        raise LoopscopeError(f"{name} must be a number{cond}, got {value!r}")
    return v


def check_float_dtype(name: str, value: Any) -> Any:
    """Validate ``value`` as a floating ``torch.dtype`` (None passes) and return it."""
    import torch

    if value is None:
        return None
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    hint = f" (torch.{value})" if isinstance(value, str) and hasattr(torch, value) else ""
    shown = str(value).replace("torch.", "") if isinstance(value, torch.dtype) else repr(value)
    raise LoopscopeError(
        f"{name} must be a floating torch dtype such as torch.float16{hint}, got {shown}"
    )
