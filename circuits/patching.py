"""Per-iteration activation patching, batched: many patches per forward along the batch axis.

``patch_sweep`` runs the clean and corrupted inputs once (capturing the sites), then evaluates
every (site x iteration x position) patch, ``chunk`` patches per forward: the corrupted (denoising)
or clean (noising) input is repeated and each batch row gets its own patch through one
row-aware intervention. A patch at iteration t leaves iterations < t bit-identical. Output: a tidy
DataFrame, one row per (patch, example), one column per metric; ``recovery`` is the normalised
logit difference (LD_pt - LD_corr) / (LD_clean - LD_corr).

``state_transplant`` gives the recovery curve R(t) when the clean state h_t is transplanted into
the corrupted run at iteration t.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.capture import pos_dim_of, resolve_hooks
from loopscope.errors import LoopscopeError, check_positive_int
from loopscope.interventions import Patch, Transplant
from loopscope.unroll import unroll

__all__ = ["patch_sweep", "state_transplant", "logit_diff_metric"]


def logit_diff_metric(
    answer: Tensor, wrong: Tensor, position: int = -1
) -> Callable[[Tensor, Tensor], Tensor]:
    """Metric ``logit[answer] - logit[wrong]`` at ``position`` for example rows ``idx``.

    Returns ``fn(logits [R, P, C], idx [R]) -> [R]``.
    """

    def fn(logits: Tensor, idx: Tensor) -> Tensor:
        lg = logits[:, position]
        return (
            lg.gather(-1, answer[idx].view(-1, 1))[:, 0]
            - lg.gather(-1, wrong[idx].view(-1, 1))[:, 0]
        )

    return fn


def _repeat_inputs(x: Any, idx: Tensor) -> Any:
    if isinstance(x, Tensor):
        return x[idx]
    raise LoopscopeError("patch_sweep needs tensor inputs (token ids [B, pos])")


def patch_sweep(
    loop: Any,
    clean: Tensor,
    corrupt: Tensor,
    sites: Sequence[str],
    iterations: Sequence[int] | str,
    metric: Callable[[Tensor, Tensor], Tensor],
    *,
    n_iter: int,
    positions: Sequence[int] | None = None,
    direction: str = "denoise",
    chunk: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Sweep single-site, single-iteration, single-position patches (see module docstring).

    Args:
        loop: a Loop; ``clean`` / ``corrupt``: token ids ``[B, pos]`` of equal shape.
        sites: hook names; ``iterations``: iterations to patch (or "all").
        metric: ``fn(final_logits [R, P, C], example_idx [R]) -> [R]`` (e.g. :func:`logit_diff_metric`).
        n_iter: loop iterations; positions: positions to patch (default all; None = whole activation
            if a hook has no position axis).
        direction: "denoise" (corrupt run, clean value: sufficiency), "noise" (clean run, corrupt
            value: necessity) or "both".
        chunk: patches evaluated per forward (rows of one batch).
    """
    n_iter = check_positive_int("n_iter", n_iter)
    if clean.shape != corrupt.shape:
        raise LoopscopeError(
            f"clean and corrupt inputs must have the same shape, got {tuple(clean.shape)} vs {tuple(corrupt.shape)}"
        )
    if direction not in ("denoise", "noise", "both"):
        raise LoopscopeError(f"direction must be denoise, noise or both, got {direction!r}")
    its = list(range(n_iter)) if iterations == "all" else [int(t) for t in iterations]
    for t in its:
        if not 0 <= t < n_iter:
            raise LoopscopeError(f"iteration {t} out of range 0..{n_iter - 1}")
    points, _ = resolve_hooks(loop, list(sites))
    B = clean.shape[0]
    runs = {
        "clean": unroll(loop, clean, n_iter, capture=list(sites), seed=seed, decode=True),
        "corrupt": unroll(loop, corrupt, n_iter, capture=list(sites), seed=seed, decode=True),
    }
    base = {k: metric(v.logits[-1], torch.arange(B)) for k, v in runs.items()}
    directions = ["denoise", "noise"] if direction == "both" else [direction]
    rows = []
    for d in directions:
        run_inputs, src = (corrupt, runs["clean"]) if d == "denoise" else (clean, runs["corrupt"])
        jobs = []  # (site, t, pos, example)
        for site in sites:
            name = next(iter(resolve_hooks(loop, [site])[0]))
            act = src[name]
            has_pos = act.dim() >= 3  # [T, B, pos, ...]
            pos_list = (
                [None]
                if not has_pos
                else (
                    list(range(act.shape[1 + pos_dim_of(points[name])]))
                    if positions is None
                    else list(positions)
                )
            )
            for t in its:
                for p in pos_list:
                    for b in range(B):
                        jobs.append((name, t, p, b))
        for s0 in range(0, len(jobs), chunk):
            part = jobs[s0 : s0 + chunk]
            ex = torch.tensor([j[3] for j in part])
            ivs = []
            for site in dict.fromkeys(j[0] for j in part):
                rows_site = [(r, j) for r, j in enumerate(part) if j[0] == site]
                pdim = pos_dim_of(points[site])
                ivs.append(Patch(site, "all", value=_row_patcher(src[site], rows_site, pdim)))
            tr = unroll(
                loop,
                _repeat_inputs(run_inputs, ex),
                n_iter,
                interventions=ivs,
                seed=seed,
                decode=True,
                init=_init_rows(loop, run_inputs, ex, seed),
            )
            vals = metric(tr.logits[-1], ex)
            for r, (site, t, p, b) in enumerate(part):
                rows.append(
                    dict(
                        direction=d,
                        site=site,
                        iteration=t,
                        position=-1 if p is None else p,
                        example=b,
                        metric=float(vals[r]),
                        clean=float(base["clean"][b]),
                        corrupt=float(base["corrupt"][b]),
                    )
                )
    df = pd.DataFrame(rows)
    denom = df["clean"] - df["corrupt"]
    df["recovery"] = np.where(denom.abs() > 1e-12, (df["metric"] - df["corrupt"]) / denom, np.nan)
    return df


