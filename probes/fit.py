"""``fit_probes``: probes for every iteration and site in ONE batched solve, plus ``LinearProbe``.

``X [S, N, d]`` stacks the activations of ``S`` sites (iterations x sites x positions) over the
same ``N`` examples; ``y`` is ``[N]`` (shared) or ``[S, N]``; ``-100`` marks an unlabelled row.
Each fold standardises every site with its own training statistics, then one batched solver call
fits all ``S`` probes (see :mod:`loopscope.probes.solvers`). Rows with non-finite activations
(diverged samples) are dropped at that site only and counted, never crash the batch.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(3, 400, 8, generator=g, dtype=torch.float64)
    >>> y = (X[1, :, 0] > 0).long()
    >>> res = fit_probes(X, y, probe="logistic", seed=0)
    >>> int(res.accuracy.argmax())
    1
    >>> list(res.to_frame().columns)[:4]
    ['site', 'fold', 'probe', 'train_acc']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import (
    LoopscopeError,
    UnknownOptionError,
    check_positive_int,
    check_seed,
    did_you_mean,
)
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace
from loopscope.probes import solvers
from loopscope.probes.activations import ActivationSet
from loopscope.probes.design import trace_design
from loopscope.probes.logistic import check_solver
from loopscope.probes.splits import as_groups, make_folds

__all__ = ["fit_probes", "ProbeResult", "LinearProbe"]


def _nanmean(a: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean over the finite entries (NaN where there are none, without numpy's warning)."""
    ok = ~np.isnan(a)
    n = ok.sum(axis)
    total = np.where(ok, a, 0.0).sum(axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def meta_columns(meta: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a result's ``meta`` that its frame repeats as columns (not None,
    not the version)."""
    return {
        k: v
        for k, v in meta.items()
        if k != "loopscope_version" and v is not None and np.isscalar(v)
    }


@dataclass(kw_only=True, repr=False)
class ProbeResult(Result):
    """Probes fitted for ``S`` sites over ``F`` folds.

    Attributes:
        kind: probe family (``ridge`` / ``logistic`` / ``lowrank`` / ``mlp``).
        params: per fold, the solver parameters (linear kinds: ``W [S, d, K]``, ``b [S, K]``,
            in standardised coordinates; see :meth:`directions` for raw coordinates).
        mean, std: per fold, the training statistics ``[S, 1, d]`` used to standardise.
        train_acc, test_acc: ``[F, S]`` accuracies (NaN where a fold has no rows at a site).
        n_train, n_test: ``[F, S]`` rows used.
        correct: ``[S, N]`` 1/0 for each held-out row (from the fold that held it out), NaN for
            rows never held out or unlabelled (drives paired bootstraps in ``selectivity``).
        test_pred: ``[S, N]`` held-out predictions (class values; -100 where not held out).
        classes: ``[K]`` class values; folds: ``(train_idx, test_idx)`` per fold.
        groups: ``[N]`` group id of each row; site_labels: one dict per site.
        meta: seed, model, split, loopscope version, the probe settings and ``n_nonfinite``
            (per site, rows dropped for non-finite activations).
    """

    kind: str
    params: list[dict[str, Tensor]]
    mean: list[Tensor]
    std: list[Tensor]
    train_acc: Tensor
    test_acc: Tensor
    n_train: Tensor
    n_test: Tensor
    correct: Tensor
    test_pred: Tensor
    classes: Tensor
    folds: list[tuple[Tensor, Tensor]]
    groups: np.ndarray
    site_labels: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_sites(self) -> int:
        return int(self.train_acc.shape[1])

    @property
    def accuracy(self) -> np.ndarray:
        """Held-out accuracy per site ``[S]``, averaged over folds (NaN without held-out rows)."""
        return _nanmean(self.test_acc.numpy(), axis=0)

    def _standardise(self, X: Tensor, fold: int) -> Tensor:
        X = torch.as_tensor(X)
        if X.dim() == 2:
            X = X.unsqueeze(0).expand(self.n_sites, *X.shape)
        if X.dim() != 3 or X.shape[0] != self.n_sites or X.shape[2] != self.mean[fold].shape[2]:
            raise LoopscopeError(
                f"X must be [{self.n_sites}, M, {self.mean[fold].shape[2]}] (or [M, d]), got "
                f"{tuple(X.shape)}"
            )
        return (torch.nan_to_num(X.double()) - self.mean[fold]) / self.std[fold]

    def decision_function(self, X: Tensor, fold: int = 0) -> Tensor:
        """Class scores ``[S, M, K]`` of every site's probe (of ``fold``) on ``X [S, M, d]``."""
        return solvers.scores(self.kind, self.params[fold], self._standardise(X, fold))

    def predict(self, X: Tensor, fold: int = 0) -> Tensor:
        """Predicted class values ``[S, M]`` on ``X [S, M, d]`` (or ``[M, d]`` for every site)."""
        return self.classes[self.decision_function(X, fold).argmax(-1)]

    def directions(self, fold: int = 0, unit: bool = True) -> Tensor:
        """Probe directions in raw activation coordinates.

        Binary probes: ``[S, d]`` (positive class minus negative class); ``K > 2``: ``[S, d, K]``.
        ``unit`` normalises each direction (column) to length 1.
        """
        if self.kind == "mlp":
            raise LoopscopeError("an MLP probe has no single direction; use a linear probe kind")
        W = self.params[fold]["W"] / self.std[fold].transpose(1, 2)
        if W.shape[-1] == 2:
            W = W[..., 1] - W[..., 0]
            return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-30) if unit else W
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-30) if unit else W

    def to_frame(self, aggregate: bool = False) -> pd.DataFrame:
        """Tidy table: one row per (site, fold) — or per site with ``aggregate`` (fold = -1).

        Columns: the site labels (``site``, and ``iteration`` / ``position`` on a trace),
        fold, probe, train_acc, test_acc, n_train, n_test, seed, and model / task / split /
        n_nonfinite where known.
        """
        rows = []
        F = self.train_acc.shape[0]
        for s in range(self.n_sites):
            lab = dict(self.site_labels[s]) if self.site_labels else {"site": s}
            if aggregate:
                rows.append(self._row(lab, s, None))
            else:
                rows.extend(self._row(lab, s, f) for f in range(F))
        return pd.DataFrame(rows)

    def _row(self, lab: dict[str, Any], s: int, f: int | None) -> dict[str, Any]:
        r = dict(lab)
        if f is None:
            r.update(
                fold=-1,
                probe=self.kind,
                train_acc=float(_nanmean(self.train_acc[:, s].numpy())),
                test_acc=float(_nanmean(self.test_acc[:, s].numpy())),
                n_train=int(self.n_train[:, s].sum()),
                n_test=int(self.n_test[:, s].sum()),
            )
        else:
            r.update(
                fold=f,
                probe=self.kind,
                train_acc=float(self.train_acc[f, s]),
                test_acc=float(self.test_acc[f, s]),
                n_train=int(self.n_train[f, s]),
                n_test=int(self.n_test[f, s]),
            )
        r["seed"] = self.meta.get("seed")
        for k in ("model", "task", "split", "n_nonfinite"):
            v = self.meta.get(k)
            if v is not None:
                r[k] = v[s] if isinstance(v, list) else v
        return r

    def summary(self) -> dict[str, float]:
        """Sites and folds, mean / best held-out accuracy (and the best site), mean train accuracy."""
        acc = self.accuracy
        has = ~np.isnan(acc)
        return float_summary(
            {
                "n_sites": self.n_sites,
                "n_folds": len(self.folds),
                "mean_test_acc": float(_nanmean(acc)),
                "max_test_acc": float(acc[has].max()) if has.any() else None,
                "best_site": int(np.nanargmax(acc)) if has.any() else None,
                "mean_train_acc": float(_nanmean(self.train_acc.numpy())),
            }
        )


