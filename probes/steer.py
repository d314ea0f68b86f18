"""Causal validation of probe directions: steer, erase, interchange interventions.

A probe that decodes a variable does not show the model *uses* that direction (golden #25: two
directions both decode the bit, only one is read). These functions edit the activation at one
(hook, iteration) of a loop run and measure the behaviour change:

* ``steer(..., mode="set")``: set-projection ``h' = h - (h.u)u + c u``;
  ``mode="add"``: ``h' = h + alpha u`` (``dose_response`` sweeps alpha);
  ``mode="erase"``: ``h' = (I - Q Q^T) h`` for a basis ``Q``.
* ``erase(X, z)``: LEACE (closed form, Belrose et al. 2023), INLP, or a given direction;
  ``Eraser.control()`` removes a random subspace of the same rank orthogonal to it.
* ``interchange_intervention_accuracy``: patch the subspace from a source run and compare the
  output with the causal model's counterfactual (IIA, pyvene / DAS style).

Every loop function takes ``(loop, inputs, n_iter, iteration, hook, direction)`` and runs
:func:`loopscope.core.unroll` with a :class:`loopscope.Patch` whose value is a callable, so iterations
before the edit stay bit-identical.

Example:
    >>> import torch
    >>> h = torch.tensor([[1.0, 2.0]]); u = torch.tensor([1.0, 0.0])
    >>> set_projection(h, u, -3.0).tolist()
    [[-3.0, 2.0]]
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
from loopscope.core.loop import Loop
from loopscope.core.result import Result, float_summary, result_meta
from loopscope.core.trace import Trace
from loopscope.probes.fit import fit_probes, meta_columns

__all__ = [
    "set_projection",
    "add_direction",
    "project_out",
    "intervene",
    "steer",
    "dose_response",
    "EditResult",
    "DoseResponse",
    "Eraser",
    "erase",
    "interchange_intervention_accuracy",
    "IIAResult",
]


def _unit(u: Any, d: int | None = None) -> Tensor:
    u = torch.as_tensor(u)
    if u.dim() != 1 or (d is not None and u.shape[0] != d):
        raise LoopscopeError(f"direction must be a vector [{d or 'd'}], got {tuple(u.shape)}")
    n = u.double().norm()
    if not torch.isfinite(n) or n == 0:
        raise LoopscopeError("direction must be a finite non-zero vector")
    return u / n.to(u.dtype) if u.is_floating_point() else u.double() / n


def _basis(Q: Any, d: int | None = None) -> Tensor:
    """Orthonormal basis ``[d, k]`` of the span of ``Q`` (a vector or ``[d, k]`` columns)."""
    Q = torch.as_tensor(Q)
    if Q.dim() == 1:
        return _unit(Q, d).unsqueeze(1)
    if Q.dim() != 2 or (d is not None and Q.shape[0] != d):
        raise LoopscopeError(f"subspace must be [{d or 'd'}, k], got {tuple(Q.shape)}")
    U, s, _ = torch.linalg.svd(Q.double(), full_matrices=False)
    k = int((s > 1e-10 * s.max().clamp_min(1e-300)).sum())
    if k == 0:
        raise LoopscopeError("subspace is all zeros")
    return U[:, :k]


def set_projection(h: Tensor, u: Any, c: float | Tensor) -> Tensor:
    """Set the component of ``h [..., d]`` along unit ``u`` to ``c``: ``h - (h.u)u + c u``."""
    u = _unit(u, h.shape[-1]).to(h.dtype)
    c = torch.as_tensor(c, dtype=h.dtype)
    c = c.unsqueeze(-1) if c.dim() else c  # a per-sample c broadcasts over the last axis
    return h - (h @ u).unsqueeze(-1) * u + c * u


def add_direction(h: Tensor, u: Any, alpha: float) -> Tensor:
    """Additive steering ``h + alpha u`` (``u`` normalised)."""
    return h + alpha * _unit(u, h.shape[-1]).to(h.dtype)


def project_out(h: Tensor, Q: Any) -> Tensor:
    """Remove the span of ``Q`` (vector or ``[d, k]``): ``h - h Q Q^T`` (orthonormalised)."""
    B = _basis(Q, h.shape[-1]).to(h.dtype)
    return h - (h @ B) @ B.T


# -- running edited loops -------------------------------------------------------------------------


def _default_readout(trace: Any) -> Tensor:
    return torch.as_tensor(trace.decode()).argmax(-1)


@dataclass(kw_only=True, repr=False)
class EditResult(Result):
    """Outputs of a clean and an edited run (``changed``: where they differ).

    Attributes:
        clean_out, edited_out: the readouts of the two runs.
        clean, edited: the two :class:`~loopscope.Trace` s.
        meta: model, seed, hook, iteration, n_iter (and mode / value from :func:`steer`).
    """

    clean_out: Tensor
    edited_out: Tensor
    clean: Trace = field(repr=False)
    edited: Trace = field(repr=False)

    @property
    def changed(self) -> Tensor:
        return self.clean_out != self.edited_out

    def flip_rate(self, mask: Any = None) -> float:
        """Fraction of outputs that changed (over ``mask`` if given, e.g. the positives)."""
        ch = self.changed
        if mask is not None:
            m = torch.as_tensor(mask).bool()
            if m.shape != ch.shape:
                m = m.reshape(m.shape + (1,) * (ch.dim() - m.dim())).expand_as(ch)
            ch = ch[m]
        return float(ch.double().mean()) if ch.numel() else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row: the settings (meta) and flip_rate."""
        return pd.DataFrame([{**meta_columns(self.meta), "flip_rate": self.flip_rate()}])

    def summary(self) -> dict[str, float]:
        """Fraction of outputs changed, and of samples with any output changed."""
        ch = self.changed
        per = ch.reshape(ch.shape[0], -1).any(1) if ch.dim() else ch.reshape(1)
        return float_summary(
            {"flip_rate": self.flip_rate(), "frac_samples_changed": float(per.double().mean())}
        )


