"""The probing experiment: a linear probe for a task variable at every iteration and position.

Per split, one unroll of ``iterations`` steps (default ``2 x length``) and one batched ridge
solve over every (iteration, position) probe; the onset table says at which iteration each
position's variable first becomes decodable.

Example::

    res = probe_study(zoo.load("s3_fprm"), tasks.get("s3"), target="state", n=256)
    res.onset[["split", "position", "onset"]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, result_meta
from loopscope.core.targets import IGNORE_INDEX
from loopscope.core.unroll import unroll
from loopscope.experiments.common import cap_iterations, check_splits

__all__ = ["probe_study", "ProbeStudy", "probe_labels"]


def probe_labels(batch: Any, target: str, task_name: str = "task") -> Any:
    """The labels ``[B, pos]`` of ``target``: the task's targets, or one of its intermediate
    variables masked to the labelled positions (``IGNORE_INDEX`` elsewhere)."""
    if target == "targets":
        return batch.targets
    if target not in batch.intermediates:
        raise LoopscopeError(
            f"task {task_name!r} has no variable {target!r}; "
            f"variables: targets, {', '.join(batch.intermediates)}"
        )
    y = batch.intermediates[target].clone()
    if y.dim() == 1:  # a per-sequence variable (e.g. a stored item): no position to mask
        return y
    y[batch.targets == IGNORE_INDEX] = IGNORE_INDEX
    return y


@dataclass(kw_only=True, repr=False)
class ProbeStudy(Result):
    """Per (split, iteration, position) probe accuracies (``frame``) and the onset table."""

    frame: pd.DataFrame
    onset: pd.DataFrame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def summary(self) -> dict[str, float]:
        out = {}
        for sp, g in self.frame.groupby("split"):
            col = "test_acc" if "test_acc" in g else g.select_dtypes("number").columns[-1]
            out[f"{sp}/max_{col}"] = float(g[col].max())
        return out


@did_you_mean
def probe_study(
    loop: Loop,
    task: Any,
    *,
    target: str = "state",
    splits: tuple[str, ...] | list[str] = ("id", "ood"),
    iterations: int | None = None,
    site: str = "state",
    n: int = 256,
    seed: int = 0,
) -> ProbeStudy:
    """Probe ``target`` at every iteration and position of ``loop`` on ``task``.

    Args:
        loop: the model.
        task: a loopscope task whose batches carry ``intermediates`` (e.g. ``state``, ``carry``).
        target: the variable to probe, or ``"targets"``.
        splits: task splits.
        iterations: iterations to unroll (default ``2 x length`` per split).
        site: ``"state"`` (h_t) or a hook name.
        n: sequences per split.
        seed: sampling and probe-split seed.
    """
    from loopscope.probes import onset, probe_trace

    if iterations is not None and iterations < 1:
        raise LoopscopeError(f"iterations must be a positive integer, got {iterations!r}")
    splits = check_splits(task, splits)
    frames, onsets = [], []
    for sp in splits:
        b = task.sample(n, sp, seed=seed)
        y = probe_labels(b, target, task.name)
        T = cap_iterations(loop, b.tokens, 2 * b.length) if iterations is None else iterations
        tr = unroll(loop, b.tokens, T, seed=seed, capture=None if site == "state" else [site])
        df = probe_trace(tr, y, site=site, pooled=False, seed=seed).to_frame()
        frames.append(df.assign(split=sp))
        on = onset(df).to_frame()
        onsets.append(on.assign(split=sp))
    settings = {"target": target, "splits": list(splits), "site": site, "n": n}
    return ProbeStudy(
        frame=pd.concat(frames, ignore_index=True),
        onset=pd.concat(onsets, ignore_index=True),
        meta=result_meta(loop, seed=seed, settings=settings),
    )
