"""Recipes of the zoo models: the exact training config and the evaluation protocol.

``loopscope zoo build NAME`` (= :func:`build`) trains the recipe, measures its accuracy on every
split listed in ``evals`` with the toolkit, and writes ``checkpoints/NAME`` (safetensors + JSON
config + card). The card records the command, so every shipped model is re-trainable by it.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loopscope.core.errors import LoopscopeError, suggest
from loopscope.train import TrainConfig

__all__ = ["Recipe", "RECIPES", "build", "evaluate_recipe"]


@dataclass
class Recipe:
    """A zoo model: training config + evaluation splits.

    ``evals`` maps a split name to how many iterations to run: ``{"iter_factor": f}`` (f x length)
    or ``{"n_iter": T}``.
    """

    name: str
    train: TrainConfig
    evals: dict[str, dict[str, Any]]
    description: str = ""
    tags: list[str] = field(default_factory=list)


RECIPES: dict[str, Recipe] = {}


def _add(r: Recipe) -> None:
    RECIPES[r.name] = r


def evaluate_recipe(model: Any, recipe: Recipe, n: int = 512) -> dict[str, dict[str, float]]:
    """Accuracy of ``model`` on every split of ``recipe.evals`` (deterministic seeds)."""
    from loopscope import tasks
    from loopscope.train import evaluate

    task = tasks.get(recipe.train.task, **recipe.train.task_params)
    out = {}
    for split, rule in recipe.evals.items():
        out[split] = evaluate(
            model,
            task,
            split=split,
            n=n,
            n_iter=rule.get("n_iter"),
            iter_factor=rule.get("iter_factor"),
            cfg=None if ("n_iter" in rule or "iter_factor" in rule) else recipe.train,
        )
        out[split].update({k: v for k, v in rule.items()})
    return out


def build(
    name: str,
    steps: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
    n_eval: int = 512,
) -> dict[str, Any]:
    """Train recipe ``name`` and write its checkpoint + measured card; returns the card."""
    import dataclasses

    from loopscope.models.checkpoint import save_model
    from loopscope.train import train
    from loopscope.zoo import ROOT

    if name not in RECIPES:
        raise LoopscopeError(f"unknown zoo recipe {name!r}{suggest(name, RECIPES)}")
    recipe = RECIPES[name]
    cfg = recipe.train if steps is None else dataclasses.replace(recipe.train, steps=steps)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / name
    t0 = time.perf_counter()
    model, history = train(cfg, out_dir=run_dir, progress=progress)
    wall = history[-1]["wall_s"] if history else time.perf_counter() - t0
    acc = evaluate_recipe(model, recipe, n=n_eval)
    card = {
        "name": name,
        "description": recipe.description,
        "task": cfg.task,
        "task_params": cfg.task_params,
        "preset": cfg.preset,
        "model_overrides": cfg.model_overrides,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "seed": cfg.seed,
        "steps": cfg.steps,
        "wall_s": round(float(wall), 1),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "command": f"loopscope zoo build {name}"
        + (f" --steps {steps}" if steps is not None else ""),
        "train_config": cfg.to_dict(),
        "accuracy": acc,
        "evals": recipe.evals,
        "tags": recipe.tags,
        "final_loss": history[-1]["loss"] if history else None,
    }
    save_model(model, Path(out) if out is not None else ROOT / name, card=card)
    return card


# -- the shipped recipes -------------------------------------------------------------------------
_S3_EVALS = {
    "id": {"iter_factor": 2.0},
    "ood": {"iter_factor": 2.0},
    "ood_len64": {"iter_factor": 2.0},
}

_add(
    Recipe(
        "s3_fprm",
        TrainConfig(
            task="s3",
            preset="fprm",
            steps=3000,
            batch_size=64,
            lr=2e-3,
            iters=(1.0, 2.0),
            truncate=16,
            seed=0,
        ),
        _S3_EVALS,
        "S3 state tracking, FPRM recipe: pre-norm + residual scaling, NoPE + causal conv1d, random init (std 6).",
        ["state_tracking", "fprm"],
    )
)
_add(
    Recipe(
        "s3_rope",
        TrainConfig(
            task="s3",
            preset="fprm_rope_postnorm",
            steps=3000,
            batch_size=64,
            lr=2e-3,
            iters=(1.0, 2.0),
            truncate=16,
            seed=0,
        ),
        _S3_EVALS,
        "S3 state tracking, post-norm RoPE baseline (no local mixer).",
        ["state_tracking", "baseline"],
    )
)
_add(
    Recipe(
        "s3_act",
        TrainConfig(
            task="s3",
            preset="act",
            steps=3000,
            batch_size=64,
            lr=2e-3,
            iters=(1.0, 2.0),
            segments=4,
            truncate=8,
            seed=0,
        ),
        _S3_EVALS,
        "S3 state tracking with an ACT Q-head (deep supervision, 4 segments) for the halting comparison.",
        ["state_tracking", "halting"],
    )
)
_add(
    Recipe(
        "addition_conv",
        TrainConfig(
            task="addition",
            preset="fprm",
            steps=2500,
            batch_size=64,
            lr=2e-3,
            iters=(1.0, 2.0),
            truncate=16,
            seed=0,
        ),
        {"id": {"iter_factor": 2.0}, "ood": {"iter_factor": 2.0}, "ood_32": {"iter_factor": 2.0}},
        "Carry addition (aligned digit pairs, LSB first), FPRM recipe with a causal conv mixer; OOD = 2x and 4x digits.",
        ["addition", "algorithmic"],
    )
)
_add(
    Recipe(
        "maze_reach_conv",
        TrainConfig(
            task="maze_reach",
            preset="maze_conv",
            model_overrides={"d_mlp": 128},
            steps=1500,
            batch_size=32,
            lr=2e-3,
            # T ~ U[12, 32] covers the 9x9 flood fill (BFS eccentricity: median 12, max 28)
            iters=(12.0, 32.0),
            iters_per="fixed",
            truncate=8,
            seed=0,
        ),
        {"id": {"n_iter": 40}, "ood": {"n_iter": 80}, "ood_17": {"n_iter": 120}},
        "Maze reachability (flood fill) on 9x9 grids, FPRM recipe with a 3x3 depthwise conv2d mixer; OOD = 13x13 and 17x17.",
        ["maze", "algorithmic"],
    )
)
_add(
    Recipe(
        "sudoku4_hrm",
        TrainConfig(
            task="sudoku4",
            preset="hrm",
            steps=1500,
            batch_size=64,
            lr=2e-3,
            iters=(2.0, 4.0),
            iters_per="fixed",
            segments=2,
            seed=0,
        ),
        {"id": {"n_iter": 6}, "ood": {"n_iter": 12}},
        "Two-state HRM-style model (two post-norm stacks, L_cycles=2) on 4x4 Sudoku; OOD = harder puzzles.",
        ["sudoku", "hierarchical"],
    )
)
_add(
    Recipe(
        "mult_universal",
        TrainConfig(
            task="multiplication",
            preset="universal",
            steps=2500,
            batch_size=64,
            lr=2e-3,
            iters=(4.0, 8.0),
            iters_per="fixed",
            seed=0,
        ),
        {"train": {"n_iter": 8}, "id": {"n_iter": 8}, "ood": {"n_iter": 16}},
        "2x2-digit multiplication (80/20 pair split) with a Universal-Transformer-style loop; for the memorization analysis.",
        ["multiplication", "memorization"],
    )
)
# TransformerFAM on PassKey: one step per context block (T = n_context: iters (1, 1) x length);
# ID = the trained 3 context blocks, OOD = 2x / 4x / 16x as many filler blocks
_FAM_EVALS = {s: {"iter_factor": 1.0} for s in ("id", "ood_2x", "ood_4x", "ood_16x")}
_add(
    Recipe(
        "passkey_fam",
        TrainConfig(
            task="passkey",
            preset="fam",
            model_overrides={"norm": "pre"},
            steps=2000,
            batch_size=64,
            lr=3e-3,
            iters=(1.0, 1.0),
            seed=0,
        ),
        _FAM_EVALS,
        "TransformerFAM (2 pre-norm layers, 4 memory activations per layer, blocks of 8) on PassKey with 3 context blocks.",
        ["memory", "fam"],
    )
)
_add(
    Recipe(
        "passkey_fam_post",
        TrainConfig(
            task="passkey",
            preset="fam",
            model_overrides={"norm": "post"},
            steps=600,
            batch_size=64,
            lr=3e-3,
            iters=(1.0, 1.0),
            seed=0,
        ),
        _FAM_EVALS,
        "TransformerFAM with post-norm layers (RMS-normed, bounded memory) on PassKey: the contracting counterpart of passkey_fam.",
        ["memory", "fam"],
    )
)
_add(
    Recipe(
        "assoc_fam",
        TrainConfig(
            task="assoc_recall",
            preset="fam",
            model_overrides={"norm": "pre"},
            steps=2000,
            batch_size=64,
            lr=3e-3,
            iters=(1.0, 1.0),
            seed=0,
        ),
        _FAM_EVALS,
        "TransformerFAM (as passkey_fam) on associative recall: 2 key-value pairs in separate blocks of 3 context blocks.",
        ["memory", "fam"],
    )
)
