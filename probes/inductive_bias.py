"""Inductive-bias probes (Vafa et al., ICML 2025, "What Has a Foundation Model Found?").

A model is treated as a learning algorithm ``D -> m_D``: fit it on a small white-noise dataset
(every state gets a uniform random bit), record its extrapolations on held-out inputs, and ask
whether inputs with the same state get the same prediction (R-IB) and inputs with different states
different ones (D-IB). Over upper-triangle pairs (i < j) of held-out inputs, per dataset:

    R_raw = P(pred_i == pred_j | state_i == state_j)      R_norm = 2 R_raw - 1
    D_raw = P(pred_i != pred_j | state_i != state_j)      D_norm = 2 D_raw

(1 = perfect, 0 = uninformative; a constant predictor has R_raw = 1, D_raw = 0; an oracle on
binary white noise has D_raw = 0.5.) With a coarsening ``q`` (pseudo-state, e.g. the set of
legal next tokens), ``D_q_eq`` / ``D_q_neq`` restrict the different-state pairs to equal /
unequal ``q``; ``D_q_eq < D_q_neq`` means the model extrapolates by ``q``, not by state.
Reported as mean ± stderr over datasets, raw and normalised under explicit names.

Pair counts come from group counts (sum over groups of C(n, 2)), so no pair list is built.

Example:
    >>> import torch
    >>> states = torch.arange(4).repeat(5)                   # 20 inputs, 4 states
    >>> bits = torch.randint(0, 2, (50, 4), generator=torch.Generator().manual_seed(0))
    >>> res = inductive_bias(bits[:, states], states)        # an oracle's extrapolations
    >>> round(res.value("R_raw"), 6)
    1.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from loopscope.core.errors import LoopscopeError, check_positive_int, did_you_mean
from loopscope.core.result import Result, float_summary
from loopscope.probes.fit import fit_probes

__all__ = [
    "inductive_bias",
    "inductive_bias_probe",
    "linear_head",
    "InductiveBiasResult",
    "white_noise",
]

_RAW = ("R_raw", "D_raw", "D_q_eq_raw", "D_q_neq_raw")


def _finite_mean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _ids(x: Any, name: str, M: int) -> Tensor:
    t = torch.as_tensor(np.asarray(x.cpu() if isinstance(x, Tensor) else x))
    if t.shape != (M,):
        raise LoopscopeError(f"{name} must be [{M}] (one per held-out input), got {tuple(t.shape)}")
    return torch.unique(t, return_inverse=True)[1].reshape(M)


def _agree_pairs(pred: Tensor, group: Tensor, n_vals: int) -> tuple[Tensor, Tensor]:
    """Pairs within each group and how many of them agree: pred ``[B, M]``, group ``[M]``."""
    G = int(group.max()) + 1
    B = pred.shape[0]
    n_g = torch.bincount(group, minlength=G).double()
    total = (n_g * (n_g - 1) / 2).sum()
    idx = (group * n_vals).unsqueeze(0) + pred  # [B, M]
    cnt = torch.zeros(B, G * n_vals, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    return total.expand(B), (cnt * (cnt - 1) / 2).sum(1)


@dataclass(kw_only=True, repr=False)
class InductiveBiasResult(Result):
    """Per-dataset R-IB / D-IB (raw) for each site; summaries via :meth:`to_frame`.

    Attributes:
        per_dataset: metric -> ``[S, K]`` raw value per site and dataset (NaN: no pairs).
        site_labels: one dict per site.
        meta: n_datasets, n_eval (and seed, n_train from :func:`inductive_bias_probe`).
    """

    per_dataset: dict[str, np.ndarray]  # metric -> [S, K]
    site_labels: list[dict[str, Any]] = field(default_factory=list)

    def _stats(self, metric: str, site: int) -> tuple[float, float, int]:
        raw = metric.replace("_norm", "_raw")
        if raw not in self.per_dataset:
            raise LoopscopeError(f"unknown metric {metric!r} (have {', '.join(self.metrics)})")
        v = self.per_dataset[raw][site]
        if metric.endswith("_norm"):
            v = 2 * v - 1 if metric.startswith("R") else 2 * v
        v = v[~np.isnan(v)]
        if v.size == 0:
            return float("nan"), float("nan"), 0
        se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
        return float(v.mean()), se, int(v.size)

    @property
    def metrics(self) -> list[str]:
        out = []
        for m in _RAW:
            if m in self.per_dataset:
                out += [m, m.replace("_raw", "_norm")]
        return out

    def value(self, metric: str, site: int = 0) -> float:
        """Mean over datasets of ``metric`` (e.g. ``"R_norm"``, ``"D_q_eq_raw"``) at ``site``."""
        return self._stats(metric, site)[0]

    def stderr(self, metric: str, site: int = 0) -> float:
        return self._stats(metric, site)[1]

    def to_frame(self) -> pd.DataFrame:
        """Rows (site labels, metric, mean, stderr, n_datasets) for raw and normalised metrics."""
        S = next(iter(self.per_dataset.values())).shape[0]
        rows = []
        for s in range(S):
            lab = dict(self.site_labels[s]) if self.site_labels else {"site": s}
            for m in self.metrics:
                mean, se, n = self._stats(m, s)
                rows.append({**lab, "metric": m, "mean": mean, "stderr": se, "n_datasets": n})
        df = pd.DataFrame(rows)
        for k, v in self.meta.items():
            if np.isscalar(v):
                df[k] = v
        return df

    def summary(self) -> dict[str, float]:
        """Every metric (raw and normalised) averaged over datasets, at site 0 and over sites."""
        S = next(iter(self.per_dataset.values())).shape[0]
        out: dict[str, Any] = {"n_sites": S, "n_datasets": self.meta.get("n_datasets")}
        for m in self.metrics:
            vals = np.array([self.value(m, s) for s in range(S)])
            out[m] = vals[0]
            if S > 1:
                out[f"mean_{m}"] = float(_finite_mean(vals))
        return float_summary(out)


def inductive_bias(
    preds: Any, states: Any, q: Any = None, site_labels: list[dict] | None = None
) -> InductiveBiasResult:
    """R-IB / D-IB from extrapolations ``preds [K, M]`` (or ``[S, K, M]`` for S sites).

    Args:
        preds: discrete predictions of the model fitted on each of K datasets, on M held-out
            inputs (the same inputs for every dataset).
        states: ``[M]`` true state of each held-out input.
        q: optional ``[M]`` coarsening / pseudo-state for ``D_q_eq`` and ``D_q_neq``.
    """
    p = torch.as_tensor(np.asarray(preds.cpu() if isinstance(preds, Tensor) else preds))
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3:
        raise LoopscopeError(f"preds must be [K, M] or [S, K, M], got {tuple(p.shape)}")
    S, K, M = p.shape
    if M < 2:
        raise LoopscopeError(f"need at least 2 held-out inputs, got {M}")
    _, pv = torch.unique(p, return_inverse=True)
    pv = pv.reshape(S * K, M)
    V = int(pv.max()) + 1
    st = _ids(states, "states", M)
    T_all = torch.tensor(M * (M - 1) / 2, dtype=torch.float64).expand(S * K)
    A_all = _agree_pairs(pv, torch.zeros(M, dtype=torch.long), V)[1]
    T_s, A_s = _agree_pairs(pv, st, V)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "R_raw": (A_s / T_s).numpy(),
            "D_raw": (1 - (A_all - A_s) / (T_all - T_s)).numpy(),
        }
        if q is not None:
            qq = _ids(q, "q", M)
            T_q, A_q = _agree_pairs(pv, qq, V)
            T_qs, A_qs = _agree_pairs(pv, qq * (int(st.max()) + 1) + st, V)
            out["D_q_eq_raw"] = (1 - (A_q - A_qs) / (T_q - T_qs)).numpy()
            T_n = T_all - (T_q + T_s - T_qs)
            A_n = A_all - (A_q + A_s - A_qs)
            out["D_q_neq_raw"] = (1 - A_n / T_n).numpy()
    per = {k: np.where(np.isfinite(v), v, np.nan).reshape(S, K) for k, v in out.items()}
    return InductiveBiasResult(
        per_dataset=per, site_labels=list(site_labels or []), meta={"n_datasets": K, "n_eval": M}
    )


def white_noise(states: Any, n_datasets: int, seed: int = 0) -> Tensor:
    """``[K, M]`` white-noise labels: every distinct state gets a uniform random bit per dataset."""
    st = torch.unique(torch.as_tensor(np.asarray(states)), return_inverse=True)[1].reshape(-1)
    rng = np.random.default_rng(seed)
    bits = torch.as_tensor(rng.integers(0, 2, size=(n_datasets, int(st.max()) + 1)))
    return bits[:, st]


@did_you_mean
def linear_head(
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
    standardize: bool = True,
    seed: int = 0,
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A batched "learning algorithm": fit a linear head per dataset, predict held-out inputs.

    Returns ``learner(X_train [b, n, d], y_train [b, n], X_eval [b, m, d]) -> preds [b, m]``
    (all ``b`` heads in one :func:`fit_probes` call on every training row, classes ``{0, 1}``).

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
        standardize: z-score the features with the training statistics.
        seed: initialisation seed (lowrank, mlp).
    """

    def learner(Xtr: Tensor, ytr: Tensor, Xev: Tensor) -> Tensor:
        res = fit_probes(
            Xtr,
            ytr,
            probe=kind,
            split="all",
            classes=[0, 1],
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
            standardize=standardize,
            seed=seed,
        )
        return res.predict(Xev)

    return learner


