"""Corruptions for patching: STR pairs (default), resampling, mean / zero ablation, Gaussian noise.

A :class:`Corruption` is what a corrupted run needs: its inputs and, optionally, per-row
interventions (an ablation or embedding noise applied on top of those inputs). Every patching
function accepts either plain corrupted inputs (a token tensor) or a Corruption.

* :func:`str_pairs` — symmetric token replacement for loopscope tasks: same length, one input token
  changed so that exactly one computation-graph variable changes (a group element; a digit that
  flips exactly one carry; an operand digit), validated so the answers differ (r != r'). Returns
  :class:`STRPairs` with the answer pair and answer position for :class:`AnswerMetric`.
* :func:`resample` — another example's input (a derangement; optionally with a different answer).
* :func:`mean_ablation` / :func:`zero_ablation` — the corrupted run is the clean input with the
  sites replaced by their mean over a reference batch (per iteration and position) or by zero.
* :func:`gaussian_noise` — N(0, nu) on embeddings (ROME-style, nu = 3 x embedding std): off
  distribution, so it is refused unless ``replication=True`` and the result is flagged.

Example:
    >>> from loopscope import tasks
    >>> pairs = str_pairs(tasks.get("s3", train_len=(6, 6)), 4, seed=0)
    >>> bool((pairs.answer != pairs.wrong).all()), pairs.clean.shape == pairs.corrupt.shape
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.circuits.engine import Source, canonical_sites
from loopscope.circuits.metrics import AnswerMetric
from loopscope.core.errors import LoopscopeError, check_number, check_positive_int
from loopscope.core.interventions import Intervention, Patch, Zero
from loopscope.core.unroll import unroll

__all__ = [
    "Corruption",
    "STRPairs",
    "str_pairs",
    "resample",
    "mean_ablation",
    "zero_ablation",
    "gaussian_noise",
    "as_corruption",
]


@dataclass
class Corruption:
    """Inputs of the corrupted run plus optional per-row interventions.

    Attributes:
        inputs: corrupted inputs ``[B, ...]`` (for ablations: the clean inputs).
        kind: "str", "resample", "mean", "zero", "gaussian" or "inputs".
        interventions: ``fn(example_idx [R]) -> [Intervention]`` for a batch whose row r is a copy
            of example ``example_idx[r]`` (None: the inputs alone are the corruption).
        flagged: True for off-distribution corruptions (Gaussian noise), replication only.
        meta: facts about the construction (seed, nu, sites ...).
    """

    inputs: Any
    kind: str = "inputs"
    interventions: Callable[[Tensor], list[Intervention]] | None = None
    flagged: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def as_corruption(corrupt: Any) -> Corruption:
    """Plain corrupted inputs -> ``Corruption(inputs)``; a Corruption / STRPairs passes through."""
    if isinstance(corrupt, Corruption):
        return corrupt
    if isinstance(corrupt, STRPairs):
        return corrupt.corruption
    return Corruption(inputs=corrupt, kind="inputs")


# -- STR pairs ---------------------------------------------------------------------------------


@dataclass
class STRPairs:
    """Clean / corrupted token pairs differing in exactly one input token.

    Attributes:
        clean, corrupt: ``[n, pos]`` long token ids (same shape).
        answer, wrong: ``[n]`` clean answer r and corrupted answer r' (r != r' everywhere).
        answer_position: ``[n]`` readout position of the pair (the last labelled position whose
            label changes).
        changed_position: ``[n]`` the replaced token's position.
        variable: name of the computation-graph variable that changes (e.g. ``"g3"``,
            ``"carry2"``, ``"x1"``).
    """

    clean: Tensor
    corrupt: Tensor
    answer: Tensor
    wrong: Tensor
    answer_position: Tensor
    changed_position: Tensor
    variable: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.clean.shape[0]

    def metric(self) -> AnswerMetric:
        """Logit difference logit(r) - logit(r') at each pair's answer position."""
        return AnswerMetric(self.answer, self.wrong, self.answer_position)

    @property
    def corruption(self) -> Corruption:
        return Corruption(inputs=self.corrupt, kind="str", meta=dict(self.meta))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "example": np.arange(len(self)),
                "changed_position": self.changed_position.numpy(),
                "variable": self.variable,
                "answer_position": self.answer_position.numpy(),
                "answer": self.answer.numpy(),
                "wrong": self.wrong.numpy(),
                **{k: v for k, v in self.meta.items() if np.isscalar(v)},
            }
        )


Edit = tuple[int, int, str]  # (position, new token, variable name)


def _group_labeler(task: Any) -> Callable[[np.ndarray], np.ndarray]:
    table = np.asarray(task.table)

    def label(tok: np.ndarray) -> np.ndarray:
        out = np.full(tok.shape, -100, dtype=np.int64)
        cur = np.zeros(tok.shape[0], dtype=np.int64)
        for i in range(1, tok.shape[1]):
            cur = table[tok[:, i], cur]
            out[:, i] = cur
        return out

    return label


def _group_edits(task: Any, row: np.ndarray) -> list[Edit]:
    return [
        (i, g, f"g{i}") for i in range(1, len(row)) for g in range(task.order) if g != int(row[i])
    ]


def _addition_labeler(tok: np.ndarray) -> np.ndarray:
    from loopscope.tasks.addition import add_digits

    return add_digits(tok // 10, tok % 10)["sum"]


def _addition_edits(task: Any, row: np.ndarray) -> list[Edit]:
    """Change one operand digit by +-1 so that exactly one carry flips."""
    from loopscope.tasks.addition import add_digits

    a, b = row // 10, row % 10
    base = add_digits(a[None], b[None])["carry"][0]
    edits = []
    for i in range(len(row) - 1):  # the last position is the (0, 0) carry-out slot
        for which in ("a", "b"):
            for d in (-1, 1):
                a2, b2 = a.copy(), b.copy()
                arr = a2 if which == "a" else b2
                if not 0 <= arr[i] + d <= 9:
                    continue
                arr[i] += d
                flips = np.flatnonzero(add_digits(a2[None], b2[None])["carry"][0] != base)
                if len(flips) == 1:
                    edits.append((i, int(10 * a2[i] + b2[i]), f"carry{int(flips[0])}"))
    return edits


def _mult_labeler(task: Any) -> Callable[[np.ndarray], np.ndarray]:
    from loopscope.tasks.multiplication import SEP, digits_of

    def label(tok: np.ndarray) -> np.ndarray:
        seps = np.flatnonzero(tok[0] == SEP)
        n1, n2 = int(seps[0]), int(seps[1] - seps[0] - 1)
        out = np.full(tok.shape, -100, dtype=np.int64)
        for k, r in enumerate(tok):
            x = sum(int(d) * 10**i for i, d in enumerate(r[:n1]))
            y = sum(int(d) * 10**j for j, d in enumerate(r[n1 + 1 : n1 + 1 + n2]))
            out[k, n1 + n2 + 2 :] = digits_of(x * y, n1 + n2)
        return out

    return label


def _mult_edits(task: Any, row: np.ndarray) -> list[Edit]:
    from loopscope.tasks.multiplication import SEP

    seps = np.flatnonzero(row == SEP)
    n1, n2 = int(seps[0]), int(seps[1] - seps[0] - 1)
    edits = [(i, d, f"x{i}") for i in range(n1) for d in range(10) if d != int(row[i])]
    edits += [
        (n1 + 1 + j, d, f"y{j}") for j in range(n2) for d in range(10) if d != int(row[n1 + 1 + j])
    ]
    return edits


def _builders(task: Any, labeler: Any, positions: Any, vocab: Any) -> tuple[Callable, Callable]:
    from loopscope.tasks import AdditionTask, GroupTask, MultiplicationTask

    if labeler is not None:
        if not callable(labeler):
            raise LoopscopeError("labeler must be fn(tokens [n, pos] numpy) -> targets [n, pos]")
        voc = list(range(task.vocab_size)) if vocab is None else [int(v) for v in vocab]

        def generic(task: Any, row: np.ndarray) -> list[Edit]:
            pos = range(len(row)) if positions is None else positions
            return [(int(i), v, f"token{int(i)}") for i in pos for v in voc if v != int(row[i])]

        return labeler, generic
    if isinstance(task, GroupTask):
        return _group_labeler(task), _group_edits
    if isinstance(task, AdditionTask):
        return _addition_labeler, _addition_edits
    if isinstance(task, MultiplicationTask):
        return _mult_labeler(task), _mult_edits
    raise LoopscopeError(
        f"no STR builder for task {getattr(task, 'name', type(task).__name__)!r}; pass "
        "labeler=fn(tokens) -> targets (and optionally positions=, vocab=)"
    )


def str_pairs(
    task: Any,
    n: int,
    split: str = "id",
    seed: int = 0,
    *,
    positions: Sequence[int] | None = None,
    labeler: Callable[[np.ndarray], np.ndarray] | None = None,
    vocab: Sequence[int] | None = None,
    max_batches: int = 20,
) -> STRPairs:
    """``n`` STR pairs from ``task.sample(n, split, seed)`` (see module docstring).

    Each clean example gets one edit drawn (seeded) among the task's valid edits: group tasks
    replace one element g_i; addition changes one operand digit by +-1 so exactly one carry flips;
    multiplication changes one operand digit. Other tasks need ``labeler`` (tokens -> targets,
    numpy) and edit any position in ``positions`` to any token in ``vocab``. An edit is kept only
    if some label changes; the answer position is the last labelled position whose label changes.
    Examples without a valid edit are replaced from further batches of the same length.

    Raises:
        LoopscopeError: no builder for the task, or fewer than ``n`` valid pairs found.
    """
    n = check_positive_int("n", n)
    label, edits_of = _builders(task, labeler, positions, vocab)
    rng = np.random.default_rng(seed)
    cl, co, ans, wr, apos, cpos, var = [], [], [], [], [], [], []
    length = None
    for k in range(max_batches):
        b = task.sample(n, split, seed=int(seed) + 7919 * k)
        tok = b.tokens.numpy()
        if length is None:
            length = tok.shape[1]
        if tok.shape[1] != length:
            continue
        tgt = label(tok)
        for row, trow in zip(tok, tgt, strict=True):
            edits = edits_of(task, row)
            for j in rng.permutation(len(edits)):
                p, v, name = edits[j]
                new = row.copy()
                new[p] = v
                t2 = label(new[None])[0]
                diff = np.flatnonzero((trow != t2) & (trow != -100) & (t2 != -100))
                if len(diff) == 0:
                    continue
                q = int(diff[-1])
                cl.append(row)
                co.append(new)
                ans.append(int(trow[q]))
                wr.append(int(t2[q]))
                apos.append(q)
                cpos.append(int(p))
                var.append(name)
                break
            if len(cl) == n:
                break
        if len(cl) == n:
            break
    if len(cl) < n:
        raise LoopscopeError(
            f"found only {len(cl)} of {n} valid STR pairs for task {task.name!r} in {max_batches} batches"
        )
    meta = {"task": task.name, "split": split, "seed": int(seed), "corruption": "str"}
    return STRPairs(
        clean=torch.as_tensor(np.stack(cl)).long(),
        corrupt=torch.as_tensor(np.stack(co)).long(),
        answer=torch.as_tensor(ans).long(),
        wrong=torch.as_tensor(wr).long(),
        answer_position=torch.as_tensor(apos).long(),
        changed_position=torch.as_tensor(cpos).long(),
        variable=var,
        meta=meta,
    )


# -- resampling ----------------------------------------------------------------------------------


def resample(
    inputs: Tensor, seed: int = 0, answers: Tensor | None = None, max_tries: int = 200
) -> Corruption:
    """Each example's corrupted input is another example's input (seeded derangement).

    With ``answers`` ``[B]``, the partner must have a different answer (Nikankin et al.: a random
    different prompt with a different answer); ``meta["partner"]`` holds the permutation.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 2:
        raise LoopscopeError("resample needs a tensor batch of at least 2 examples")
    B = inputs.shape[0]
    rng = np.random.default_rng(seed)
    ans = None if answers is None else torch.as_tensor(answers).reshape(-1).numpy()
    if ans is not None and len(ans) != B:
        raise LoopscopeError(f"answers must have one entry per example ({B}), got {len(ans)}")
    for _ in range(max_tries):
        perm = rng.permutation(B)
        ok = perm != np.arange(B)
        if ans is not None:
            ok &= ans[perm] != ans
        if ok.all():
            return Corruption(
                inputs=inputs[torch.as_tensor(perm)],
                kind="resample",
                meta={"seed": int(seed), "partner": perm.tolist()},
            )
    raise LoopscopeError(
        f"no resampling partner assignment found in {max_tries} tries (are all answers equal?)"
    )


# -- ablations -----------------------------------------------------------------------------------


def mean_ablation(
    loop: Any,
    inputs: Any,
    sites: Sequence[str] | str,
    n_iter: int,
    *,
    reference: Any = None,
    iterations: Any = "all",
    seed: int = 0,
) -> Corruption:
    """Corrupted run = ``inputs`` with ``sites`` replaced by their mean over ``reference``
    (default ``inputs``), per firing (iteration) and position, at ``iterations``."""
    n_iter = check_positive_int("n_iter", n_iter)
    names = canonical_sites(loop, sites)
    ref = inputs if reference is None else reference
    tr = unroll(loop, ref, n_iter, capture=names, seed=seed)
    src = Source.from_trace(tr, names)
    means = {s: src.acts[s].mean(dim=1, keepdim=True) for s in names}  # [F, 1, ...]

    def make(site: str) -> Callable:
        def value(x: Tensor, label: tuple) -> Tensor:
            i = src.index[site].get(tuple(label))
            if i is None:
                raise LoopscopeError(f"reference run has no firing of {site!r} labelled {label}")
            return means[site][i].expand_as(x)

        return value

    def ivs(ex: Tensor) -> list[Intervention]:
        return [Patch(s, iterations, value=make(s)) for s in names]

    return Corruption(
        inputs=inputs,
        kind="mean",
        interventions=ivs,
        meta={"sites": names, "iterations": str(iterations), "seed": int(seed)},
    )


def zero_ablation(
    inputs: Any, sites: Sequence[str] | str, *, iterations: Any = "all"
) -> Corruption:
    """Corrupted run = ``inputs`` with ``sites`` zeroed at ``iterations``."""
    names = [sites] if isinstance(sites, str) else list(sites)
    return Corruption(
        inputs=inputs,
        kind="zero",
        interventions=lambda ex: [Zero(s, iterations) for s in names],
        meta={"sites": names, "iterations": str(iterations)},
    )


def gaussian_noise(
    loop: Any,
    inputs: Any,
    *,
    hook: str = "hook_embed",
    positions: Sequence[int] | None = None,
    scale: float = 3.0,
    nu: float | None = None,
    seed: int = 0,
    replication: bool = False,
) -> Corruption:
    """ROME-style Gaussian noise N(0, nu) added to ``hook`` (the embeddings) at ``positions``.

    ``nu`` defaults to ``scale`` x the standard deviation of the clean activation. Off
    distribution and known to localise inconsistently: refused unless ``replication=True``.
    """
    if not replication:
        raise LoopscopeError(
            "Gaussian-noise corruption is off-distribution (replication only); use str_pairs or "
            "resample, or pass replication=True"
        )
    check_number("scale", scale, low=0, strict=True)
    if nu is not None:
        check_number("nu", nu, low=0)
    tr = unroll(loop, inputs, 1, capture=[hook], seed=seed)
    x = tr[hook][0]  # [B, ...]
    std = float(x.double().std()) if nu is None else float(nu) / float(scale)
    g = torch.Generator().manual_seed(int(seed))
    noise = scale * std * torch.randn(x.shape, generator=g, dtype=torch.float64)
    if positions is not None:
        keep = torch.zeros(x.shape[1], dtype=torch.bool)
        keep[torch.as_tensor(list(positions))] = True
        noise = noise * keep.view(1, -1, *([1] * (x.dim() - 2)))

    def ivs(ex: Tensor) -> list[Intervention]:
        return [Patch(hook, "all", value=lambda a, lab: a + noise[ex].to(a.dtype))]

    return Corruption(
        inputs=inputs,
        kind="gaussian",
        interventions=ivs,
        flagged=True,
        meta={"hook": hook, "nu": scale * std, "seed": int(seed), "replication": True},
    )