@did_you_mean
def intervene(
    loop: Loop,
    inputs: Any,
    *,
    n_iter: int,
    iteration: Any,
    edit: Callable[[Tensor], Tensor],
    hook: str = "hook_state",
    positions: Any = None,
    readout: Callable[[Any], Tensor] | None = None,
    seed: int | None = 0,
) -> EditResult:
    """Run ``loop`` clean and with ``edit(activation)`` applied at ``(hook, iteration)``."""
    from loopscope import Patch, unroll

    n_iter = check_positive_int("n_iter", n_iter)
    if not callable(edit):
        raise LoopscopeError(f"edit must be callable, got {type(edit).__name__}")
    readout = readout or _default_readout
    clean = unroll(loop, inputs, n_iter, seed=seed)
    patch = Patch(hook, iteration, value=lambda x, label: edit(x), positions=positions)
    edited = unroll(loop, inputs, n_iter, seed=seed, interventions=[patch])
    settings = {"hook": hook, "iteration": iteration, "n_iter": n_iter}
    return EditResult(
        clean_out=readout(clean),
        edited_out=readout(edited),
        clean=clean,
        edited=edited,
        meta=result_meta(loop, seed=seed, settings=settings),
    )


def _make_edit(direction: Any, mode: str, value: Any) -> Callable[[Tensor], Tensor]:
    if mode == "set":
        return lambda x: set_projection(x, direction, value)
    if mode == "add":
        return lambda x: add_direction(x, direction, float(value))
    if mode == "erase":
        return lambda x: project_out(x, direction)
    raise LoopscopeError(f"mode must be 'set', 'add' or 'erase', got {mode!r}")


@did_you_mean
def steer(
    loop: Loop,
    inputs: Any,
    *,
    n_iter: int,
    iteration: Any,
    direction: Any,
    hook: str = "hook_state",
    mode: str = "set",
    value: Any = 0.0,
    positions: Any = None,
    readout: Callable[[Any], Tensor] | None = None,
    seed: int | None = 0,
) -> EditResult:
    """Steer the activation at ``(hook, iteration)`` along ``direction`` and compare outputs.

    ``mode="set"``: ``h - (h.u)u + value u`` (``value`` = c, e.g. the mean projection of the
    target class); ``"add"``: ``h + value u``; ``"erase"``: remove ``direction`` (vector or basis).
    ``readout(trace)`` gives the behaviour (default: argmax of the final decode).

    Example:
        >>> import torch, loopscope as ls
        >>> loop = ls.FnLoop(step=lambda h: h, init_state=torch.tensor([1.0, 1.0]),
        ...                  decode=lambda h, c: torch.stack([-h[:, 0], h[:, 0]], -1))
        >>> r = steer(loop, torch.zeros(4, 1), n_iter=2, iteration=1, direction=[1.0, 0.0],
        ...           value=-1.0)
        >>> r.flip_rate()
        1.0
    """
    res = intervene(
        loop,
        inputs,
        n_iter=n_iter,
        iteration=iteration,
        edit=_make_edit(direction, mode, value),
        hook=hook,
        positions=positions,
        readout=readout,
        seed=seed,
    )
    res.meta.update(mode=mode, value=float(value) if np.isscalar(value) else None)
    return res


