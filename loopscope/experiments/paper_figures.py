"""The paper's figure recipes: what each figure of ``loopscope paper`` measures, on which models.

Each figure is one recipe ``fig_*(ctx) -> PaperFigure``: it computes tidy results with the
analyses and returns them with a title, a caption and the drawing (a call into
:mod:`loopscope.figures`, made by the writer, never by the recipe). :mod:`loopscope.paper` runs
the recipes and writes them. ``ctx.quick`` selects the shipped checkpoints and small sample sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope import figures
from loopscope.core.errors import LoopscopeError
from loopscope.core.result import FrameResult
from loopscope.core.unroll import unroll

__all__ = ["PaperContext", "PaperFigure", "Parts", "FIGURES", "PARTS", "EXPECTED_FIGURES"]


@dataclass(kw_only=True, repr=False)
class PaperFigure(FrameResult):
    """One figure's data (``frame``), title and caption; ``draw()`` makes the matplotlib Figure."""

    title: str
    caption: str
    draw: Callable[[], Any] = field(repr=False)


@dataclass
class PaperContext:
    """Shared settings and a model cache for one paper run."""

    quick: bool = True
    seed: int = 0
    model_dir: Path | None = None
    n: int = 64
    cache: dict[str, Any] = field(default_factory=dict)

    def model(self, name: str):
        if name not in self.cache:
            from loopscope import zoo
            from loopscope.models.checkpoint import load_model

            if self.model_dir is not None and (self.model_dir / name / "config.json").exists():
                m = load_model(self.model_dir / name)
                m.zoo_name = name
            else:
                m = zoo.load(name)
            self.cache[name] = m
        return self.cache[name]

    def task(self, model_name: str):
        if ("task", model_name) not in self.cache:
            from loopscope import zoo

            self.cache["task", model_name] = zoo.task_of(model_name)
        return self.cache["task", model_name]

    def n_iter(self, batch: Any, factor: float) -> int:
        L = batch.length
        return max(2, int(round(factor * L)))


@dataclass(frozen=True)
class Parts:
    """A figure computed in independent parts, then combined (``loopscope paper --jobs`` runs the
    parts of every such figure in parallel, longest first, beside the whole figures).

    ``items(ctx)`` lists the parts (model names, ``(model, split)`` pairs, ...); ``part(ctx,
    item)`` computes one from scratch (the global torch seed is reset to ``ctx.seed`` before each,
    so a part's result never depends on which process ran it or what ran before);
    ``combine(ctx, results)`` gets the results in ``items`` order and returns the figure. The
    functions are module-level (worker processes import them by name).
    """

    items: Callable[[PaperContext], list]
    part: Callable[[PaperContext, Any], Any]
    combine: Callable[[PaperContext, list], PaperFigure]

    def __call__(self, ctx: PaperContext) -> PaperFigure:
        results = []
        for item in self.items(ctx):
            torch.manual_seed(ctx.seed)
            results.append(self.part(ctx, item))
        return self.combine(ctx, results)


def _model_splits(ctx: PaperContext) -> list[tuple[str, str]]:
    return [(m, s) for m in ("s3_fprm", "s3_rope", "addition_conv") for s in ("id", "ood")]


