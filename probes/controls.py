"""Control tasks and selectivity (Hewitt & Liang 2019).

A control task gives every token *type* one label, drawn independently per type from the
empirical label distribution, so a probe can only solve it by memorising types. Selectivity =
task accuracy - control accuracy with the same probe family, hyperparameters and split; a real
variable must beat every control (token, (position, token), operand tuple, whole input).

Example:
    >>> import torch
    >>> types = torch.tensor([0, 1, 0, 2, 1, 0])
    >>> c = control_task(types, torch.tensor([0, 1, 1, 0, 1, 0]), seed=0)
    >>> bool((c[types == 0] == c[0]).all())   # one label per type
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, check_seed, did_you_mean
from loopscope.core.result import Result, float_summary
from loopscope.probes.fit import ProbeResult, fit_probes

__all__ = ["control_task", "type_keys", "selectivity", "SelectivityResult"]


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x)


def type_keys(tokens: Any, kind: str = "token", width: int = 2) -> Tensor:
    """Integer type ids ``[B, pos]`` of each token for a control task.

    kinds: ``"token"`` (the token id), ``"position_token"`` (the pair (position, token)),
    ``"window"`` (the last ``width`` tokens up to the position — an operand tuple), ``"input"``
    (the whole input row: the strongest control, one random label per distinct input).
    """
    t = torch.as_tensor(_np(tokens)).long()
    if t.dim() != 2:
        raise LoopscopeError(f"tokens must be [B, pos], got {tuple(t.shape)}")
    B, P = t.shape
    if kind == "token":
        rows = t.unsqueeze(-1)
    elif kind == "position_token":
        rows = torch.stack([torch.arange(P).expand(B, P), t], -1)
    elif kind == "window":
        check_positive_int("width", width)
        pad = torch.nn.functional.pad(t, (width - 1, 0), value=-1)
        rows = pad.unfold(1, width, 1)  # [B, P, width]
    elif kind == "input":
        _, inv = torch.unique(t, dim=0, return_inverse=True)
        return inv.unsqueeze(1).expand(B, P).clone()
    else:
        raise LoopscopeError(
            f"unknown type kind {kind!r}; choose token, position_token, window or input"
        )
    _, inv = torch.unique(rows.reshape(B * P, -1), dim=0, return_inverse=True)
    return inv.reshape(B, P)


def control_task(
    types: Any, labels: Any, seed: int = 0, key: Callable[[Any], Any] | None = None
) -> Tensor:
    """Hewitt–Liang control labels: one label per type, sampled from the empirical distribution.

    Args:
        types: type of each token — same shape as ``labels`` (e.g. token ids ``[B, pos]``), or
            with one extra trailing axis (a tuple per token, e.g. ``(position, token)``).
        labels: task labels (``-100`` = unlabelled; kept as ``-100``).
        seed: ``numpy.random.default_rng`` seed.
        key: optional ``key(type) -> hashable`` applied to each token's type (pluggable keys).

    Returns:
        long tensor shaped like ``labels``.
    """
    lab = _np(labels).astype(np.int64)
    ty = _np(types)
    if ty.shape == lab.shape:
        flat_types = ty.reshape(-1, 1)
    elif ty.shape[:-1] == lab.shape:
        flat_types = ty.reshape(lab.size, ty.shape[-1])
    else:
        raise LoopscopeError(
            f"types must have the labels' shape {lab.shape} (or one extra axis), got {ty.shape}"
        )
    flat_lab = lab.reshape(-1)
    valid = flat_lab != -100
    if not valid.any():
        raise LoopscopeError("labels has no labelled (non -100) entry")
    values, counts = np.unique(flat_lab[valid], return_counts=True)
    if key is None:
        _, type_id = np.unique(flat_types, axis=0, return_inverse=True)
    else:
        ids: dict[Any, int] = {}
        type_id = np.array(
            [ids.setdefault(key(tuple(r) if len(r) > 1 else r[0]), len(ids)) for r in flat_types]
        )
    type_id = type_id.reshape(-1)
    rng = np.random.default_rng(seed)
    per_type = rng.choice(values, size=int(type_id.max()) + 1, p=counts / counts.sum())
    out = np.where(valid, per_type[type_id], -100)
    return torch.as_tensor(out.reshape(lab.shape))


@dataclass(kw_only=True, repr=False)
class SelectivityResult(Result):
    """Task and control accuracy per site with a paired bootstrap CI of their difference.

    Attributes:
        task, control: the two fits (same sites, examples and split).
        task_acc, control_acc, selectivity: ``[S]`` held-out accuracies and their difference.
        ci_low, ci_high: ``[S]`` bootstrap interval of the difference.
        meta: seed, n_boot, ci, probe.
    """

    task: ProbeResult
    control: ProbeResult
    task_acc: np.ndarray
    control_acc: np.ndarray
    selectivity: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per site: labels, task_acc, control_acc, selectivity, ci_low, ci_high, seed."""
        rows = []
        for s in range(len(self.selectivity)):
            r = dict(self.task.site_labels[s]) if self.task.site_labels else {"site": s}
            r.update(
                probe=self.task.kind,
                task_acc=float(self.task_acc[s]),
                control_acc=float(self.control_acc[s]),
                selectivity=float(self.selectivity[s]),
                ci_low=float(self.ci_low[s]),
                ci_high=float(self.ci_high[s]),
                seed=self.meta.get("seed"),
            )
            rows.append(r)
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, float]:
        """Sites, mean / max selectivity, and the fraction of sites whose CI lies above 0."""
        sel = np.asarray(self.selectivity, dtype=float)
        ok = np.isfinite(sel)
        return float_summary(
            {
                "n_sites": len(sel),
                "mean_selectivity": float(sel[ok].mean()) if ok.any() else None,
                "max_selectivity": float(sel[ok].max()) if ok.any() else None,
                "frac_ci_above_zero": float(np.mean(np.asarray(self.ci_low) > 0)),
            }
        )


