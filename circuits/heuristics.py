"""Heuristic neurons (Nikankin et al., *Arithmetic Without Algorithms*, ICLR 2025), per iteration.

A neuron's activation over the operand grid ``A[op1, op2]`` (last position, one iteration) is
compared with heuristic prompt sets H (Alg. 1): with k = |prompts_H|,

    score(H) = |prompts_H & top-k prompts by A| / k        (stable descending sort)

and the neuron is classified as H if score >= 0.6 (multi-label; the argmax is reported too). For a
*direct* heuristic the grid is first multiplied by the neuron's logit pattern
``L[op1, op2] = logit_vector[token(op1 o op2)]`` (:func:`direct_grid`).

Families (configurable grids, recorded in ``Heuristic.params``):

* range [a, b) on op1 / op2 / result — lengths {10, 30, 50, 100} by default, starts on a grid of
  step max(floor(len / 3), 10) (the code's lists differ from the paper's: pass your own);
* modulo n, residue r — n in {2..9, 11, 13, 15};
* digit pattern — digit k of the value equals d (e.g. ``__5`` for the units digit 5);
* identical operands (op1 == op2); any custom mask (:class:`Heuristic` with ``mask_fn``).

Looped mapping: :func:`grid_activations` records ``[T, units, n1, n2]`` grids per iteration,
:func:`heuristic_census` gives the census per (iteration, neuron), and :func:`heuristic_knockout` /
:func:`prompt_guided_knockout` zero the associated neurons at chosen iterations against equal-size
random baselines.

Example:
    >>> import numpy as np
    >>> g = OperandGrid(np.arange(20), np.arange(20), "+")
    >>> A = ((g.result >= 10) & (g.result < 20)).astype(float)
    >>> classify_heuristics(A, g, range_heuristics(g, "result", lengths=[10])).best.name
    'result in [10, 20)'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.interventions import Patch
from loopscope.core.loop import Loop
from loopscope.core.result import FrameResult, Result, float_summary, result_meta
from loopscope.core.unroll import unroll

__all__ = [
    "OperandGrid",
    "Heuristic",
    "range_heuristics",
    "modulo_heuristics",
    "pattern_heuristics",
    "identical_operands",
    "default_heuristics",
    "heuristic_score",
    "direct_grid",
    "classify_heuristics",
    "Classification",
    "grid_activations",
    "heuristic_census",
    "heuristic_knockout",
    "prompt_guided_knockout",
]

THRESHOLD = 0.6

_OPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: np.where(b != 0, a // np.where(b == 0, 1, b), -1),
}


@dataclass
class OperandGrid:
    """The prompt grid ``op1 x op2`` (row-major: prompt index = i * n2 + j) and its results."""

    op1_values: np.ndarray
    op2_values: np.ndarray
    op: str = "+"
    result_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        self.op1_values = np.asarray(self.op1_values)
        self.op2_values = np.asarray(self.op2_values)
        if self.result_fn is None and self.op not in _OPS:
            raise LoopscopeError(
                f"op must be one of {list(_OPS)} (or give result_fn), got {self.op!r}"
            )
        self.op1, self.op2 = np.meshgrid(self.op1_values, self.op2_values, indexing="ij")
        fn = self.result_fn or _OPS[self.op]
        self.result = np.asarray(fn(self.op1, self.op2))

    @property
    def shape(self) -> tuple[int, int]:
        return self.op1.shape

    def values(self, on: str) -> np.ndarray:
        if on not in ("op1", "op2", "result"):
            raise LoopscopeError(f"heuristics act on 'op1', 'op2' or 'result', got {on!r}")
        return getattr(self, on)


@dataclass(frozen=True)
class Heuristic:
    """A prompt set over the operand grid: ``family`` in range / modulo / pattern / identical /
    custom, on ``op1`` / ``op2`` / ``result``, with its ``params``."""

    family: str
    on: str
    params: tuple
    name: str
    mask_fn: Callable[[OperandGrid], np.ndarray] | None = field(default=None, compare=False)

    def mask(self, grid: OperandGrid) -> np.ndarray:
        """Boolean ``[n1, n2]`` mask of the prompts in the set."""
        if self.mask_fn is not None:
            return np.asarray(self.mask_fn(grid), dtype=bool)
        if self.family == "identical":
            return grid.op1 == grid.op2
        v = grid.values(self.on)
        if self.family == "range":
            a, b = self.params
            return (v >= a) & (v < b)
        if self.family == "modulo":
            n, r = self.params
            return v % n == r
        if self.family == "pattern":
            k, d = self.params
            return (v >= 0) & ((v // 10**k) % 10 == d)
        raise LoopscopeError(f"unknown heuristic family {self.family!r}")


def _default_step(length: int) -> int:
    return max(length // 3, 10)


def range_heuristics(
    grid: OperandGrid,
    on: str = "result",
    lengths: Sequence[int] = (10, 30, 50, 100),
    step: Callable[[int], int] | int | None = None,
    start: int | None = None,
    stop: int | None = None,
) -> list[Heuristic]:
    """Ranges [a, a + len) on ``on``: starts from ``start`` (default min value) in steps of
    ``step(len)`` (default max(len // 3, 10)) while a + len <= ``stop`` (default max value + 1)."""
    v = grid.values(on)
    lo = int(v.min()) if start is None else int(start)
    hi = int(v.max()) + 1 if stop is None else int(stop)
    out = []
    for L in lengths:
        L = check_positive_int("range length", int(L))
        s = _default_step(L) if step is None else (step(L) if callable(step) else int(step))
        for a in range(lo, hi - L + 1, max(1, s)):
            out.append(Heuristic("range", on, (a, a + L), f"{on} in [{a}, {a + L})"))
    return out


def modulo_heuristics(
    grid: OperandGrid,
    on: str = "result",
    moduli: Sequence[int] = (2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15),
) -> list[Heuristic]:
    """``value % n == r`` for every modulus n and residue r."""
    grid.values(on)
    return [
        Heuristic("modulo", on, (int(n), r), f"{on} = {r} mod {int(n)}")
        for n in moduli
        for r in range(int(n))
    ]


def pattern_heuristics(grid: OperandGrid, on: str = "result", n_digits: int = 3) -> list[Heuristic]:
    """Digit patterns: digit k (0 = units) of the value equals d, written like ``__5``."""
    grid.values(on)
    out = []
    for k in range(n_digits):
        for d in range(10):
            pat = "".join(str(d) if i == k else "_" for i in reversed(range(n_digits)))
            out.append(Heuristic("pattern", on, (k, d), f"{on} ~ {pat}"))
    return out


def identical_operands() -> list[Heuristic]:
    return [Heuristic("identical", "op1", (), "op1 == op2")]


def default_heuristics(grid: OperandGrid) -> list[Heuristic]:
    """Every family on op1, op2 and result with the default grids."""
    hs: list[Heuristic] = []
    for on in ("op1", "op2", "result"):
        hs += (
            range_heuristics(grid, on) + modulo_heuristics(grid, on) + pattern_heuristics(grid, on)
        )
    return hs + identical_operands()


def heuristic_score(A: np.ndarray, mask: np.ndarray) -> float:
    """|prompts_H & top-k prompts by A| / k with k = |prompts_H| (stable descending sort)."""
    A, mask = np.asarray(A, dtype=float).ravel(), np.asarray(mask, dtype=bool).ravel()
    if A.shape != mask.shape:
        raise LoopscopeError(f"grid and mask sizes differ: {A.shape} vs {mask.shape}")
    k = int(mask.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-A, kind="stable")[:k]
    return float(mask[top].sum()) / k


def direct_grid(
    A: np.ndarray, logit_vector: np.ndarray, grid: OperandGrid, token_of: Callable | None = None
) -> np.ndarray:
    """``A * L`` with L[op1, op2] = logit_vector[token(result)] (token = result by default)."""
    res = grid.result if token_of is None else np.vectorize(token_of)(grid.result)
    lv = np.asarray(logit_vector, dtype=float)
    if res.min() < 0 or res.max() >= len(lv):
        raise LoopscopeError(
            f"result tokens {res.min()}..{res.max()} outside the logit vector (len {len(lv)})"
        )
    return np.asarray(A, dtype=float) * lv[res]


@dataclass(kw_only=True, repr=False)
class Classification(Result):
    """Scores of one grid against a heuristic list: ``scores`` frame, ``best`` (argmax) and
    ``matches`` (every heuristic with score >= threshold)."""

    scores: pd.DataFrame
    heuristics: list[Heuristic]
    threshold: float = THRESHOLD

    @property
    def best(self) -> Heuristic:
        return self.heuristics[int(np.nanargmax(self.scores["score"].to_numpy()))]

    @property
    def best_score(self) -> float:
        return float(np.nanmax(self.scores["score"].to_numpy()))

    @property
    def matches(self) -> list[Heuristic]:
        ok = self.scores["score"].to_numpy() >= self.threshold
        return [h for h, m in zip(self.heuristics, ok, strict=True) if m]

    def to_frame(self) -> pd.DataFrame:
        """One row per heuristic: heuristic, family, on, params, score, matched."""
        return self.scores.assign(matched=self.scores["score"] >= self.threshold)

    def summary(self) -> dict[str, float]:
        """Best score, number of matches, heuristics scored."""
        return float_summary(
            {
                "best_score": self.best_score,
                "n_matches": len(self.matches),
                "n_heuristics": len(self.heuristics),
            }
        )


@did_you_mean
def classify_heuristics(
    A: np.ndarray,
    grid: OperandGrid,
    heuristics: Sequence[Heuristic] | None = None,
    threshold: float = THRESHOLD,
) -> Classification:
    """Score grid ``A`` ``[n1, n2]`` against every heuristic (default: :func:`default_heuristics`).

    Args:
        A: activation grid ``[n1, n2]`` of one neuron over the operand grid.
        grid: the :class:`OperandGrid` (operands and results).
        heuristics: heuristics to score (default: :func:`default_heuristics` of ``grid``).
        threshold: a heuristic matches at score >= threshold (Nikankin et al.: 0.6).
    """
    A = np.asarray(A, dtype=float)
    if A.shape != grid.shape:
        raise LoopscopeError(
            f"activation grid {A.shape} does not match the operand grid {grid.shape}"
        )
    hs = list(default_heuristics(grid) if heuristics is None else heuristics)
    if not hs:
        raise LoopscopeError("no heuristics to score")
    scores = [heuristic_score(A, h.mask(grid)) for h in hs]
    frame = pd.DataFrame(
        {
            "heuristic": [h.name for h in hs],
            "family": [h.family for h in hs],
            "on": [h.on for h in hs],
            "params": [h.params for h in hs],
            "score": scores,
        }
    )
    return Classification(scores=frame, heuristics=hs, threshold=threshold)


def grid_activations(
    loop: Loop,
    tokens: Tensor,
    grid: OperandGrid,
    site: str,
    n_iter: int,
    *,
    position: int = -1,
    unit_dim: int = -1,
    seed: int = 0,
) -> Tensor:
    """Activations of ``site`` at ``position`` over the grid, per iteration: ``[T, units, n1, n2]``.

    ``tokens`` ``[n1 * n2, pos]`` are the grid's prompts in row-major (op1, op2) order; the unit
    axis (neurons) is ``unit_dim`` of the activation (default last).
    """
    n1, n2 = grid.shape
    if tokens.shape[0] != n1 * n2:
        raise LoopscopeError(f"need {n1 * n2} prompts (row-major op1 x op2), got {tokens.shape[0]}")
    tr = unroll(loop, tokens, n_iter, capture=[site], seed=seed)
    x = tr[site]  # [F, B, pos, ..., units]
    x = x.select(2, position)  # [F, B, ...]
    # activation axis d >= 2 sits at d + 1 in the trace and at d once the position axis is gone
    x = x.movedim(unit_dim, -1)
    x = x.reshape(x.shape[0], n1, n2, -1)
    return x.permute(0, 3, 1, 2).contiguous()


@did_you_mean
def heuristic_census(
    acts: Tensor | np.ndarray,
    grid: OperandGrid,
    heuristics: Sequence[Heuristic] | None = None,
    threshold: float = THRESHOLD,
    neurons: Sequence[int] | None = None,
) -> FrameResult:
    """Heuristic census: one row per (iteration, neuron) with the best heuristic, its score, the
    number of matches and their names.

    Args:
        acts: ``[T, units, n1, n2]`` grids (or ``[units, n1, n2]``), e.g. :func:`grid_activations`.
        grid: the :class:`OperandGrid`.
        heuristics: heuristics to score (default: :func:`default_heuristics` of ``grid``).
        threshold: a heuristic matches at score >= threshold.
        neurons: the neurons to classify (default: every unit).

    Returns:
        :class:`~loopscope.core.result.FrameResult`; columns iteration, neuron, best,
        best_score, n_matches, matches, classified (summary: ``mean_classified`` ...).
    """
    a = np.asarray(acts.detach().cpu() if isinstance(acts, Tensor) else acts, dtype=float)
    if a.ndim == 3:
        a = a[None]
    hs = list(default_heuristics(grid) if heuristics is None else heuristics)
    masks = [h.mask(grid) for h in hs]
    rows = []
    for t in range(a.shape[0]):
        for n in range(a.shape[1]) if neurons is None else neurons:
            sc = np.array([heuristic_score(a[t, n], m) for m in masks])
            best = int(np.nanargmax(sc))
            match = [hs[i].name for i in np.flatnonzero(sc >= threshold)]
            rows.append(
                {
                    "iteration": t,
                    "neuron": int(n),
                    "best": hs[best].name,
                    "best_score": float(sc[best]),
                    "n_matches": len(match),
                    "matches": match,
                    "classified": len(match) > 0,
                }
            )
    frame = pd.DataFrame(rows)
    return FrameResult(
        frame=frame,
        summary_columns=("best_score", "n_matches", "classified"),
        meta=result_meta(settings={"threshold": threshold, "n_heuristics": len(hs)}),
    )


# -- knockouts -----------------------------------------------------------------------------------


def _accuracy_with_masks(
    loop: Any,
    tokens: Tensor,
    answers: Tensor,
    site: str,
    masks: dict[int, Tensor],
    n_iter: int,
    position: int,
    answer_position: int,
    unit_dim: int,
    seed: int,
) -> np.ndarray:
    """Per-prompt correctness with units zeroed: ``masks[t]`` ``[B, units]`` (1 = knock out)."""

    def value(x: Tensor, label: tuple) -> Tensor:
        m = masks[label[0]].to(device=x.device, dtype=x.dtype)  # [B, units]
        out = x.clone()
        sl = out.select(1, position).movedim(unit_dim - 1 if unit_dim > 0 else unit_dim, -1)
        sl.mul_((1 - m).view(m.shape[0], *([1] * (sl.dim() - 2)), m.shape[1]))
        return out

    ivs = [Patch(site, sorted(masks), value=value)] if masks else []
    tr = unroll(loop, tokens, n_iter, interventions=ivs, seed=seed)
    lg = tr.decode()
    pred = lg[:, answer_position].argmax(-1) if lg.dim() >= 3 else lg.argmax(-1)
    return (pred.cpu() == torch.as_tensor(answers).reshape(-1)).numpy()


def _neurons_for(census: pd.DataFrame, name: str, t: int) -> list[int]:
    rows = census[(census["iteration"] == t) & census["matches"].apply(lambda m: name in m)]
    return sorted(rows["neuron"].astype(int).tolist())


@did_you_mean
def heuristic_knockout(
    loop: Loop,
    tokens: Tensor,
    answers: Tensor,
    grid: OperandGrid,
    site: str,
    census: FrameResult | pd.DataFrame,
    heuristic: Heuristic,
    *,
    n_iter: int,
    n_units: int,
    iterations: Sequence[int] | None = None,
    position: int = -1,
    answer_position: int = -1,
    unit_dim: int = -1,
    n_random: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Zero the neurons classified as ``heuristic`` (per iteration, from ``census``) at
    ``iterations`` (default every iteration of the census) and compare accuracy on associated
    prompts (in the heuristic's set) vs the others, against ``n_random`` equal-count random sets of
    non-associated neurons.

    Args:
        loop: a Loop. tokens: the grid's prompts ``[n1 * n2, pos]`` (row-major). answers: ``[B]``.
        grid: the :class:`OperandGrid`. site: the hook whose units are zeroed.
        census: :func:`heuristic_census` (or its frame).
        heuristic: the heuristic whose neurons are knocked out.
        n_iter: loop iterations. n_units: units along ``unit_dim``.
        iterations: iterations to knock out at (default: every iteration of the census).
        position: position of the zeroed activation. answer_position: position read out.
        unit_dim: the unit axis of the activation.
        n_random: equal-count random baselines. seed: baseline and initial-state seed.

    Returns:
        :class:`~loopscope.core.result.FrameResult`; rows condition, prompts, accuracy,
        baseline, drop, n_neurons, heuristic.
    """
    census = _census_frame(census)
    its = sorted(census["iteration"].unique().tolist()) if iterations is None else list(iterations)
    B = tokens.shape[0]
    assoc = heuristic.mask(grid).ravel()
    rng = np.random.default_rng(seed)
    base = _accuracy_with_masks(
        loop, tokens, answers, site, {}, n_iter, position, answer_position, unit_dim, seed
    )
    conditions: list[tuple[str, dict[int, Tensor], int]] = []
    chosen = {t: _neurons_for(census, heuristic.name, t) for t in its}
    n_total = sum(len(v) for v in chosen.values())
    if n_total == 0:
        raise LoopscopeError(f"no neuron is classified as {heuristic.name!r} at iterations {its}")

    def masks_for(sets: dict[int, list[int]]) -> dict[int, Tensor]:
        out = {}
        for t, ns in sets.items():
            m = torch.zeros(B, n_units)
            m[:, ns] = 1
            out[t] = m
        return out

    conditions.append(("heuristic", masks_for(chosen), n_total))
    for r in range(n_random):
        rand = {}
        for t, ns in chosen.items():
            pool = np.setdiff1d(np.arange(n_units), ns)
            rand[t] = sorted(rng.choice(pool, size=min(len(ns), len(pool)), replace=False).tolist())
        conditions.append((f"random_{r}", masks_for(rand), n_total))
    rows = []
    for name, masks, n in conditions:
        ok = _accuracy_with_masks(
            loop, tokens, answers, site, masks, n_iter, position, answer_position, unit_dim, seed
        )
        for which, sel in (("associated", assoc), ("other", ~assoc)):
            if not sel.any():
                continue
            rows.append(
                {
                    "condition": name,
                    "prompts": which,
                    "accuracy": float(ok[sel].mean()),
                    "baseline": float(base[sel].mean()),
                    "drop": float(base[sel].mean() - ok[sel].mean()),
                    "n_neurons": n,
                    "heuristic": heuristic.name,
                }
            )
    meta = result_meta(loop, seed=seed, settings={"heuristic": heuristic.name, "site": site})
    return FrameResult(frame=pd.DataFrame(rows), summary_columns=("drop",), meta=meta)


@did_you_mean
def prompt_guided_knockout(
    loop: Loop,
    tokens: Tensor,
    answers: Tensor,
    grid: OperandGrid,
    site: str,
    census: FrameResult | pd.DataFrame,
    heuristics: Sequence[Heuristic],
    *,
    n_iter: int,
    n_units: int,
    iterations: Sequence[int] | None = None,
    position: int = -1,
    answer_position: int = -1,
    unit_dim: int = -1,
    seed: int = 0,
) -> pd.DataFrame:
    """Per prompt, zero the neurons whose matched heuristics contain that prompt (per iteration),
    vs an equal-count random set of the other neurons. One batched run per condition; rows:
    condition, accuracy, baseline, drop, mean_neurons.

    Args:
        loop, tokens, answers, grid, site, census, n_iter, n_units, iterations, position,
            answer_position, unit_dim, seed: as in :func:`heuristic_knockout`.
        heuristics: the heuristics whose prompt sets guide the knockout.

    Returns:
        :class:`~loopscope.core.result.FrameResult` with one row per condition.
    """
    census = _census_frame(census)
    its = sorted(census["iteration"].unique().tolist()) if iterations is None else list(iterations)
    B = tokens.shape[0]
    by_name = {h.name: h.mask(grid).ravel() for h in heuristics}
    rng = np.random.default_rng(seed)
    guided = {t: torch.zeros(B, n_units) for t in its}
    rand = {t: torch.zeros(B, n_units) for t in its}
    counts = []
    for t in its:
        cen = census[census["iteration"] == t]
        for r in cen.itertuples():
            hits = np.zeros(B, dtype=bool)
            for name in r.matches:
                if name in by_name:
                    hits |= by_name[name]
            guided[t][torch.as_tensor(hits), int(r.neuron)] = 1
        for b in range(B):
            on = torch.nonzero(guided[t][b]).reshape(-1).numpy()
            pool = np.setdiff1d(np.arange(n_units), on)
            pick = rng.choice(pool, size=min(len(on), len(pool)), replace=False)
            rand[t][b, torch.as_tensor(pick, dtype=torch.long)] = 1
            counts.append(len(on))
    base = _accuracy_with_masks(
        loop, tokens, answers, site, {}, n_iter, position, answer_position, unit_dim, seed
    )
    rows = []
    for name, masks in (("prompt_guided", guided), ("random", rand)):
        ok = _accuracy_with_masks(
            loop, tokens, answers, site, masks, n_iter, position, answer_position, unit_dim, seed
        )
        rows.append(
            {
                "condition": name,
                "accuracy": float(ok.mean()),
                "baseline": float(base.mean()),
                "drop": float(base.mean() - ok.mean()),
                "mean_neurons": float(np.mean(counts)) if counts else 0.0,
            }
        )
    meta = result_meta(loop, seed=seed, settings={"site": site})
    return FrameResult(frame=pd.DataFrame(rows), summary_columns=("drop",), meta=meta)


def _census_frame(census: FrameResult | pd.DataFrame) -> pd.DataFrame:
    """The census table of a :func:`heuristic_census` result (or the table itself)."""
    if isinstance(census, Result):
        return census.to_frame()
    if not isinstance(census, pd.DataFrame):
        raise LoopscopeError(
            f"census must be a heuristic_census result or its frame, got {type(census).__name__}"
        )
    return census
