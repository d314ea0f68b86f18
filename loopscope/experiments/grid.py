"""Study grids: a TOML file expanded into train-then-analyse jobs, each keyed by a config hash.

A study file has ``[study]`` (name, description), ``[defaults]`` (the job every grid point starts
from: ``task``, ``preset``, ``seed`` and the tables ``train`` / ``model`` / ``task_params`` /
``analysis``), one ``[grid]`` or several ``[[grid]]`` tables (axes: key -> list of values; the
jobs are the union of each table's cartesian product) and ``[quick]`` (what ``--quick`` changes:
a list replaces that axis' values, an empty list drops the grid tables with that axis, a
scalar overrides that setting in every job). Dotted keys
address the nested tables: ``"model.n_core" = [1, 2]``, ``"train.steps" = 40``. The axis
``recipe`` starts a job from a zoo recipe (its training config and evaluation splits);
``checkpoint = "zoo"`` then measures the shipped model of that recipe instead of training it,
once its card's training config is checked to be the job's (same recipe, seed, steps)::

    [study]
    name = "demo"
    [defaults]
    task = "s3"
    preset = "fprm"
    train = { steps = 200, batch_size = 32 }
    [grid]
    seed = [0, 1, 2]
    "model.injection" = ["add", "convex"]
    [quick]
    "train.steps" = 20
    seed = [0, 1]

The job's key is the fingerprint of its whole resolved config (so any change to what a job
trains or measures gives a new key, and key order in the file never matters).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopscope.core.errors import LoopscopeError, did_you_mean, suggest
from loopscope.core.io import fingerprint

__all__ = ["Job", "Study", "load_study", "expand_grid", "JOB_FORMAT"]

#: bump when a job's row changes meaning (a new key for every job: old rows are not reused)
JOB_FORMAT = "loopscope.sweep.job/2"
#: bump when training changes meaning (a new training key: old checkpoints are not reused)
TRAIN_FORMAT = "loopscope.sweep.train/1"
_TABLES = ("train", "model", "task_params", "analysis")
_SCALARS = ("task", "preset", "seed", "recipe", "checkpoint")
_ANALYSIS_DEFAULTS: dict[str, Any] = {
    "splits": ["id", "ood"],
    "evals": {},
    "iter_factor": 3.0,
    "n": 64,
    "n_dyn": 4,
    "seed": 0,
}
_TRAIN_OWN = ("task", "preset", "task_params", "model_overrides", "seed")


@dataclass(kw_only=True)
class Job:
    """One train-then-analyse job of a study (a resolved grid point)."""

    task: str
    preset: str
    seed: int = 0
    recipe: str | None = None
    checkpoint: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)
    analysis: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-normal dict (tuples become lists) of everything that defines the job."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        """The job of ``to_dict`` output."""
        return cls(**d)

    @property
    def key(self) -> str:
        """Config hash: 16 hex chars of the resolved config (``axes`` is a label, not hashed)."""
        d = self.to_dict()
        d.pop("axes")
        return fingerprint({"format": JOB_FORMAT, **d})

    @property
    def train_key(self) -> str:
        """Hash of the training config alone: jobs that differ only in what they measure share
        it (and one checkpoint), so changing the analysis never retrains."""
        return fingerprint({"format": TRAIN_FORMAT, **self.train_config().to_dict()})

    @property
    def label(self) -> str:
        """Short human name: the grid point's axis values."""
        parts = [f"{k}={v}" for k, v in self.axes.items()]
        return ", ".join(parts) or f"{self.task}/{self.preset} seed={self.seed}"

    def train_config(self) -> Any:
        """The :class:`~loopscope.train.TrainConfig` of this job (progress off, no evals)."""
        from loopscope.train import TrainConfig

        return TrainConfig.from_dict(
            {
                **self.train,
                "task": self.task,
                "preset": self.preset,
                "task_params": dict(self.task_params),
                "model_overrides": dict(self.model),
                "seed": int(self.seed),
            }
        )


@dataclass(kw_only=True)
class Study:
    """A named list of jobs (from :func:`load_study`)."""

    name: str
    jobs: list[Job]
    description: str = ""
    quick: bool = False


def _set(d: dict[str, Any], key: str, value: Any, where: str) -> None:
    """``d["model"]["n_core"] = value`` for key ``"model.n_core"``; unknown heads raise."""
    head, _, rest = key.partition(".")
    if head == "task" and rest:  # "task.size" is a task parameter
        head = "task_params"
    if head in _SCALARS and not rest:
        d[head] = value
    elif head in _TABLES and rest:
        d.setdefault(head, {})[rest] = value
    else:
        allowed = [*_SCALARS, *(f"{t}.<name>" for t in _TABLES)]
        raise LoopscopeError(
            f"{where}: unknown key {key!r}{suggest(head, [*_SCALARS, *_TABLES])}; keys: {', '.join(allowed)}"
        )


