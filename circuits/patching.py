"""Per-iteration activation patching, batched: many patches per forward along the batch axis.

``patch_sweep`` runs the clean and corrupted inputs once (capturing the sites), then evaluates
every (site x iteration x position [x unit]) patch for every example, ``batch_size`` patches per
forward: the corrupted (denoising) or clean (noising) input is repeated and each batch row gets its
own patch through one row-aware intervention per site (:mod:`loopscope.circuits.engine`). A patch
at iteration t leaves iterations < t bit-identical. Output: a tidy frame, one row per (patch,
example), one column per metric; ``recovery`` is the normalised metric
(m_pt - m_corr) / (m_clean - m_corr).

Long sweeps: ``checkpoint_dir=`` writes every finished forward chunk (``batch_size`` patch rows)
atomically to that folder (safetensors + a JSON manifest fingerprinting the sweep: model weights,
inputs, sites, iterations, positions, units, direction, seed, batch_size ...); re-running with the
same folder after an interruption (even ``kill -9``) skips the finished chunks and returns a frame
identical to an uninterrupted run. A folder holding a different sweep is refused, never mixed.
Before running, the sweep estimates its memory (source captures of the clean and corrupted runs,
reference states, one forward chunk) and refuses over ``max_bytes`` (default: half the free
memory, as for captures) with the estimate and the way out.

Directions (Heimersheim & Nanda): "denoise" = corrupted run + one clean activation (sufficiency),
"noise" = clean run + one corrupted activation (necessity); they are not mirror images (AND/OR
gates), so "both" is recommended.

``state_transplant`` gives the recovery curve R(t) when the clean state h_t is transplanted into
the corrupted run at iteration t (measured at T and at T + extra).

Example:
    >>> import torch
    >>> from loopscope.circuits import toys
    >>> gate = toys.GateLoop("or")
    >>> df = patch_sweep(gate, torch.tensor([[1, 1]]), torch.tensor([[0, 0]]), ["hook_A"], "all",
    ...                  toys.gate_metric, n_iter=1, direction="both")
    >>> df[["direction", "recovery"]].values.tolist()
    [['denoise', 1.0], ['noise', 1.0]]
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.circuits.corruptions import STRPairs, as_corruption
from loopscope.circuits.engine import (
    Elements,
    Source,
    canonical_sites,
    fires_in_encode,
    init_states,
    run_rows,
    site_info,
)
from loopscope.circuits.metrics import AnswerMetric, kl_columns, normalised
from loopscope.core.capture import available_memory_bytes
from loopscope.core.errors import (
    CaptureMemoryError,
    CheckpointError,
    LoopscopeError,
    check_positive_int,
    did_you_mean,
)
from loopscope.core.interventions import Transplant
from loopscope.core.io import ChunkCheckpoint, fingerprint
from loopscope.core.loop import Loop, batch_size_of, select_batch
from loopscope.core.result import Result, result_meta
from loopscope.core.unroll import unroll

__all__ = ["patch_sweep", "state_transplant", "SweepResult", "resolve_metric"]


@dataclass(kw_only=True, repr=False)
class SweepResult(Result):
    """A patching sweep: a tidy table, one row per (patch, example), plus run facts.

    Attributes:
        frame: the table (see :func:`patch_sweep` for its columns); ``to_frame()`` returns a copy
            with ``sample`` (= ``example``) as a column.
        checkpoint: with ``checkpoint_dir``, the chunk counts ``{"dir", "total", "resumed",
            "computed"}``; otherwise None.
        meta: model, seed, n_iter, measured_at, corruption kind and flags (``result_meta``).

    Example::

        res = patch_sweep(loop, clean, corrupt, ["hook_A"], n_iter=3, metric=m)
        res.to_frame().groupby("iteration")["recovery"].mean()
    """

    frame: pd.DataFrame
    checkpoint: dict[str, Any] | None = None

    def to_frame(self) -> pd.DataFrame:
        f = self.frame.copy()
        if "example" in f and "sample" not in f:
            f.insert(f.columns.get_loc("example"), "sample", f["example"].to_numpy())
        return f

    def summary(self) -> dict[str, float]:
        """Mean recovery (per direction when there are several), diverged fraction, rows."""
        f = self.frame
        out: dict[str, float] = {"n_rows": float(len(f))}
        if "recovery" in f:
            out["mean_recovery"] = float(f["recovery"].astype(float).mean())
            if "direction" in f and f["direction"].nunique() > 1:
                for d, g in f.groupby("direction", sort=True):
                    out[f"mean_recovery_{d}"] = float(g["recovery"].astype(float).mean())
        if "diverged" in f:
            out["diverged_fraction"] = float(f["diverged"].astype(float).mean())
        return out

    def __len__(self) -> int:
        return len(self.frame)


def resolve_metric(metric: Any, corrupt: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The metric callable; ``None`` takes the STR pairs' logit-difference metric."""
    if metric is None:
        if isinstance(corrupt, STRPairs):
            return corrupt.metric()
        raise LoopscopeError(
            "metric is required (fn(logits, example_idx) -> [R]) unless corrupt is STRPairs"
        )
    if not callable(metric):
        raise LoopscopeError(
            f"metric must be callable fn(logits, example_idx), got {type(metric).__name__}"
        )
    return metric


