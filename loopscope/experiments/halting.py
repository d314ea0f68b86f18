"""The halting experiment: every exit criterion scored offline on one recorded trace per split.

One unroll of ``iter_factor x length`` iterations per split records the whole trajectory; each
criterion of :func:`loopscope.analysis.halting.evaluate` (fixed budget, residual thresholds,
entropy, the model's own ACT head when it has one ...) is then replayed on it: accuracy against
mean steps, compute saved, and the gap to the saturating budget.

Example::

    res = halting_study(zoo.load("s3_act"), tasks.get("s3"), splits=("id", "ood"), n=64)
    res.to_frame().groupby(["split", "criterion"])["accuracy"].max()
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from loopscope.core.errors import did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import FrameResult, result_meta
from loopscope.core.targets import sequence_correct
from loopscope.core.unroll import unroll
from loopscope.experiments.common import check_budget, check_splits

__all__ = ["halting_study", "halting_figure"]


@did_you_mean
def halting_study(
    loop: Loop,
    task: Any,
    *,
    splits: tuple[str, ...] | list[str] = ("id", "ood"),
    n: int = 128,
    iter_factor: float = 3.0,
    seed: int = 0,
    model_name: str | None = None,
) -> FrameResult:
    """Score every exit criterion on ``loop`` x ``task``; one row per (split, criterion, threshold).

    Args:
        loop: a looped model with a readout; an ACT model (``cfg.halting == "act"``) also has its
            own halting head scored.
        task: a loopscope task.
        splits: task splits.
        n: examples per split.
        iter_factor: budget = ``max(2, round(iter_factor x length))`` iterations.
        seed: sampling seed.
        model_name: the ``model`` column (default: the loop's zoo name).
    """
    from loopscope.analysis import halting as H

    check_budget(n=n, iter_factor=iter_factor, seed=seed)
    splits = check_splits(task, splits)
    name = model_name or getattr(loop, "zoo_name", None) or type(loop).__name__
    act = getattr(getattr(loop, "cfg", None), "halting", "none") == "act"
    frames = []
    for sp in splits:
        b = task.sample(n, sp, seed=seed)
        tr = unroll(loop, b.tokens, max(2, round(iter_factor * b.length)), seed=seed, decode=True)
        correct = sequence_correct(tr.logits.argmax(-1), b.targets)
        rep = H.evaluate(tr, None, correct=correct, q=loop.q_head if act else None)
        frames.append(rep.to_frame().assign(split=sp, model=name))
    df = pd.concat(frames, ignore_index=True)
    meta = result_meta(
        loop,
        seed=seed,
        model=name,
        settings={"splits": list(splits), "n": n, "iter_factor": iter_factor},
    )
    return FrameResult(frame=df, summary_columns=("accuracy", "mean_steps"), meta=meta)


def halting_figure(result: FrameResult) -> Any:
    """Accuracy vs mean steps per criterion, with the saturation gaps (a matplotlib Figure)."""
    from loopscope import figures

    df = result.to_frame()
    gaps = df.groupby(["criterion", "split"], as_index=False)["saturation_gap"].mean()
    return figures.halting_tradeoff(df, gaps)
