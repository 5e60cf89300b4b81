"""95% bootstrap intervals over evaluation windows, so that a 5% difference can be told from noise.

Windows, not tokens, are resampled: tokens within a window are correlated, windows of disjoint
text much less so. Ratios are paired: both numerator and denominator are resampled with the same
windows, which is what "plan A against plan B on the same text" means.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _resample_indices(n: int, seed: int, resamples: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(samples: np.ndarray, level: float) -> list[float]:
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_ci(values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
            seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of per-window values ([low, high])."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return [float(values.mean()), float(values.mean())] if values.size else [float("nan")] * 2
    means = values[_resample_indices(values.size, seed, resamples)].mean(axis=1)
    return _bounds(means, level)


def perplexity_ci(window_nll: Sequence[float], window_tokens: Sequence[int], *, level: float = LEVEL,
                  resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """Interval of exp(total NLL / total tokens) with windows resampled."""
    nll, tokens = np.asarray(window_nll, dtype=np.float64), np.asarray(window_tokens, dtype=np.float64)
    if nll.size < 2:
        value = float(np.exp(nll.sum() / tokens.sum()))
        return [value, value]
    index = _resample_indices(nll.size, seed, resamples)
    return _bounds(np.exp(nll[index].sum(axis=1) / tokens[index].sum(axis=1)), level)


def paired_ratio_ci(numerator: Sequence[float], denominator: Sequence[float], *, level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """Interval of mean(numerator) / mean(denominator), both per-window values on the same windows."""
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same windows: {a.shape} against {b.shape}")
    if a.size < 2:
        value = float(a.mean() / b.mean())
        return [value, value]
    index = _resample_indices(a.size, seed, resamples)
    return _bounds(a[index].mean(axis=1) / b[index].mean(axis=1), level)


def paired_difference_ci(first: Sequence[float], second: Sequence[float], *, level: float = LEVEL,
                         resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """Interval of mean(first) - mean(second) on the same windows."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    return mean_ci(a - b, level=level, resamples=resamples, seed=seed)
