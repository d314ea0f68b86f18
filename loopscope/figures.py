"""Figure functions: tidy frames in, matplotlib Figure out (no computation here).

Importing this module never changes the matplotlib backend: in a notebook figures display
inline; the CLI and the tests select the headless ``Agg`` backend themselves.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "convergence_curves",
    "spectra_lyapunov",
    "eigen_scatter",
    "basin_map",
    "basin_maps",
    "halting_tradeoff",
    "hierarchical_convergence",
    "heatmap",
    "line_curves",
    "scatter_xy",
    "verdict_table",
    "memory_panels",
    "knob_effects",
    "seed_spread",
]


def convergence_curves(df: pd.DataFrame) -> plt.Figure:
    """Median relative residual (and period-2 residual) vs iteration, IQR band, per model x split;
    accuracy vs iteration underneath. ``df``: model, split, iteration, median, q25, q75,
    median_p2, accuracy."""
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(
        2, len(models), figsize=(4.2 * len(models), 6.5), sharex="col", squeeze=False
    )
    for j, m in enumerate(models):
        d = df[df["model"] == m]
        for split, g in d.groupby("split", sort=False):
            ax = axes[0, j]
            r1 = g.dropna(subset=["median"])  # the last state has no next one: no residual
            (line,) = ax.plot(r1["iteration"], r1["median"], label=f"{split} 1-step")
            ax.fill_between(
                r1["iteration"], r1["q25"], r1["q75"], alpha=0.2, color=line.get_color()
            )
            p2 = g.dropna(subset=["median_p2"])  # drawn (and in the legend) only where measured
            if len(p2):
                ax.plot(
                    p2["iteration"],
                    p2["median_p2"],
                    ls="--",
                    color=line.get_color(),
                    label=f"{split} period-2",
                )
            acc = g.dropna(subset=["accuracy"])
            if len(acc):
                axes[1, j].plot(
                    acc["iteration"], acc["accuracy"], color=line.get_color(), label=split
                )
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(m)
        axes[0, j].set_ylabel("relative residual")
        axes[1, j].set_ylabel("token accuracy")
        axes[1, j].set_xlabel("iteration")
        axes[1, j].set_ylim(0, 1.02)
        axes[0, j].legend(fontsize=7)
        if axes[1, j].lines:
            axes[1, j].legend(fontsize=7)
        else:
            axes[1, j].text(
                0.5, 0.5, "no accuracy measured", ha="center", transform=axes[1, j].transAxes
            )
    fig.tight_layout()
    return fig


def spectra_lyapunov(
    rho: pd.DataFrame, lyap: pd.DataFrame, eig: pd.DataFrame | None = None
) -> plt.Figure:
    """Spectral radius rho(J) at the end state and largest Lyapunov exponent per model, ID vs
    OOD, every sample a point (n per group in the tick labels); with ``eig`` (model, split,
    real, imag), a row above with the leading eigenvalues of every sample in the complex plane
    against the unit circle, one panel per model."""
    models = list(dict.fromkeys(rho["model"]))
    splits = list(dict.fromkeys(rho["split"]))
    colours = dict(zip(splits, sns.color_palette("tab10", len(splits)), strict=True))
    rows = 2 if eig is not None and len(eig) else 1
    fig = plt.figure(figsize=(max(10, 3.6 * len(models)), 3.9 * rows))
    gs = fig.add_gridspec(rows, 2 * len(models))
    if rows == 2:
        th = np.linspace(0, 2 * np.pi, 400)
        for j, m in enumerate(models):
            ax = fig.add_subplot(gs[0, 2 * j : 2 * j + 2])
            ax.plot(np.cos(th), np.sin(th), color="k", lw=0.8)
            for sp in splits:
                g = eig[(eig["model"] == m) & (eig["split"] == sp)]
                n = g["sample"].nunique() if "sample" in g else 0
                ax.scatter(g["real"], g["imag"], s=12, alpha=0.6, color=colours[sp],
                           label=f"{sp}: {len(g)} eigenvalues, {n} samples")  # fmt: skip
            ax.set_aspect("equal")
            ax.set_title(f"{m}: leading eigenvalues of J (end state)", fontsize=9)
            ax.set_xlabel("Re λ")
            ax.set_ylabel("Im λ")
            ax.legend(fontsize=7, loc="lower left")
    half = len(models)
    for k, (df, col, ref, title) in enumerate(
        (
            (rho, "rho", 1.0, "spectral radius of J at the end state"),
            (lyap, "lambda1", 0.0, "largest Lyapunov exponent (nats / iteration)"),
        )
    ):
        ax = fig.add_subplot(gs[rows - 1, k * half : (k + 1) * half])
        sns.stripplot(data=df, x="model", y=col, hue="split", dodge=True, ax=ax, size=5,
                      palette=colours, order=models, hue_order=splits, jitter=0.15)  # fmt: skip
        ax.axhline(ref, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=9)
        counts = df.groupby(["model", "split"]).size()
        ax.set_xticks(
            range(len(models)),
            [
                f"{m}\n(n = {' + '.join(str(int(counts.get((m, sp), 0))) for sp in splits)})"
                for m in models
            ],
        )
        ax.set_xlabel("")
    fig.tight_layout()
    return fig


def eigen_scatter(eig: pd.DataFrame) -> plt.Figure:
    """Eigenvalues in the complex plane with the unit circle, per split."""
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    th = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(th), np.sin(th), color="k", lw=0.8)
    for (m, split), g in eig.groupby(["model", "split"], sort=False):
        ax.scatter(g["real"], g["imag"], s=6, alpha=0.5, label=f"{m} {split}")
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def basin_map(img: pd.DataFrame, fractions: pd.DataFrame) -> plt.Figure:
    """Left: decoded answer on a 2-D slice of initial states; right: basin fractions (correct
    basin highlighted) per split. ``img``: alpha, beta, answer_id, correct."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    piv = img.pivot(index="beta", columns="alpha", values="answer_id")
    ext = [img["alpha"].min(), img["alpha"].max(), img["beta"].min(), img["beta"].max()]
    axes[0].imshow(
        piv.values, origin="lower", extent=ext, cmap="tab20", interpolation="nearest", aspect="auto"
    )
    axes[0].set_title("answer reached from a 2-D slice of h_0")
    axes[0].set_xlabel("alpha (random direction 1)")
    axes[0].set_ylabel("beta (random direction 2)")
    sns.barplot(
        data=fractions,
        x="split",
        y="correct_basin_fraction",
        hue="model",
        ax=axes[1],
        errorbar=None,
    )
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("share of random inits ending on the correct answer")
    fig.tight_layout()
    return fig


