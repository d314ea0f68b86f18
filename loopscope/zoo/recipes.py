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

from loopscope.errors import LoopscopeError, suggest
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
            model, task, split=split, n=n, n_iter=rule.get("n_iter"), iter_factor=rule.get("iter_factor"),
            cfg=None if ("n_iter" in rule or "iter_factor" in rule) else recipe.train,
        )
        out[split].update({k: v for k, v in rule.items()})
    return out


def build(name: str, steps: int | None = None, out: str | Path | None = None, progress: bool = True,
          run_dir: str | Path | None = None, n_eval: int = 512) -> dict[str, Any]:
    """Train recipe ``name`` and write its checkpoint + measured card; returns the card."""
    import dataclasses

    from loopscope.io import save_model
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
        "command": f"loopscope zoo build {name}" + (f" --steps {steps}" if steps is not None else ""),
        "train_config": cfg.to_dict(),
        "accuracy": acc,
        "evals": recipe.evals,
        "tags": recipe.tags,
        "final_loss": history[-1]["loss"] if history else None,
    }
    save_model(model, Path(out) if out is not None else ROOT / name, card=card)
    return card
