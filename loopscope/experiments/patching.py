"""The patching experiment: a per-iteration denoising sweep with single-token corruptions.

The clean inputs are task samples; the corrupt inputs change one token (``position``) to the
next vocabulary id. Each (iteration, position) patch of the clean activation into the corrupt
run is scored by the log-probability of the clean answer summed over the labelled positions;
``recovery`` is the share of the clean-vs-corrupt gap it restores.

Example::

    res = patch_study(zoo.load("s3_fprm"), tasks.get("s3"), iterations="all", n=4)
    res.to_frame().pivot_table("recovery", "iteration", "position")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import FrameResult, result_meta
from loopscope.core.targets import IGNORE_INDEX, labelled
from loopscope.experiments.common import cap_iterations

__all__ = ["patch_study", "PatchStudy", "single_token_corruption", "answer_logprob_metric"]


@dataclass(kw_only=True, repr=False)
class PatchStudy(FrameResult):
    """The sweep's rows (``to_frame()``: iteration, position, recovery ...) and its checkpoint
    bookkeeping (``checkpoint``: ``total`` and ``resumed`` chunks)."""

    checkpoint: dict = field(default_factory=dict)


def single_token_corruption(tokens: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """``tokens [B, pos]`` with the token at ``position`` replaced by the next id (mod vocab)."""
    if not 0 <= position < tokens.shape[1]:
        raise LoopscopeError(f"position {position} out of range 0..{tokens.shape[1] - 1}")
    corrupt = tokens.clone()
    corrupt[:, position] = (corrupt[:, position] + 1) % vocab_size
    return corrupt


def answer_logprob_metric(targets: torch.Tensor):
    """``metric(logits, idx) -> [len(idx)]``: the summed log-probability of the right answer over
    the labelled positions of ``targets [B, pos]`` (rows ``idx``)."""
    ans = targets.clone()
    ans[ans == IGNORE_INDEX] = 0
    mask = labelled(targets)

    def metric(lg: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        lp = lg.log_softmax(-1).gather(-1, ans[i].unsqueeze(-1))[..., 0]
        return (lp * mask[i]).sum(-1)

    return metric


@did_you_mean
def patch_study(
    loop: Loop,
    task: Any,
    *,
    iterations: str | list[int] = "all",
    site: str = "hook_state",
    position: int = 1,
    n: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    checkpoint_dir: str | Path | None = None,
) -> PatchStudy:
    """Denoising sweep over (iteration x position) on ``n`` ID samples of ``task``.

    Args:
        loop: the model.
        task: a loopscope task.
        iterations: ``"all"`` or the iterations to patch.
        site: the hook to patch.
        position: the input position whose token the corruption changes.
        n: samples.
        seed: sampling seed.
        batch_size: patches per forward.
        checkpoint_dir: finished chunks go here (resumable; see ``patch_sweep``).

    Returns a Result whose ``to_frame()`` has one row per patch (``recovery``) and whose
    ``checkpoint`` says how many chunks were resumed.
    """
    from loopscope.circuits import patch_sweep

    b = task.sample(n, "id", seed=seed)
    corrupt = single_token_corruption(b.tokens, position, task.vocab_size)
    res = patch_sweep(
        loop, b.tokens, corrupt, [site], iterations, answer_logprob_metric(b.targets),
        n_iter=cap_iterations(loop, b.tokens, 2 * b.length), seed=seed, batch_size=batch_size,
        checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    frame, info = res.to_frame(), res.checkpoint
    settings = {"site": site, "position": position, "n": n, "iterations": iterations}
    return PatchStudy(
        frame=pd.DataFrame(frame), checkpoint=info, summary_columns=("recovery",),
        meta=result_meta(loop, seed=seed, settings=settings),
    )  # fmt: skip