#: basin colours: the correct answer green, wrong answers distinct hues, pooled answers grey
_CORRECT = "#2ca02c"
_WRONG = ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_OTHER, _DIVERGED = "#c7c7c7", "#000000"


def _basin_colours(answers: pd.DataFrame) -> dict[int, str]:
    out, k = {-1: _DIVERGED}, 0
    for r in answers.sort_values("answer_id").itertuples():
        if "other answers" in str(r.label):
            out[int(r.answer_id)] = _OTHER
        elif r.correct:
            out[int(r.answer_id)] = _CORRECT
        else:
            out[int(r.answer_id)] = _WRONG[k % len(_WRONG)]
            k += 1
    return out


def basin_maps(grid: pd.DataFrame, fractions: pd.DataFrame, answers: pd.DataFrame) -> plt.Figure:
    """One row per ``model``: left, the decoded answer reached from each point of a 2-D slice of
    initial states around the model's own ``h_0`` (star), dashed circles at the shell radii,
    a legend naming each colour's answer and attractor kind; right, the share of inits on each
    sphere ``||h - h_0|| = r`` ending in each basin, with 95 % CIs.

    Frames (each with ``model``): ``grid`` (alpha, beta, answer_id), ``fractions`` (radius,
    answer_id, fraction, ci_low, ci_high, n), ``answers`` (answer_id, label, correct) and
    optionally ``title`` on ``answers`` (the panel title)."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Circle, Patch

    models = list(dict.fromkeys(grid["model"]))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.4 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        g, fr, an = (d[d["model"] == m] for d in (grid, fractions, answers))
        col = _basin_colours(an)
        alphas, betas = np.sort(g["alpha"].unique()), np.sort(g["beta"].unique())
        img = np.ones((len(betas), len(alphas), 3))
        ia = np.searchsorted(alphas, g["alpha"].to_numpy())
        ib = np.searchsorted(betas, g["beta"].to_numpy())
        img[ib, ia] = [to_rgb(col.get(int(a), _OTHER)) for a in g["answer_id"]]
        ext = [alphas[0], alphas[-1], betas[0], betas[-1]]
        ax = axes[i, 0]
        ax.imshow(img, origin="lower", extent=ext, interpolation="nearest", aspect="equal")
        for r in sorted(fr.loc[fr["radius"] > 0, "radius"].unique()):
            if r <= alphas[-1] * 1.42:  # the spheres the slice reaches
                ax.add_patch(Circle((0, 0), r, fill=False, ls="--", lw=0.8, color="w"))
        ax.set_xlim(ext[0], ext[1])
        ax.set_ylim(ext[2], ext[3])
        ax.grid(False)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))
        ax.yaxis.set_major_locator(plt.MaxNLocator(5))
        ax.plot(0, 0, marker="*", ms=13, color="w", mec="k", ls="none")
        ax.set_xlabel("a (units of scale)")
        ax.set_ylabel("b (units of scale)")
        title = an["title"].iloc[0] if "title" in an and len(an) else m
        ax.set_title(title, fontsize=9)
        present = set(g["answer_id"]) | set(fr["answer_id"])
        handles = [
            Patch(color=col[int(r.answer_id)], label=str(r.label))
            for r in an.sort_values("answer_id").itertuples()
            if int(r.answer_id) in present
        ]
        if -1 in present:
            handles.append(Patch(color=_DIVERGED, label="diverged"))
        handles.append(
            plt.Line2D(
                [], [], marker="*", ms=10, color="w", mec="k", ls="none", label="h_0 (own init)"
            )
        )
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax2 = axes[i, 1]
        rs = sorted(fr["radius"].unique())  # equally spaced: the radii are geometric
        pos = {r: k for k, r in enumerate(rs)}
        k_ans = max(1, fr["answer_id"].nunique())
        for j, (a, d) in enumerate(fr.groupby("answer_id")):
            d = d.sort_values("radius")
            x = d["radius"].map(pos) + (j - (k_ans - 1) / 2) * 0.06  # dodge: no hidden line
            c = col.get(int(a), _OTHER)
            ax2.plot(
                x, d["fraction"], marker="o", ms=4, lw=1.2, color=c, mec="k" if c == _OTHER else c
            )
            # CIs where they say something: a share > 0 on a sphere (the own init is one state)
            e = d[(d["fraction"] > 0) & (d["radius"] > 0)]
            ex = e["radius"].map(pos) + (j - (k_ans - 1) / 2) * 0.06
            err = [e["fraction"] - e["ci_low"], e["ci_high"] - e["fraction"]]
            ax2.errorbar(ex, e["fraction"], yerr=err, fmt="none", capsize=3, lw=1, color=c)
        ax2.set_xticks(range(len(rs)), ["own init" if r == 0 else f"{r:g}" for r in rs])
        n = int(fr.loc[fr["radius"] > 0, "n"].max()) if (fr["radius"] > 0).any() else 0
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_xlabel("distance from h_0, r (units of scale)")
        ax2.set_ylabel("share of inits in the basin")
        ax2.set_title(
            f"basin shares on spheres around h_0 ({n} inits each, 95 % Wilson CI)", fontsize=9
        )
    fig.tight_layout()
    return fig


def halting_tradeoff(df: pd.DataFrame, gaps: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy vs mean iterations per exit criterion (points over thresholds)."""
    fig, axes = plt.subplots(
        1, 2 if gaps is not None else 1, figsize=(11 if gaps is not None else 6, 4.2), squeeze=False
    )
    ax = axes[0, 0]
    # one colour per criterion (never reused), one line style + marker per split
    crits = list(dict.fromkeys(df["criterion"]))
    palette = dict(
        zip(
            crits,
            sns.color_palette("tab20" if len(crits) > 10 else "tab10", len(crits)),
            strict=True,
        )
    )
    splits = list(dict.fromkeys(df["split"])) if "split" in df else [None]
    styles = dict(zip(splits, [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")] * 3, strict=False))
    groups = (
        df.groupby(["criterion", "split"], sort=False)
        if "split" in df
        else df.groupby(["criterion"], sort=False)
    )
    for key, g in groups:
        crit, split = (key[0], key[1]) if "split" in df else (key[0], None)
        g = g.sort_values("mean_steps")
        ls, mk = styles[split]
        ax.plot(g["mean_steps"], g["accuracy"], ls=ls, marker=mk, ms=3.5, color=palette[crit])
    handles = [plt.Line2D([], [], color=palette[c], lw=2, label=c) for c in crits]
    if len(splits) > 1:
        handles += [
            plt.Line2D(
                [],
                [],
                color="k",
                ls=styles[sp][0],
                marker=styles[sp][1],
                ms=3.5,
                label=f"split: {sp}",
            )
            for sp in splits
        ]
    ax.set_xlabel("mean iterations at exit")
    ax.set_ylabel("sequence accuracy")
    ax.legend(handles=handles, fontsize=6, ncol=2)
    ax.set_title("halting trade-off")
    if gaps is not None:
        sns.barplot(
            data=gaps, x="criterion", y="saturation_gap", hue="split", ax=axes[0, 1], errorbar=None
        )
        axes[0, 1].axhline(0, color="k", lw=0.8)
        axes[0, 1].set_title("halt step − accuracy-saturation step")
        axes[0, 1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def hierarchical_convergence(df: pd.DataFrame, pr: pd.DataFrame) -> plt.Figure:
    """Residual of z_H and z_L across slow cycles (and, where ``df`` has ``loop == "fixed_point"``
    rows, the distance of z_L from the fast loop's fixed point); fast-loop residual within each
    cycle; participation ratio of each state."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    slow = df[df["loop"] == "slow"]
    for (state, split), g in slow.groupby(["state", "split"]):  # one line per state and split
        style = dict(ls=":" if split == "ood" else "-", color="C0" if state == "z_H" else "C1")
        axes[0].plot(
            g["iteration"], g["median"], marker="o", ms=3, label=f"{state} {split}", **style
        )
    fp = df[df["loop"] == "fixed_point"]  # optional: ‖z_L − z_L*‖ / ‖z_L*‖ at the end of a cycle
    if len(fp):
        axes[0].plot(
            fp["iteration"], fp["median"], ls="--", color="k", label="z_L to fast fixed pt (id)"
        )
    axes[0].set_yscale("log")
    axes[0].set_title("slow loop: relative change per H-cycle")
    axes[0].set_xlabel("H-cycle")
    axes[0].legend()
    fast = df[df["loop"] == "fast"]
    for cyc, g in fast.groupby("cycle"):
        axes[1].plot(g["iteration"], g["median"], label=f"z_H of cycle {cyc}")
    axes[1].set_yscale("log")
    axes[1].set_title("fast loop (z_H fixed): relative change")
    axes[1].set_xlabel("L-step")
    axes[1].legend(fontsize=7)
    sns.barplot(data=pr, x="state", y="participation_ratio", hue="split", ax=axes[2], errorbar=None)
    axes[2].set_title("participation ratio")
    fig.tight_layout()
    return fig


def heatmap(
    df: pd.DataFrame, index: str, columns: str, values: str, title: str, center: float | None = None
) -> plt.Figure:
    """A labelled heatmap of one value over two axes."""
    piv = df.pivot_table(index=index, columns=columns, values=values, aggfunc="mean")
    fig, ax = plt.subplots(
        figsize=(max(4, 0.35 * piv.shape[1] + 2), max(3, 0.3 * piv.shape[0] + 1.5))
    )
    sns.heatmap(piv, ax=ax, cmap="RdBu_r" if center is not None else "viridis", center=center)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def line_curves(
    df: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    title: str,
    ylabel: str | None = None,
    ylim: tuple | None = None,
) -> plt.Figure:
    """Lines of ``y`` vs ``x`` per ``hue`` with 95% CI bands where there are repeats."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", ms=4, ax=ax, errorbar=("ci", 95))
    ax.set_title(title)
    if ylabel:
        ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    fig.tight_layout()
    return fig


def scatter_xy(df: pd.DataFrame, x: str, y: str, hue: str | None, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sns.scatterplot(data=df, x=x, y=y, hue=hue, ax=ax, s=18, alpha=0.7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def verdict_table(df: pd.DataFrame) -> plt.Figure:
    """The verdict evidence rows as a colour-coded table figure."""
    show = df[["model", "evidence", "split", "value", "reading"]].copy()
    show["value"] = show["value"].map(lambda v: f"{v:.3f}")
    colors = {"algorithm": "#d9f0d3", "memorized/heuristic": "#f4cccc", "neutral": "#ffffff"}
    fig, ax = plt.subplots(figsize=(13, 0.28 * len(show) + 1))
    ax.axis("off")
    tab = ax.table(cellText=show.values, colLabels=show.columns, loc="center", cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(7)
    for i, s in enumerate(df["supports"].tolist()):
        for j in range(show.shape[1]):
            tab[i + 1, j].set_facecolor(colors.get(s, "#ffffff"))
    tab.auto_set_column_width(list(range(show.shape[1])))
    fig.tight_layout()
    return fig


def _thin_ticks(ax: plt.Axes, labels_x: list, labels_y: list, most: int = 12) -> None:
    """Heatmap tick labels every k-th cell so that at most ``most`` show (no overlap)."""
    for labels, set_ticks, set_labels in (
        (labels_x, ax.set_xticks, ax.set_xticklabels),
        (labels_y, ax.set_yticks, ax.set_yticklabels),
    ):
        k = max(1, int(np.ceil(len(labels) / most)))
        idx = list(range(0, len(labels), k))
        set_ticks([i + 0.5 for i in idx])
        set_labels([str(labels[i]) for i in idx], rotation=0)


def probe_wavefront(
    df: pd.DataFrame, onset_df: pd.DataFrame, transfer: pd.DataFrame | None = None
) -> plt.Figure:
    """Probe test accuracy over (iteration x position), one panel per split, onset vs position
    (positions that never reach the threshold marked x at the top, with their final accuracy),
    and (optionally) the cross-iteration transfer matrix (fit at t, score at t')."""
    splits = list(dict.fromkeys(df["split"]))
    extra = 2 if transfer is not None else 1
    fig, axes = plt.subplots(1, len(splits) + extra, figsize=(5 * len(splits) + 4.5 * extra, 4))
    for ax, sp in zip(axes, splits, strict=False):
        piv = df[df["split"] == sp].pivot_table(
            index="iteration", columns="position", values="test_acc"
        )
        sns.heatmap(piv, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar=ax is axes[len(splits) - 1])
        _thin_ticks(ax, [int(c) for c in piv.columns], [int(i) for i in piv.index])
        ax.invert_yaxis()
        ax.set_title(f"probe accuracy, running state ({sp})")
    ax_on = axes[len(splits)]
    top = float(df["iteration"].max())
    for sp, g in onset_df.groupby("split", sort=False):
        ok = g[g["onset"] >= 0]
        (line,) = ax_on.plot(ok["position"], ok["onset"], marker="o", ms=4, label=sp)
        never = g[g["onset"] < 0]
        if len(never):
            d = df[df["split"] == sp]
            last = d[d["iteration"] == d["iteration"].max()].groupby("position")["test_acc"].mean()
            ax_on.plot(
                never["position"], [top + 1.5] * len(never), ls="none", marker="x", ms=7, mew=2,
                color=line.get_color(),
                label=f"{sp}: never >= 0.9 (final acc "
                + ", ".join(f"{last.get(p, np.nan):.2f}" for p in never["position"][:4])
                + (" ..." if len(never) > 4 else "") + ")",
                clip_on=False,
            )  # fmt: skip
    lim = float(onset_df["position"].max())
    ax_on.plot([0, lim], [0, lim], color="k", lw=0.8, ls=":", label="onset = position")
    ax_on.axhline(top + 0.5, color="grey", lw=0.6)
    ax_on.set_ylim(bottom=0, top=top + 3)
    ax_on.set_xlabel("position")
    ax_on.set_ylabel("onset iteration (acc >= 0.9)")
    ax_on.legend(fontsize=7, loc="upper left")
    if transfer is not None:
        piv = transfer.pivot(index="fit_iteration", columns="score_iteration", values="accuracy")
        sns.heatmap(piv, ax=axes[-1], vmin=0, vmax=1, cmap="viridis")
        _thin_ticks(axes[-1], [int(c) for c in piv.columns], [int(i) for i in piv.index])
        axes[-1].invert_yaxis()
        axes[-1].set_title("transfer: probe fit at t, scored at t'")
    fig.tight_layout()
    return fig


def patching_panels(
    heat: pd.DataFrame, transplant: pd.DataFrame, *, setting: str | None = None
) -> plt.Figure:
    """Denoising recovery over (iteration x position) and the state-transplant curve R(t), one
    style per measuring step (solid circles / dashed open squares: an overlap stays visible);
    ``setting`` (e.g. n, length, T, the corrupted position) heads the figure."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    piv = heat.pivot_table(index="iteration", columns="position", values="recovery", aggfunc="mean")
    sns.heatmap(piv, ax=axes[0], cmap="RdBu_r", center=0, vmin=-1, vmax=1)
    _thin_ticks(axes[0], [int(c) for c in piv.columns], [int(i) for i in piv.index])
    axes[0].invert_yaxis()
    axes[0].set_title("denoising recovery: clean h_t at one position")
    styles = [("-", "o", "C0", "full"), ("--", "s", "C3", "none"), (":", "^", "C2", "full")]
    for (at, g), (ls, mk, c, fill) in zip(transplant.groupby("measured_at"), styles, strict=False):
        m = g.groupby("t")["recovery"]
        mean, se = m.mean(), m.sem().fillna(0)
        axes[1].fill_between(mean.index, mean - 1.96 * se, mean + 1.96 * se, color=c, alpha=0.12)
        axes[1].plot(
            mean.index, mean.to_numpy(), ls=ls, marker=mk, ms=5, color=c, fillstyle=fill,
            label=f"measured at iteration {int(at)} (n = {g['example'].nunique()})",
        )  # fmt: skip
    axes[1].set_ylim(-0.1, 1.1)
    axes[1].legend(fontsize=8)
    axes[1].set_title("state transplant: clean h_t into the corrupted run, R(t)")
    axes[1].set_xlabel("iteration t of the transplant")
    axes[1].set_ylabel("recovery (mean, 95 % CI)")
    if setting:
        fig.suptitle(setting, fontsize=9)
    fig.tight_layout()
    return fig


def memorization_panels(digits: pd.DataFrame) -> plt.Figure:
    """Per-digit accuracy by whether the digit's computation was seen in training (df > 0)."""
    d = digits.assign(seen=np.where(digits["df"] > 0, "df > 0 (seen)", "df = 0 (novel)"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sns.barplot(data=d, x="digit", y="correct", hue="seen", ax=axes[0], errorbar=("ci", 95))
    axes[0].set_ylim(0, 1.02)
    axes[0].set_title("digit accuracy vs training frequency of its computation")
    g = d.groupby(["split", "digit"], as_index=False).agg(
        acc=("correct", "mean"), mean_log_df=("df", lambda x: float(np.log1p(x).mean()))
    )
    sns.scatterplot(data=g, x="mean_log_df", y="acc", hue="split", style="digit", s=70, ax=axes[1])
    axes[1].set_xlabel("mean log(1 + df)")
    axes[1].set_ylabel("accuracy")
    axes[1].set_title("correctness vs subgraph frequency")
    fig.tight_layout()
    return fig


def memory_panels(
    acc: pd.DataFrame, dec: pd.DataFrame, long: pd.DataFrame, spec: pd.DataFrame
) -> plt.Figure:
    """Four panels per model: answer accuracy vs context blocks; probe accuracy vs updates since
    the item was written; memory norm (/ ||M_0||) and answer accuracy over a long filler
    stream; Jacobian eigenvalues at the filler fixed point with the unit circle.
    Frames: ``acc`` (model, n_context, accuracy), ``dec`` (model, updates, test_acc),
    ``long`` (model, iteration, rel_norm, accuracy), ``spec`` (model, real, imag)."""
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
    for name, g in acc.groupby("model"):
        ax[0].plot(g["n_context"], g["accuracy"], "o-", label=name)
    ax[0].set(xscale="log", xlabel="context blocks", ylabel="answer accuracy", ylim=(0, 1.05))
    ticks = sorted(acc["n_context"].unique())
    ax[0].set_xticks(ticks, [str(t) for t in ticks])
    ax[0].minorticks_off()
    ax[0].set_title("accuracy vs filler length")
    ax[0].legend(fontsize=7)
    for name, g in dec.groupby("model"):
        ax[1].plot(g["updates"], g["test_acc"], ".-", label=name)
    ax[1].set(xlabel="memory updates since written", ylabel="probe accuracy", ylim=(0, 1.05))
    ax[1].set_title("stored item decodability")
    ax2 = ax[2].twinx()
    for name, g in long.groupby("model"):
        (line,) = ax[2].plot(g["iteration"], g["rel_norm"], label=f"{name} norm")
        ax2.plot(g["iteration"], g["accuracy"], ":", color=line.get_color())
    ax[2].set(xscale="symlog", yscale="log", xlabel="block", ylabel="||M_t|| / ||M_0|| (solid)")
    ax2.set_ylabel("answer accuracy (dotted)")
    ax[2].set_title("memory drift over a filler stream")
    th = np.linspace(0, 2 * np.pi, 200)
    ax[3].plot(np.cos(th), np.sin(th), color="grey", lw=0.8)
    for name, g in spec.groupby("model"):
        ax[3].scatter(g["real"], g["imag"], s=6, alpha=0.5, label=name)
    ax[3].set(aspect="equal", xlabel="Re", ylabel="Im")
    ax[3].set_title("spectrum at the filler fixed point")
    fig.tight_layout()
    return fig


def knob_effects(long: pd.DataFrame, summary: pd.DataFrame, metrics: dict[str, str]) -> plt.Figure:
    """Study metrics per architecture configuration: one panel per metric, configurations on x,
    one colour per split; every seed a small mark, the mean over seeds with its 95 % CI a large
    one. ``long``: config, split, metric, seed, value; ``summary``: config, split, metric, mean,
    ci_low, ci_high, n_seeds; ``metrics``: metric -> panel title."""
    configs = list(dict.fromkeys(long["config"]))
    splits = list(dict.fromkeys(long["split"]))
    colours = dict(zip(splits, sns.color_palette("tab10", len(splits)), strict=True))
    names = [m for m in metrics if m in set(long["metric"])]
    ncol = 3
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(15, 3.9 * nrow), squeeze=False)
    x = np.arange(len(configs))
    for ax, m in zip(axes.flat, names, strict=False):
        for k, sp in enumerate(splits):
            off = (k - (len(splits) - 1) / 2) * 0.25
            d = long[(long["metric"] == m) & (long["split"] == sp)]
            xi = d["config"].map({c: i for i, c in enumerate(configs)}).to_numpy() + off
            jit = (d["seed"].to_numpy() % 3 - 1) * 0.04
            ax.scatter(xi + jit, d["value"], s=18, alpha=0.7, color=colours[sp], lw=0)
            sm = summary[(summary["metric"] == m) & (summary["split"] == sp)].set_index("config")
            sm = sm.reindex(configs)
            err = [sm["mean"] - sm["ci_low"], sm["ci_high"] - sm["mean"]]
            ax.errorbar(x + off, sm["mean"], yerr=err, fmt="o", ms=6, capsize=3, lw=1.3,
                        color=colours[sp], mec="k", label=f"{sp}: mean over seeds, 95 % CI")  # fmt: skip
        ax.set_title(metrics[m], fontsize=10)
        ax.set_xticks(x, [c.replace(" ", "\n") for c in configs], fontsize=7)
        if m.endswith(("_acc", "_fraction")):  # shares: a t-interval past [0, 1] is cut
            ax.set_ylim(-0.05, 1.05)
        if m == "rho_median":
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
        if m == "lambda1_median":
            ax.axhline(0.0, color="k", lw=0.8, ls=":")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def seed_spread(long: pd.DataFrame) -> plt.Figure:
    """Headline findings across training seeds: one row per finding, one mark per seed (its
    seed number beside it), the threshold the finding is read against (dotted; the side where
    it holds shaded), and on how many seeds it holds. ``long``: finding, seed, value, rule,
    holds."""
    findings = list(dict.fromkeys(long["finding"]))
    fig, ax = plt.subplots(figsize=(10, 0.62 * len(findings) + 1.2))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    lo = min(-0.05, float(long["value"].min()) - 0.05)
    for i, f in enumerate(findings):
        g = long[long["finding"] == f].sort_values("seed")
        op, thr = str(g["rule"].iloc[0]).split()
        thr = float(thr)
        span = (thr, 1.08) if op == ">=" else (lo, thr)
        ax.fill_between(span, i - 0.35, i + 0.35, color="#d9f0d3", lw=0)
        ax.plot([thr, thr], [i - 0.38, i + 0.38], color="k", lw=0.9, ls=":")
        for j, r in enumerate(g.itertuples()):
            c = "#2ca02c" if r.holds else "#d62728"
            y = i + (j - (len(g) - 1) / 2) * 0.15
            ax.plot(
                r.value,
                y,
                marker=markers[int(r.seed) % len(markers)],
                ms=7,
                color=c,
                mec="k",
                ls="none",
            )
            ax.annotate(
                f"s{int(r.seed)}",
                (r.value, y),
                xytext=(5, -3),
                textcoords="offset points",
                fontsize=6,
            )
        ax.text(1.1, i, f"holds on {int(g['holds'].sum())}/{len(g)}", va="center", fontsize=8)
    ax.set_yticks(range(len(findings)), findings, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(lo, 1.08)
    ax.set_xlabel(
        "value (green side of the dotted line: the finding holds; green mark: it holds on that seed)"
    )
    ax.set_title("Headline findings across training seeds (one mark per seed)")
    fig.tight_layout()
    return fig
