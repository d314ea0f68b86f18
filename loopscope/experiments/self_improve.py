"""Self-improvement rounds on carry addition: does the loop keep *correct* fixed points as it
teaches itself longer problems (algorithm-tests spec §7.2, Lee et al. 2025)?

Protocol (:func:`self_improve`):

* **Round 0** trains ``n_models`` copies of the zoo recipe (``addition_conv`` by default, seeds
  ``seed, seed + 1, ...``) on true labels of ``[1, d0]`` digits with :func:`loopscope.train.train`.
* **Round r >= 1** adds ``step_digits`` lengths (difficulty schedule ``d_r = d0 + r * step_digits``).
  ``n_label`` fresh inputs per new length are labelled by greedy decoding of every model of round
  ``r - 1``; the filters keep an input when the most common full output has at least
  ``vote_threshold * n_models`` votes (:func:`majority_vote`) and its length is right
  (:func:`length_filter`); optional label noise (:func:`inject_noise`) corrupts a share of the
  kept labels. Every model then trains ``round_steps`` more steps on a mixture: the newest round
  with probability ``newest_weight``, the rest shared in proportion to difficulty levels (round 0
  has ``d0`` levels, every older self-labelled length one).
* **After every round** model 0 is measured at every length ``1 .. d_R + margin``: sequence
  accuracy and the loop's dynamics (converged fraction, cycle fraction, spectral radius of the
  step at the end state, correct-basin fraction under Gaussian inits, confidently-wrong rate).

Every round is checkpointed atomically (``run_dir/round-RRR/``: the models' weights, the kept
self-labels, the round's table rows, and ``round.json`` written last); a rerun resumes from the
last finished round after a kill, and round 0's training resumes inside the round. Every random
draw is a pure function of ``(seed, model, round, step)``, so a resumed run is bit-identical to
an uninterrupted one.

Addition here is aligned digit pairs (``loopscope.tasks.addition``): the output always has one
position per digit plus the carry-out, so a "length" is the number of significant digits of the
predicted sum (see :func:`length_filter`).

Example:
    >>> from loopscope.experiments.self_improve import SelfImproveConfig, self_improve
    >>> res = self_improve(SelfImproveConfig.quick(), progress=False)   # doctest: +SKIP
    >>> res.to_frame().query("round == 2")[["length", "acc"]]           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import CheckpointError, LoopscopeError, did_you_mean
from loopscope.core.io import (
    atomic_write_text,
    fingerprint,
    load_state_dict,
    payload_sha256,
    read_json,
    save_state_dict,
)
from loopscope.core.result import Result, float_summary, result_meta, tidy

__all__ = [
    "SelfImproveConfig",
    "SelfImproveResult",
    "self_improve",
    "majority_vote",
    "length_filter",
    "inject_noise",
    "frontier",
    "NOISE_KINDS",
    "LENGTH_FILTERS",
]

NOISE_KINDS = ("none", "uniform", "perturb")
LENGTH_FILTERS = ("true", "valid", "none")
_FORMAT = "loopscope.self_improve/1"


@dataclass
class SelfImproveConfig:
    """Everything that defines a self-improvement run (saved with every round checkpoint)."""

    recipe: str = "addition_conv"  # zoo recipe: architecture, optimiser and iteration rule
    d0: int = 4  # round 0 trains on [1, d0] digits with true labels
    rounds: int = 6  # self-improvement rounds after round 0
    step_digits: int = 1  # new lengths per round (+k digits)
    base_steps: int = 800  # round-0 training steps per model
    round_steps: int = 200  # training steps per model and round
    batch_size: int = 64
    lr: float = 2e-3  # peak learning rate of every round (warmup, stable, linear decay)
    n_models: int = 3  # models with different seeds (the majority vote's voters)
    n_label: int = 512  # fresh inputs labelled per new length
    vote_threshold: float = 0.7  # keep if the top output has >= threshold * n_models votes
    length_filter: str = "true"  # "true" (true label length), "valid" (carry-out 0/1), "none"
    noise: str = "none"  # label noise on kept labels: "none" | "uniform" | "perturb"
    noise_rate: float = 0.0  # share of kept labels corrupted
    noise_from_round: int = 1  # first round whose labels get noise
    newest_weight: float = 0.5  # probability of a batch from the newest round
    margin: int = 4  # lengths measured beyond the last round's
    n_eval: int = 256  # inputs per length for accuracy
    n_dynamics: int = 64  # of those, unrolled for the convergence / cycle / confident-wrong rates
    n_basin: int = 16  # inputs per length for the correct-basin fraction
    basin_seeds: int = 8  # Gaussian inits per input
    n_rho: int = 2  # inputs per length for the spectral radius (dense Jacobian up to n = 2048)
    iter_factor: float = 2.0  # iterations = ceil(iter_factor * (digits + 1)), as the recipe's evals
    tol: float = 1e-3  # relative residual below which a trajectory counts as converged
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d0", "rounds", "step_digits", "base_steps", "round_steps", "batch_size"):
            _positive(name, getattr(self, name))
        for name in ("n_models", "n_label", "n_eval", "n_dynamics", "n_basin", "basin_seeds"):
            _positive(name, getattr(self, name))
        if not isinstance(self.n_rho, int) or self.n_rho < 0:
            raise LoopscopeError(f"n_rho must be an integer >= 0, got {self.n_rho!r}")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise LoopscopeError(f"margin must be an integer >= 0, got {self.margin!r}")
        if not 0 < self.vote_threshold <= 1:
            raise LoopscopeError(f"vote_threshold must be in (0, 1], got {self.vote_threshold!r}")
        if self.length_filter not in LENGTH_FILTERS:
            raise LoopscopeError(
                f"length_filter must be one of {LENGTH_FILTERS}, got {self.length_filter!r}"
            )
        if self.noise not in NOISE_KINDS:
            raise LoopscopeError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not 0 <= self.noise_rate <= 1:
            raise LoopscopeError(f"noise_rate must be in [0, 1], got {self.noise_rate!r}")
        if not 0 < self.newest_weight < 1:
            raise LoopscopeError(f"newest_weight must be in (0, 1), got {self.newest_weight!r}")
        if self.n_dynamics > self.n_eval or self.n_basin > self.n_eval or self.n_rho > self.n_eval:
            raise LoopscopeError("n_dynamics, n_basin and n_rho must not exceed n_eval")
        self._check_recipe()

    def _check_recipe(self) -> None:
        from loopscope.models import preset
        from loopscope.zoo.recipes import RECIPES

        if self.recipe not in RECIPES:
            raise LoopscopeError(f"unknown zoo recipe {self.recipe!r}")
        if RECIPES[self.recipe].train.task != "addition":
            raise LoopscopeError(
                f"self-improvement runs on the addition recipes; {self.recipe!r} trains "
                f"{RECIPES[self.recipe].train.task!r}"
            )
        max_pos = preset(RECIPES[self.recipe].train.preset).max_pos
        if self.max_digits + 1 > max_pos:
            raise LoopscopeError(
                f"the schedule reaches {self.max_digits} digits (+1 carry position) but the "
                f"model has {max_pos} positions; use fewer rounds, step_digits or margin"
            )

    @property
    def max_digits(self) -> int:
        """The longest length measured: the last round's plus ``margin``."""
        return self.digits(self.rounds) + self.margin

    def digits(self, r: int) -> int:
        """Training difficulty after round ``r``: ``d0 + r * step_digits``."""
        return self.d0 + r * self.step_digits

    def new_lengths(self, r: int) -> list[int]:
        """The lengths round ``r`` labels and adds (none for round 0)."""
        return list(range(self.digits(r - 1) + 1, self.digits(r) + 1)) if r >= 1 else []

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (saved with every round checkpoint)."""
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls) -> SelfImproveConfig:
        """The paper's ``--quick`` setting (seconds): 2-digit start, 2 tiny rounds, 3 models."""
        return cls(
            d0=2,
            rounds=2,
            base_steps=60,
            round_steps=10,
            batch_size=32,
            n_label=32,
            margin=1,
            n_eval=32,
            n_dynamics=16,
            n_basin=2,
            basin_seeds=2,
            n_rho=1,
        )

    @classmethod
    def quick(cls) -> SelfImproveConfig:
        """The CI setting (about a minute on one core): 3-digit start, 4 rounds, 3 models
        (change fields with :func:`dataclasses.replace`)."""
        return cls(
            d0=3,
            rounds=4,
            base_steps=500,
            round_steps=100,
            n_label=128,
            margin=2,
            n_eval=128,
            n_dynamics=32,
            n_basin=8,
            basin_seeds=4,
            n_rho=1,
        )

    @classmethod
    def full(cls) -> SelfImproveConfig:
        """The documented setting (docs/self_improve.md): the dataclass defaults."""
        return cls()


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LoopscopeError(f"{name} must be a positive integer, got {v!r}")