def inductive_bias_probe(
    X: Any,
    states: Any,
    *,
    learner: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    n_datasets: int = 100,
    n_train: int = 100,
    eval_frac: float = 0.5,
    q: Any = None,
    seed: int = 0,
    site_labels: list[dict] | None = None,
    chunk: int = 256,
) -> InductiveBiasResult:
    """Run the white-noise protocol with ``learner`` on features ``X [S, N, d]`` (or ``[N, d]``).

    The inputs are split once (seeded) into a training pool and ``eval_frac`` held-out inputs;
    each of ``n_datasets`` datasets draws fresh white-noise bits per state and ``n_train``
    training inputs from the pool, the learner (default :func:`linear_head`, logistic C = 1 —
    a linear head on ``h_t``, a cheaper stand-in for fine-tuning the whole model) is fitted and
    its held-out predictions are scored with :func:`inductive_bias`.
    """
    X = torch.as_tensor(X)
    if X.dim() == 2:
        X = X.unsqueeze(0)
    if X.dim() != 3:
        raise LoopscopeError(f"X must be [S, N, d] or [N, d], got {tuple(X.shape)}")
    S, N, d = X.shape
    st = _ids(states, "states", N)
    check_positive_int("n_datasets", n_datasets)
    check_positive_int("n_train", n_train)
    check_positive_int("chunk", chunk)
    if not 0 < eval_frac < 1:
        raise LoopscopeError(f"eval_frac must lie in (0, 1), got {eval_frac!r}")
    rng = np.random.default_rng(seed)
    perm = torch.as_tensor(rng.permutation(N))
    n_eval = max(2, int(round(eval_frac * N)))
    ev, pool = perm[:n_eval], perm[n_eval:]
    if n_train > len(pool):
        raise LoopscopeError(f"n_train={n_train} exceeds the training pool ({len(pool)} inputs)")
    y = white_noise(st, n_datasets, seed=int(rng.integers(2**31)))  # [K, N]
    tr = torch.stack(
        [
            pool[torch.as_tensor(rng.choice(len(pool), n_train, replace=False))]
            for _ in range(n_datasets)
        ]
    )  # [K, n_train]
    learner = learner or linear_head()
    preds = torch.empty(S, n_datasets, n_eval, dtype=torch.long)
    jobs = [(s, k) for s in range(S) for k in range(n_datasets)]
    for i in range(0, len(jobs), chunk):
        part = jobs[i : i + chunk]
        s_idx = torch.tensor([s for s, _ in part])
        k_idx = torch.tensor([k for _, k in part])
        Xtr = X[s_idx.unsqueeze(1), tr[k_idx]]  # [b, n_train, d]
        ytr = y[k_idx.unsqueeze(1), tr[k_idx]]
        Xev = X[s_idx][:, ev]
        out = torch.as_tensor(learner(Xtr, ytr, Xev)).long()
        if out.shape != (len(part), n_eval):
            raise LoopscopeError(
                f"learner must return [{len(part)}, {n_eval}] predictions, got {tuple(out.shape)}"
            )
        preds[s_idx, k_idx] = out
    res = inductive_bias(
        preds, st[ev], None if q is None else np.asarray(q)[ev.numpy()], site_labels
    )
    res.meta.update(seed=seed, n_train=n_train)
    return res