def _metric_columns(
    metric: Callable,
    lg: Tensor,
    idx: Tensor,
    clean_lg: Tensor,
    corr_lg: Tensor,
    direction: str | None = None,
) -> dict[str, Tensor]:
    vals = {"metric": torch.as_tensor(metric(lg, idx)).double().reshape(-1)}
    if len(vals["metric"]) != len(idx):
        raise LoopscopeError(
            f"metric must return one value per row ({len(idx)}), got {tuple(vals['metric'].shape)}"
        )
    if isinstance(metric, AnswerMetric):
        vals.update(metric.columns(lg, idx, clean_lg[idx], corr_lg[idx], direction))
    elif lg.is_floating_point() and lg.dim() >= 2:
        vals.update(kl_columns(lg, clean_lg[idx], corr_lg[idx]))
    return {k: v.detach().double().cpu() for k, v in vals.items()}


def _iterations(its: Any, n_iter: int) -> list[int] | None:
    if isinstance(its, str):
        if its != "all":
            raise LoopscopeError(f"iterations must be 'all' or a list of ints, got {its!r}")
        return None
    if isinstance(its, int) and not isinstance(its, bool):
        its = [its]
    out = []
    for t in its:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise LoopscopeError(f"iterations must be ints, got {t!r}")
        if not 0 <= int(t) < n_iter:
            raise LoopscopeError(
                f"iterations: iteration {int(t)} out of range 0..{n_iter - 1} (n_iter={n_iter})"
            )
        out.append(int(t))
    return out


def _positions(positions: Any, n_pos: int, site: str) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    out = []
    for p in positions:
        p = int(p)
        if not -n_pos <= p < n_pos:
            raise LoopscopeError(f"position {p} out of range for {site!r} ({n_pos} positions)")
        out.append(p % n_pos)
    return out