def _recipe_base(name: str) -> dict[str, Any]:
    from loopscope.zoo.recipes import RECIPES

    if name not in RECIPES:
        raise LoopscopeError(f"unknown zoo recipe {name!r}{suggest(name, RECIPES)}")
    r = RECIPES[name]
    tc = r.train.to_dict()
    return {
        "task": tc["task"],
        "preset": tc["preset"],
        "task_params": dict(tc["task_params"]),
        "model": dict(tc["model_overrides"]),
        "train": {k: v for k, v in tc.items() if k not in _TRAIN_OWN},
        "analysis": {"splits": list(r.evals), "evals": copy.deepcopy(r.evals)},
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in _TABLES:
            out.setdefault(k, {}).update(copy.deepcopy(v))
        else:
            out[k] = v
    return out


def _flat(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A TOML table with nested sub-tables -> dotted keys (``{"model": {"a": 1}}`` -> ``model.a``)."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict) and k in (*_TABLES, "task"):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[k] = v
    return out


def _resolve(defaults: dict, point: dict, quick: dict) -> Job:
    """defaults < recipe < grid point < quick scalars (later wins)."""
    over: dict[str, Any] = {}
    for k, v in {**defaults, **point}.items():
        _set(over, k, v, "grid")
    d = _recipe_base(over["recipe"]) if over.get("recipe") else {}
    d = _merge(d, over)
    for k, v in quick.items():
        if not isinstance(v, list):
            _set(d, k, v, "[quick]")
    d["analysis"] = {**_ANALYSIS_DEFAULTS, **d.get("analysis", {})}
    for need in ("task", "preset"):
        if need not in d:
            raise LoopscopeError(f"a job has no {need!r}: set it in [defaults] or the grid")
    if "seed" in d.get("train", {}):
        raise LoopscopeError("set the training seed as 'seed', not 'train.seed'")
    if d.get("checkpoint") not in (None, "zoo"):
        raise LoopscopeError(f'checkpoint must be "zoo" (or absent), got {d["checkpoint"]!r}')
    if d.get("checkpoint") == "zoo" and not d.get("recipe"):
        raise LoopscopeError('checkpoint = "zoo" needs a recipe (the zoo model of that name)')
    return Job(**d, axes={k: v for k, v in point.items()})


def _check_names(job: Job, seen: set) -> None:
    """Unknown task, preset or knob names are one-line errors at load time (with a suggestion);
    bad values (e.g. ``norm = "bogus"``) are left to the job, which records its error."""
    import dataclasses

    from loopscope import tasks
    from loopscope.models.presets import PRESETS
    from loopscope.train import TrainConfig

    if job.preset not in PRESETS:
        raise LoopscopeError(
            f"unknown preset {job.preset!r}{suggest(job.preset, PRESETS)}; presets: {', '.join(PRESETS)}"
        )
    groups = (
        ("model", job.model, [f.name for f in dataclasses.fields(PRESETS[job.preset][0])]),
        ("train", job.train, [f.name for f in dataclasses.fields(TrainConfig) if f.name not in _TRAIN_OWN]),
        ("analysis", job.analysis, [*_ANALYSIS_DEFAULTS, "verdict"]),
    )  # fmt: skip
    for table, values, known in groups:
        for k in values:
            if k not in known:
                raise LoopscopeError(
                    f"unknown knob {table}.{k}{suggest(k, known)} (preset {job.preset!r})"
                )
    key = json.dumps([job.task, job.task_params], sort_keys=True, default=str)
    if key not in seen:  # each task once: constructing one validates its name and parameters
        tasks.get(job.task, **job.task_params)
        seen.add(key)


def _axes(grid: dict[str, Any], quick: dict[str, Any] | None) -> dict[str, list]:
    axes = {}
    for k, v in _flat(grid, "[grid]").items():
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise LoopscopeError(f"grid axis {k!r} has no values")
        if quick is not None and isinstance(quick.get(k), list):
            vals = quick[k]  # [] in [quick]: the grid table has no quick jobs (empty product)
        axes[k] = vals
    return axes


@did_you_mean
def expand_grid(config: dict[str, Any], *, quick: bool = False) -> list[Job]:
    """The jobs of a parsed study config (see the module docstring), duplicates dropped.

    Example:
        >>> jobs = expand_grid({"defaults": {"task": "s3", "preset": "fprm"},
        ...                     "grid": {"seed": [0, 1], "model.n_core": [1, 2]}})
        >>> [(j.seed, j.model["n_core"]) for j in jobs]
        [(0, 1), (0, 2), (1, 1), (1, 2)]
    """
    unknown = set(config) - {"study", "defaults", "grid", "quick"}
    if unknown:
        k = sorted(unknown)[0]
        raise LoopscopeError(
            f"unknown study table [{k}]{suggest(k, ['study', 'defaults', 'grid', 'quick'])}"
        )
    defaults = _flat(config.get("defaults", {}), "[defaults]")
    qk = _flat(config.get("quick", {}), "[quick]") if quick else {}
    grids = config.get("grid", {})
    grids = grids if isinstance(grids, list) else [grids]
    jobs: dict[str, Job] = {}
    seen: set = set()
    for grid in grids:
        axes = _axes(grid, qk if quick else None)
        for values in itertools.product(*axes.values()):
            job = _resolve(defaults, dict(zip(axes, values, strict=True)), qk)
            _check_names(job, seen)
            jobs.setdefault(job.key, job)
    return list(jobs.values())


@did_you_mean
def load_study(path: str | Path = "studies/architecture.toml", *, quick: bool = False) -> Study:
    """Parse a study TOML file into a :class:`Study` (``quick`` applies its ``[quick]`` table)."""
    path = Path(path)
    if not path.exists():
        raise LoopscopeError(f"study file not found: {path}")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LoopscopeError(f"{path}: invalid TOML: {e}") from None
    meta = config.get("study", {})
    return Study(
        name=str(meta.get("name", path.stem)),
        description=str(meta.get("description", "")),
        jobs=expand_grid(config, quick=quick),
        quick=quick,
    )
