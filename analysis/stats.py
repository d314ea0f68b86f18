"""Confidence intervals shared by every analysis: binomial, bootstrap of a mean, block bootstrap.

* :func:`wilson_ci`: Wilson score interval of a proportion ``k / n`` (basin fractions, accuracy).
* :func:`bootstrap_mean_ci`: percentile bootstrap CI of the mean of i.i.d. values (per-sample
  numbers: AA scores, correct-basin fractions).
* :func:`block_bootstrap_ci`: moving-block bootstrap CI of the mean of a *correlated* series
  (finite-time Lyapunov exponents along one trajectory).

Example:
    >>> lo, hi = wilson_ci(8, 10)
    >>> round(float(lo), 3), round(float(hi), 3)
    (0.49, 0.943)
"""

from __future__ import annotations

import numpy as np

__all__ = ["wilson_ci", "bootstrap_mean_ci", "block_bootstrap_ci"]

#: two-sided 95 % normal quantile
Z95 = 1.959963984540054


def wilson_ci(
    k: np.ndarray | int, n: np.ndarray | int, z: float = Z95
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion ``k / n`` (95 % by default).

    ``k``, ``n`` broadcast (arrays give arrays); ``n = 0`` gives NaN.
    """
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        den = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / den
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def bootstrap_mean_ci(
    x: np.ndarray, seed: int = 0, n_boot: int = 500, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite entries of ``x`` (NaN for < 2 of them)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n_boot, len(x)), replace=True).mean(1)
    a = round((1 - level) / 2, 12)  # 0.025 exactly for the default level
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def block_bootstrap_ci(
    series: np.ndarray, n_boot: int, block: int, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Moving-block bootstrap percentile CI of the mean of ``series [N, ...]`` along axis 0.

    Blocks of ``block`` consecutive rows are drawn with replacement (``N // block`` per draw), so
    that the serial correlation within a block survives; ``n_boot = 0`` or ``N = 0`` gives NaN.
    """
    N = series.shape[0]
    rest = series.shape[1:]
    if n_boot <= 0 or N == 0:
        nan = np.full(rest, np.nan)
        return nan, nan.copy()
    block = max(1, min(block, N))
    cs = np.concatenate([np.zeros((1, *rest)), np.cumsum(series, axis=0)])
    sums = cs[block:] - cs[:-block]  # [N - block + 1, ...] block sums
    m = max(1, N // block)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, *rest))
    for i in range(n_boot):
        starts = rng.integers(0, sums.shape[0], size=m)
        means[i] = sums[starts].sum(axis=0) / (m * block)
    a = (1 - level) / 2
    return np.quantile(means, a, axis=0), np.quantile(means, 1 - a, axis=0)
