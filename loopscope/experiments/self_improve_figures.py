"""Figures of the self-improvement rounds: results in, matplotlib Figure out (no computation).

Each function takes :class:`~loopscope.experiments.self_improve.SelfImproveResult` objects (or
their ``to_frame()``) and never switches the matplotlib backend.

Example:
    >>> fig = accuracy_by_length(result)            # doctest: +SKIP
    >>> fig = panels(result, noisy=noisy_result)    # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from loopscope.core.errors import did_you_mean

__all__ = ["accuracy_by_length", "fixed_points_by_round", "labels_by_round", "panels"]


def _frame(result: Any) -> pd.DataFrame:
    return result if isinstance(result, pd.DataFrame) else result.to_frame()


def _round_colors(rounds: list) -> dict:
    cmap = plt.get_cmap("viridis")
    return {r: cmap(i / max(1, len(rounds) - 1)) for i, r in enumerate(rounds)}


def _accuracy(ax: Any, f: pd.DataFrame) -> None:
    rounds = sorted(f["round"].unique())
    colors = _round_colors(rounds)
    for r in rounds:
        g = f[f["round"] == r].sort_values("length")
        ax.plot(g["length"], g["acc"], "-o", ms=3, color=colors[r], label=f"round {r}")
        d = g.loc[g["trained"], "length"].max()  # the round's training frontier
        ax.axvline(d, color=colors[r], lw=0.6, ls=":")
    ax.set(xlabel="digits", ylabel="sequence accuracy", ylim=(-0.03, 1.03))
    ax.set_title("accuracy vs length (dotted: trained up to)", fontsize=9)
    ax.legend(fontsize=7)


def _fixed_points(ax: Any, f: pd.DataFrame) -> None:
    rounds = sorted(f["round"].unique())
    colors = _round_colors(rounds)
    for r in rounds:
        g = f[f["round"] == r].sort_values("length")
        ax.plot(g["length"], g["conv_correct"], "-", color=colors[r], label=f"round {r}")
        ax.plot(g["length"], g["conv_wrong"], "--", color=colors[r])
    ax.set(xlabel="digits", ylabel="share of inputs", ylim=(-0.03, 1.03))
    ax.set_title("converged & correct (solid) vs converged & wrong (dashed)", fontsize=9)
    ax.legend(fontsize=7)


def _labels(ax: Any, runs: dict[str, pd.DataFrame]) -> None:
    styles = {"label_error": "-o", "filter_yield": "--s", "kept_label_error": ":^"}
    for (name, f), color in zip(runs.items(), ("C0", "C3", "C2", "C1"), strict=False):
        g = f[f["label_error"].notna()].groupby("round")[list(styles)].mean()
        for col, st in styles.items():
            ax.plot(g.index, g[col], st, ms=4, color=color, label=f"{name}: {col}")
    ax.set(xlabel="round", ylabel="share", ylim=(-0.03, 1.03))
    ax.set_title("self-labels: error before filters, filter yield, error kept", fontsize=9)
    ax.legend(fontsize=6)


def _frontier(ax: Any, runs: dict[str, pd.DataFrame]) -> None:
    from loopscope.experiments.self_improve import frontier

    for (name, f), color in zip(runs.items(), ("C0", "C3", "C2", "C1"), strict=False):
        fr = frontier(f)
        ax.plot(fr.index, fr.values, "-o", ms=4, color=color, label=f"{name}: acc >= 0.99 up to")
    trained = f[f["trained"]].groupby("round")["length"].max()
    ax.plot(trained.index, trained.values, ":", color="grey", label="trained up to")
    ax.set(xlabel="round", ylabel="digits")
    ax.set_title("length frontier per round", fontsize=9)
    ax.legend(fontsize=6)


@did_you_mean
def accuracy_by_length(result: Any) -> plt.Figure:
    """Sequence accuracy vs digits, one line per round (the round's training frontier dotted)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _accuracy(ax, _frame(result))
    fig.tight_layout()
    return fig


@did_you_mean
def fixed_points_by_round(result: Any) -> plt.Figure:
    """Converged-and-correct vs converged-and-wrong (confidently wrong) vs digits per round."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _fixed_points(ax, _frame(result))
    fig.tight_layout()
    return fig


@did_you_mean
def labels_by_round(result: Any, *, noisy: Any = None) -> plt.Figure:
    """Self-label error, filter yield and kept-label error vs round (and the noisy run's)."""
    runs = {"clean": _frame(result)}
    if noisy is not None:
        runs["noisy"] = _frame(noisy)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    _labels(ax, runs)
    fig.tight_layout()
    return fig


@did_you_mean
def panels(result: Any, *, noisy: Any = None) -> plt.Figure:
    """The paper's four panels: accuracy vs length per round; converged-correct vs
    converged-wrong per round; label error and filter yield vs round; the length frontier per
    round, with the label-noise run beside the clean one where ``noisy`` is given."""
    f = _frame(result)
    runs = {"clean": f} if noisy is None else {"clean": f, "noisy": _frame(noisy)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.2))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _accuracy(axes[0, 0], f)
    _fixed_points(axes[0, 1], f)
    _labels(axes[1, 0], runs)
    _frontier(axes[1, 1], runs)
    fig.tight_layout()
    return fig