@dataclass(kw_only=True, repr=False)
class DoseResponse(Result):
    """Behaviour change as a function of the steering strength.

    Attributes:
        values: the steering strengths; metric: the behaviour change at each.
        meta: model, seed, mode, hook.
    """

    values: np.ndarray
    metric: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per strength: value, metric, and meta."""
        df = pd.DataFrame({"value": self.values, "metric": self.metric})
        for k, v in meta_columns(self.meta).items():
            df[k] = v
        return df

    def summary(self) -> dict[str, float]:
        """Strengths swept, the largest change and the smallest |strength| that reaches half of it."""
        m = np.asarray(self.metric, dtype=float)
        top = float(np.nanmax(m)) if np.isfinite(m).any() else float("nan")
        half = np.abs(self.values[m >= top / 2]) if np.isfinite(top) and top > 0 else []
        return float_summary(
            {
                "n_values": len(m),
                "max_metric": top,
                "half_max_value": float(np.min(half)) if len(half) else None,
            }
        )


@did_you_mean
def dose_response(
    loop: Loop,
    inputs: Any,
    *,
    n_iter: int,
    iteration: Any,
    direction: Any,
    values: Any,
    hook: str = "hook_state",
    mode: str = "add",
    positions: Any = None,
    readout: Callable[[Any], Tensor] | None = None,
    metric: Callable[[Tensor, Tensor], float] | None = None,
    seed: int | None = 0,
) -> DoseResponse:
    """Sweep the steering strength (``values``): ``metric(edited_out, clean_out)`` per value
    (default: fraction of outputs changed)."""
    vals = np.asarray(list(values), dtype=float)
    if vals.size == 0:
        raise LoopscopeError("values is empty")
    metric = metric or (lambda e, c: float((e != c).double().mean()))
    out = []
    for v in vals:
        r = steer(
            loop,
            inputs,
            n_iter=n_iter,
            iteration=iteration,
            direction=direction,
            hook=hook,
            mode=mode,
            value=float(v),
            positions=positions,
            readout=readout,
            seed=seed,
        )
        out.append(float(metric(r.edited_out, r.clean_out)))
    return DoseResponse(
        values=vals,
        metric=np.asarray(out),
        meta=result_meta(loop, seed=seed, settings={"mode": mode, "hook": hook}),
    )


# -- concept erasure ------------------------------------------------------------------------------


@dataclass
class Eraser:
    """Affine eraser ``r(x) = x - (x - shift) A^T`` applied along the last axis.

    ``A`` (``[d, d]``, rank ``rank``) is the LEACE map ``W^+ P W``, the INLP / direction
    projection ``Q Q^T``; ``basis`` spans its range (``[d, rank]``, orthonormal).
    """

    A: Tensor
    shift: Tensor
    basis: Tensor
    method: str

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def __call__(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        A, s = self.A.to(x.dtype), self.shift.to(x.dtype)
        return x - (x - s) @ A.T

    def control(self, seed: int = 0) -> Eraser:
        """Orthogonal control: project out a random subspace of the same rank orthogonal to
        the erased one (same intervention size, different directions)."""
        d = self.A.shape[0]
        if 2 * self.rank > d:
            raise LoopscopeError(f"no room for an orthogonal control of rank {self.rank} in d={d}")
        g = torch.Generator().manual_seed(seed)
        R = torch.randn(d, self.rank, generator=g, dtype=torch.float64)
        R = R - self.basis @ (self.basis.T @ R)
        Q = _basis(R)
        return Eraser(Q @ Q.T, torch.zeros(d, dtype=torch.float64), Q, f"{self.method}-control")


def _leace(X: Tensor, z: Tensor, tol: float) -> Eraser:
    """LEACE (Belrose et al. 2023): r(x) = x - W^+ P_{W Sigma_xz} W (x - mu), W = Sigma^{-1/2}."""
    n, d = X.shape
    mu = X.mean(0)
    Xc = X - mu
    _, zi = torch.unique(z, return_inverse=True)
    Z = torch.nn.functional.one_hot(zi).double()
    Zc = Z - Z.mean(0)
    sigma = Xc.T @ Xc / n
    sigma_xz = Xc.T @ Zc / n  # [d, K]
    L, V = torch.linalg.eigh(sigma)
    keep = L > tol * L.max().clamp_min(1e-300)
    sq = torch.where(keep, L.clamp_min(0).sqrt(), torch.zeros_like(L))
    isq = torch.where(keep, 1.0 / sq.clamp_min(1e-300), torch.zeros_like(L))
    W = V @ torch.diag(isq) @ V.T  # whitening (Sigma^{1/2})^+
    W_pinv = V @ torch.diag(sq) @ V.T  # Sigma^{1/2}
    U, s, _ = torch.linalg.svd(W @ sigma_xz, full_matrices=False)
    r = int((s > tol * s.max().clamp_min(1e-300)).sum()) if s.numel() else 0
    U = U[:, :r]
    A = W_pinv @ U @ U.T @ W
    basis = _basis(W_pinv @ U) if r else torch.zeros(d, 0, dtype=torch.float64)
    return Eraser(A, mu, basis, "leace")


def _inlp(X: Tensor, z: Tensor, n_iter: int, C: float, seed: int) -> Eraser:
    """INLP (Ravfogel et al. 2020): repeatedly fit a linear probe and project out its directions."""
    d = X.shape[1]
    Q = torch.zeros(d, 0, dtype=torch.float64)
    Xk = X.clone()
    for _ in range(n_iter):
        res = fit_probes(Xk.unsqueeze(0), z, probe="logistic", C=C, split="all", seed=seed)
        D = res.directions(unit=False)[0]
        D = D.unsqueeze(1) if D.dim() == 1 else D
        D = D - Q @ (Q.T @ D)
        if float(D.norm()) < 1e-10:
            break
        Q = _basis(torch.cat([Q, D], 1))
        Xk = X - (X @ Q) @ Q.T
    return Eraser(Q @ Q.T, torch.zeros(d, dtype=torch.float64), Q, "inlp")


@did_you_mean
def erase(
    X: Any,
    z: Any = None,
    *,
    method: str = "leace",
    direction: Any = None,
    n_iter: int = 10,
    C: float = 1.0,
    tol: float = 1e-10,
    seed: int = 0,
) -> Eraser:
    """Fit a concept eraser on activations ``X [N, d]`` with concept labels ``z [N]``.

    methods: ``"leace"`` (closed form: after erasure no linear classifier beats a constant on
    the fitting data), ``"inlp"`` (``n_iter`` rounds of logistic probes, projected out),
    ``"direction"`` (project out the given ``direction`` — vector or ``[d, k]`` basis; no fit).
    The eraser works on any ``[..., d]`` tensor, e.g. as ``intervene(..., edit=eraser)``.
    """
    if method == "direction":
        if direction is None:
            raise LoopscopeError("method='direction' needs direction=")
        Q = _basis(direction)
        return Eraser(Q @ Q.T, torch.zeros(Q.shape[0], dtype=torch.float64), Q, "direction")
    X = torch.as_tensor(X).double()
    if X.dim() != 2:
        raise LoopscopeError(f"X must be [N, d], got {tuple(X.shape)}")
    if z is None:
        raise LoopscopeError(f"method={method!r} needs concept labels z")
    z = torch.as_tensor(np.asarray(z)).long().reshape(-1)
    if z.shape[0] != X.shape[0]:
        raise LoopscopeError(f"z must have {X.shape[0]} labels, got {z.shape[0]}")
    if not bool(torch.isfinite(X).all()):
        raise LoopscopeError("X has non-finite rows; drop diverged samples before erasing")
    if torch.unique(z).numel() < 2:
        raise LoopscopeError("z needs at least 2 classes")
    if method == "leace":
        return _leace(X, z, tol)
    if method == "inlp":
        return _inlp(X, z, check_positive_int("n_iter", n_iter), C, seed)
    raise LoopscopeError(f"method must be 'leace', 'inlp' or 'direction', got {method!r}")


# -- interchange intervention accuracy ------------------------------------------------------------


@dataclass(kw_only=True, repr=False)
class IIAResult(Result):
    """Interchange intervention accuracy (token- and example-level), with an optional control.

    Attributes:
        iia: fraction of scored outputs equal to the counterfactual; iia_example: fraction of
            examples with every scored output right; n: scored outputs.
        correct, outputs, expected: per output (``-100`` in ``expected`` = not scored).
        control_iia: the IIA of a random orthogonal subspace of the same rank (or None).
        meta: model, seed, hook, iteration, n_iter, rank.
    """

    iia: float
    iia_example: float
    n: int
    correct: Tensor
    outputs: Tensor
    expected: Tensor
    control_iia: float | None = None

    def to_frame(self) -> pd.DataFrame:
        """One row: the settings (meta), iia, iia_example, n, control_iia."""
        row = {**meta_columns(self.meta), "rank": self.meta.get("rank")}
        row.update(
            iia=self.iia, iia_example=self.iia_example, n=self.n, control_iia=self.control_iia
        )
        return pd.DataFrame([row])

    def summary(self) -> dict[str, float]:
        """iia, iia_example, n and control_iia (NaN without a control)."""
        return float_summary(
            {
                "iia": self.iia,
                "iia_example": self.iia_example,
                "n": self.n,
                "control_iia": self.control_iia,
            }
        )


def _iia_run(
    loop: Loop,
    base: Any,
    src: Any,
    hook: str,
    iteration: Any,
    Q: Tensor | None,
    positions: Any,
    n_iter: int,
    readout: Callable,
    seed: Any,
) -> Tensor:
    from loopscope import Patch, unroll

    def value(x: Tensor, label: tuple) -> Tensor:
        s = src.firing(hook, label).to(x.dtype)
        if Q is None:
            return s
        B = Q.to(x.dtype)
        return x + ((s - x) @ B) @ B.T

    patch = Patch(hook, iteration, value=value, positions=positions)
    return readout(unroll(loop, base, n_iter, seed=seed, interventions=[patch]))


def _orthogonal_control(Q: Tensor | None, seed: int | None) -> Tensor:
    """A random basis of Q's rank orthogonal to Q (the interpretability-illusion control)."""
    if Q is None:
        raise LoopscopeError("control=True needs a subspace (the whole site has no complement)")
    d = Q.shape[0]
    if 2 * Q.shape[1] > d:
        raise LoopscopeError(f"no room for an orthogonal control of rank {Q.shape[1]} in d={d}")
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    R = torch.randn(d, Q.shape[1], generator=g, dtype=torch.float64)
    return _basis(R - Q @ (Q.T @ R))