# -- filters -------------------------------------------------------------------------------------
@did_you_mean
def majority_vote(labels: Tensor, *, threshold: float = 0.7) -> tuple[Tensor, Tensor, Tensor]:
    """Majority vote over the full outputs of ``K`` models.

    Args:
        labels: ``[K, N, P]`` predicted digits of K models for N inputs.
        threshold: keep an input when its most common full output has >= threshold * K votes.

    Returns:
        ``(label [N, P], votes [N], keep [N] bool)``; ties go to the lowest model index.

    >>> l = torch.tensor([[[1, 2]], [[1, 2]], [[3, 4]]])
    >>> lab, votes, keep = majority_vote(l, threshold=0.6)
    >>> lab.tolist(), votes.tolist(), keep.tolist()
    ([[1, 2]], [2], [True])
    """
    if labels.dim() != 3:
        raise LoopscopeError(f"labels must be [K, N, P], got shape {tuple(labels.shape)}")
    K = labels.shape[0]
    same = (labels[:, None] == labels[None]).all(-1)  # [K, K, N]: model i agrees with model j
    counts = same.sum(1)  # [K, N]
    winner = counts.argmax(0)  # first maximum: the lowest model index among ties
    n = torch.arange(labels.shape[1])
    votes = counts[winner, n]
    keep = votes.double() >= threshold * K - 1e-9
    return labels[winner, n], votes, keep