# -- validation -----------------------------------------------------------------------------------

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class _ProbeSpec:
    """A probe family with its checked hyperparameters; :meth:`solve` fits it on one fold."""

    kind: str
    C: float
    alpha: float
    rank: int | None
    hidden: int
    weight_decay: float
    lr: float
    epochs: int
    batch_size: int
    max_iter: int
    tol: float
    dtype: torch.dtype
    solver: str

    @classmethod
    def checked(cls, kind: str, *, dtype: Any, **hyper: Any) -> _ProbeSpec:
        name = str(dtype).replace("torch.", "")
        if name not in _DTYPES:
            raise LoopscopeError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        if kind not in solvers.KINDS:
            raise LoopscopeError(
                f"unknown probe kind {kind!r}; choose one of {', '.join(solvers.KINDS)}"
            )
        for key in ("C", "lr", "tol"):
            if not float(hyper[key]) > 0:
                raise LoopscopeError(f"{key} must be > 0, got {hyper[key]!r}")
        for key in ("alpha", "weight_decay"):
            if not float(hyper[key]) >= 0:
                raise LoopscopeError(f"{key} must be >= 0, got {hyper[key]!r}")
        for key in ("hidden", "epochs", "batch_size", "max_iter"):
            check_positive_int(key, hyper[key])
        if kind == "lowrank":
            if hyper["rank"] is None:
                raise LoopscopeError("probe='lowrank' needs rank= (a positive integer)")
            check_positive_int("rank", hyper["rank"])
        for key in ("C", "alpha", "weight_decay", "lr", "tol"):
            hyper[key] = float(hyper[key])
        check_solver(hyper["solver"])
        return cls(kind=kind, dtype=_DTYPES[name], **hyper)

    @property
    def data_dtype(self) -> torch.dtype:
        # the closed-form ridge with dtype="float32" reads the data in float32 end to end (no
        # float64 copy of X); the iterative probes keep float64 data and cast per pass
        return (
            torch.float32 if self.kind == "ridge" and self.dtype == torch.float32 else torch.float64
        )

    def solve(self, Z: Tensor, y: Tensor, w: Tensor, K: int, gen: torch.Generator) -> dict:
        """Fit every site on standardised training rows ``Z [S, n, d]`` (see solvers; the
        logistic probe standardises as it goes: :func:`_solve_logistic`)."""
        if self.kind == "ridge":
            return solvers.ridge(Z, y, w, K, alpha=self.alpha)
        if self.kind == "lowrank":
            return solvers.lowrank(
                Z,
                y,
                w,
                K,
                rank=self.rank,
                C=self.C,
                max_iter=self.max_iter,
                tol=self.tol,
                generator=gen,
            )
        return solvers.mlp(
            Z,
            y,
            w,
            K,
            hidden=self.hidden,
            alpha=self.weight_decay,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            generator=gen,
        )