def _init_rows(loop: Any, inputs: Tensor, ex: Tensor, seed: int) -> Tensor:
    # the same initial state per example as in the reference runs (random inits stay paired)
    with torch.no_grad():
        ctx = loop.encode(inputs)
        h0 = loop.init_state(ctx, torch.Generator().manual_seed(seed))
    return h0[ex]


def _row_patcher(src: Tensor, rows_site: list, pdim: int) -> Callable:
    """A value fn patching row r at its own iteration/position from the source trace."""

    def fn(x: Tensor, label: tuple) -> Tensor:
        out = x.clone()
        for r, (_, t, p, b) in rows_site:
            if label[0] != t:
                continue
            if p is None:
                out[r] = src[t][b]
            else:
                idx = [slice(None)] * (x.dim() - 1)
                idx[pdim - 1] = p
                out[r][tuple(idx)] = src[t][b][tuple(idx)]
        return out

    return fn


def state_transplant(
    loop: Any,
    clean: Tensor,
    corrupt: Tensor,
    metric: Callable[[Tensor, Tensor], Tensor],
    *,
    n_iter: int,
    extra: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """Recovery R(t) when the clean state h_t replaces the corrupted run's state at iteration t.

    Returns one row per (t, example) with the metric at T (and at T + ``extra`` if > 0) and
    ``recovery`` = (m_pt - m_corr) / (m_clean - m_corr).
    """
    n_iter = check_positive_int("n_iter", n_iter)
    T = n_iter + extra
    c = unroll(loop, clean, T, seed=seed, decode=True)
    k = unroll(loop, corrupt, T, seed=seed, decode=True)
    B = clean.shape[0]
    idx = torch.arange(B)
    rows = []
    for t in range(n_iter):
        tr = unroll(
            loop,
            corrupt,
            T,
            seed=seed,
            decode=True,
            interventions=[Transplant(iteration=t, source=c)],
        )
        for at in sorted({n_iter, T}):
            m_pt = metric(tr.logits[at], idx)
            m_c, m_k = metric(c.logits[at], idx), metric(k.logits[at], idx)
            for b in range(B):
                den = float(m_c[b] - m_k[b])
                rows.append(
                    dict(
                        t=t,
                        measured_at=at,
                        example=b,
                        metric=float(m_pt[b]),
                        recovery=(float(m_pt[b] - m_k[b]) / den) if abs(den) > 1e-12 else np.nan,
                    )
                )
    return pd.DataFrame(rows)