def _n_significant(digits: Tensor) -> Tensor:
    """Number of significant digits of LSB-first digit rows ``[N, P]`` (0 has one digit)."""
    P = digits.shape[1]
    pos = torch.arange(1, P + 1).expand_as(digits)
    return torch.where(digits != 0, pos, torch.zeros_like(pos)).max(1).values.clamp_min(1)


@did_you_mean
def length_filter(pred: Tensor, *, targets: Tensor | None = None) -> Tensor:
    """Keep predictions whose sum has the right length.

    Args:
        pred: ``[N, P]`` predicted sum digits, LSB first, the last position the carry-out.
        targets: ``[N, P]`` true sums. Given: keep when the predicted number of significant
            digits equals the true one (the spec's filter, which uses the true label length).
            None: keep when the carry-out digit is 0 or 1 (a sum of two (P-1)-digit numbers has
            at most P digits, led by a 1), which needs no label.

    Returns:
        ``keep [N]`` bool.

    >>> length_filter(torch.tensor([[5, 1], [5, 2]])).tolist()
    [True, False]
    """
    if pred.dim() != 2:
        raise LoopscopeError(f"pred must be [N, P], got shape {tuple(pred.shape)}")
    if targets is None:
        return pred[:, -1] <= 1
    if targets.shape != pred.shape:
        raise LoopscopeError("pred and targets must have the same shape")
    return _n_significant(pred) == _n_significant(targets)


