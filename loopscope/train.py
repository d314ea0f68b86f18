"""Training small looped models on generated tasks (CPU-friendly, exactly resumable).

Recipe knobs (``TrainConfig``): AdamW, sampled iteration counts, truncated backprop through the
last ``truncate`` steps of each segment, deep supervision over ``segments`` with the carry
detached between segments, ACT Q-head loss (BCE of ``q_halt`` on sequence correctness, TRM style)
and Ouro exit-gate loss (expected loss under the exit distribution minus an entropy bonus) when
the model has those heads, a step budget (never wall time), seeds.

Determinism and resume: the batch of step ``s`` is ``task.sample(batch, "train", seed=f(seed, s))``
and its iteration count comes from a generator seeded by ``(seed, s)``, so the data stream is a
pure function of the step. A checkpoint holds the model, the AdamW moments and the step, written
atomically (safetensors + JSON); resuming after a kill reproduces the uninterrupted run's final
weights bit for bit.

Example:
    >>> from loopscope.train import TrainConfig, train          # doctest: +SKIP
    >>> cfg = TrainConfig(task="s3", preset="fprm", steps=200)  # doctest: +SKIP
    >>> model, history = train(cfg, out_dir="runs/s3")          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_number, check_seed
from loopscope.core.io import (
    atomic_write_text,
    load_state_dict,
    payload_sha256,
    read_json,
    save_state_dict,
)

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "sample_iterations",
    "eval_iterations",
    "build_model",
]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved with its checkpoints and model card)."""

    task: str
    preset: str
    task_params: dict[str, Any] = field(default_factory=dict)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup: int = 50
    #: iteration count per batch: T ~ U[iters[0] * L, iters[1] * L] with L the per-batch length
    #: (``iters_per="length"``) or T ~ U[iters[0], iters[1]] (``iters_per="fixed"``)
    iters: tuple[float, float] = (1.0, 2.0)
    iters_per: str = "length"
    segments: int = 1
    truncate: int | None = None
    q_loss_weight: float = 0.5
    gate_entropy: float = 0.05
    seed: int = 0
    eval_every: int = 0
    eval_n: int = 256
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.iters_per not in ("length", "fixed"):
            raise LoopscopeError(f"iters_per must be 'length' or 'fixed', got {self.iters_per!r}")
        for name in ("steps", "batch_size", "segments", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LoopscopeError(f"{name} must be a positive integer, got {v!r}")
        if self.truncate is not None and self.truncate < 1:
            raise LoopscopeError(f"truncate must be >= 1 or None, got {self.truncate!r}")
        if not (0 < self.iters[0] <= self.iters[1]):
            raise LoopscopeError(f"iters must satisfy 0 < lo <= hi, got {self.iters!r}")
        check_number("lr", self.lr, low=0, strict=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("grad_clip", self.grad_clip, low=0, strict=True)
        check_seed(self.seed)
        self.iters = tuple(self.iters)  # type: ignore[assignment]
        self.betas = tuple(self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LoopscopeError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**d)


def build_model(cfg: TrainConfig, task: Any) -> torch.nn.Module:
    """The model of a run: the preset with the task's vocabulary, classes and mask."""
    from loopscope import models

    overrides = {"vocab_size": task.vocab_size, "n_classes": task.n_classes}
    if hasattr(task, "causal"):
        overrides["causal"] = bool(task.causal)
    overrides.update(cfg.model_overrides)
    mcfg = models.preset(cfg.preset, **overrides)
    torch.manual_seed(cfg.seed)
    return models.build(mcfg)


def _length(batch: Any) -> int:
    return batch.length


def sample_iterations(cfg: TrainConfig, batch: Any, generator: torch.Generator) -> int:
    """Iteration count for one training batch (see ``TrainConfig.iters``)."""
    scale = _length(batch) if cfg.iters_per == "length" else 1
    lo = max(1, math.floor(cfg.iters[0] * scale))
    hi = max(lo, math.ceil(cfg.iters[1] * scale))
    return int(torch.randint(lo, hi + 1, (1,), generator=generator).item())


def eval_iterations(cfg: TrainConfig, batch: Any, factor: float | None = None) -> int:
    """Evaluation iteration count: the top of the training range (or ``factor`` x length)."""
    scale = _length(batch) if cfg.iters_per == "length" else 1
    return max(1, math.ceil((cfg.iters[1] if factor is None else factor) * scale))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31 - 1)


def _loss_and_stats(
    model: Any, batch: Any, n_iter: int, cfg: TrainConfig, generator: torch.Generator
) -> tuple[Tensor, dict]:
    tokens, targets = batch.tokens, batch.targets
    ctx = model.encode(tokens)
    h = model.init_state(ctx, generator)
    segments = min(cfg.segments, n_iter)
    per_seg = [n_iter // segments + (1 if s < n_iter % segments else 0) for s in range(segments)]
    losses: list[Tensor] = []
    gate_terms: list[tuple[Tensor, Tensor]] = []
    t = 0
    stats: dict[str, float] = {}
    for n_s in per_seg:
        n_free = max(0, n_s - cfg.truncate) if cfg.truncate else 0
        if n_free:
            with torch.no_grad():
                for _ in range(n_free):
                    h = model.step(h, ctx, t)
                    t += 1
        for _ in range(n_s - n_free):
            h = model.step(h, ctx, t)
            t += 1
        logits = model.decode(h, ctx)
        ce = F.cross_entropy(
            logits.flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="none"
        )
        ce = ce.view(targets.shape)
        mask = (targets != -100).to(ce.dtype)
        tok_loss = (ce * mask).sum() / mask.sum().clamp_min(1)
        loss = tok_loss
        if getattr(model.cfg, "halting", "none") == "act":
            q = model.q_head(h, ctx)  # [B, 2]
            with torch.no_grad():
                pred = logits.argmax(-1)
                correct = ((pred == targets) | (targets == -100)).all(dim=1).to(q.dtype)
            loss = loss + cfg.q_loss_weight * F.binary_cross_entropy_with_logits(q[:, 0], correct)
        if getattr(model.cfg, "halting", "none") == "exit_gate":
            lam = torch.sigmoid(model.exit_gate(h, ctx))  # [B, pos]
            gate_terms.append((lam, ce))
        losses.append(loss)
        h = h.detach()  # deep supervision: carry detached between segments
    total = torch.stack(losses).mean()
    if gate_terms:
        # Ouro stage I: expected per-token loss under p_t = lam_t prod_{j<t}(1-lam_j) (last step takes
        # the remaining mass) minus an entropy bonus so the gate does not collapse onto one step
        survive = torch.ones_like(gate_terms[0][0])
        ps, ces = [], []
        for i, (lam, ce) in enumerate(gate_terms):
            p = survive if i == len(gate_terms) - 1 else lam * survive
            survive = survive * (1 - lam)
            ps.append(p)
            ces.append(ce)
        P = torch.stack(ps)  # [S, B, pos]
        CE = torch.stack(ces)
        mask = (targets != -100).to(P.dtype)
        expected = ((P * CE).sum(0) * mask).sum() / mask.sum().clamp_min(1)
        entropy = (-(P.clamp_min(1e-9).log() * P).sum(0) * mask).sum() / mask.sum().clamp_min(1)
        total = total + expected - cfg.gate_entropy * entropy
    stats["loss"] = float(total.detach())
    return total, stats


@torch.no_grad()
def evaluate(
    model: Any,
    task: Any,
    split: str = "id",
    n: int = 256,
    n_iter: int | None = None,
    iter_factor: float | None = None,
    cfg: TrainConfig | None = None,
    seed: int = 12345,
    batch_size: int = 256,
) -> dict[str, float]:
    """Token and sequence accuracy on ``n`` examples of ``split``.

    ``n_iter`` fixes the iteration count; otherwise ``iter_factor`` x length (or the top of the
    training range when ``cfg`` is given).
    """
    model.eval()
    tok_c = seq_c = tok_n = seq_n = 0.0
    done = 0
    chunk = 0
    while done < n:
        b = min(batch_size, n - done)
        batch = task.sample(b, split=split, seed=seed + chunk)
        chunk += 1
        T = n_iter
        if T is None:
            T = (
                eval_iterations(cfg, batch, iter_factor)
                if cfg is not None
                else max(1, round((iter_factor or 2.0) * _length(batch)))
            )
        logits = model(batch.tokens, T)
        pred = logits.argmax(-1)
        mask = batch.targets != -100
        correct = (pred == batch.targets) & mask
        tok_c += float(correct.sum())
        tok_n += float(mask.sum())
        seq_c += float((correct | ~mask).all(dim=1).sum())
        seq_n += b
        done += b
    model.train()
    return {"token_acc": tok_c / max(tok_n, 1), "seq_acc": seq_c / max(seq_n, 1), "n": int(seq_n)}


# -- checkpoints -------------------------------------------------------------------------------
def _save_checkpoint(
    directory: Path,
    model: Any,
    opt: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    history: list,
) -> None:
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt/{idx}/{key}"] = val if isinstance(val, Tensor) else torch.tensor(val)
    # the tensors go to a file named by the step and the JSON, written last, names that file:
    # replacing one tensor file in place would let a kill between the two writes pair step k's
    # JSON with step k+1's weights (the resumed run then repeats a step and is no longer exact)
    name = f"checkpoint-{step:08d}.safetensors"
    save_state_dict(tensors, directory / name)
    meta = {
        "format": "loopscope.train/1",
        "step": step,
        "tensors": name,
        "param_groups": sd["param_groups"],
        "train_config": cfg.to_dict(),
        "history": history,
        "sha256": payload_sha256(directory / name),
    }
    atomic_write_text(directory / "checkpoint.json", json.dumps(meta, default=str))
    for old in directory.glob("checkpoint*.safetensors"):
        if old.name != name:  # no JSON names them any more
            old.unlink(missing_ok=True)


def _load_checkpoint(
    directory: Path, model: Any, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, list]:
    meta = read_json(directory / "checkpoint.json")
    if meta.get("train_config") != json.loads(json.dumps(cfg.to_dict(), default=str)):
        raise LoopscopeError(
            f"checkpoint in {directory} was written by a different training config; use another out_dir"
        )
    tensors = load_state_dict(
        directory / meta.get("tensors", "checkpoint.safetensors"),
        sha256=meta.get("sha256"),  # checkpoints written before hashes were recorded: unchecked
        where=directory / "checkpoint.json",
    )
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta.get("history", []))


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[Any, list[dict]]:
    """Train the model described by ``cfg``; returns ``(model, history)``.

    With ``out_dir`` a checkpoint is written every ``checkpoint_every`` steps and at the end, and
    an existing checkpoint is resumed (``resume=True``). ``stop_after`` ends the run early after that
    many steps (used to test interruption); the checkpoint then resumes it exactly.
    """
    from loopscope import tasks

    task = tasks.get(cfg.task, **cfg.task_params)
    model = build_model(cfg, task)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    start, history = 0, []
    directory = Path(out_dir) if out_dir is not None else None
    if directory is not None and resume and (directory / "checkpoint.json").exists():
        start, history = _load_checkpoint(directory, model, opt, cfg)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    t0 = time.perf_counter()
    wall0 = float(history[-1].get("wall_s", 0.0)) if history else 0.0
    bar = _progress(progress, cfg, start)
    try:
        for step in range(start, end):
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) * 0.9 + 0.1
            for g in opt.param_groups:
                g["lr"] = lr
            gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step))
            batch = task.sample(cfg.batch_size, split="train", seed=_step_seed(cfg.seed, step))
            n_iter = sample_iterations(cfg, batch, gen)
            loss, stats = _loss_and_stats(model, batch, n_iter, cfg, gen)
            if not torch.isfinite(loss):
                raise LoopscopeError(
                    f"training diverged at step {step} (loss {float(loss)}); lower lr or use damping"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            rec = {
                "step": step + 1,
                "loss": stats["loss"],
                "n_iter": n_iter,
                "lr": lr,
                "wall_s": wall0 + time.perf_counter() - t0,
            }
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                rec.update(
                    {
                        f"id_{k}": v
                        for k, v in evaluate(model, task, "id", cfg.eval_n, cfg=cfg).items()
                        if k != "n"
                    }
                )
            history.append(rec)
            if bar is not None:
                bar[0].update(
                    bar[1],
                    advance=1,
                    description=f"{cfg.task}/{cfg.preset} loss {stats['loss']:.3f}",
                )
            if directory is not None and (
                (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end
            ):
                _save_checkpoint(directory, model, opt, step + 1, cfg, history)
    finally:
        if bar is not None:
            bar[0].stop()
    model.eval()
    return model, history


def _progress(enabled: bool, cfg: TrainConfig, start: int):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    prog.start()
    tid = prog.add_task(f"{cfg.task}/{cfg.preset}", total=cfg.steps, completed=start)
    return prog, tid