def _solve_logistic(
    spec: _ProbeSpec, X: Tensor, rows: Tensor, y: Tensor, w: Tensor, K: int, standardize: bool
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The logistic probe from the raw rows (it standardises chunk by chunk, never copying the
    whole training set in float64): ``(params, mean, std)``."""
    p = solvers.logistic(
        X,
        y,
        w,
        K,
        rows=rows,
        standardize=standardize,
        C=spec.C,
        max_iter=spec.max_iter,
        tol=spec.tol,
        dtype=spec.dtype,
        solver=spec.solver,
    )
    return p, p.pop("mean"), p.pop("std")


def _finite_rows(X: Tensor) -> Tensor:
    """``[S, N]`` True where a row of ``X [S, N, d]`` is all finite.

    A row sum is non-finite whenever an entry is (NaN / inf propagate), so one cheap reduction
    settles almost every row; only rows whose sum is not finite (a bad entry, or finite values
    that overflow when added) are checked entry by entry.
    """
    ok = torch.isfinite(X.sum(-1))
    if not bool(ok.all()):
        bad = ~ok
        ok[bad] = torch.isfinite(X[bad]).all(-1)
    return ok


def _as_labels(y: Any, S: int, N: int) -> Tensor:
    y = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, Tensor) else y))
    if y.is_floating_point():
        if not bool(torch.all(y[torch.isfinite(y)] == torch.round(y[torch.isfinite(y)]))):
            raise LoopscopeError("y must hold class labels (integers); use probe='ridge' targets")
        y = torch.nan_to_num(y, nan=-100).long()
    y = y.long()
    if y.dim() == 1 and y.shape[0] == N:
        y = y.expand(S, N)
    if y.shape != (S, N):
        raise LoopscopeError(f"y must be [N] or [S, N] = [{S}, {N}], got {tuple(y.shape)}")
    return y


@dataclass(frozen=True)
class _Data:
    """Checked arrays of one fit: ``X`` in the solver's data dtype (non-finite rows zeroed),
    class indices ``yi``, the usable rows ``valid`` and the class values."""

    X: Tensor  # [S, N, d]
    yi: Tensor  # [S, N] long, 0..K-1 (anything where not valid)
    valid: Tensor  # [S, N] bool
    finite: Tensor  # [S, N] bool
    classes: Tensor  # [K]


def _check_data(X: Any, y: Any, mask: Any, classes: Any, dtype: torch.dtype) -> _Data:
    X = torch.as_tensor(X)
    if X.dim() != 3:
        raise LoopscopeError(f"X must be [sites, examples, features], got {tuple(X.shape)}")
    S, N, d = X.shape
    if S == 0 or N == 0 or d == 0:
        raise LoopscopeError(f"X must be non-empty, got shape {tuple(X.shape)}")
    y = _as_labels(y, S, N)
    finite = _finite_rows(X)
    valid = (y != -100) & finite
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask))
        if m.dtype != torch.bool or m.shape not in ((N,), (S, N)):
            raise LoopscopeError(f"mask must be bool [N] or [S, N], got {m.dtype} {tuple(m.shape)}")
        valid = valid & m
    if classes is None:
        values = torch.unique(y[valid])
    else:
        values = torch.unique(torch.as_tensor(classes).long())
        unknown = torch.unique(y[valid][~torch.isin(y[valid], values)])
        if unknown.numel():
            raise LoopscopeError(f"labels {unknown.tolist()[:5]} are not in classes=")
    if values.numel() < 2:
        raise LoopscopeError(
            f"need at least 2 classes to fit probes, got {values.tolist()} (pass classes=)"
        )
    yi = torch.searchsorted(values, torch.where(valid, y, values[0]).contiguous())
    X = X.to(dtype)  # no copy when X already has that dtype
    if not bool(finite.all()):
        X = torch.where(finite.unsqueeze(-1), X, torch.zeros((), dtype=dtype))
    return _Data(X, yi, valid, finite, values)


def _check_trace_only(on_trace: bool, **given: Any) -> None:
    """Options of one input kind are refused on the other (never silently ignored)."""
    defaults = {
        "sites": None,
        "positions": None,
        "iterations": None,
        "pooled": False,
        "exclude_diverged": True,
        "groups": None,
        "site_labels": None,
    }
    for key, value in given.items():
        if value is defaults[key] or (isinstance(value, bool) and value == defaults[key]):
            continue
        if on_trace and key in ("groups", "site_labels"):
            raise UnknownOptionError(
                f"fit_probes() got an unknown option {key!r} for a Trace (set from the trace: "
                "sequence ids and site keys)"
            )
        if not on_trace and key not in ("groups", "site_labels"):
            raise LoopscopeError(f"{key}= applies to a Trace or ActivationSet X, not an array")


# -- the fit --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fold:
    """One fold's fit: solver parameters, standardisation, predicted class index of every row."""

    params: dict[str, Tensor]
    mean: Tensor  # [S, 1, d]
    std: Tensor  # [S, 1, d]
    pred: Tensor  # [S, N]
    notes: dict[str, Tensor]  # per-site solver diagnostics (logistic: iterations, jitter)


def _fit_fold(
    spec: _ProbeSpec, data: _Data, tr: Tensor, standardize: bool, gen: torch.Generator
) -> _Fold:
    """Fit every site on the rows ``tr`` and predict every row."""
    K = int(data.classes.numel())
    w = data.valid[:, tr].double()
    yi = data.yi[:, tr]
    if spec.kind == "logistic":
        p, mean, std = _solve_logistic(spec, data.X, tr, yi, w, K, standardize)
    else:
        p, mean, std = _solve_standardised(spec, data.X, tr, yi, w, K, standardize, gen)
    notes = {k: p.pop(k) for k in ("iterations", "jitter") if k in p}
    # score every row through weights with the standardisation folded in (no scaled copy)
    raw = solvers.fold_standardisation(spec.kind, p, mean, std)
    if data.X.dtype != torch.float64:
        raw = {k: v.to(data.X.dtype) for k, v in raw.items()}
    return _Fold(p, mean, std, solvers.scores(spec.kind, raw, data.X).argmax(-1), notes)


def _solve_standardised(
    spec: _ProbeSpec,
    X: Tensor,
    tr: Tensor,
    yi: Tensor,
    w: Tensor,
    K: int,
    standardize: bool,
    gen: torch.Generator,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Standardise a copy of the training rows in place, then solve: ``(params, mean, std)``."""
    S, _, d = X.shape
    Ztr = X[:, tr]  # an index tensor: always a copy, so the in-place passes are safe
    if not standardize:
        mean = torch.zeros(S, 1, d, dtype=torch.float64)
        std = torch.ones(S, 1, d, dtype=torch.float64)
        return spec.solve(Ztr, yi, w, K, gen), mean, std
    mean = solvers._wmean(Ztr, w)
    Ztr -= mean
    mean = mean.double()
    if spec.kind == "ridge":
        # the closed form never needs the scaled copy: std comes from the centred Gram
        p, std = solvers.ridge_centred(Ztr, yi, w, K, mean, alpha=spec.alpha)
        return p, mean, std
    std = solvers.standard_deviation(Ztr, w, mean)
    Ztr /= std
    return spec.solve(Ztr, yi, w, K, gen), mean, std


def _solver_notes(spec: _ProbeSpec, data: _Data, fits: list[_Fold]) -> dict[str, Any]:
    """The logistic solver used, and per site the Hessian jitter a fold needed (0: none)."""
    if spec.kind != "logistic":
        return {}
    jitter = torch.stack([f.notes["jitter"] for f in fits]).amax(0)
    notes: dict[str, Any] = {"solver": spec.solver}
    notes["hessian_jitter"] = jitter.tolist()
    bad = torch.nonzero(jitter > 0).flatten().tolist()
    if bad:
        notes["notes"] = [
            f"site {s}: Hessian not positive definite, factorised with diagonal jitter "
            f"{jitter[s]:.3g}" + (" (none sufficed: gradient steps)" if jitter[s] == np.inf else "")
            for s in bad
        ]
    return notes


def _assemble(
    spec: _ProbeSpec,
    data: _Data,
    folds: list[tuple[Tensor, Tensor]],
    fits: list[_Fold],
    groups: np.ndarray,
    site_labels: list[dict[str, Any]],
    meta: dict[str, Any],
) -> ProbeResult:
    """Accuracies per (fold, site) and each row's held-out prediction, into a ProbeResult."""
    S, N, _ = data.X.shape
    nan = float("nan")
    acc = {k: torch.full((len(folds), S), nan, dtype=torch.float64) for k in ("tr", "te")}
    n = {k: torch.zeros(len(folds), S, dtype=torch.long) for k in ("tr", "te")}
    correct = torch.full((S, N), nan, dtype=torch.float64)
    test_pred = torch.full((S, N), -100, dtype=torch.long)
    for f, ((tr, te), fit) in enumerate(zip(folds, fits, strict=True)):
        ok = (fit.pred == data.yi).double()
        for key, idx in (("tr", tr), ("te", te)):
            v = data.valid[:, idx]
            n[key][f] = v.sum(1)
            a = (ok[:, idx] * v).sum(1) / n[key][f].clamp_min(1)
            acc[key][f] = torch.where(n[key][f] > 0, a, torch.full_like(a, nan))
        vte = data.valid[:, te]
        correct[:, te] = torch.where(vte, ok[:, te], torch.full_like(ok[:, te], nan))
        held = data.classes[fit.pred[:, te]]
        test_pred[:, te] = torch.where(vte, held, torch.full_like(held, -100))
    return ProbeResult(
        kind=spec.kind,
        params=[fit.params for fit in fits],
        mean=[fit.mean for fit in fits],
        std=[fit.std for fit in fits],
        train_acc=acc["tr"],
        test_acc=acc["te"],
        n_train=n["tr"],
        n_test=n["te"],
        correct=correct,
        test_pred=test_pred,
        classes=data.classes,
        folds=folds,
        groups=groups,
        site_labels=site_labels,
        meta=meta,
    )


@did_you_mean
def fit_probes(
    X: Tensor | np.ndarray | Trace | ActivationSet,
    y: Any,
    *,
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
    seed: int = 0,
    site_labels: list[dict[str, Any]] | None = None,
    meta: dict[str, Any] | None = None,
    sites: Any = None,
    positions: Any = None,
    iterations: Any = None,
    pooled: bool = False,
    exclude_diverged: bool = True,
) -> ProbeResult:
    """Fit one probe per site for all ``S`` sites (iterations x sites) in one batched solve.

    Args:
        X: ``[S, N, d]`` activations — or a :class:`loopscope.Trace` / :class:`ActivationSet`
            with ``y`` the ``[B, pos]`` targets (see :func:`loopscope.probes.fit_trace`).
        y: ``[N]`` labels shared by every site, or ``[S, N]``; ``-100`` = unlabelled.
        probe: ``"logistic"`` (L2), ``"ridge"`` (closed form), ``"lowrank"`` (logistic with a
            rank-``rank`` weight matrix) or ``"mlp"`` (one ReLU hidden layer).
        C: inverse L2 strength of the logistic and low-rank probes (scikit-learn's ``C``).
        alpha: L2 strength of the ridge probe (scikit-learn's ``Ridge(alpha)``).
        rank: rank of the ``lowrank`` probe's weight matrix (required for that kind).
        hidden: hidden units of the ``mlp`` probe.
        weight_decay: L2 strength of the ``mlp`` probe (scikit-learn's ``MLPClassifier(alpha)``).
        lr: Adam learning rate of the ``mlp`` probe.
        epochs: passes over the data of the ``mlp`` probe.
        batch_size: minibatch size of the ``mlp`` probe.
        max_iter: iteration cap of the logistic and low-rank solvers.
        tol: the logistic and low-rank solvers stop at ``max |gradient| <= tol`` of the objective
            scaled by ``1 / (C n)`` (scikit-learn's convention).
        dtype: ``"float64"`` or ``"float32"``: the precision the probes are solved in (the
            logistic solvers run float32 passes first and, for float64, finish with float64
            ones; the closed-form ridge reads float32 data in float32 end to end).
        solver: the logistic solver: ``"lbfgs"`` (L-BFGS with Kronecker-factored curvature) or
            ``"newton"`` (Newton / IRLS, one Cholesky per site per iteration); both reach
            scikit-learn's optimum (see :mod:`loopscope.probes.logistic`).
        groups: ``[N]`` example ids (tokens of one example never straddle folds).
        folds: k-fold cross-validation (k >= 2); overrides ``split``.
        split: ``"random"`` (one seeded split, ``test_frac`` held out), ``"all"`` (train on
            every row, no test rows), ``(train_idx, test_idx)`` or a bool train mask ``[N]``.
        test_frac: held-out fraction of groups for ``split="random"``.
        mask: ``[N]`` or ``[S, N]`` bool, the rows to use (on a trace: ``[B, pos]``).
        classes: the label set (default: the labels observed).
        standardize: z-score every site with its training-fold statistics.
        seed: split and initialisation seed.
        site_labels: one dict per site (columns of the frame); on a trace, set from its keys.
        meta: extra entries for the result's ``meta`` (e.g. model, task, split).
        sites: on a trace: ``"state"`` and/or captured hook names (default: all).
        positions: on a trace: positions to probe (default: all).
        iterations: on a trace: iterations to probe (default: all).
        pooled: on a trace: one probe per (iteration, site) over every labelled token, split by
            sequence, instead of one per (iteration, site, position).
        exclude_diverged: on a trace: leave out the samples it flagged as diverged.

    Returns:
        :class:`ProbeResult` (``.to_frame()``: site, fold, probe, train_acc, test_acc, seed ...).
    """
    spec = _ProbeSpec.checked(
        probe,
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
    )
    seed = check_seed(seed)
    on_trace = isinstance(X, (Trace, ActivationSet))
    _check_trace_only(
        on_trace,
        sites=sites,
        positions=positions,
        iterations=iterations,
        pooled=pooled,
        exclude_diverged=exclude_diverged,
        groups=groups,
        site_labels=site_labels,
    )
    extra: dict[str, Any] = {}
    if on_trace:
        design = trace_design(
            X,
            y,
            sites=sites,
            positions=positions,
            iterations=iterations,
            pooled=pooled,
            exclude_diverged=exclude_diverged,
            mask=mask,
        )
        X, y, groups, site_labels = design.X, design.y, design.groups, design.site_labels
        extra, mask = dict(design.meta), None
    data = _check_data(X, y, mask, classes, spec.data_dtype)
    S, N, _ = data.X.shape
    labels = list(site_labels) if site_labels is not None else []
    if labels and len(labels) != S:
        raise LoopscopeError(f"site_labels must have one dict per site ({S}), got {len(labels)}")
    groups = as_groups(groups, N)
    folds_idx = make_folds(
        N, groups=groups, folds=folds, test_frac=test_frac, split=split, seed=seed
    )

    fits = [
        _fit_fold(spec, data, tr, standardize, torch.Generator().manual_seed(seed * 1000 + f))
        for f, (tr, _) in enumerate(folds_idx)
    ]

    extra.update(meta or {})
    settings = {
        "probe": spec.kind,
        "C": C,
        "alpha": alpha,
        "rank": rank,
        "hidden": hidden,
        "folds": folds,
        "split_mode": split if isinstance(split, str) else "explicit",
        "n_nonfinite": (~data.finite).sum(1).tolist(),
        **_solver_notes(spec, data, fits),
    }
    info = result_meta(
        model=extra.get("model"), seed=seed, split=extra.get("split"), settings=settings
    )
    info.update(extra)
    return _assemble(spec, data, folds_idx, fits, groups, labels, info)


class LinearProbe:
    """scikit-learn-style estimator over :func:`fit_probes` (trains on all rows given).

    ``X`` may be ``[N, d]`` (one probe) or ``[S, N, d]`` (S probes fitted in one batched solve;
    ``predict`` / ``score`` then return per-site results). The keyword parameters are those of
    :func:`fit_probes` (same defaults), kept as attributes like a scikit-learn estimator's.

    Args:
        kind: probe family (``fit_probes``'s ``probe``): logistic, ridge, lowrank or mlp.
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
        mask: ``[N]`` or ``[S, N]`` bool, the rows to train on.
        classes: the label set (default: the labels seen by :meth:`fit`).
        standardize: z-score the features with the training statistics.
        seed: initialisation seed (lowrank, mlp).

    Example:
        >>> import torch
        >>> X = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
        >>> y = (X[:, 0] > 0).long()
        >>> LinearProbe(kind="logistic", C=1.0).fit(X, y).score(X, y) > 0.95
        True
    """

    @did_you_mean
    def __init__(
        self,
        kind: str = "logistic",
        *,
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
        mask: Any = None,
        classes: Any = None,
        standardize: bool = True,
        seed: int = 0,
    ) -> None:
        self.kind = kind
        self.C = C
        self.alpha = alpha
        self.rank = rank
        self.hidden = hidden
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype
        self.solver = solver
        self.mask = mask
        self.classes = classes
        self.standardize = standardize
        self.seed = seed
        self.result_: ProbeResult | None = None
        self._single = False

    def fit(self, X: Any, y: Any) -> LinearProbe:
        X = torch.as_tensor(X)
        self._single = X.dim() == 2
        Xs = X.unsqueeze(0) if self._single else X
        self.result_ = fit_probes(
            Xs,
            y,
            probe=self.kind,
            split="all",
            C=self.C,
            alpha=self.alpha,
            rank=self.rank,
            hidden=self.hidden,
            weight_decay=self.weight_decay,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_iter=self.max_iter,
            tol=self.tol,
            dtype=self.dtype,
            solver=self.solver,
            mask=self.mask,
            classes=self.classes,
            standardize=self.standardize,
            seed=self.seed,
        )
        return self

    def _res(self) -> ProbeResult:
        if self.result_ is None:
            raise LoopscopeError("LinearProbe is not fitted yet: call .fit(X, y) first")
        return self.result_

    def _lift(self, X: Any) -> Tensor:
        X = torch.as_tensor(X)
        return X.unsqueeze(0) if self._single else X

    def decision_function(self, X: Any) -> Tensor:
        s = self._res().decision_function(self._lift(X))
        return s[0] if self._single else s

    def predict(self, X: Any) -> Tensor:
        p = self._res().predict(self._lift(X))
        return p[0] if self._single else p

    def score(self, X: Any, y: Any) -> float | np.ndarray:
        """Accuracy (float for one probe, ``[S]`` array for a batch)."""
        p = self._res().predict(self._lift(X))
        y = torch.as_tensor(y).long()
        acc = (p == y.expand_as(p)).double().mean(-1).numpy()
        return float(acc[0]) if self._single else acc

    @property
    def classes_(self) -> Tensor:
        return self._res().classes

    @property
    def coef_(self) -> Tensor:
        """Raw-coordinate weights: ``[K, d]`` (``[1, d]`` for binary) or ``[S, ...]`` batched."""
        r = self._res()
        W = r.params[0]["W"] / r.std[0].transpose(1, 2)  # [S, d, K]
        W = W.transpose(1, 2)
        if W.shape[1] == 2:
            W = (W[:, 1] - W[:, 0]).unsqueeze(1)
        return W[0] if self._single else W

    @property
    def intercept_(self) -> Tensor:
        r = self._res()
        Wraw = r.params[0]["W"] / r.std[0].transpose(1, 2)
        b = r.params[0]["b"] - (r.mean[0] @ Wraw).squeeze(1)  # [S, K]
        if b.shape[1] == 2:
            b = (b[:, 1] - b[:, 0]).unsqueeze(1)
        return b[0] if self._single else b