@did_you_mean
def interchange_intervention_accuracy(
    loop: Loop,
    base: Any,
    source: Any,
    *,
    n_iter: int,
    iteration: Any,
    counterfactual: Any,
    hook: str = "hook_state",
    subspace: Any = None,
    positions: Any = None,
    readout: Callable[[Any], Tensor] | None = None,
    control: bool = False,
    seed: int | None = 0,
) -> IIAResult:
    """Patch ``subspace`` of ``(hook, iteration)`` from the ``source`` run into the ``base`` run
    and score the output against the causal model's counterfactual.

    Args:
        loop, base, source: a Loop and paired inputs (same batch size).
        counterfactual: expected outputs (tensor shaped like ``readout``'s output, -100 =
            ignore) or ``fn(base, source) -> tensor`` (e.g. the sum recomputed with the source's
            carry bit).
        subspace: direction ``[d]`` or basis ``[d, k]`` (default: the whole activation).
        control: also run a random subspace of the same rank orthogonal to ``subspace``
            (the interpretability-illusion control); its IIA is ``control_iia``.

    Returns:
        :class:`IIAResult` with ``iia`` (fraction of scored outputs equal to the counterfactual)
        and ``iia_example`` (fraction of examples with every scored output correct).
    """
    from loopscope import unroll

    n_iter = check_positive_int("n_iter", n_iter)
    readout = readout or _default_readout
    capture = None if hook == "hook_state" else [hook]
    src = unroll(loop, source, n_iter, seed=seed, capture=capture)
    Q = None if subspace is None else _basis(subspace)
    if control:
        Qc = _orthogonal_control(Q, seed)
    out = _iia_run(loop, base, src, hook, iteration, Q, positions, n_iter, readout, seed)
    exp = counterfactual(base, source) if callable(counterfactual) else counterfactual
    exp = torch.as_tensor(exp)
    if exp.shape != out.shape:
        raise LoopscopeError(
            f"counterfactual shape {tuple(exp.shape)} != readout shape {tuple(out.shape)}"
        )
    valid = exp != -100
    ok = (out == exp) & valid
    n = int(valid.sum())
    if n == 0:
        raise LoopscopeError("counterfactual has no scored (non -100) entries")
    per_ex = (ok | ~valid).reshape(ok.shape[0], -1).all(1) & valid.reshape(ok.shape[0], -1).any(1)
    ctrl = None
    if control:
        oc = _iia_run(loop, base, src, hook, iteration, Qc, positions, n_iter, readout, seed)
        ctrl = float(((oc == exp) & valid).sum()) / n
    settings = {"hook": hook, "iteration": iteration, "n_iter": n_iter}
    settings["rank"] = None if Q is None else int(Q.shape[1])
    return IIAResult(
        iia=float(ok.sum()) / n,
        iia_example=float(per_ex.double().mean()),
        n=n,
        correct=ok,
        outputs=out,
        expected=exp,
        control_iia=ctrl,
        meta=result_meta(loop, seed=seed, settings=settings),
    )
