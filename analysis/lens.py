"""Logit lens across iterations: every iteration's state decoded to the answer's rank and probability.

For any Loop, ``loop.decode(h_t)`` is read at every iteration ``t = 0 .. T`` (the trace's
``decode=True`` logits), and each labelled target token (``targets != -100``: the answer span of a
text task) gets its log-probability and rank (0 = the argmax). With ``layers=True`` a Loop that
declares a per-layer lens (``lens_hook``: a hook firing once per layer of a pass, labelled
``(iteration, layer)``, and ``lens_residual(resid) -> logits``: the model's final norm and head;
:class:`~loopscope.models.inkling2.Inkling2Loop` does) is also read at every ``pass x layer``:
the classic logit lens on the residual stream, which skips whatever the model runs after the
loop (so it is an approximation where the state lens is exact).

Example:
    >>> import torch, loopscope as ls
    >>> from loopscope.models.inkling2 import build_tiny_inkling2
    >>> loop = ls.models.from_hf(build_tiny_inkling2())
    >>> ids = torch.randint(0, 60, (2, 6))
    >>> targets = torch.full_like(ids, -100); targets[:, -1] = 7
    >>> res = logit_lens(loop, ids, n_iter=3, targets=targets, layers=True)
    >>> res.rank.shape, res.layer_rank.shape  # [T+1, B, pos], [T, layers, B, pos]
    (torch.Size([4, 2, 6]), torch.Size([3, 2, 2, 6]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.targets import IGNORE_INDEX, labelled

__all__ = ["logit_lens", "LogitLensResult"]


@dataclass(kw_only=True, repr=False)
class LogitLensResult(Result):
    """Answer log-probability and rank at every iteration (and pass x layer).

    Attributes:
        log_prob: ``[T+1, B, pos]`` log p(target) of ``decode(h_t)`` (NaN where unlabelled).
        rank: ``[T+1, B, pos]`` rank of the target (0 = argmax; -1 where unlabelled).
        layer_log_prob, layer_rank: ``[T, L, B, pos]`` the same on every layer's residual of every
            pass (None unless ``layers=True``).
        targets: ``[B, pos]`` the targets read (-100 where none).
    """

    log_prob: Tensor
    rank: Tensor
    targets: Tensor
    layer_log_prob: Tensor | None = None
    layer_rank: Tensor | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row per (iteration[, layer], sample, position) with a target."""
        rows = [_rows(self.log_prob, self.rank, self.targets, site="state")]
        if self.layer_rank is not None:
            for j in range(self.layer_rank.shape[1]):
                rows.append(
                    _rows(
                        self.layer_log_prob[:, j],
                        self.layer_rank[:, j],
                        self.targets,
                        site=f"layer{j}",
                        layer=j,
                    )
                )
        return pd.concat(rows, ignore_index=True)

    def summary(self) -> dict[str, float]:
        """Top-1 fraction and mean probability at the last iteration; first iteration at top-1."""
        m = labelled(self.targets)
        top1 = (self.rank == 0) & m
        frac = top1.flatten(1).sum(1).double() / max(1, int(m.sum()))
        reached = torch.nonzero(frac >= frac[-1] - 1e-12).flatten()
        return float_summary(
            {
                "top1_last": frac[-1].item(),
                "p_last": self.log_prob[-1][m].exp().mean().item() if m.any() else None,
                "top1_first_iteration": int(reached[0]) if len(reached) else None,
                "n_targets": int(m.sum()),
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Mean target probability vs iteration (and per layer when read); returns the axes."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(5, 3))[1]
        frame = self.to_frame()
        frame["p"] = np.exp(frame["log_prob"])
        for site, g in frame.groupby("site", sort=False):
            g = g.groupby("iteration")["p"].mean()
            ax.plot(g.index, g.values, marker="o", label=site)
        ax.set_xlabel("iteration (pass)")
        ax.set_ylabel("p(answer)")
        ax.legend(fontsize=7)
        return ax


def _rows(log_prob: Tensor, rank: Tensor, targets: Tensor, site: str, layer: int = -1):
    m = labelled(targets)
    t, b, p = torch.nonzero(m.unsqueeze(0).expand_as(rank), as_tuple=True)
    return pd.DataFrame(
        {
            "iteration": t.numpy(),
            "sample": b.numpy(),
            "position": p.numpy(),
            "site": site,
            "layer": layer,
            "log_prob": log_prob[t, b, p].double().numpy(),
            "rank": rank[t, b, p].numpy(),
        }
    )


def _score(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``logits [..., B, pos, V]`` -> (log p(target), rank) ``[..., B, pos]``."""
    m = labelled(targets)
    safe = torch.where(m, targets, torch.zeros_like(targets))
    lp = torch.log_softmax(logits.double(), dim=-1)
    idx = safe.expand(*lp.shape[:-1]).unsqueeze(-1)
    tlp = lp.gather(-1, idx).squeeze(-1)
    rank = (logits.double() > logits.double().gather(-1, idx)).sum(-1)
    nan = torch.full_like(tlp, float("nan"))
    return torch.where(m, tlp, nan), torch.where(m, rank, torch.full_like(rank, -1))


@did_you_mean
def logit_lens(
    loop: Loop,
    inputs: Any,
    *,
    n_iter: int,
    targets: Tensor | None = None,
    layers: bool = False,
    seed: int = 0,
) -> LogitLensResult:
    """Decode every iteration's state (and, with ``layers``, every pass x layer) to the targets.

    Args:
        loop: any Loop whose ``decode`` returns logits ``[B, pos, V]``.
        inputs: what ``loop.encode`` takes (token ids ``[B, pos]``).
        n_iter: iterations to unroll (the model's native count, or more to look past it).
        targets: ``[B, pos]`` target ids, -100 where none (e.g. ``batch.targets``); default: the
            last iteration's argmax at the last position (the lens toward the final prediction).
        layers: also read every layer of every pass (needs ``loop.lens_hook`` / ``lens_residual``).
        seed: seed for ``init_state``.
    """
    import loopscope as ls

    n_iter = check_positive_int("n_iter", n_iter)
    hook = getattr(loop, "lens_hook", None)
    if layers and (hook is None or not hasattr(loop, "lens_residual")):
        raise LoopscopeError(
            f"{type(loop).__name__} has no per-layer lens (lens_hook / lens_residual); "
            "use layers=False"
        )
    tr = ls.unroll(loop, inputs, n_iter, decode=True, seed=seed, capture=[hook] if layers else None)
    logits = tr.logits
    if targets is None:
        targets = torch.full(logits.shape[1:3], IGNORE_INDEX, dtype=torch.long)
        targets[:, -1] = logits[-1, :, -1].argmax(-1)
    targets = torch.as_tensor(targets, dtype=torch.long).to(logits.device)
    if targets.shape != logits.shape[1:3]:
        raise LoopscopeError(
            f"targets must be [B, pos] = {tuple(logits.shape[1:3])}, got {tuple(targets.shape)}"
        )
    lp, rank = _score(logits, targets)
    out = LogitLensResult(
        log_prob=lp.cpu(),
        rank=rank.cpu(),
        targets=targets.cpu(),
        meta=result_meta(loop, seed=seed, settings={"n_iter": n_iter, "layers": layers}),
    )
    if layers:
        acts, labels = tr[hook], tr.labels[hook]
        n_layers = 1 + max(lab[1] for lab in labels)
        with torch.no_grad():
            lay = torch.stack([loop.lens_residual(a) for a in acts])
        lay = lay.view(n_iter, n_layers, *lay.shape[1:])
        out.layer_log_prob, out.layer_rank = (x.cpu() for x in _score(lay, targets))
    return out