def _bootstrap(
    task: ProbeResult, control: ProbeResult, n_boot: int, ci: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paired bootstrap over held-out groups of (task acc - control acc), per site."""
    ct, cc = task.correct.numpy(), control.correct.numpy()  # [S, N], NaN = not held out
    g = task.groups
    G = int(g.max()) + 1
    # per-group sums of correct answers and counts, so resampling groups is one matmul
    sums = np.zeros((2, ct.shape[0], G))
    cnts = np.zeros((2, ct.shape[0], G))
    for i, c in enumerate((ct, cc)):
        ok = ~np.isnan(c)
        for s in range(c.shape[0]):
            sums[i, s] = np.bincount(g[ok[s]], weights=c[s, ok[s]], minlength=G)
            cnts[i, s] = np.bincount(g[ok[s]], minlength=G)
    held = cnts.sum((0, 1)) > 0
    idx = np.nonzero(held)[0]
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)  # [n_boot, G']
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_t = (w @ sums[0][:, idx].T) / (w @ cnts[0][:, idx].T)
        acc_c = (w @ sums[1][:, idx].T) / (w @ cnts[1][:, idx].T)
    diff = acc_t - acc_c  # [n_boot, S]
    lo = np.nanquantile(diff, (1 - ci) / 2, axis=0)
    hi = np.nanquantile(diff, 1 - (1 - ci) / 2, axis=0)
    return lo, hi


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is the signature's default (arrays are never a default: they were passed)."""
    if value is default:
        return True
    return (
        isinstance(value, (str, int, float)) and type(value) is type(default) and value == default
    )


@did_you_mean
def selectivity(
    task: ProbeResult | Any,
    control: ProbeResult | Any,
    control_y: Any = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int | None = None,
    probe: str = "logistic",
    C: float = 1.0,
    alpha: float = 1.0,
    rank: int | None = None,
    hidden: int = 256,
    weight_decay: float = 1e-4,
    lr: float = 3e-3,
    epochs: int = 50,
    batch_size: int = 256,
    max_iter: int = 1000,
    tol: float = 1e-4,
    dtype: str = "float64",
    solver: str = "lbfgs",
    groups: Any = None,
    folds: int | None = None,
    split: Any = "random",
    test_frac: float = 0.25,
    mask: Any = None,
    classes: Any = None,
    standardize: bool = True,
    site_labels: list[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
) -> SelectivityResult:
    """Selectivity = task accuracy - control accuracy, with a paired bootstrap CI.

    Two call forms:

    * ``selectivity(task_result, control_result, n_boot=1000, ci=0.95)`` with two
      :class:`ProbeResult` fitted with the same options and split (the fit options below are
      then already fixed and may not be passed);
    * ``selectivity(X, y, control_y, probe=..., ...)`` fits the task and the control in one
      batched solve (``X [S, N, d]``), guaranteeing the same split.

    The bootstrap resamples held-out groups (examples) and recomputes both accuracies on the
    same resample (paired).

    Args:
        task: the task :class:`ProbeResult`, or the activations ``X [S, N, d]``.
        control: the control :class:`ProbeResult`, or (with ``X``) the task labels ``y``.
        control_y: (with ``X``) the control-task labels, e.g. from :func:`control_task`.
        n_boot: bootstrap resamples.
        ci: coverage of the interval, in (0, 1).
        seed: bootstrap seed (and, with ``X``, the split seed); default the fit's seed (0).
        probe: probe family (with ``X``; see :func:`fit_probes` for it and the options below).
        C: inverse L2 strength (logistic, lowrank).
        alpha: L2 strength (ridge).
        rank: rank of the lowrank probe.
        hidden: hidden units (mlp).
        weight_decay: L2 strength (mlp).
        lr: learning rate (mlp).
        epochs: passes over the data (mlp).
        batch_size: minibatch size (mlp).
        max_iter: iteration cap (logistic, lowrank).
        tol: gradient tolerance (logistic, lowrank).
        dtype: precision the probes are solved in, ``"float64"`` or ``"float32"``.
        solver: logistic solver, ``"lbfgs"`` or ``"newton"``.
        groups: ``[N]`` example ids (resampled as units).
        folds: k-fold cross-validation (overrides ``split``).
        split: ``"random"`` (``test_frac`` held out), ``"all"`` or explicit.
        test_frac: held-out fraction for ``split="random"``.
        mask: ``[N]`` or ``[S, N]`` bool, the rows to use.
        classes: the label set.
        standardize: z-score every site with its training-fold statistics.
        site_labels: one dict per site (frame columns).
        meta: extra entries for the fits' ``meta``.
    """
    check_positive_int("n_boot", n_boot)
    if not 0 < float(ci) < 1:
        raise LoopscopeError(f"ci must lie in (0, 1), got {ci!r}")
    # the fit, with every option named once; its keywords double as the "were any passed" check
    fit = functools.partial(
        fit_probes,
        probe=probe,
        C=C,
        alpha=alpha,
        rank=rank,
        hidden=hidden,
        weight_decay=weight_decay,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        max_iter=max_iter,
        tol=tol,
        dtype=dtype,
        solver=solver,
        groups=groups,
        folds=folds,
        split=split,
        test_frac=test_frac,
        mask=mask,
        classes=classes,
        standardize=standardize,
        meta=meta,
    )
    if isinstance(task, ProbeResult):
        res_t, res_c = _fitted_pair(
            task, control, control_y, {**fit.keywords, "site_labels": site_labels}
        )
        seed = check_seed(res_t.meta.get("seed", 0) if seed is None else seed)
    else:
        seed = check_seed(0 if seed is None else seed)
        res_t, res_c = _fit_pair(task, control, control_y, fit, seed=seed, site_labels=site_labels)
    lo, hi = _bootstrap(res_t, res_c, int(n_boot), float(ci), seed)
    ta, ca = res_t.accuracy, res_c.accuracy
    return SelectivityResult(
        task=res_t,
        control=res_c,
        task_acc=ta,
        control_acc=ca,
        selectivity=ta - ca,
        ci_low=lo,
        ci_high=hi,
        meta={"seed": seed, "n_boot": n_boot, "ci": ci, "probe": res_t.kind},
    )


def _fitted_pair(
    task: ProbeResult, control: Any, control_y: Any, fit_options: dict[str, Any]
) -> tuple[ProbeResult, ProbeResult]:
    """Check two given fits: same sites, examples and split, and no fit options passed."""
    if control_y is not None:
        raise LoopscopeError("selectivity(task_result, control_result) takes no control_y")
    params = inspect.signature(selectivity).parameters
    given = [k for k, v in fit_options.items() if not _is_default(v, params[k].default)]
    if given:
        raise LoopscopeError(
            f"selectivity(task_result, control_result) takes no fit options (got {given[0]}=): "
            "the probes are already fitted"
        )
    if not isinstance(control, ProbeResult):
        raise LoopscopeError("control must be a ProbeResult when task is one")
    if task.correct.shape != control.correct.shape or any(
        not torch.equal(a[1], b[1]) for a, b in zip(task.folds, control.folds, strict=True)
    ):
        raise LoopscopeError("task and control probes must share sites, examples and split")
    return task, control


def _fit_pair(
    X: Any,
    y: Any,
    control_y: Any,
    fit: Callable[..., ProbeResult],
    *,
    seed: int,
    site_labels: list[dict[str, Any]] | None,
) -> tuple[ProbeResult, ProbeResult]:
    """Fit the task and the control labels in ONE batched solve (so they share the split)."""
    if control_y is None:
        raise LoopscopeError("selectivity(X, y, control_y) needs control_y")
    X = torch.as_tensor(X)
    if X.dim() != 3:
        raise LoopscopeError(f"X must be [sites, examples, features], got {tuple(X.shape)}")
    S, N = X.shape[:2]
    y_t = torch.as_tensor(_np(y)).long().expand(S, N)
    y_c = torch.as_tensor(_np(control_y)).long().expand(S, N)
    labels = None if site_labels is None else list(site_labels) * 2
    both = fit(torch.cat([X, X]), torch.cat([y_t, y_c]), seed=seed, site_labels=labels)
    return _halves(both, S)


def _halves(res: ProbeResult, S: int) -> tuple[ProbeResult, ProbeResult]:
    """Split a fit over ``[task sites; control sites]`` into two results."""

    def part(sl: slice) -> ProbeResult:
        return ProbeResult(
            kind=res.kind,
            params=[{k: v[sl] for k, v in p.items()} for p in res.params],
            mean=[m[sl] for m in res.mean],
            std=[s[sl] for s in res.std],
            train_acc=res.train_acc[:, sl],
            test_acc=res.test_acc[:, sl],
            n_train=res.n_train[:, sl],
            n_test=res.n_test[:, sl],
            correct=res.correct[sl],
            test_pred=res.test_pred[sl],
            classes=res.classes,
            folds=res.folds,
            groups=res.groups,
            site_labels=res.site_labels[sl] if res.site_labels else [],
            meta={k: v[sl] if isinstance(v, list) else v for k, v in res.meta.items()},
        )

    return part(slice(0, S)), part(slice(S, 2 * S))
