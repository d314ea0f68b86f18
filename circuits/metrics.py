"""Patching metrics: logit difference (normalised recovery), log-prob, probability, KL, accuracy.

A *metric* is any callable ``fn(logits [R, ...], example_idx [R]) -> [R]`` evaluated on the readout
at the measured iteration (rows are patched copies of examples ``example_idx``). The standard one is
:class:`AnswerMetric` (``logit_diff_metric``): for a pair of answers ``r`` (clean) and ``r'``
(corrupted) at one readout position it gives the logit difference LD = logit(r) - logit(r') and,
through :meth:`AnswerMetric.columns`, the companion columns of Heimersheim & Nanda (log-prob and
probability of r, KL to the clean distribution, KL delta, accuracy).

Normalised recovery (1 = clean level, 0 = corrupted level)::

    recovery = (m_patched - m_corrupt) / (m_clean - m_corrupt)

Example:
    >>> import torch
    >>> m = logit_diff_metric(torch.tensor([0]), torch.tensor([1]), position=0)
    >>> m(torch.tensor([[[2.0, -1.0]]]), torch.tensor([0])).tolist()
    [3.0]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError

__all__ = ["AnswerMetric", "logit_diff_metric", "normalised", "kl_columns"]

Metric = Callable[[Tensor, Tensor], Tensor]


class AnswerMetric:
    """Logit difference between answer ``r`` and counterfactual ``r'`` at a readout position.

    Args:
        answer: ``[B]`` clean answer ids r.
        wrong: ``[B]`` corrupted answer ids r' (r != r' expected; STR builders validate it).
        position: readout position, an int (same for every example) or ``[B]`` per-example
            positions (negative counts from the end). ``None`` for readouts without a position axis
            (logits ``[R, C]``).

    Calling it returns LD ``[R]``; :meth:`columns` returns every companion metric.
    """

    def __init__(self, answer: Tensor, wrong: Tensor, position: int | Tensor | None = -1) -> None:
        self.answer = torch.as_tensor(answer).long().reshape(-1)
        self.wrong = torch.as_tensor(wrong).long().reshape(-1)
        if self.answer.shape != self.wrong.shape:
            raise LoopscopeError(
                f"answer and wrong must have the same length, got {len(self.answer)} vs {len(self.wrong)}"
            )
        if position is not None and not isinstance(position, int):
            position = torch.as_tensor(position).long().reshape(-1)
            if position.shape != self.answer.shape:
                raise LoopscopeError(
                    f"per-example positions must have one entry per example ({len(self.answer)}), got {tuple(position.shape)}"
                )
        self.position = position

    def readout(self, logits: Tensor, idx: Tensor) -> Tensor:
        """Logits at the answer position ``[R, C]`` (float64)."""
        idx = idx.to(torch.long)
        if self.position is None:
            if logits.dim() != 2:
                raise LoopscopeError(
                    f"position=None needs logits [R, C], got shape {tuple(logits.shape)}"
                )
            return logits.double()
        if logits.dim() < 3:
            raise LoopscopeError(
                f"logits of shape {tuple(logits.shape)} have no position axis; use position=None"
            )
        if isinstance(self.position, int):
            return logits[:, self.position].double()
        pos = self.position[idx].to(logits.device)
        return logits[torch.arange(len(idx), device=logits.device), pos].double()

    def __call__(self, logits: Tensor, idx: Tensor) -> Tensor:
        lg = self.readout(logits, idx)
        r, w = self.answer[idx].to(lg.device), self.wrong[idx].to(lg.device)
        return lg.gather(-1, r.view(-1, 1))[:, 0] - lg.gather(-1, w.view(-1, 1))[:, 0]

    def columns(
        self,
        logits: Tensor,
        idx: Tensor,
        clean_logits: Tensor,
        corrupt_logits: Tensor,
        direction: str | None = None,
    ) -> dict[str, Tensor]:
        """Companion metrics ``[R]`` each: ``logprob`` / ``prob`` of r, ``logprob_wrong``,
        ``kl`` = D(P_clean || P_patched), ``kl_delta`` = D(P_clean || P_corrupt) - D(P_clean ||
        P_patched) (positive = closer to clean), ``accuracy`` (argmax == r) and ``nl`` =
        logit(r) / max logit (Nikankin's normalised logit).

        With ``direction`` ("denoise" / "noise") also Nikankin's effect ``effect_E`` =
        1/2 [(P*(b) - P(b)) / P(b) + (P(a) - P*(a)) / P*(a)] where P / P* are the run's
        probabilities before / after the patch, a is the run's answer and b the patch source's
        (noise: a = r, b = r'; denoise: a = r', b = r).

        ``clean_logits`` / ``corrupt_logits`` are the unpatched runs' readouts for examples ``idx``
        (same layout as ``logits``).
        """
        lg = self.readout(logits, idx)
        lp = lg.log_softmax(-1)
        r, w = self.answer[idx].to(lg.device), self.wrong[idx].to(lg.device)
        lp_cl = self.readout(clean_logits, idx).log_softmax(-1)
        lp_co = self.readout(corrupt_logits, idx).log_softmax(-1)
        kl_pt = _kl(lp_cl, lp)

        def at(x: Tensor, k: Tensor) -> Tensor:
            return x.gather(-1, k.view(-1, 1))[:, 0]

        out = {
            "logprob": at(lp, r),
            "prob": at(lp, r).exp(),
            "logprob_wrong": at(lp, w),
            "kl": kl_pt,
            "kl_delta": _kl(lp_cl, lp_co) - kl_pt,
            "accuracy": (lg.argmax(-1) == r).double(),
            "nl": at(lg, r) / lg.max(-1).values,
        }
        if direction is not None:
            if direction not in ("denoise", "noise"):
                raise LoopscopeError(f"direction must be 'denoise' or 'noise', got {direction!r}")
            pre = (lp_co if direction == "denoise" else lp_cl).exp()
            post = lp.exp()
            a, b = (w, r) if direction == "denoise" else (r, w)
            out["effect_E"] = 0.5 * (
                (at(post, b) - at(pre, b)) / at(pre, b) + (at(pre, a) - at(post, a)) / at(post, a)
            )
        return out


def logit_diff_metric(
    answer: Tensor, wrong: Tensor, position: int | Tensor | None = -1
) -> AnswerMetric:
    """Metric ``logit[answer] - logit[wrong]`` at ``position`` (see :class:`AnswerMetric`).

    Returns a callable ``fn(logits [R, P, C], idx [R]) -> [R]`` that also knows the companion
    metrics (log-prob, KL, accuracy) used by :func:`loopscope.circuits.patch_sweep`.
    """
    return AnswerMetric(answer, wrong, position)


def _kl(lp_p: Tensor, lp_q: Tensor) -> Tensor:
    """D(P || Q) over the last axis from log-probabilities (0 log 0 = 0)."""
    p = lp_p.exp()
    terms = torch.where(p > 0, p * (lp_p - lp_q), torch.zeros_like(p))
    return terms.sum(-1)


def kl_columns(logits: Tensor, clean_logits: Tensor, corrupt_logits: Tensor) -> dict[str, Tensor]:
    """``kl`` / ``kl_delta`` for a generic metric: mean over every readout position of
    D(P_clean || P_patched) (and D(P_clean || P_corrupt) - that). ``logits`` ``[R, ..., C]``."""
    lp = logits.double().log_softmax(-1)
    lp_cl = clean_logits.double().log_softmax(-1)
    lp_co = corrupt_logits.double().log_softmax(-1)
    kl = _kl(lp_cl, lp).reshape(len(lp), -1).mean(-1)
    kl_co = _kl(lp_cl, lp_co).reshape(len(lp), -1).mean(-1)
    return {"kl": kl, "kl_delta": kl_co - kl}


def normalised(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray) -> np.ndarray:
    """(m_patched - m_corrupt) / (m_clean - m_corrupt); NaN where clean == corrupt."""
    patched, clean, corrupt = (np.asarray(a, dtype=float) for a in (patched, clean, corrupt))
    den = clean - corrupt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(den) > 1e-12, (patched - corrupt) / den, np.nan)