def _base_runs(
    loop: Any,
    clean: Any,
    corruption: Any,
    sites: list[str],
    n_iter: int,
    seed: int,
    read_at: int,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Clean and corrupted reference runs (captured sites, initial states, readouts)."""
    B = batch_size_of(clean)
    if B is None:
        raise LoopscopeError("clean inputs need a leading batch axis")
    Bc = batch_size_of(corruption.inputs)
    if isinstance(clean, Tensor) and isinstance(corruption.inputs, Tensor):
        if clean.shape != corruption.inputs.shape:
            raise LoopscopeError(
                f"clean and corrupt inputs must have the same shape, got {tuple(clean.shape)} vs "
                f"{tuple(corruption.inputs.shape)}"
            )
    elif Bc != B:
        raise LoopscopeError(f"clean and corrupt batches differ in size: {B} vs {Bc}")
    T = max(n_iter, read_at)
    h0c = init_states(loop, clean, seed)
    h0k = init_states(loop, corruption.inputs, seed)
    every = torch.arange(B)
    extra = corruption.interventions(every) if corruption.interventions is not None else []
    cap = {"capture": sites, "max_bytes": max_bytes}
    tc = unroll(loop, clean, T, init=h0c, **cap)
    tk = unroll(loop, corruption.inputs, T, init=h0k, interventions=extra, **cap)
    return {
        "B": B,
        "h0_clean": h0c,
        "h0_corrupt": h0k,
        "clean": tc,
        "corrupt": tk,
        "src_clean": Source.from_trace(tc, sites),
        "src_corrupt": Source.from_trace(tk, sites),
        "lg_clean": tc.decode(read_at),
        "lg_corrupt": tk.decode(read_at),
    }


def run_jobs(
    loop: Any,
    base: dict[str, Any],
    corruption: Any,
    direction: str,
    jobs: Sequence[tuple[int, list[tuple[str, int, int, int]]]],
    infos: dict,
    metric: Callable,
    n_iter: int,
    read_at: int,
    batch_size: int,
    reuse_prefix: bool = True,
    store: ChunkCheckpoint | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate patch *jobs* ``(example, [(site, t, pos, unit), ...])``, one job per batch row.

    denoise: corrupted run, elements from the clean run; noise: clean run, elements from the
    corrupted run. With ``reuse_prefix`` a job whose earliest element is at iteration s starts
    from the unpatched run's state h_s (iterations before a patch are identical to it), so rows
    are grouped by s and only iterate from s on. Returns metric columns (arrays of len(jobs)).

    With ``store`` every forward chunk is saved as ``<direction>-<k>`` once finished, and chunks
    already in the store are read back instead of recomputed (the chunking is a pure function of
    the jobs and ``batch_size``, which the store's fingerprint pins).
    """
    if direction == "denoise":
        inputs, h0, src = corruption.inputs, base["h0_corrupt"], base["src_clean"]
        extra, run = corruption.interventions, base["corrupt"]
    else:
        inputs, h0, src = base["clean_inputs"], base["h0_clean"], base["src_corrupt"]
        extra, run = None, base["clean"]
    states = run.states
    frozen = (run.diverged_at >= 0).numpy()  # diverged examples are frozen: replay them in full
    sites = sorted({e[0] for _, els in jobs for e in els})
    shift = reuse_prefix and extra is None and not fires_in_encode(loop, inputs, sites)
    starts = np.array(
        [min((e[1] for e in els), default=0) if shift and not frozen[b] else 0 for b, els in jobs]
    )
    order = np.argsort(starts, kind="stable")
    cols: dict[str, np.ndarray] = {}
    # one group per start (merging starts would recompute iterations the model cost is in)
    groups = [order[starts[order] == s] for s in np.unique(starts)]
    chunks = [g[c0 : c0 + batch_size] for g in groups for c0 in range(0, len(g), batch_size)]
    for k, part in enumerate(chunks):
        key = f"{direction}-{k:06d}"
        if store is not None and store.has(key):
            vals = _load_chunk(store, key, part)
            _fill(cols, vals, part, len(jobs))
            continue
        s = int(starts[part].min())
        ex = torch.as_tensor([jobs[j][0] for j in part], dtype=torch.long)
        els: dict[str, Elements] = {}
        for r, j in enumerate(part):
            for site, t, p, u in jobs[j][1]:
                els.setdefault(site, Elements()).add(r, t, p, u)
        out = run_rows(
            loop,
            inputs,
            ex,
            n_iter,
            h0,
            els,
            src,
            infos,
            [read_at],
            extra,
            start=int(s),
            start_states=states,
        )
        lg = out[read_at]
        vals = _metric_columns(metric, lg, ex, base["lg_clean"], base["lg_corrupt"], direction)
        vals["diverged"] = out["diverged"].double()
        if store is not None:
            _save_chunk(store, key, part, vals)
        _fill(cols, vals, part, len(jobs))
    return cols


def _fill(cols: dict[str, np.ndarray], vals: dict[str, Tensor], part: np.ndarray, n: int) -> None:
    for name, v in vals.items():
        if name not in cols:
            cols[name] = np.full(n, np.nan)
        cols[name][part] = v.numpy()


def _save_chunk(
    store: ChunkCheckpoint, key: str, part: np.ndarray, vals: dict[str, Tensor]
) -> None:
    tensors = {"rows": torch.as_tensor(np.asarray(part, dtype=np.int64))}
    tensors.update({f"col.{k}": v.double().contiguous() for k, v in vals.items()})
    store.save(key, tensors, {"columns": json.dumps(list(vals))})


def _load_chunk(store: ChunkCheckpoint, key: str, part: np.ndarray) -> dict[str, Tensor]:
    tensors, meta = store.load(key)
    path = store.file(key)
    try:
        names = json.loads(meta["columns"])
        rows = tensors["rows"]
        vals = {n: tensors[f"col.{n}"] for n in names}
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(
            f"{path} is not a patch-sweep chunk; delete it to recompute it"
        ) from None
    if not torch.equal(rows, torch.as_tensor(np.asarray(part, dtype=np.int64))):
        raise CheckpointError(
            f"{path} holds other rows than this sweep's chunk {key}; delete {store.dir} to start over"
        )
    return vals


@did_you_mean
def patch_sweep(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    sites: Sequence[str] | str,
    iterations: Sequence[int] | int | str = "all",
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    n_iter: int,
    positions: Sequence[int] | None = None,
    units: dict[str, int] | None = None,
    direction: str = "denoise",
    batch_size: int = 256,
    seed: int = 0,
    measure_at: int | None = None,
    reuse_prefix: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> SweepResult:
    """Sweep single-site, single-iteration, single-position patches (see module docstring).

    Args:
        loop: a Loop. clean: clean inputs ``[B, ...]``. corrupt: corrupted inputs of the same
            shape, a :class:`~loopscope.circuits.corruptions.Corruption` (resample / mean / zero /
            Gaussian) or :class:`~loopscope.circuits.corruptions.STRPairs`.
        sites: hook names or globs. iterations: iterations to patch or "all".
        metric: ``fn(readout [R, ...], example_idx [R]) -> [R]``; an
            :class:`~loopscope.circuits.metrics.AnswerMetric` (``logit_diff_metric``) adds logprob,
            prob, KL and accuracy columns; None takes the STR pairs' metric.
        n_iter: loop iterations T. measure_at: readout iteration (default T; > T runs longer).
        positions: positions to patch (default all); hooks without a position axis ([B, d]) are
            patched whole (``position = -1``).
        units: ``{site: axis}`` to patch one unit (head, neuron) at a time along that axis of the
            activation (e.g. ``{"core.blocks.0.attn.hook_z": 2}``); ``unit = -1`` otherwise.
        direction: "denoise", "noise" or "both".
        batch_size: patches evaluated per forward (rows of one batch).
        seed: seed of the initial states (shared by every run so random inits stay paired).
        reuse_prefix: start a row patched at iteration t from the unpatched run's h_t instead
            of recomputing iterations < t (identical by construction; off for corruptions with
            interventions and for sites that fire in ``encode``).
        checkpoint_dir: folder for a resumable sweep (module docstring): finished chunks are
            written there atomically and skipped on a re-run; another sweep's folder raises
            :class:`~loopscope.core.errors.CheckpointError`.
        max_bytes: memory budget (default: half the free memory of the state's device);
            an estimate over it raises :class:`~loopscope.core.errors.CaptureMemoryError`.

    Returns:
        :class:`SweepResult`; its frame has columns direction, site, iteration, position, unit,
        example, metric, clean, corrupt, recovery, diverged (the patched run blew up / went
        non-finite; its metric is read from the frozen state), kl / kl_delta (plus logprob,
        prob, logprob_wrong, accuracy, nl, effect_E for answer metrics). With
        ``checkpoint_dir``, ``.checkpoint`` counts the chunks (total, resumed, computed).
    """
    n_iter, read_at, batch_size = _check_run_args(n_iter, measure_at, batch_size)
    metric, corruption = _check_pair(clean, corrupt, metric, direction)
    its = _iterations(iterations, n_iter)
    late = [t for t in (range(n_iter) if its is None else its) if t >= read_at]
    if late:
        raise LoopscopeError(
            f"measure_at={read_at} comes before patched iteration(s) {late[:5]}: a patch there "
            "cannot change what is measured (measure_at >= n_iter, or patch earlier iterations)"
        )
    names, units = _check_sites(loop, sites, units)
    T = max(n_iter, read_at)
    budget = _check_sweep_memory(loop, clean, names, T, batch_size, seed, max_bytes)
    store = None
    if checkpoint_dir is not None:
        store = ChunkCheckpoint(
            checkpoint_dir,
            "patch_sweep",
            _sweep_fingerprint(
                loop, clean, corruption, metric, names, its, positions, units, direction,
                seed, batch_size, n_iter, read_at, reuse_prefix,
            ),
        )  # fmt: skip
    try:
        return _run_sweep(
            loop, clean, corruption, metric, names, units, its, positions, direction, seed,
            n_iter, read_at, batch_size, reuse_prefix, budget, store,
        )  # fmt: skip
    finally:
        if store is not None:
            store.close()  # another process may resume the folder now


def _run_sweep(
    loop: Loop, clean: Any, corruption: Any, metric: Callable, names: list[str],
    units: dict[str, int], its: list[int], positions: Any, direction: str, seed: int,
    n_iter: int, read_at: int, batch_size: int, reuse_prefix: bool, budget: Any,
    store: ChunkCheckpoint | None,
) -> SweepResult:  # fmt: skip
    """:func:`patch_sweep` after validation: base runs, every chunk (resumed or computed), the
    frame."""
    base = _base_runs(loop, clean, corruption, names, n_iter, seed, read_at, budget)
    base["clean_inputs"] = clean
    infos = {s: site_info(loop, base["src_clean"], s, units.get(s)) for s in names}
    keys = _sweep_keys(names, infos, its, positions, base["B"])
    jobs = [(b, [(s, t, p, u)]) for s, t, p, u, b in keys]
    clean_m, corr_m = _reference_metrics(metric, base)
    if store is not None:  # the same metric on the same runs, or refuse to mix
        store.check_values("metric_clean", clean_m)
        store.check_values("metric_corrupt", corr_m)
    frames = []
    for d in ["denoise", "noise"] if direction == "both" else [direction]:
        cols = run_jobs(
            loop, base, corruption, d, jobs, infos, metric, n_iter, read_at, batch_size,
            reuse_prefix, store,
        )  # fmt: skip
        frames.append(_sweep_frame(d, keys, cols, clean_m, corr_m))
    checkpoint = None
    if store is not None:
        checkpoint = {
            "dir": str(store.dir),
            "total": store.resumed + store.computed,
            "resumed": store.resumed,
            "computed": store.computed,
        }
    return SweepResult(
        frame=pd.concat(frames, ignore_index=True),
        checkpoint=checkpoint,
        meta=_meta(loop, corruption, seed, n_iter, read_at),
    )


def _check_pair(
    clean: Any, corrupt: Any, metric: Any, direction: str, both: bool = True
) -> tuple[Callable, Any]:
    """Validated ``(metric, corruption)`` of a clean / corrupt pair and the patch direction."""
    allowed = ("denoise", "noise", "both") if both else ("denoise", "noise")
    if direction not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise LoopscopeError(f"direction must be one of {names}, got {direction!r}")
    metric = resolve_metric(metric, corrupt)
    corruption = as_corruption(corrupt)
    if isinstance(corrupt, STRPairs) and isinstance(clean, Tensor):
        if not torch.equal(clean, corrupt.clean):
            raise LoopscopeError("clean inputs differ from the STR pairs' clean tokens")
    return metric, corruption


def _check_sites(
    loop: Loop, sites: Sequence[str] | str, units: dict[str, int] | None
) -> tuple[list[str], dict[str, int]]:
    """Canonical site names and the ``{site: unit axis}`` map (every key among the sites)."""
    names = canonical_sites(loop, sites)
    units = dict(units or {})
    for s in units:
        if s not in names:
            raise LoopscopeError(f"units names site {s!r}, which is not among the sites {names}")
    return names, units


def _check_run_args(n_iter: Any, measure_at: Any, batch_size: Any) -> tuple[int, int, int]:
    """Validated ``(n_iter, readout iteration, batch_size)``."""
    n_iter = check_positive_int("n_iter", n_iter)
    batch_size = check_positive_int("batch_size", batch_size)
    read_at = n_iter if measure_at is None else check_positive_int("measure_at", measure_at)
    return n_iter, read_at, batch_size


def _sweep_keys(
    names: list[str], infos: dict, its: list[int] | None, positions: Any, B: int
) -> list[tuple[str, int, int, int, int]]:
    """Every ``(site, iteration, position, unit, example)`` the sweep patches, in frame order."""
    keys: list[tuple[str, int, int, int, int]] = []
    for s in names:
        info = infos[s]
        s_its = info.iterations if its is None else its
        missing = sorted(set(s_its) - set(info.iterations))
        if missing:
            raise LoopscopeError(f"site {s!r} does not fire at iterations {missing}")
        pos = [-1] if info.pos_dim is None else _positions(positions, info.n_pos, s)
        uns = [-1] if info.unit_dim is None else list(range(info.n_units))
        keys += [(s, t, p, u, b) for t, p, u, b in itertools.product(s_its, pos, uns, range(B))]
    return keys


def _reference_metrics(metric: Callable, base: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The metric of the unpatched clean and corrupted runs, ``[B]`` each; NaN for an example
    that run flagged diverged (``unroll`` froze it at its last finite state: its readout is a
    number that means nothing, and so would be every patch sourced from it)."""
    every = torch.arange(base["B"])
    lg_clean, lg_corrupt = base["lg_clean"], base["lg_corrupt"]
    return tuple(
        np.where(
            (run.diverged_at >= 0).numpy(),
            np.nan,
            _metric_columns(metric, lg, every, lg_clean, lg_corrupt)["metric"],
        )
        for lg, run in ((lg_clean, base["clean"]), (lg_corrupt, base["corrupt"]))
    )  # type: ignore[return-value]


def _base_diverged(base: dict[str, Any]) -> np.ndarray:
    """``[B]`` bool: examples the clean or the corrupted reference run flagged diverged."""
    return ((base["clean"].diverged_at >= 0) | (base["corrupt"].diverged_at >= 0)).numpy()


def _sweep_frame(
    direction: str,
    keys: list[tuple[str, int, int, int, int]],
    cols: dict[str, np.ndarray],
    clean_m: np.ndarray,
    corr_m: np.ndarray,
) -> pd.DataFrame:
    """One direction's rows: keys, metric, clean, corrupt, recovery, diverged, extra columns."""
    ex = np.array([k[4] for k in keys], dtype=np.int64)
    f = pd.DataFrame(
        {
            "direction": direction,
            "site": [k[0] for k in keys],
            "iteration": np.array([k[1] for k in keys], dtype=np.int64),
            "position": np.array([k[2] for k in keys], dtype=np.int64),
            "unit": np.array([k[3] for k in keys], dtype=np.int64),
            "example": ex,
        }
    )
    cols = dict(cols)
    f["clean"] = clean_m[ex]
    f["corrupt"] = corr_m[ex]
    # an example whose reference run diverged has NaN references: its patched rows are flagged
    # and NaN too, never a plausible number read off a frozen state
    base_bad = np.isnan(f["clean"].to_numpy()) | np.isnan(f["corrupt"].to_numpy())
    f.insert(len(f.columns) - 2, "metric", np.where(base_bad, np.nan, cols.pop("metric")))
    f["recovery"] = normalised(f["metric"], f["clean"], f["corrupt"])
    f["diverged"] = cols.pop("diverged").astype(bool) | base_bad
    for k, v in cols.items():
        f[k] = v
    return f


def _nbytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _check_sweep_memory(
    loop: Any,
    clean: Any,
    sites: list[str],
    T: int,
    batch_size: int,
    seed: int,
    max_bytes: int | None,
) -> int | None:
    """Estimate a sweep's bytes from a 1-example, 2-iteration probe run and refuse over budget.

    Counts the source captures of the clean and corrupted runs (every firing of every site, per
    example), both runs' states and readouts, and one forward chunk (``batch_size`` rows with
    their states). Returns the budget (None: the default, half the free memory).
    """
    if max_bytes is not None:
        max_bytes = check_positive_int("max_bytes", max_bytes)
    B = batch_size_of(clean)
    if B is None:
        return max_bytes  # _base_runs names the problem
    one = select_batch(clean, torch.zeros(1, dtype=torch.long), B)
    probe = unroll(loop, one, 2, capture=sites, seed=seed, max_bytes=2**62)
    capture = 0  # bytes per example over T iterations
    for s in sites:
        if s not in probe.acts:
            continue
        acts = probe.acts[s]  # [F, 1, ...]
        per_iter = sum(1 for lab in probe.labels[s] if lab[0] == 1)
        once = max(acts.shape[0] - 2 * per_iter, 0)  # firings in encode
        capture += acts[0].numel() * acts.element_size() * (once + T * per_iter)
    state = probe.states[0].numel() * probe.states.element_size()
    readout = probe.decode(0)
    readout = readout.numel() * readout.element_size() if isinstance(readout, Tensor) else 0
    sources = 2 * B * capture
    refs = 2 * B * ((T + 1) * state + readout)
    rows = batch_size * ((T + 1) * state + readout)
    estimate = sources + refs + rows
    device = probe.states.device
    budget = max_bytes if max_bytes is not None else available_memory_bytes(device) // 2
    if estimate > budget:
        raise CaptureMemoryError(
            f"patch sweep would need ~{_nbytes(estimate)} (source captures of {len(sites)} "
            f"site(s): {_nbytes(sources)} for 2 runs x {B} examples x {T} iterations; states "
            f"and readouts {_nbytes(refs)}; one forward of batch_size={batch_size} rows: {_nbytes(rows)}) "
            f"but the budget is {_nbytes(budget)}; patch fewer sites, fewer examples or "
            f"iterations, use a smaller batch_size, or raise max_bytes"
        )
    return max_bytes


def _sweep_fingerprint(
    loop: Any,
    clean: Any,
    corruption: Any,
    metric: Any,
    sites: list[str],
    its: list[int] | None,
    positions: Any,
    units: dict[str, int],
    direction: str,
    seed: int,
    batch_size: int,
    n_iter: int,
    read_at: int,
    reuse_prefix: bool,
) -> dict[str, Any]:
    """What a resumed sweep must share with the checkpoint (JSON-able)."""
    cfg = getattr(loop, "cfg", None)
    return {
        "model": f"{type(loop).__qualname__}:{getattr(cfg, 'name', '')}",
        "model_params": fingerprint(loop) if isinstance(loop, torch.nn.Module) else None,
        "clean_inputs": fingerprint(clean),
        "corrupt_inputs": fingerprint(corruption.inputs),
        "corruption": {
            "kind": corruption.kind,
            "flagged": bool(corruption.flagged),
            "meta": fingerprint(corruption.meta),
            "interventions": corruption.interventions is not None,
        },
        "metric": getattr(metric, "__qualname__", type(metric).__qualname__),
        "sites": list(sites),
        "iterations": "all" if its is None else list(its),
        "positions": None if positions is None else [int(p) for p in positions],
        "units": {k: int(v) for k, v in sorted(units.items())},
        "direction": direction,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "n_iter": int(n_iter),
        "measure_at": int(read_at),
        "reuse_prefix": bool(reuse_prefix),
    }


def _meta(loop: Any, corruption: Any, seed: int, n_iter: int, read_at: int) -> dict[str, Any]:
    """``result_meta`` of a patching run: model, seed, n_iter, readout, corruption facts."""
    cfg = getattr(loop, "cfg", None)
    settings = {
        "n_iter": int(n_iter),
        "measured_at": int(read_at),
        "corruption": corruption.kind,
        "flagged": bool(corruption.flagged),
        **{f"corruption_{k}": v for k, v in corruption.meta.items() if np.isscalar(v)},
    }
    return result_meta(
        loop, seed=int(seed), model=getattr(cfg, "name", type(loop).__name__), settings=settings
    )


@did_you_mean
def state_transplant(
    loop: Loop,
    clean: Any,
    corrupt: Any,
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    n_iter: int,
    extra: int = 0,
    iterations: Sequence[int] | str = "all",
    seed: int = 0,
) -> SweepResult:
    """Recovery R(t) when the clean state h_t replaces the corrupted run's state at iteration t.

    For each t the corrupted run is repeated with ``Transplant(iteration=t, source=clean_run)``
    and read out at T (= ``n_iter``) and, if ``extra > 0``, at T + extra. With input injection and
    a contracting block the effect decays back to the corrupted attractor (distance <=
    L^(T-t) x gap); without injection the transplanted answer persists (recovery 1).

    Args:
        loop: a Loop. clean / corrupt / metric: as in :func:`patch_sweep`.
        n_iter: loop iterations T (the first readout).
        extra: further iterations after T for a second readout at T + extra (0: none).
        iterations: the transplant iterations t (default "all": 0..T-1).
        seed: seed of the initial states (shared by every run).

    Returns:
        :class:`SweepResult`, one row per (t, measured_at, example): metric, clean, corrupt,
        recovery, ``diverged`` (a run of the example was flagged: its numbers are NaN), ``gap`` = ||h_t^clean - h_t^corrupt||, ``dist_corrupt`` / ``dist_clean`` = distance
        of the transplanted state at measured_at to the corrupted / clean run's state.
    """
    n_iter = check_positive_int("n_iter", n_iter)
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise LoopscopeError(f"extra must be a non-negative int, got {extra!r}")
    metric = resolve_metric(metric, corrupt)
    corruption = as_corruption(corrupt)
    T = n_iter + extra
    base = _base_runs(loop, clean, corruption, [], T, seed, T)
    c, k = base["clean"], base["corrupt"]
    idx = torch.arange(base["B"])
    its = _iterations(iterations, n_iter)
    its = list(range(n_iter)) if its is None else its
    ivs0 = corruption.interventions(idx) if corruption.interventions is not None else []
    at_list = sorted({n_iter, T})
    base_bad = _base_diverged(base)
    m_c = {
        a: _metric_or_nan(metric, c.decode(a), idx, (c.diverged_at >= 0).numpy()) for a in at_list
    }
    m_k = {
        a: _metric_or_nan(metric, k.decode(a), idx, (k.diverged_at >= 0).numpy()) for a in at_list
    }
    frames = []
    for t in its:
        tr = unroll(
            loop,
            corruption.inputs,
            T,
            init=base["h0_corrupt"],
            interventions=[*ivs0, Transplant(iteration=t, source=c)],
        )
        gap = _row_norm(c.states[t] - k.states[t])
        bad = base_bad | (tr.diverged_at >= 0).numpy()
        for a in at_list:
            m_pt = _metric_or_nan(metric, tr.decode(a), idx, bad)
            f = pd.DataFrame({"t": t, "measured_at": a, "example": idx.numpy(), "metric": m_pt})
            f["clean"], f["corrupt"] = m_c[a], m_k[a]
            f["recovery"] = normalised(m_pt, m_c[a], m_k[a])
            f["diverged"] = bad
            f["gap"] = gap
            f["dist_corrupt"] = _row_norm(tr.states[a] - k.states[a])
            f["dist_clean"] = _row_norm(tr.states[a] - c.states[a])
            frames.append(f)
    return SweepResult(
        frame=pd.concat(frames, ignore_index=True), meta=_meta(loop, corruption, seed, n_iter, T)
    )


def _metric_or_nan(metric: Callable, readout: Tensor, idx: Tensor, bad: np.ndarray) -> np.ndarray:
    """``metric`` per example as float64, NaN where ``bad`` (a run flagged diverged)."""
    return np.where(bad, np.nan, torch.as_tensor(metric(readout, idx)).double().numpy())


def _row_norm(x: Tensor) -> np.ndarray:
    """Euclidean norm of each example's entry of ``x [B, ...]`` (float64), ``[B]``."""
    return x.reshape(x.shape[0], -1).double().norm(dim=1).numpy()