# -- figures -------------------------------------------------------------------------------------
def _convergence_part(ctx: PaperContext, item: tuple[str, str]) -> list[dict]:
    from loopscope.analysis import metrics

    name, split = item
    model, task = ctx.model(name), ctx.task(name)
    rows = []
    b = task.sample(ctx.n // 2 if ctx.quick else ctx.n, split, seed=ctx.seed)
    tr = unroll(
        model,
        b.tokens,
        ctx.n_iter(b, 3.0 if ctx.quick else 4.0),
        seed=ctx.seed,
        decode=True,
    )
    m = metrics(tr, p_max=2)
    rel = m["rel_residual"].numpy()  # [T+1, B]
    p2 = (m["res_p2"] / tr.states.flatten(2).double().norm(dim=-1).clamp_min(1e-30)).numpy()
    mask = b.targets != -100
    acc = ((tr.logits.argmax(-1) == b.targets) & mask).sum((1, 2)).numpy() / mask.sum().item()
    for t in range(1, rel.shape[0]):
        if not np.isfinite(rel[t]).any():
            continue
        rows.append(
            dict(
                model=name,
                split=split,
                iteration=t,
                median=np.nanmedian(rel[t]),
                q25=np.nanquantile(rel[t], 0.25),
                q75=np.nanquantile(rel[t], 0.75),
                median_p2=np.nanmedian(p2[t]) if t >= 2 and np.isfinite(p2[t]).any() else np.nan,
                accuracy=acc[t],
            )
        )
    return rows


def _convergence_figure(ctx: PaperContext, parts: list[list[dict]]) -> PaperFigure:
    df = pd.DataFrame([row for rows in parts for row in rows])
    cap = (
        "Median relative residual ||h_t - h_{t-1}||/||h_t|| (solid, IQR band) and period-2 residual (dashed) per iteration, "
        "with token accuracy below; ID vs OOD (2x length), iterations up to 4x the length."
    )
    return PaperFigure(
        draw=lambda: figures.convergence_curves(df),
        frame=df,
        title="Convergence ID vs OOD",
        caption=cap,
    )


CONVERGENCE = Parts(items=_model_splits, part=_convergence_part, combine=_convergence_figure)
fig_convergence = CONVERGENCE


def _spectra_part(ctx: PaperContext, item: tuple[str, str]) -> tuple[list, list, list]:
    from loopscope.experiments.stability import end_spectrum, mid_lambda1

    name, split = item
    rho_rows, ly_rows, eig_rows = [], [], []
    k_samples = 2 if ctx.quick else 8
    model, task = ctx.model(name), ctx.task(name)
    b = task.sample(k_samples, split, seed=ctx.seed)
    # causal models: a prefix of an input is an input of that length; capping OOD inputs
    # at 24 tokens (1.5x the longest training length) keeps the dense eigen-solve cheap
    max_len = 25 if split != "id" else 17
    b.tokens, b.targets = b.tokens[:, :max_len], b.targets[:, :max_len]
    T = ctx.n_iter(b, 4.0)
    tr = unroll(model, b.tokens, T, seed=ctx.seed)
    sp = end_spectrum(model, b.tokens, tr.final, dense_max=1700 if ctx.quick else 2400)
    for s in range(k_samples):
        rho_rows.append(
            dict(
                model=name,
                split=split,
                sample=s,
                rho=sp.rho[s],
                unstable=sp.unstable[s],
                method=sp.method,
            )
        )
        for lam in sp.eigenvalues[s]:
            eig_rows.append(dict(model=name, split=split, sample=s, real=lam.real, imag=lam.imag))
    ly = mid_lambda1(
        model, b.tokens, tr.states[T // 2], n_steps=40 if ctx.quick else 200, seed=ctx.seed
    )
    for s in range(k_samples):
        ly_rows.append(dict(model=name, split=split, sample=s, lambda1=float(ly.exponents[s, 0])))
    return rho_rows, ly_rows, eig_rows


def _spectra_figure(ctx: PaperContext, parts: list[tuple[list, list, list]]) -> PaperFigure:
    k_samples = 2 if ctx.quick else 8
    rho, lyd, eig = (pd.DataFrame([r for p in parts for r in p[i]]) for i in range(3))
    df = rho.merge(lyd, on=["model", "split", "sample"])
    cap = (
        "Spectral radius of the step's Jacobian at the end state (dense or ARPACK with ncv >= 64) and the largest Lyapunov "
        "exponent from the middle of the trajectory (QR method), per model; ID inputs vs OOD inputs of 24 tokens (1.5x the training length); rho < 1 and lambda1 < 0 mean a locally stable attractor. "
        f"{k_samples} inputs per model and split (every one a point); top: the 6 leading eigenvalues of each in the complex plane."
    )
    return PaperFigure(
        draw=lambda: figures.spectra_lyapunov(rho, lyd, eig),
        frame=df,
        title="Jacobian spectra and Lyapunov exponents",
        caption=cap,
    )


SPECTRA = Parts(items=_model_splits, part=_spectra_part, combine=_spectra_figure)
fig_spectra = SPECTRA


def fig_basins(ctx: PaperContext):
    from loopscope.experiments.basin_maps import paper_basin_frames

    grid, fr, answers, cap = paper_basin_frames(
        lambda name: (ctx.model(name), ctx.task(name)), quick=ctx.quick, seed=ctx.seed
    )
    data = pd.concat(
        [
            fr.merge(answers, on=["model", "answer_id"], how="left").assign(kind="fractions"),
            grid.assign(kind="slice"),
        ],
        ignore_index=True,
    ).drop(columns=["title"])
    return PaperFigure(
        draw=lambda: figures.basin_maps(grid, fr, answers),
        frame=data,
        title="Basins of attraction",
        caption=cap,
    )


def fig_halting(ctx: PaperContext):
    from loopscope.analysis import halting

    name = "s3_act"
    model, task = ctx.model(name), ctx.task(name)
    rows, gaps = [], []
    for split in ("id", "ood"):
        b = task.sample(ctx.n * 2, split, seed=ctx.seed)
        T = ctx.n_iter(b, 3.0)
        tr = unroll(model, b.tokens, T, seed=ctx.seed, decode=True)
        grid = {
            "fp_residual": [0.3, 0.1, 0.03],
            "latent_diff": [0.1, 0.03, 0.01],
            "kl": [1e-2, 1e-3, 1e-4],
            "argmax_stable": [2, 3, 5],
            "q_head": [0.0],
            "fixed": sorted({max(1, T // 4), max(1, T // 2), T}),
        }
        rep = (
            halting.evaluate(tr, grid, targets=b.targets[:, 1:], q=model.q_head, budget=T)
            if False
            else halting.evaluate(
                tr, grid, correct=_correct_per_step(tr, b), q=model.q_head, budget=T
            )
        )
        summ = rep.to_frame().assign(split=split, budget=T)
        rows.append(summ)
        gaps.append(
            summ.groupby("criterion", as_index=False)["saturation_gap"].mean().assign(split=split)
        )
    df = pd.concat(rows, ignore_index=True)
    gp = pd.concat(gaps, ignore_index=True)
    cap = (
        f"{name} (ACT Q-head, deep supervision): sequence accuracy vs mean iterations at exit for FPRM fixed-point residual, "
        "Huginn latent-diff / KL / argmax-stability, the learned Q-head and fixed depth, scored offline on one recorded trace "
        "(budget 3x length); right: mean halt step minus the step after which the answer is right for good."
    )
    return PaperFigure(
        draw=lambda: figures.halting_tradeoff(df, gp),
        frame=df,
        title="Halting criteria",
        caption=cap,
    )


def _correct_per_step(tr: Any, b: Any) -> torch.Tensor:
    mask = b.targets != -100
    return ((tr.logits.argmax(-1) == b.targets) | ~mask).all(-1)  # [T+1, B]


def fig_hierarchical(ctx: PaperContext):
    from loopscope.analysis import hierarchical

    name = "sudoku4_hrm"
    model, task = ctx.model(name), ctx.task(name)
    T, fast_cycles = 12, (0, 1, 3, 6)
    rows, pr_rows = [], []
    for split in ("id", "ood"):
        b = task.sample(ctx.n, split, seed=ctx.seed)
        # the fast loop's fixed point (one solve per cycle and sample) on the ID split; residual
        # curves and participation ratios on both
        res = hierarchical(
            model,
            b.tokens,
            T,
            fast_steps=16,
            fixed_points=split == "id",
            spectrum="none",
            method="anderson",  # memory 5: ~5x faster than auto's 30 at n = 1024, same solves
            solver_options={"m": 5},
            tol=1e-8,
            seed=ctx.seed,
            meta={"split": split},
        )
        summ = res.residual_summary()
        for r in summ[summ["loop"] == "slow"].itertuples():
            rows.append(
                dict(
                    loop="slow",
                    split=split,
                    state=r.state,
                    cycle=-1,
                    iteration=r.cycle + 1,
                    median=r.median,
                )
            )
        if split == "id":
            fast = summ[(summ["loop"] == "fast") & summ["cycle"].isin(fast_cycles)]
            for r in fast.itertuples():
                rows.append(
                    dict(
                        loop="fast",
                        split=split,
                        state="z_L",
                        cycle=r.cycle,
                        iteration=r.step,
                        median=r.median,
                    )
                )
            # does the model's inner loop reach the fast fixed point within a cycle?
            for r in res.per_cycle().itertuples():
                for loop, value in (
                    ("fixed_point", r.dist_end_rel_median),
                    ("fixed_point_reached", r.frac_reached),
                ):
                    rows.append(
                        dict(
                            loop=loop,
                            split=split,
                            state="z_L",
                            cycle=r.cycle,
                            iteration=r.cycle + 1,
                            median=value,
                        )
                    )
        pr = res.participation
        for r in pr[(pr["cycle"] == T) & pr["state"].isin(["z_H", "z_L"])].itertuples():
            pr_rows.append(
                dict(split=split, state=r.state, participation_ratio=r.participation_ratio)
            )
        tr = unroll(model, b.tokens, T, seed=ctx.seed, decode=True)
        acc = _correct_per_step(tr, b).float().mean(1).numpy()
        for t in range(1, T + 1):
            rows.append(
                dict(
                    loop="accuracy",
                    split=split,
                    state="seq_acc",
                    cycle=-1,
                    iteration=t,
                    median=float(acc[t]),
                )
            )
    df = pd.DataFrame(rows)
    pr = pd.DataFrame(pr_rows)
    cap = (
        f"{name}: relative change of z_H and z_L per slow H-cycle, and the distance of the model's z_L after its "
        "L inner steps from the fast loop's fixed point z_L* (solved per sample with z_H held fixed, ID) (left); the "
        "fast L-loop with z_H held at the state of several H-cycles (middle): does the inner loop converge within a "
        "cycle?; participation ratio of each state over samples x positions after the last cycle (right)."
    )
    return PaperFigure(
        draw=lambda: figures.hierarchical_convergence(df[df["loop"] != "accuracy"], pr),
        frame=pd.concat([df, pr.assign(loop="pr")], ignore_index=True),
        title="Hierarchical (HRM) convergence",
        caption=cap,
    )


def fig_probes(ctx: PaperContext):
    from loopscope import tasks
    from loopscope.probes import fit_probes, onset, probe_trace, transfer_matrix

    name = "s3_fprm"
    model = ctx.model(name)
    frames, onsets = [], []
    for split, task in (("id", tasks.get("s3", train_len=(16, 16))), ("ood", tasks.get("s3"))):
        b = task.sample(192 if ctx.quick else 768, split, seed=ctx.seed)
        L = b.tokens.shape[1] - 1
        tr = unroll(model, b.tokens, L + 8, seed=ctx.seed)
        positions = list(range(1, L + 1, 1 if L <= 16 else 2))
        df = probe_trace(tr, b.targets, pooled=False, positions=positions, seed=ctx.seed).to_frame()
        df["split"] = split
        frames.append(df)
        on = onset(df, threshold=0.9).to_frame()
        on["split"] = split
        onsets.append(on)
        if split == "id":  # transfer matrix at one position: fit at iteration t, score at t'
            p = min(8, L)
            X = tr.states[1:, :, p]
            res = fit_probes(X, b.targets[:, p], seed=ctx.seed)
            M = transfer_matrix(res, X, b.targets[:, p])
            transfer = pd.DataFrame(
                [
                    dict(fit_iteration=i + 1, score_iteration=j + 1, accuracy=M[i, j], position=p)
                    for i in range(M.shape[0])
                    for j in range(M.shape[1])
                ]
            )
    df, on = pd.concat(frames, ignore_index=True), pd.concat(onsets, ignore_index=True)
    cap = (
        f"{name}: held-out accuracy of a linear probe (ridge, one per iteration x position, fitted in one batched solve, "
        "split by sequence) for the running group element s_i; onset = first iteration with accuracy >= 0.9. "
        "A step-by-step wavefront has onset = position, ID (L = 16) and OOD (L = 32). "
        "Right: cross-iteration transfer of L2-logistic probes at position 8 (ID)."
    )
    return PaperFigure(
        draw=lambda: figures.probe_wavefront(df, on, transfer),
        frame=pd.concat(
            [df, on.assign(kind="onset"), transfer.assign(kind="transfer")], ignore_index=True
        ),
        title="Probes: the running state per iteration",
        caption=cap,
    )


def fig_patching(ctx: PaperContext):
    from loopscope import tasks
    from loopscope.circuits import patch_sweep, state_transplant

    name = "s3_fprm"
    model = ctx.model(name)
    task = tasks.get("s3", train_len=(12, 12))
    b = task.sample(6 if ctx.quick else 24, "id", seed=ctx.seed)
    clean = b.tokens
    corrupt = clean.clone()
    corrupt[:, 3] = (
        corrupt[:, 3] % (task.order - 1)
    ) + 1  # change exactly one group element (never identity)
    corrupt[:, 3] = torch.where(
        corrupt[:, 3] == clean[:, 3], (corrupt[:, 3] % (task.order - 1)) + 1, corrupt[:, 3]
    )
    ans_clean = b.targets[:, -1]
    # the corrupted answer: recompute the running product with the changed element
    s = torch.zeros(len(clean), dtype=torch.long)
    for i in range(1, clean.shape[1]):
        s = torch.as_tensor(task.table)[corrupt[:, i], s]
    ans_corrupt = s
    if bool((ans_clean == ans_corrupt).any()):
        raise LoopscopeError("STR pair left an answer unchanged")

    def metric(lg: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        last = lg[:, -1]
        return (
            last.gather(-1, ans_clean[i].view(-1, 1))[:, 0]
            - last.gather(-1, ans_corrupt[i].view(-1, 1))[:, 0]
        )

    T = 2 * (clean.shape[1] - 1)
    heat = patch_sweep(
        model, clean, corrupt, ["hook_state"], "all", metric, n_iter=T, seed=ctx.seed
    ).frame
    tp = state_transplant(model, clean, corrupt, metric, n_iter=T, extra=T, seed=ctx.seed).frame
    setting = (
        f"{name}: n = {len(clean)} STR pairs, S3 length 12, position 3 corrupted (one group "
        f"element changed), budget T = {T}"
    )
    cap = (
        f"{name}, S3 length 12, n = {len(clean)} STR pairs changing exactly one group element (position 3): left, normalised logit-difference "
        "recovery when the clean state h_t at one position replaces the corrupted one (denoising); right, recovery when the "
        f"whole clean state h_t is transplanted, measured at T = {T} and at 2T."
    )
    data = pd.concat([heat.assign(kind="patch"), tp.assign(kind="transplant")], ignore_index=True)
    return PaperFigure(
        draw=lambda: figures.patching_panels(heat, tp, setting=setting),
        frame=data,
        title="Per-iteration patching and state transplant",
        caption=cap,
    )


def fig_memorization(ctx: PaperContext):
    from loopscope.circuits import digit_df, logistic_slope

    name = "mult_universal"
    model, task = ctx.model(name), ctx.task(name)
    tr_pairs = task.pairs["train"]
    tx, ty = tr_pairs // 10**task.nd, tr_pairs % 10**task.nd
    rows = []
    for split in ("train", "id"):
        b = task.sample(256 if ctx.quick else 1024, split, seed=ctx.seed)
        logits = model(b.tokens, 8)
        nd = 2 * task.nd
        pred = logits.argmax(-1)[:, -nd:]
        tgt = b.targets[:, -nd:]
        x, y = b.meta["x"].numpy(), b.meta["y"].numpy()
        dfm = digit_df(x, y, nd, tx, ty)
        ok = (pred == tgt).numpy()
        for i in range(len(x)):
            for k in range(nd):
                rows.append(
                    dict(split=split, example=i, digit=k, df=int(dfm[i, k]), correct=bool(ok[i, k]))
                )
    d = pd.DataFrame(rows)
    # the digit is a categorical control: accuracy is not monotone in the digit position (the
    # units digit, with df ~ 80, and the top digit are easy), and a linear digit term would hand
    # the units-vs-rest contrast to df as a spurious slope
    fit = logistic_slope(
        d["correct"].to_numpy(), d["df"].to_numpy(), None, op=d["digit"].to_numpy()
    )
    d.attrs["logistic"] = fit.summary()
    cap = (
        f"{name}: product digit k is determined by (x mod 10^(k+1), y mod 10^(k+1)); df = number of training pairs sharing them "
        f"(held-out ID pairs have df = 0 for the top digits). Logistic slope of correctness on log(1+df), with one dummy per digit: "
        f"{fit.slope:.2f} [{fit.ci_low:.2f}, {fit.ci_high:.2f}]."
    )
    return PaperFigure(
        draw=lambda: figures.memorization_panels(d),
        frame=d.assign(slope=fit.slope, slope_ci_low=fit.ci_low, slope_ci_high=fit.ci_high),
        title="Memorization: correctness vs subgraph frequency",
        caption=cap,
    )


VERDICT_MODELS = (
    "s3_fprm",
    "s3_rope",
    "s3_act",
    "addition_conv",
    "maze_reach_conv",
    "sudoku4_hrm",
    "mult_universal",
)


def _verdict_models(ctx: PaperContext) -> list[str]:
    from loopscope import zoo

    return [name for name in VERDICT_MODELS if name in zoo.names()]


def _verdict_part(ctx: PaperContext, name: str) -> pd.DataFrame:
    from loopscope.experiments.verdict import verdict

    v = verdict(
        ctx.model(name),
        ctx.task(name),
        n=32 if ctx.quick else 128,
        seed=ctx.seed,
        iter_factor=3.0,
        n_basin=_n_basin(ctx),
    )
    f = v.to_frame()
    f["model"] = name
    return f


def _n_basin(ctx: PaperContext) -> int:
    """Gaussian inits per sample for the verdict's correct-basin fraction (the row was half of
    the quick verdict's time at 8)."""
    return 4 if ctx.quick else 8


def _verdict_figure(ctx: PaperContext, frames: list[pd.DataFrame]) -> PaperFigure:
    if not frames:
        raise LoopscopeError("no zoo models to judge")
    df = pd.concat(frames, ignore_index=True)
    cap = (
        "Evidence vector per model (green: reads algorithmic, red: memorized/heuristic); never a single yes/no. "
        "Confident-wrong = the loop settled (residual < 1e-3) on a wrong answer. Correct-basin fraction = "
        f"share of {_n_basin(ctx)} Gaussian inits per sample (entry scale of the model's init, same budget) that end on "
        "the right answer. Correctness vs subgraph frequency = logistic slope on log1p(df) with one dummy "
        "per digit (multiplication only). Probe onset = first iteration a ridge probe per position decodes the "
        "target at >= 0.9 held-out accuracy, ranked against depth where depth is a function of the position. "
        "Inductive bias (state tracking) = R-IB / D-IB of a logistic head on the end state at the last position "
        "over 50 white-noise datasets."
    )
    return PaperFigure(
        draw=lambda: figures.verdict_table(df),
        frame=df,
        title="Verdict: algorithm vs memorization evidence",
        caption=cap,
    )


VERDICT = Parts(items=_verdict_models, part=_verdict_part, combine=_verdict_figure)
fig_verdict = VERDICT


def fig_memory(ctx: PaperContext):
    from loopscope.experiments.memory import memory_study

    parts: dict[str, list] = {"acc": [], "dec": [], "long": [], "spec": []}
    for name in ("passkey_fam", "passkey_fam_post"):
        n, n_long = (64, 128) if ctx.quick else (256, 256)
        r = memory_study(ctx.model(name), ctx.task(name), n=n, n_long=n_long, seed=ctx.seed)
        for key, f in zip(parts, (r.accuracy, r.decodability, r.long, r.spectrum), strict=True):
            parts[key].append(f.assign(model=name))
    acc, dec, long, spec = (pd.concat(v, ignore_index=True) for v in parts.values())
    df = pd.concat(
        [f.assign(panel=k) for k, f in zip(parts, (acc, dec, long, spec), strict=True)],
        ignore_index=True,
    )
    cap = (
        "TransformerFAM on PassKey (pre-norm passkey_fam vs post-norm passkey_fam_post, trained on 3 "
        "context blocks): answer accuracy vs context blocks (ID, 2x, 4x, 16x); held-out logistic-probe "
        "accuracy for the key from the memory k updates after it was written (16x split); memory norm "
        "and answer accuracy over [key block, 128 (quick) or 256 random filler blocks, query]; eigenvalues of the "
        "memory map's Jacobian for one repeated filler block at its fixed point (at the end state where "
        "none is reached), with the unit circle."
    )
    return PaperFigure(
        draw=lambda: figures.memory_panels(acc, dec, long, spec),
        frame=df,
        title="Working memory of a feedback-memory loop",
        caption=cap,
    )


def fig_self_improve(ctx: PaperContext):
    import dataclasses
    import tempfile

    from loopscope.experiments import self_improve as si
    from loopscope.experiments.self_improve_figures import panels

    cfg = si.SelfImproveConfig.tiny() if ctx.quick else si.SelfImproveConfig.full()
    cfg = dataclasses.replace(cfg, seed=ctx.seed)
    noisy_cfg = dataclasses.replace(cfg, noise="uniform", noise_rate=0.3, noise_from_round=1)
    with tempfile.TemporaryDirectory() as tmp:  # the two runs share round 0's training
        root = ctx.model_dir.parent / "runs" if ctx.model_dir is not None else Path(tmp)
        train_dir = root / "self_improve_round0"
        clean = si.self_improve(
            cfg, run_dir=root / "self_improve", train_dir=train_dir, progress=False
        )
        noisy = si.self_improve(
            noisy_cfg, run_dir=root / "self_improve_noise", train_dir=train_dir, progress=False
        )
    df = pd.concat(
        [clean.to_frame().assign(run="clean"), noisy.to_frame().assign(run="noisy")],
        ignore_index=True,
    )
    cap = (
        f"Self-improvement rounds on carry addition ({cfg.recipe} recipe, {cfg.n_models} seed models, "
        f"round 0 on 1-{cfg.d0} digits for {cfg.base_steps} steps, then +{cfg.step_digits} digit per round "
        f"labelled by the models' majority vote (>= {cfg.vote_threshold:.0%} of the votes) and the length "
        f"filter, {cfg.round_steps} steps per round). Accuracy vs length per round; converged-and-correct "
        "vs converged-and-wrong (residual < 1e-3 on a wrong answer); label error before the filters, "
        "filter yield and error of the kept labels per round; the accuracy frontier per round, clean vs 30 % "
        "uniform label noise."
        + (
            " Quick mode: a tiny smoke-sized run; measured results are in docs/self_improve.md."
            if ctx.quick
            else ""
        )
    )
    return PaperFigure(
        draw=lambda: panels(clean, noisy=noisy),
        frame=df,
        title="Self-improvement rounds: accuracy, labels and fixed points",
        caption=cap,
    )


def _runs_dir(ctx: PaperContext) -> Path | None:
    return ctx.model_dir.parent / "runs" if ctx.model_dir is not None else None


def fig_architecture(ctx: PaperContext):
    from loopscope.experiments import study_figures as S

    table, source = S.paper_study_table("architecture", quick=ctx.quick, runs=_runs_dir(ctx))
    long = S.architecture_long(table)
    summ = S.architecture_summary(long)
    n_seeds = int(long["seed"].nunique())
    cap = (
        "Architecture study (the question of arXiv 2604.11791): a tiny looped transformer (d 32, "
        "RoPE, h_0 = the input embedding) trained on parity for 600 steps for each of core layers "
        "L in {1, 2} x input injection {none, add} x norm {pre, post}, "
        f"{n_seeds} training seeds each, measured ID (length <= 16) and OOD (length 32) at 3x the "
        "length; rho, lambda1 and the correct-basin fraction on 4 inputs per split: small marks = "
        "one seed, large = mean over seeds with a 95 % t-interval. " + source
    )
    return PaperFigure(
        draw=lambda: figures.knob_effects(long, summ, S.ARCH_METRICS),
        frame=summ,
        title="Architecture study: fixed points vs block size, injection and norm",
        caption=cap,
    )


def fig_seeds(ctx: PaperContext):
    from loopscope.experiments import study_figures as S

    table, source = S.paper_study_table("seeds", quick=ctx.quick, runs=_runs_dir(ctx))
    long = S.seeds_long(table)
    if long.empty:
        raise LoopscopeError("the seeds study table has no finished job with a headline finding")
    summ = S.seeds_summary(long)
    n_seeds = long.groupby("recipe")["seed"].nunique()
    cap = (
        "The zoo's headline findings across training seeds (studies/seeds.toml): each zoo recipe "
        "retrained from scratch by the same recipe at seeds 1 and 2, seed 0 the shipped model, all "
        "measured by one protocol (64 ID and 64 OOD inputs; the verdict's evidence rows). One mark "
        "per seed, the rule each finding is read against (shaded where it holds) and on how many "
        "seeds it holds. Seeds per recipe: "
        + ", ".join(f"{r} {n}" for r, n in n_seeds.items())
        + ". "
        + source
    )
    return PaperFigure(
        draw=lambda: figures.seed_spread(long),
        frame=summ,
        title="Headline findings across training seeds",
        caption=cap,
    )


FIGURES: dict[str, Callable[[PaperContext], PaperFigure]] = {  # a recipe or its Parts
    "convergence": fig_convergence,
    "spectra": fig_spectra,
    "basins": fig_basins,
    "halting": fig_halting,
    "hierarchical": fig_hierarchical,
    "probes": fig_probes,
    "patching": fig_patching,
    "memorization": fig_memorization,
    "verdict": fig_verdict,
    "memory": fig_memory,
    "self_improve": fig_self_improve,
    "architecture": fig_architecture,
    "seeds": fig_seeds,
}

#: the figures computed in parts (run in parallel by ``loopscope paper --jobs``)
PARTS: dict[str, Parts] = {
    name: fn for name, fn in FIGURES.items() if isinstance(fn, Parts)
}  # fmt: skip

EXPECTED_FIGURES = list(FIGURES)
