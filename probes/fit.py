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
    check_positive_int,
    check_seed,
    reject_unknown_kwargs,
)
from loopscope.probes import solvers
from loopscope.probes.splits import as_groups, make_folds

__all__ = ["fit_probes", "ProbeResult", "LinearProbe", "FIT_OPTIONS"]

#: keyword options of :func:`fit_probes` and their defaults
FIT_OPTIONS: dict[str, Any] = {
    "probe": "logistic",
    "C": 1.0,
    "alpha": 1.0,
    "rank": None,
    "hidden": 256,
    "weight_decay": 1e-4,
    "lr": 3e-3,
    "epochs": 50,
    "batch_size": 256,
    "max_iter": 1000,
    "tol": 1e-4,
    "dtype": "float64",
    "groups": None,
    "folds": None,
    "split": "random",
    "test_frac": 0.25,
    "mask": None,
    "classes": None,
    "standardize": True,
    "seed": 0,
    "site_labels": None,
    "meta": None,
}


@dataclass
class ProbeResult:
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
        groups: ``[N]`` group id of each row; site_labels: one dict per site; meta: options.
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
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_sites(self) -> int:
        return int(self.train_acc.shape[1])

    @property
    def accuracy(self) -> np.ndarray:
        """Held-out accuracy per site ``[S]``, averaged over folds."""
        return np.nanmean(self.test_acc.numpy(), axis=0)

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
        """Tidy table: one row per (site, fold) — or per site with ``aggregate`` (fold = -1)."""
        rows = []
        F = self.train_acc.shape[0]
        for s in range(self.n_sites):
            lab = dict(self.site_labels[s]) if self.site_labels else {"site": s}
            folds = [None] if aggregate else range(F)
            for f in folds:
                r = dict(lab)
                if f is None:
                    r.update(
                        fold=-1,
                        probe=self.kind,
                        train_acc=float(np.nanmean(self.train_acc[:, s].numpy())),
                        test_acc=float(np.nanmean(self.test_acc[:, s].numpy())),
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
                    if k in self.meta:
                        v = self.meta[k]
                        r[k] = v[s] if isinstance(v, list) else v
                rows.append(r)
        return pd.DataFrame(rows)


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


_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _check_options(o: dict[str, Any]) -> None:
    if str(o["dtype"]).replace("torch.", "") not in _DTYPES:
        raise LoopscopeError(f"dtype must be 'float64' or 'float32', got {o['dtype']!r}")
    if o["probe"] not in solvers.KINDS:
        raise LoopscopeError(
            f"unknown probe kind {o['probe']!r}; choose one of {', '.join(solvers.KINDS)}"
        )
    for name in ("C", "lr", "tol"):
        if not float(o[name]) > 0:
            raise LoopscopeError(f"{name} must be > 0, got {o[name]!r}")
    for name in ("alpha", "weight_decay"):
        if not float(o[name]) >= 0:
            raise LoopscopeError(f"{name} must be >= 0, got {o[name]!r}")
    for name in ("hidden", "epochs", "batch_size", "max_iter"):
        check_positive_int(name, o[name])
    o["seed"] = check_seed(o["seed"])
    if o["probe"] == "lowrank":
        if o["rank"] is None:
            raise LoopscopeError("probe='lowrank' needs rank= (a positive integer)")
        check_positive_int("rank", o["rank"])


def fit_probes(X: Any, y: Any, **options: Any) -> ProbeResult:
    """Fit one probe per site for all ``S`` sites (iterations x sites) in one batched solve.

    Args:
        X: ``[S, N, d]`` activations — or a :class:`loopscope.Trace` / :class:`ActivationSet`
            with ``y`` the ``[B, pos]`` targets (see :func:`loopscope.probes.fit_trace`).
        y: ``[N]`` labels shared by every site, or ``[S, N]``; ``-100`` = unlabelled.

    Keyword options (defaults in ``FIT_OPTIONS``):
        probe: ``"logistic"`` (L2, ``C``; batched L-BFGS to gradient ``tol``, ``max_iter``;
            ``dtype="float32"`` runs the data passes in single precision, about 2x faster),
            ``"ridge"`` (``alpha``), ``"lowrank"`` (``rank``, ``C``), ``"mlp"`` (``hidden``, ``weight_decay``, ``lr``, ``epochs``, ``batch_size``).
        groups: ``[N]`` example ids (tokens of one example never straddle folds).
        folds: k-fold cross-validation; else ``split`` (``"random"`` with ``test_frac``,
            ``"all"``, ``(train_idx, test_idx)`` or a bool train mask).
        mask: ``[N]`` or ``[S, N]`` bool, rows to use. classes: the label set (default: observed).
        standardize: z-score every site with its training-fold statistics (default True).
        seed: split and initialisation seed. site_labels: one dict per site (frame columns).

    Returns:
        :class:`ProbeResult` (``.to_frame()``: site, fold, probe, train_acc, test_acc, seed ...).
    """
    if not isinstance(X, (Tensor, np.ndarray)):
        from loopscope.probes.trace_fit import fit_trace

        return fit_trace(X, y, **options)
    reject_unknown_kwargs("fit_probes", options, FIT_OPTIONS)
    o = {**FIT_OPTIONS, **options}
    _check_options(o)
    X = torch.as_tensor(X)
    if X.dim() != 3:
        raise LoopscopeError(f"X must be [sites, examples, features], got {tuple(X.shape)}")
    S, N, d = X.shape
    if S == 0 or N == 0 or d == 0:
        raise LoopscopeError(f"X must be non-empty, got shape {tuple(X.shape)}")
    y = _as_labels(y, S, N)
    finite = _finite_rows(X)  # [S, N]
    valid = (y != -100) & finite
    if o["mask"] is not None:
        m = torch.as_tensor(np.asarray(o["mask"]))
        if m.dtype != torch.bool or m.shape not in ((N,), (S, N)):
            raise LoopscopeError(f"mask must be bool [N] or [S, N], got {m.dtype} {tuple(m.shape)}")
        valid = valid & m
    if o["classes"] is None:
        classes = torch.unique(y[valid])
    else:
        classes = torch.unique(torch.as_tensor(o["classes"]).long())
        unknown = torch.unique(y[valid][~torch.isin(y[valid], classes)])
        if unknown.numel():
            raise LoopscopeError(f"labels {unknown.tolist()[:5]} are not in classes=")
    if classes.numel() < 2:
        raise LoopscopeError(
            f"need at least 2 classes to fit probes, got {classes.tolist()} (pass classes=)"
        )
    K = int(classes.numel())
    yi = torch.searchsorted(classes, torch.where(valid, y, classes[0]).contiguous())
    groups = as_groups(o["groups"], N)
    folds = make_folds(
        N,
        groups=groups,
        folds=o["folds"],
        test_frac=o["test_frac"],
        split=o["split"],
        seed=o["seed"],
    )
    # the closed-form ridge with dtype="float32" reads the data in float32 end to end (no float64
    # copy of X); the iterative probes keep float64 data and cast per pass (see solvers)
    data_dtype = torch.float64
    if o["probe"] == "ridge" and _DTYPES[str(o["dtype"]).replace("torch.", "")] == torch.float32:
        data_dtype = torch.float32
    X0 = X.to(data_dtype)  # no copy when X already has that dtype
    if not bool(finite.all()):
        X0 = torch.where(finite.unsqueeze(-1), X0, torch.zeros((), dtype=data_dtype))
    Fn = len(folds)
    out = {k: torch.full((Fn, S), float("nan"), dtype=torch.float64) for k in ("tr", "te")}
    n_tr = torch.zeros(Fn, S, dtype=torch.long)
    n_te = torch.zeros(Fn, S, dtype=torch.long)
    correct = torch.full((S, N), float("nan"), dtype=torch.float64)
    test_pred = torch.full((S, N), -100, dtype=torch.long)
    params, means, stds = [], [], []
    for f, (tr, te) in enumerate(folds):
        w = valid[:, tr].double()
        # full-array passes dominate at probe sizes: standardise the training rows in place
        # and score every row through weights with the standardisation folded in
        gen = torch.Generator().manual_seed(int(o["seed"]) * 1000 + f)
        Ztr = X0[:, tr]  # an index tensor: always a copy, so the in-place passes are safe
        if o["standardize"]:
            mean = solvers._wmean(Ztr, w)
            Ztr -= mean
            mean = mean.double()
            if o["probe"] == "ridge":
                # the closed form never needs the scaled copy: std comes from the centred Gram
                p, std = solvers.ridge_centred(Ztr, yi[:, tr], w, K, mean, alpha=float(o["alpha"]))
            else:
                std = solvers.standard_deviation(Ztr, w, mean)
                Ztr /= std
                p = _solve(o, Ztr, yi[:, tr], w, K, gen)
        else:
            mean = torch.zeros(S, 1, d, dtype=torch.float64)
            std = torch.ones(S, 1, d, dtype=torch.float64)
            p = _solve(o, Ztr, yi[:, tr], w, K, gen)
        del Ztr
        raw = solvers.fold_standardisation(o["probe"], p, mean, std)
        raw_x = (
            raw if data_dtype == torch.float64 else {k: v.to(data_dtype) for k, v in raw.items()}
        )
        pred = solvers.scores(o["probe"], raw_x, X0).argmax(-1)  # [S, N] class indices
        ok = (pred == yi).double()
        for key, idx in (("tr", tr), ("te", te)):
            v = valid[:, idx]
            n = v.sum(1)
            acc = (ok[:, idx] * v).sum(1) / n.clamp_min(1)
            out[key][f] = torch.where(n > 0, acc, torch.full_like(acc, float("nan")))
            (n_tr if key == "tr" else n_te)[f] = n
        vte = valid[:, te]
        correct[:, te] = torch.where(vte, ok[:, te], torch.full_like(ok[:, te], float("nan")))
        test_pred[:, te] = torch.where(
            vte, classes[pred[:, te]], torch.full_like(pred[:, te], -100)
        )
        params.append(p)
        means.append(mean)
        stds.append(std)
    meta = {k: o[k] for k in ("probe", "seed", "C", "alpha", "rank", "hidden", "folds")}
    meta["split_mode"] = o["split"] if isinstance(o["split"], str) else "explicit"
    meta["n_nonfinite"] = (~finite).sum(1).tolist()
    meta.update(o["meta"] or {})
    labels = list(o["site_labels"]) if o["site_labels"] is not None else []
    if labels and len(labels) != S:
        raise LoopscopeError(f"site_labels must have one dict per site ({S}), got {len(labels)}")
    return ProbeResult(
        kind=o["probe"],
        params=params,
        mean=means,
        std=stds,
        train_acc=out["tr"],
        test_acc=out["te"],
        n_train=n_tr,
        n_test=n_te,
        correct=correct,
        test_pred=test_pred,
        classes=classes,
        folds=folds,
        groups=groups,
        site_labels=labels,
        meta=meta,
    )


def _solve(
    o: dict[str, Any], Z: Tensor, y: Tensor, w: Tensor, K: int, gen: torch.Generator
) -> dict[str, Tensor]:
    kind = o["probe"]
    if kind == "ridge":
        return solvers.ridge(Z, y, w, K, alpha=float(o["alpha"]))
    if kind == "logistic":
        return solvers.logistic(
            Z,
            y,
            w,
            K,
            C=float(o["C"]),
            max_iter=o["max_iter"],
            tol=float(o["tol"]),
            dtype=_DTYPES[str(o["dtype"]).replace("torch.", "")],
        )
    if kind == "lowrank":
        return solvers.lowrank(
            Z,
            y,
            w,
            K,
            rank=o["rank"],
            C=float(o["C"]),
            max_iter=o["max_iter"],
            tol=float(o["tol"]),
            generator=gen,
        )
    return solvers.mlp(
        Z,
        y,
        w,
        K,
        hidden=o["hidden"],
        alpha=float(o["weight_decay"]),
        lr=float(o["lr"]),
        epochs=o["epochs"],
        batch_size=o["batch_size"],
        generator=gen,
    )


class LinearProbe:
    """scikit-learn-style estimator over :func:`fit_probes` (trains on all rows given).

    ``X`` may be ``[N, d]`` (one probe) or ``[S, N, d]`` (S probes fitted in one batched solve;
    ``predict`` / ``score`` then return per-site results).

    Example:
        >>> import torch
        >>> X = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
        >>> y = (X[:, 0] > 0).long()
        >>> LinearProbe(kind="logistic", C=1.0).fit(X, y).score(X, y) > 0.95
        True
    """

    def __init__(self, kind: str = "logistic", **options: Any) -> None:
        allowed = [k for k in FIT_OPTIONS if k not in ("split", "folds", "test_frac", "probe")]
        reject_unknown_kwargs("LinearProbe", options, allowed)
        self.kind = kind
        self.options = options
        self.result_: ProbeResult | None = None
        self._single = False

    def fit(self, X: Any, y: Any) -> LinearProbe:
        X = torch.as_tensor(X)
        self._single = X.dim() == 2
        Xs = X.unsqueeze(0) if self._single else X
        self.result_ = fit_probes(Xs, y, probe=self.kind, split="all", **self.options)
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
