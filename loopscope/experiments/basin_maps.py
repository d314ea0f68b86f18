"""Basin maps: where a loop's end state depends on where it starts, and what each basin is.

:func:`basin_map` looks for the basins of one model on one split's inputs:

1. around the model's own initial state ``h_0`` of each of ``n_inputs`` inputs it starts
   ``n_inits`` states on each sphere ``||h - h_0|| = r x scale`` (``r`` in ``radii``; ``scale`` =
   ``||h_0||``, or ``sqrt(n)`` for a zero init: the norm of a unit-entry Gaussian state) and
   records the decoded answer each one ends on after the split's budget
   (:func:`loopscope.analysis.basins`, :class:`~loopscope.analysis.attractors.ShellSeeds`);
2. it keeps the input whose inits reach the most distinct answers (basins that differ), and
   maps the 2-D slice ``h_0 + a u + b v`` (``u``, ``v`` random orthonormal directions, ``a, b``
   in ``[-R, R] x scale``) on a ``resolution x resolution`` grid, ``R`` the smallest radius at
   which under half of the inits end where ``h_0`` ends (so the map crosses a basin boundary),
   else the largest radius;
3. every answer is named: ``correct`` or ``wrong at k/P`` labelled positions, with what most of
   its seeds end on (a fixed point, a p-cycle, ``settled``: relative step < 1e-3 at the budget,
   or ``still moving``); the share of the shell's inits in each basin per radius comes with a
   Wilson 95 % CI.

Example:
    >>> from loopscope import zoo                                       # doctest: +SKIP
    >>> bm = basin_map(zoo.load("s3_act"), zoo.task_of("s3_act"), split="ood")
    >>> bm.to_frame()[["radius", "label", "fraction", "ci_low", "ci_high"]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.experiments.common import check_splits

__all__ = ["basin_map", "BasinMap", "paper_basin_frames", "N_COLOURS", "PAPER_MODELS"]

#: answers with their own colour (the rest are pooled as "other answers")
N_COLOURS = 7


@dataclass(kw_only=True, repr=False)
class BasinMap(Result):
    """One model's basin map.

    Attributes:
        grid: one row per grid point: ``alpha``, ``beta`` (in units of ``scale``), ``answer_id``
            (index into ``answers``; -1 = diverged), ``correct``.
        fractions: per ``radius`` (units of ``scale``; 0 = the model's own init) and answer:
            ``count``, ``n``, ``fraction`` with Wilson ``ci_low`` / ``ci_high``.
        answers: one row per named answer: ``answer_id``, ``label``, ``correct``, ``kind``,
            ``wrong_positions``.
        inputs: per input: ``sample``, ``n_answers`` over every shell init, ``own_correct``
            (the answer from ``h_0``), ``correct_fraction`` (over the shell inits).
    """

    grid: pd.DataFrame
    fractions: pd.DataFrame
    answers: pd.DataFrame
    inputs: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        """The basin fractions per radius with their answer labels (tidy)."""
        return self.fractions.merge(self.answers, on="answer_id", how="left")

    def summary(self) -> dict[str, float]:
        """Answers on the map, its correct-basin share, inputs with several basins."""
        g = self.grid
        return float_summary(
            {
                "n_answers_on_map": float(g.loc[g["answer_id"] >= 0, "answer_id"].nunique()),
                "map_correct_fraction": float(g["correct"].mean()),
                "inputs_with_several_basins": float((self.inputs["n_answers"] > 1).mean()),
                "shell_correct_fraction": float(self.inputs["correct_fraction"].mean()),
            }
        )


def _budget(model: Any, split: str, length: int, n_iter: int | None) -> int:
    """``n_iter``, else the zoo card's evaluation budget for the split, else 2 x length."""
    if n_iter is not None:
        return int(n_iter)
    name = getattr(model, "zoo_name", None)
    if name is not None:
        from loopscope import zoo

        try:
            rule = zoo.card(name).get("evals", {}).get(split, {})
        except LoopscopeError:
            rule = {}
        if "n_iter" in rule:
            return int(rule["n_iter"])
        if "iter_factor" in rule:
            return max(2, round(float(rule["iter_factor"]) * length))
    return max(2, 2 * length)


def _wrong_positions(answer: str, target: np.ndarray) -> tuple[int, int]:
    """(wrong, labelled) positions of a decoded answer string against one input's targets."""
    a = np.array([int(x) for x in answer.split(",")]) if answer else np.zeros(0, dtype=int)
    t = target.reshape(-1)
    if a.size != t.size:  # readout over fewer positions than the input: align on the right
        k = min(a.size, t.size)
        a, t = a[-k:], t[-k:]
    lab = t != -100
    return int((a[lab] != t[lab]).sum()), int(lab.sum())


def _kind_of(res: Any) -> pd.Series:
    """Per seed of a :class:`BasinResult`: the attractor it ends on (``fixed point``,
    ``p-cycle``), else ``settled`` (relative step < 1e-3 at the budget, the confident-wrong
    tolerance) or ``still moving``; ``diverged`` where it blew up."""
    seeds, att = res.seeds, res.attractors
    kinds = {}
    for r in att.itertuples():
        if r.kind == "fixed_point":
            kinds[(int(r.sample), int(r.attractor))] = "fixed point"
        elif r.kind == "cycle":
            kinds[(int(r.sample), int(r.attractor))] = f"{int(r.period)}-cycle"
    S, B = res.end_states.shape[0], res.end_states.shape[1]
    norms = res.end_states.reshape(S, B, -1).double().norm(dim=-1).numpy()
    rel = seeds["end_residual"].to_numpy(dtype=float) / np.maximum(
        norms[seeds["seed"].to_numpy(), seeds["sample"].to_numpy()], 1.0
    )
    out = [
        kinds.get((int(b), int(a)), "settled" if r < 1e-3 else "still moving")
        for b, a, r in zip(seeds["sample"], seeds["attractor"], rel, strict=True)
    ]
    return pd.Series(out, index=seeds.index).where(~seeds["diverged"].astype(bool), "diverged")


def _orthonormal(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    v = v - (v @ u) * u
    return u, v / v.norm()


def _pick_input(shell: pd.DataFrame) -> int:
    """The input whose inits reach the most answers (ties: its own init right, then the correct
    share nearest one half)."""
    ok = shell[~shell["diverged"]]
    n_ans = ok.groupby("sample")["answer"].nunique().reindex(shell["sample"].unique(), fill_value=0)
    corr = shell.groupby("sample")["correct"].mean().astype(float)
    own = shell[shell["radius"] == 0].set_index("sample")["correct"].astype(float)
    key = pd.DataFrame({"n": n_ans, "own": own, "mid": -(corr - 0.5).abs()})
    return int(key.sort_values(["n", "own", "mid"], ascending=False).index[0])


def _map_radius(mine: pd.DataFrame, radii: tuple[float, ...], scale: float) -> float:
    """The smallest radius (units of scale) at which under half of the inits end where the own
    init ends (a basin boundary lies inside it), else the largest."""
    home = mine.loc[mine["radius"] == 0, "answer"]
    if home.empty:
        return max(radii)
    for r in radii:
        g = mine[np.isclose(mine["radius"], r * scale)]
        if len(g) and float((g["answer"] == home.iloc[0]).mean()) <= 0.5:
            return r
    return max(radii)


def _name_answers(seeds: pd.DataFrame, target: np.ndarray, n_colours: int) -> pd.DataFrame:
    """Answers ranked by how many seeds (map + shell) end on them; the first ``n_colours`` named,
    the rest pooled as ``other``."""
    ok = seeds[~seeds["diverged"]]
    counts = ok["answer"].value_counts()
    right = [a for a in counts.index if _wrong_positions(str(a), target)[0] == 0]
    order = right + [a for a in counts.index if a not in right]  # the correct answer is named
    rows = []
    for i, ans in enumerate(order):
        wrong, lab = _wrong_positions(str(ans), target)
        kinds = ok.loc[ok["answer"] == ans, "kind"].value_counts()
        kind = str(kinds.index[0]) if len(kinds) else "still moving"
        rows.append(
            {
                "answer": ans,
                "answer_id": min(i, n_colours),
                "correct": wrong == 0,
                "kind": kind,
                "wrong_positions": wrong,
                "labelled_positions": lab,
            }
        )
    df = pd.DataFrame(rows)
    if not len(df):
        return df
    named = df[df["answer_id"] < n_colours].copy()
    named["label"] = [
        ("correct" if r.correct else f"wrong at {r.wrong_positions}/{r.labelled_positions}")
        + f" ({r.kind})"
        for r in named.itertuples()
    ]
    rest = df[df["answer_id"] >= n_colours]
    if len(rest):
        other = rest.iloc[:1].copy()
        other["label"] = f"{len(rest)} other answers" + (
            " (one correct)" if rest["correct"].any() else ""
        )
        other["correct"] = bool(rest["correct"].any())
        named = pd.concat([named, other], ignore_index=True)
    return named.assign(answer_id=named["answer_id"].astype(int))


def _check(n_inputs: int, n_inits: int, radii: Any, resolution: int) -> tuple[float, ...]:
    for name, v, lo in (("n_inputs", n_inputs, 1), ("n_inits", n_inits, 1), ("resolution", resolution, 3)):  # fmt: skip
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise LoopscopeError(f"{name} must be an integer >= {lo}, got {v!r}")
    r = tuple(float(x) for x in radii)
    if not r or any(not math.isfinite(x) or x <= 0 for x in r):
        raise LoopscopeError(f"radii must be positive numbers, got {radii!r}")
    return tuple(sorted(r))


@did_you_mean
def basin_map(
    model: Any,
    task: Any,
    *,
    split: str = "ood",
    n_inputs: int = 8,
    n_inits: int = 24,
    radii: tuple[float, ...] | list[float] = (0.03, 0.1, 0.3, 1.0, 3.0),
    resolution: int = 31,
    n_iter: int | None = None,
    seed: int = 0,
    model_name: str | None = None,
) -> BasinMap:
    """Map the basins of ``model`` on ``split`` inputs (see the module docstring).

    Args:
        model: a Loop with a readout.
        task: a loopscope task (targets name each answer correct or wrong).
        split: the task split (OOD inputs are where basins differ).
        n_inputs: inputs searched for several basins.
        n_inits: inits per sphere per input.
        radii: sphere radii in units of ``scale``; the map spans the smallest one at which
            under half of the inits end where ``h_0`` ends (a boundary inside), else the largest.
        resolution: grid points per side of the map (at most 7 when no input reached a
            second answer from any sphere: the slice is one basin).
        n_iter: iterations per init (default: the zoo card's budget for the split, else 2 x
            length).
        seed: seed of the inputs, the init, the directions and the shells.
        model_name: the name in ``meta`` (default: the zoo name).
    """
    from loopscope.analysis import basins
    from loopscope.analysis.attractors import GridSeeds, ShellSeeds
    from loopscope.analysis.loopmap import LoopMap

    radii = _check(n_inputs, n_inits, radii, resolution)
    split = check_splits(task, [split])[0]
    name = model_name or getattr(model, "zoo_name", None) or type(model).__name__
    b = task.sample(n_inputs, split, seed=seed)
    T = _budget(model, split, b.length, n_iter)
    h0 = LoopMap(model, b.tokens).init(torch.Generator().manual_seed(seed))  # [B, n] float64
    n = h0.shape[1]
    norms = h0.norm(dim=1)
    scale = float(norms.median()) if float(norms.median()) > 0 else math.sqrt(n)
    sh = basins(
        model,
        b.tokens,
        seeds=ShellSeeds(center=h0, radii=[r * scale for r in radii], n_per_radius=n_inits),
        n_iter=T,
        targets=b.targets,
        seed=seed,
    )
    shell = sh.seeds.assign(kind=_kind_of(sh))
    s = _pick_input(shell)
    mine = shell[shell["sample"] == s]
    u, v = _orthonormal(n, torch.Generator().manual_seed(seed + 1))
    R = _map_radius(mine, radii, scale)
    if int(shell.loc[~shell["diverged"]].groupby("sample")["answer"].nunique().max()) <= 1:
        # no input reached a second answer from any sphere: one basin, mapped coarsely
        resolution = min(resolution, 7)
    gb = basins(
        model,
        b.tokens[s : s + 1],
        seeds=GridSeeds(center=h0[s], u=u, v=v, extent=R * scale, resolution=resolution),
        n_iter=T,
        targets=b.targets[s : s + 1],
        seed=seed,
    )
    grid = gb.seeds.assign(kind=_kind_of(gb))
    target = b.targets[s].numpy()
    answers = _name_answers(pd.concat([grid, mine], ignore_index=True), target, N_COLOURS)
    amap = dict(zip(answers["answer"], answers["answer_id"], strict=True)) if len(answers) else {}
    rest_id = N_COLOURS

    def ids(df: pd.DataFrame) -> pd.Series:
        a = df["answer"].map(amap).fillna(rest_id).astype(int)
        return a.where(~df["diverged"], -1)

    grid_out = pd.DataFrame(
        {
            "alpha": grid["alpha"] / scale,
            "beta": grid["beta"] / scale,
            "answer_id": ids(grid),
            "correct": grid["correct"].astype(bool),
        }
    )
    fr = _fractions(mine.assign(answer_id=ids(mine)), scale)
    inputs = _inputs(shell)
    answers = answers.drop(columns=["answer"]).reset_index(drop=True)
    meta = result_meta(
        model,
        seed=seed,
        model=name,
        split=split,
        settings={
            "sample": s, "n_iter": T, "scale": scale, "radii": list(radii), "map_radius": R,
            "n_inits": n_inits,
            "resolution": resolution, "n_inputs": n_inputs, "state_dim": n,
        },
    )  # fmt: skip
    return BasinMap(grid=grid_out, fractions=fr, answers=answers, inputs=inputs, meta=meta)


def _fractions(mine: pd.DataFrame, scale: float) -> pd.DataFrame:
    from loopscope.analysis.stats import wilson_ci

    rows = []
    every = sorted(mine["answer_id"].unique())
    for r, g in mine.groupby("radius"):
        counts = g["answer_id"].value_counts()
        for a in every:  # an answer no init reached at this radius is a measured 0
            k = int(counts.get(a, 0))
            lo, hi = wilson_ci(k, len(g))
            rows.append(
                {
                    "radius": float(r) / scale,
                    "answer_id": int(a),
                    "count": k,
                    "n": len(g),
                    "fraction": k / len(g),
                    "ci_low": float(lo),
                    "ci_high": float(hi),
                }
            )
    return pd.DataFrame(rows).sort_values(["radius", "answer_id"], ignore_index=True)


def _inputs(shell: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for b, g in shell.groupby("sample"):
        own = g[g["radius"] == 0.0]
        rows.append(
            {
                "sample": int(b),
                "n_answers": int(g.loc[~g["diverged"], "answer"].nunique()),
                "own_correct": bool(own["correct"].iloc[0]) if len(own) else False,
                "correct_fraction": float(g.loc[g["radius"] > 0, "correct"].mean()),
            }
        )
    return pd.DataFrame(rows)


#: the paper's basin-map models: OOD correct-basin fraction well below 1 (docs/results.md)
PAPER_MODELS = ("s3_act", "sudoku4_hrm", "s3_rope")


def paper_basin_frames(
    load: Any, *, quick: bool = True, seed: int = 0, models: tuple[str, ...] = PAPER_MODELS
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """The frames of the paper's ``basins`` figure (grid, fractions, answers, each with a
    ``model`` column; ``answers`` carries the panel ``title``) and its caption.

    ``load(name) -> (model, task)``; quick: 4 inputs, 6 inits per sphere, a 13 x 13 map (about
    30 CPU-seconds); full: 16 inputs, 32 inits, 41 x 41.
    """
    n_inputs, n_inits, res = (4, 6, 13) if quick else (16, 32, 41)
    G, F, A, notes = [], [], [], []
    for name in models:
        model, task = load(name)
        bm = basin_map(
            model, task, split="ood", n_inputs=n_inputs, n_inits=n_inits, resolution=res,
            seed=seed, model_name=name,
        )  # fmt: skip
        m = bm.meta
        several = int((bm.inputs["n_answers"] > 1).sum())
        title = (
            f"{name}: OOD input {m['sample']} of {n_inputs}, {m['n_iter']} iterations; "
            f"slice radius {m['map_radius']:g} x scale ({m['scale']:.3g})"
        )
        G.append(bm.grid.assign(model=name))
        F.append(bm.fractions.assign(model=name))
        A.append(bm.answers.assign(model=name, title=title))
        notes.append(f"{name}: {several}/{n_inputs} inputs reach more than one answer")
    cap = (
        "Basins of attraction on OOD inputs. Left: the decoded answer each initial state of a 2-D "
        "slice h_0 + a u + b v ends on (u, v random orthonormal directions; a, b in units of "
        "scale = ||h_0||, or sqrt(dim) for a zero init; star = the model's own init, dashed = the "
        "spheres of the right panel); each colour is named by its answer (correct, or wrong at "
        "k of P labelled positions) and what its inits end on (fixed point, p-cycle, settled = "
        "relative step < 1e-3 at the budget, still moving). The input is the one, of those "
        "searched, whose inits reach the most answers; the slice radius is the smallest sphere "
        "on which under half the inits end where h_0 ends. Right: share of "
        f"{n_inits} inits on each sphere ||h - h_0|| = r x scale in each basin (95 % Wilson CI). "
        + "; ".join(notes)
        + "."
    )
    return (
        pd.concat(G, ignore_index=True),
        pd.concat(F, ignore_index=True),
        pd.concat(A, ignore_index=True),
        cap,
    )
