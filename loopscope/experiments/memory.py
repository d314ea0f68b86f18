"""The working-memory experiment: for a block-recurrent model on a memory task (PassKey,
associative recall), does the memory hold the item, and for how many blocks?

Four panels of evidence, each from :mod:`loopscope.analysis.memory`:

* ``accuracy``: answer accuracy per split (ID and 2x / 4x / 16x filler blocks), also with the
  end memory recentred on the first split's mean (removes a drift common to every sequence of
  that length: does the readout fail on the item or on the drift?) and, on the longest split,
  by the number of blocks between the item and the query;
* ``decodability``: linear-probe accuracy for the item from the memory k updates after it was
  written (the longest split);
* ``long``: ``[item block, n_long random filler blocks, query block]``: memory norm drift, and
  the model's own answer when the query follows block t (decoded at every t);
* ``repeat``: the same with ONE filler block repeated: the distance of the carried memory to
  the fixed point M* it runs into (solved from the run's end state), the separation from a run
  with another item block and the same filler (-> 0: the item is forgotten), and the Jacobian
  spectrum at M* (modes near |lambda| = 1; at the end state where no fixed point is reached).

Example::

    res = memory_study(zoo.load("passkey_fam"), zoo.task_of("passkey_fam"), n=64)
    res.summary()["ood_16x/accuracy"], res.summary()["n_near_unit"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from loopscope.analysis import memory as M
from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.targets import sequence_correct
from loopscope.core.unroll import unroll
from loopscope.experiments.common import check_splits

__all__ = ["memory_study", "MemoryStudy", "check_block_task"]


def check_block_task(loop: Loop, task: Any) -> None:
    """One-line error unless ``task`` is a block memory task that ``loop`` reads."""
    cfg = getattr(loop, "cfg", None)
    if not hasattr(task, "block_size") or "n_filler" not in vars(task):
        raise LoopscopeError(
            f"task {task.name!r} is not a block memory task (passkey, assoc_recall)"
        )
    if getattr(cfg, "block_size", None) != task.block_size:
        raise LoopscopeError(
            f"model block_size {getattr(cfg, 'block_size', None)} does not match task "
            f"{task.name!r} block_size {task.block_size}"
        )
    for field in ("vocab_size", "n_classes"):
        if getattr(cfg, field, None) != getattr(task, field):
            raise LoopscopeError(
                f"model {field} {getattr(cfg, field, None)} does not match task {task.name!r} "
                f"{field} {getattr(task, field)}"
            )


@dataclass(kw_only=True, repr=False)
class MemoryStudy(Result):
    """Frames of the four panels (see the module docstring) and their headline numbers."""

    accuracy: pd.DataFrame
    by_distance: pd.DataFrame
    decodability: pd.DataFrame
    long: pd.DataFrame
    repeat: pd.DataFrame
    spectrum: pd.DataFrame
    headline: dict[str, float]

    def to_frame(self) -> pd.DataFrame:
        """Every panel stacked, one ``panel`` column naming it."""
        parts = {
            "accuracy": self.accuracy,
            "by_distance": self.by_distance,
            "decodability": self.decodability,
            "long": self.long,
            "repeat": self.repeat,
            "spectrum": self.spectrum,
        }
        return pd.concat([f.assign(panel=k) for k, f in parts.items()], ignore_index=True)

    def summary(self) -> dict[str, float]:
        """Accuracy per split, drift, decodability half-life, distance to M*, near-unit modes."""
        return float_summary(self.headline)


def _stream(task: Any, b: Any, n_long: int, repeat: bool, g: torch.Generator) -> torch.Tensor:
    """``[item block, n_long filler blocks, query block]`` from the item blocks of batch ``b``."""
    bs = task.block_size
    n = b.tokens.shape[0]
    blocks = b.tokens.view(n, -1, bs)
    item = blocks[torch.arange(n), b.intermediates["key_block"]]
    if repeat:
        filler = torch.randint(0, task.n_filler, (n, 1, bs), generator=g).expand(n, n_long, bs)
    else:
        filler = torch.randint(0, task.n_filler, (n, n_long, bs), generator=g)
    return torch.cat([item[:, None], filler, blocks[:, -1:]], dim=1).reshape(n, -1)


def _answers(loop: Loop, tokens: torch.Tensor, targets: torch.Tensor, T: int) -> tuple:
    tr = unroll(loop, tokens, T, decode=True)
    correct = torch.stack([sequence_correct(lg.argmax(-1), targets) for lg in tr.logits])
    return tr, correct.float()  # [T + 1, B]


def _accuracy(loop: Loop, task: Any, splits: list[str], n: int, seed: int) -> tuple:
    """Answer accuracy per split, and with the end memory recentred: ``M_T - mean_B(M_T) +
    mean_B(M_T of the first split)`` (a length-wide drift common to all sequences removed)."""
    rows, last, ref = [], None, None
    for sp in splits:
        b = task.sample(n, sp, seed=seed)
        T = b.meta["n_context"]
        tr = unroll(loop, b.tokens, T, decode=True)
        ok = sequence_correct(tr.logits[-1].argmax(-1), b.targets)
        end = tr.states[-1]
        ref = end.mean(0, keepdim=True) if ref is None else ref
        with torch.no_grad():
            lg = loop.decode(end - end.mean(0, keepdim=True) + ref, tr.ctx)
        ok_c = sequence_correct(lg.argmax(-1), b.targets)
        rows.append(
            {
                "split": sp,
                "n_context": T,
                "accuracy": float(ok.float().mean()),
                "accuracy_recentred": float(ok_c.float().mean()),
                "n": n,
            }
        )
        last = (b, tr, ok)
    b, tr, ok = last
    dist = pd.DataFrame({"updates_since": b.intermediates["updates_since"].numpy(), "ok": ok})
    by = dist.groupby("updates_since")["ok"].agg(["mean", "size"]).reset_index()
    return pd.DataFrame(rows), by.rename(columns={"mean": "accuracy", "size": "n"}), b, tr


@did_you_mean
def memory_study(
    loop: Loop,
    task: Any,
    *,
    splits: tuple[str, ...] | list[str] = ("id", "ood_2x", "ood_4x", "ood_16x"),
    n: int = 256,
    n_long: int = 256,
    n_spec: int = 8,
    band: float = 0.05,
    seed: int = 0,
) -> MemoryStudy:
    """The four memory panels for ``loop`` on block memory task ``task``.

    Args:
        loop: a block-recurrent model (e.g. FAMTransformer). task: passkey or assoc_recall.
        splits: task splits for the accuracy table (the last one feeds the decodability probes).
        n: sequences per split. n_long: filler blocks after the item in the long streams.
        n_spec: samples for the fixed point and the spectrum. band: near-unit band.
        seed: sampling seed.
    """
    check_block_task(loop, task)
    splits = check_splits(task, splits)
    acc, by, b, tr = _accuracy(loop, task, splits, n, seed)
    item = b.intermediates["value" if "value" in b.intermediates else "key"]
    dec = M.decodability(tr, item, b.intermediates["key_block"], seed=seed).to_frame()
    g = torch.Generator().manual_seed(seed)
    b0 = task.sample(n, splits[0], seed=seed + 1)
    long_tok = _stream(task, b0, n_long, False, g)
    drift = M.memory_drift(loop, long_tok, n_iter=n_long + 1, seed=seed)
    _, ok_long = _answers(loop, long_tok, b0.targets, n_long + 1)
    df = drift.to_frame().groupby("iteration")[["rel_norm", "rel_change"]].median()
    long = df.assign(accuracy=ok_long.mean(1).numpy()).reset_index()
    k = min(n_spec, n)
    rep_tok = _stream(task, b0, n_long, True, g)[:k]
    other = rep_tok.clone()  # same filler, another sample's item block
    bs = task.block_size
    other[:, :bs] = rep_tok[:, :bs].roll(1, 0)
    tr_rep, ok_rep = _answers(loop, rep_tok, b0.targets[:k], n_long + 1)
    tr_oth = unroll(loop, other, n_long + 1)
    filler = rep_tok[:, bs : 2 * bs]
    # M*: the fixed point the carried memory runs into (solved from the run's end state)
    fp = M.filler_fixed_point(loop, filler, trace=tr_rep, h0=tr_rep.states[-1])
    conv = torch.tensor([s == "converged" for s in fp.status])
    keep = conv.view(-1, *([1] * (fp.fixed_point.dim() - 1)))
    at = torch.where(keep, fp.fixed_point, tr_rep.states[-1].double())
    sp = M.memory_spectrum(loop, filler, state=at.float(), band=band)
    sep = (tr_rep.states - tr_oth.states).flatten(2).double().norm(dim=-1)
    sep = sep / tr_rep.states.flatten(2).double().norm(dim=-1).clamp_min(1e-300)
    rep = pd.DataFrame(
        {
            "iteration": np.arange(n_long + 2),
            "distance": np.median(fp.distance[:, conv.numpy()], axis=1) if conv.any() else np.nan,
            "separation": sep.median(1).values.numpy(),
            "accuracy": ok_rep.mean(1).numpy(),
        }
    )
    spec = sp.to_frame()
    spec["at_fixed_point"] = conv.numpy()[spec["sample"].to_numpy()]
    ds = M.DecodabilityResult(frame=dec, chance=float(torch.bincount(item).max()) / len(item))
    head: dict[str, Any] = {f"{r.split}/accuracy": r.accuracy for r in acc.itertuples()}
    head.update({f"{r.split}/accuracy_recentred": r.accuracy_recentred for r in acc.itertuples()})
    head.update({f"drift_{k}": v for k, v in drift.summary().items()})
    head.update({f"decode_{k}": v for k, v in ds.summary().items()})
    head.update({f"fixed_point_{k}": v for k, v in fp.summary().items()})
    head.update(sp.summary())  # at M* where converged, else at the run's end state
    near = [c for c, ok in zip(sp.n_near_unit(), conv.tolist(), strict=True) if ok]
    head["n_near_unit_at_fixed_point"] = float(np.mean(near)) if near else float("nan")
    head["separation_end"] = float(sep[-1].median())
    head["long_accuracy_end"] = float(ok_long[-1].mean())
    head["repeat_accuracy_end"] = float(ok_rep[-1].mean())
    settings = {"splits": splits, "n": n, "n_long": n_long, "n_spec": k, "band": band}
    return MemoryStudy(
        accuracy=acc, by_distance=by, decodability=dec, long=long, repeat=rep, spectrum=spec,
        headline=head, meta=result_meta(loop, seed=seed, settings=settings),
    )  # fmt: skip