@did_you_mean
def inject_noise(
    labels: Tensor, *, kind: str = "uniform", rate: float = 0.1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Corrupt a share ``rate`` of label rows (chosen independently per row).

    Args:
        labels: ``[N, P]`` digit labels.
        kind: "uniform" (the whole row redrawn uniformly from 0-9), "perturb" (one random digit
            changed to another), or "none".
        rate: probability that a row is corrupted.
        seed: RNG seed.

    Returns:
        ``(noisy [N, P], hit [N] bool)``; "perturb" rows always differ from the input.
    """
    if kind not in NOISE_KINDS:
        raise LoopscopeError(f"kind must be one of {NOISE_KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(int(seed))
    N, P = labels.shape
    hit = torch.rand(N, generator=g) < rate if kind != "none" else torch.zeros(N, dtype=torch.bool)
    out = labels.clone()
    if kind == "uniform":
        out[hit] = torch.randint(0, 10, (int(hit.sum()), P), generator=g)
    elif kind == "perturb":
        rows = hit.nonzero().flatten()
        cols = torch.randint(0, P, (len(rows),), generator=g)
        shift = torch.randint(1, 10, (len(rows),), generator=g)
        out[rows, cols] = (out[rows, cols] + shift) % 10
    return out, hit


# -- the result ----------------------------------------------------------------------------------
@dataclass(kw_only=True, repr=False)
class SelfImproveResult(Result):
    """Per round and length, one tidy row (``frame``).

    Row ``(round r, length D)`` is measured with the models after round r's training: ``acc``
    (model 0's sequence accuracy), ``acc_models`` (mean over the models), ``trained`` (D <= d_r),
    the dynamics columns (``converged_fraction``, ``t_conv_mean``, ``cycle_fraction``, ``rho``,
    ``correct_basin``, ``conv_correct``, ``conv_wrong`` = confidently wrong), and on the rows of
    the lengths round r added the label statistics of round r's self-labels (made by round r-1's
    models): ``label_error`` (voted labels, before the filters), ``vote_yield``, ``length_yield``,
    ``filter_yield`` (kept share), ``kept_label_error`` (what training saw, noise included),
    ``noise_hit``. The accuracy at D *before* training on it is row ``(r - 1, D)``.
    """

    frame: pd.DataFrame
    models: list = dataclasses.field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """The table: one row per (round, length), columns as in the class docstring."""
        return tidy(self.frame.copy())

    def frontier(self, threshold: float = 0.99) -> pd.Series:
        """Per round: the largest D with ``acc >= threshold`` at every length <= D (0 if none)."""
        return frontier(self.frame, threshold=threshold)

    def summary(self) -> dict[str, float]:
        """Headlines: the frontier at round 0 and at the end (and its gain per round), accuracy
        at the longest length, mean label error / kept-label error / filter yield, and the final
        round's mean confidently-wrong share."""
        f = self.frame
        fr = self.frontier()
        last = f[f["round"] == f["round"].max()]
        return float_summary(
            {
                "rounds": int(f["round"].max()),
                "frontier_round0": fr.iloc[0],
                "frontier_final": fr.iloc[-1],
                "frontier_gain_per_round": (fr.iloc[-1] - fr.iloc[0]) / max(1, len(fr) - 1),
                "acc_final_longest": last.loc[last["length"].idxmax(), "acc"],
                "label_error_mean": f["label_error"].mean(),
                "kept_label_error_mean": f["kept_label_error"].mean(),
                "filter_yield_mean": f["filter_yield"].mean(),
                "conv_wrong_final_mean": last["conv_wrong"].mean(),
            }
        )


@did_you_mean
def frontier(frame: pd.DataFrame, *, threshold: float = 0.99) -> pd.Series:
    """Per round of a self-improvement table: the largest length D with ``acc >= threshold`` at
    every length <= D (0 if length 1 already fails), as a Series indexed by round."""
    out = {}
    for r, g in frame.sort_values("length").groupby("round"):
        ok = (g["acc"] >= threshold).to_numpy()
        out[int(r)] = int(g["length"].to_numpy()[ok.cumprod().sum() - 1]) if ok[0] else 0
    return pd.Series(out, name="frontier")


# -- helpers -------------------------------------------------------------------------------------
def _seed(*parts: Any) -> int:
    return int(fingerprint([str(p) for p in parts]), 16) % (2**31 - 1)


def _task(D: int):
    from loopscope.tasks.addition import AdditionTask

    return AdditionTask(train_digits=(D, D))


def _n_iter(cfg: SelfImproveConfig, D: int) -> int:
    return max(1, math.ceil(cfg.iter_factor * (D + 1)))


def _train_config(cfg: SelfImproveConfig, k: int):
    from loopscope.zoo.recipes import RECIPES

    return dataclasses.replace(
        RECIPES[cfg.recipe].train,
        task_params={"train_digits": (1, cfg.d0)},
        steps=cfg.base_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed + k,
        checkpoint_every=max(1, cfg.base_steps // 4),
    )


@torch.no_grad()
def _predict(model: Any, tokens: Tensor, n_iter: int, seed: int) -> Tensor:
    """Greedy digits ``[N, P]`` after ``n_iter`` iterations from a seeded init."""
    ctx = model.encode(tokens)
    h = model.init_state(ctx, torch.Generator().manual_seed(seed))
    for t in range(n_iter):
        h = model.step(h, ctx, t)
    return model.decode(h, ctx).argmax(-1)


def _progress(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    prog = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True
    )
    prog.start()
    return prog, prog.add_task(label, total=total)


# -- one round -----------------------------------------------------------------------------------
def _round0(cfg: SelfImproveConfig, train_dir: Path | None, progress: bool) -> list:
    """Round 0: every model trained on true labels of [1, d0] (resumable inside the round)."""
    from loopscope.train import train

    models = []
    for k in range(cfg.n_models):
        out = None if train_dir is None else train_dir / f"train-{k}"
        model, _ = train(_train_config(cfg, k), out_dir=out, progress=progress)
        models.append(model)
    return models


def _label(models: list, cfg: SelfImproveConfig, r: int) -> tuple[dict, list[dict]]:
    """Self-labels of round r's new lengths by the models of round r-1, filtered (and noised)."""
    data, rows = {}, []
    for D in cfg.new_lengths(r):
        batch = _task(D).sample(cfg.n_label, split="train", seed=_seed(cfg.seed, "label", r, D))
        T = _n_iter(cfg, D)
        preds = torch.stack(
            [
                _predict(m, batch.tokens, T, _seed(cfg.seed, "init", r, D, k))
                for k, m in enumerate(models)
            ]
        )
        label, _, vote_ok = majority_vote(preds, threshold=cfg.vote_threshold)
        if cfg.length_filter == "none":
            len_ok = torch.ones_like(vote_ok)
        else:
            truth = batch.targets if cfg.length_filter == "true" else None
            len_ok = length_filter(label, targets=truth)
        keep = vote_ok & len_ok
        kept = label[keep]
        hit = torch.zeros(len(kept), dtype=torch.bool)
        if cfg.noise != "none" and r >= cfg.noise_from_round:
            kept, hit = inject_noise(
                kept, kind=cfg.noise, rate=cfg.noise_rate, seed=_seed(cfg.seed, "noise", r, D)
            )
        wrong = (label != batch.targets).any(-1)
        kept_wrong = (kept != batch.targets[keep]).any(-1)
        data[D] = (batch.tokens[keep], kept)
        rows.append(
            dict(
                round=r,
                length=D,
                label_error=float(wrong.double().mean()),
                vote_yield=float(vote_ok.double().mean()),
                length_yield=float(len_ok.double().mean()),
                filter_yield=float(keep.double().mean()),
                kept_label_error=float(kept_wrong.double().mean()) if len(kept) else math.nan,
                noise_hit=float(hit.double().mean()) if len(kept) else math.nan,
                n_kept=int(keep.sum()),
            )
        )
    return data, rows


def _lr(cfg: SelfImproveConfig, s: int) -> float:
    """Warmup (10 %), stable, linear decay over the last 20 % to a tenth."""
    n = cfg.round_steps
    warm = min(1.0, (s + 1) / max(1, n // 10))
    decay = max(0.1, min(1.0, (n - s) / max(1.0, 0.2 * n)))
    return cfg.lr * warm * decay


def _batch(cfg: SelfImproveConfig, data: dict, r: int, gen: torch.Generator, seed: int):
    """One training batch of round r: the newest lengths with probability ``newest_weight``,
    else round 0's true labels (d0 levels) or an older self-labelled length (one level each)."""
    from loopscope.tasks.base import Batch

    newest = [D for D in cfg.new_lengths(r) if len(data[D][0])]
    older = [D for D in sorted(data) if D not in cfg.new_lengths(r) and len(data[D][0])]
    u = float(torch.rand(1, generator=gen))
    if newest and u < cfg.newest_weight:
        D = newest[int(torch.randint(len(newest), (1,), generator=gen))]
    else:
        w = torch.tensor([float(cfg.d0)] + [1.0] * len(older))
        j = int(torch.multinomial(w, 1, generator=gen))
        if j == 0:
            from loopscope.tasks.addition import AdditionTask

            task = AdditionTask(train_digits=(1, cfg.d0))
            return task.sample(cfg.batch_size, split="train", seed=seed)
        D = older[j - 1]
    tokens, labels = data[D]
    idx = torch.randint(len(tokens), (cfg.batch_size,), generator=gen)
    return Batch(tokens=tokens[idx], targets=labels[idx])


def _train_round(models: list, data: dict, cfg: SelfImproveConfig, r: int, progress: bool) -> None:
    """``round_steps`` AdamW steps per model on round r's mixture (fresh optimiser per round)."""
    from loopscope.train import _loss_and_stats, sample_iterations

    bar = _progress(progress, cfg.n_models * cfg.round_steps, f"self-improve round {r}")
    try:
        for k, model in enumerate(models):
            tcfg = _train_config(cfg, k)
            model.train()
            opt = _optimizer(model, cfg, tcfg)
            for s in range(cfg.round_steps):
                for g in opt.param_groups:
                    g["lr"] = _lr(cfg, s)
                seed = _seed(cfg.seed, "train", k, r, s)
                gen = torch.Generator().manual_seed(seed)
                batch = _batch(cfg, data, r, gen, seed)
                loss, _ = _loss_and_stats(
                    model, batch, sample_iterations(tcfg, batch, gen), tcfg, gen
                )
                if not torch.isfinite(loss):
                    raise LoopscopeError(f"round {r} diverged at step {s} (model {k}); lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                opt.step()
                if bar is not None:
                    bar[0].update(bar[1], advance=1)
            model.eval()
    finally:
        if bar is not None:
            bar[0].stop()


def _optimizer(model: Any, cfg: SelfImproveConfig, tcfg: Any) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tcfg.betas)


# -- measurement ---------------------------------------------------------------------------------
@torch.no_grad()
def _measure(models: list, cfg: SelfImproveConfig, r: int) -> list[dict]:
    """Accuracy and dynamics of model 0 (accuracy of every model) at every length."""
    from loopscope.core.targets import sequence_correct

    rows = []
    for D in range(1, cfg.max_digits + 1):
        b = _task(D).sample(cfg.n_eval, split="id", seed=_seed(cfg.seed, "eval", D))
        T = _n_iter(cfg, D)
        accs = []
        for k, m in enumerate(models):
            pred = _predict(m, b.tokens, T, _seed(cfg.seed, "eval-init", D, k))
            accs.append(float(sequence_correct(pred, b.targets).double().mean()))
            if k == 0:
                token_acc = float((pred == b.targets).double().mean())
        row = dict(round=r, length=D, trained=D <= cfg.digits(r), acc=accs[0])
        row.update(token_acc=token_acc, acc_models=float(np.mean(accs)))
        row.update(_dynamics(models[0], b, T, cfg, _seed(cfg.seed, "dyn", D)))
        rows.append(row)
    return rows


def _dynamics(model: Any, b: Any, T: int, cfg: SelfImproveConfig, seed: int) -> dict[str, float]:
    """Converged / cycle / confidently-wrong rates, spectral radius at the end state and the
    correct-basin fraction, all from ``loopscope.analysis``."""
    from loopscope.analysis import basins, classify, confident_wrong, metrics, spectrum
    from loopscope.analysis.attractors import GaussianSeeds
    from loopscope.core.unroll import unroll

    tok, tgt = b.tokens[: cfg.n_dynamics], b.targets[: cfg.n_dynamics]
    tr = unroll(model, tok, n_iter=T, seed=seed, decode=True)
    conv = metrics(tr, p_max=2, tol=cfg.tol).summary()
    classes = classify(tr, p_max=8).to_frame()["class"].astype(str)
    cw = confident_wrong(tr, targets=tgt, tol=cfg.tol).summary()
    out = dict(
        converged_fraction=conv["converged_fraction"],
        t_conv_mean=conv["t_conv_mean"],
        cycle_fraction=float(classes.str.startswith("cycle").mean()),
        conv_correct=cw["settled_fraction"] - cw["confident_wrong_fraction"],
        conv_wrong=cw["confident_wrong_fraction"],
        rho=math.nan,
    )
    if cfg.n_rho:
        sp = spectrum(model, tok[: cfg.n_rho], state=tr.states[-1][: cfg.n_rho], method="auto")
        out["rho"] = float(np.median(sp.rho))
    nb = b.tokens[: cfg.n_basin]
    std = float(model.init_state(model.encode(nb), torch.Generator().manual_seed(seed)).std())
    res = basins(
        model,
        nb,
        seeds=GaussianSeeds(n=cfg.basin_seeds, std=std),
        n_iter=T,
        targets=b.targets[: cfg.n_basin],
        seed=seed,
    )
    out["correct_basin"] = float(res.seeds.groupby("sample")["correct"].mean().astype(float).mean())
    return out


# -- checkpoints ---------------------------------------------------------------------------------
def _round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round-{r:03d}"


def _save_round(
    run_dir: Path, r: int, cfg: SelfImproveConfig, models: list, data: dict, rows: list
) -> None:
    """Weights, self-labels and rows of round r; ``round.json``, written last, commits them."""
    d = _round_dir(run_dir, r)
    tensors = {f"model{k}/{n}": v for k, m in enumerate(models) for n, v in m.state_dict().items()}
    save_state_dict(tensors, d / "models.safetensors")
    labels = {
        f"{kind}/{D}": t[i] for D, t in data.items() for i, kind in enumerate(("tokens", "labels"))
    }
    if labels:
        save_state_dict(labels, d / "labels.safetensors")
    rows_text = json.dumps(rows, default=float)
    atomic_write_text(d / "rows.json", rows_text)
    sha = {"models.safetensors": payload_sha256(d / "models.safetensors")}
    if labels:
        sha["labels.safetensors"] = payload_sha256(d / "labels.safetensors")
    sha["rows.json"] = hashlib.sha256(rows_text.encode()).hexdigest()
    meta = {
        "format": _FORMAT, "round": r, "config": cfg.to_dict(), "labels": bool(labels),
        "sha256": sha,
    }  # fmt: skip
    atomic_write_text(d / "round.json", json.dumps(meta))


def _load_round(run_dir: Path, r: int, cfg: SelfImproveConfig) -> tuple[list, dict, list] | None:
    """Round r from its checkpoint, or None when it is not finished."""
    from loopscope import tasks
    from loopscope.train import build_model

    d = _round_dir(run_dir, r)
    if not (d / "round.json").exists():
        return None
    meta = read_json(d / "round.json")
    if meta.get("config") != json.loads(json.dumps(cfg.to_dict())):
        raise LoopscopeError(f"{run_dir} holds a run with another config; use another run_dir")
    sha = meta.get("sha256") or {}  # rounds saved before hashes were recorded load unchecked
    where = d / "round.json"
    tensors = load_state_dict(
        d / "models.safetensors", sha256=sha.get("models.safetensors"), where=where
    )
    if "rows.json" in sha:
        got = hashlib.sha256((d / "rows.json").read_bytes()).hexdigest()
        if got != sha["rows.json"]:
            raise CheckpointError(
                f"{d / 'rows.json'} is damaged: its sha256 differs from the one recorded in "
                f"{where}; delete {d} to redo the round"
            )
    task = tasks.get("addition", train_digits=(1, cfg.d0))
    models = []
    for k in range(cfg.n_models):
        m = build_model(_train_config(cfg, k), task)
        m.load_state_dict(
            {n[len(f"model{k}/") :]: v for n, v in tensors.items() if n.startswith(f"model{k}/")}
        )
        models.append(m.eval())
    data = {}
    if meta.get("labels"):
        lab = load_state_dict(
            d / "labels.safetensors", sha256=sha.get("labels.safetensors"), where=where
        )
        for key in lab:
            if key.startswith("tokens/"):
                D = key.split("/", 1)[1]
                data[int(D)] = (lab[key], lab[f"labels/{D}"])
    return models, data, read_json(d / "rows.json")


# -- the protocol --------------------------------------------------------------------------------
@did_you_mean
def self_improve(
    config: SelfImproveConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    progress: bool = True,
    stop_after_round: int | None = None,
    train_dir: str | Path | None = None,
) -> SelfImproveResult:
    """Run (or resume) the self-improvement rounds of ``config``; see the module docstring.

    Args:
        config: the run's settings (default :class:`SelfImproveConfig` = the full setting).
        run_dir: checkpoint directory; an existing one is resumed from its last finished round.
        progress: show a progress bar per round.
        stop_after_round: end after this round (the checkpoint then resumes the run).
        train_dir: round 0's training checkpoints (default ``run_dir/round-000``); runs whose
            round 0 is the same (e.g. a clean and a label-noise run) can share it.

    Returns:
        :class:`SelfImproveResult` with one row per (round, length).
    """
    cfg = config if config is not None else SelfImproveConfig()
    if not isinstance(cfg, SelfImproveConfig):
        raise LoopscopeError(f"config must be a SelfImproveConfig, got {type(cfg).__name__}")
    run_dir = Path(run_dir) if run_dir is not None else None
    if train_dir is None and run_dir is not None:
        train_dir = _round_dir(run_dir, 0)
    train_dir = Path(train_dir) if train_dir is not None else None
    last = cfg.rounds if stop_after_round is None else min(cfg.rounds, stop_after_round)
    data: dict = {}
    rows: list[dict] = []
    models: list = []
    for r in range(last + 1):
        done = _load_round(run_dir, r, cfg) if run_dir is not None else None
        if done is not None:
            models, new, round_rows = done
        else:
            if r == 0:
                models, new, label_rows = _round0(cfg, train_dir, progress), {}, []
            else:
                new, label_rows = _label(models, cfg, r)
                _train_round(models, {**data, **new}, cfg, r, progress)
            round_rows = _merge(_measure(models, cfg, r), label_rows)
            if run_dir is not None:
                _save_round(run_dir, r, cfg, models, new, round_rows)
        data.update(new)
        rows.extend(round_rows)
    frame = pd.DataFrame(rows)
    meta = result_meta(
        models[0], seed=cfg.seed, split="id", model=cfg.recipe, settings=cfg.to_dict()
    )
    return SelfImproveResult(frame=frame, models=models, meta=meta)


_LABEL_COLUMNS = (
    "label_error",
    "vote_yield",
    "length_yield",
    "filter_yield",
    "kept_label_error",
    "noise_hit",
    "n_kept",
)


def _merge(measured: list[dict], label_rows: list[dict]) -> list[dict]:
    by_len = {row["length"]: row for row in label_rows}
    out = []
    for row in measured:
        lab = by_len.get(row["length"], {})
        out.append({**row, **{c: float(lab.get(c, math.nan)) for c in _LABEL_COLUMNS}})
    return out
