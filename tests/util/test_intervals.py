"""Bootstrap intervals over evaluation windows: coverage, pairing, and the perplexity interval."""
import math

import numpy as np
import pytest

from layerwise.util.intervals import mean_ci, paired_difference_ci, paired_ratio_ci, perplexity_ci


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        values = rng.exponential(2.0, size=40)  # skewed, like per-window KL
        low, high = mean_ci(values, resamples=500, seed=int(rng.integers(1 << 30)))
        covered += low <= 2.0 <= high
    assert 0.85 <= covered / 200 <= 0.99


def test_pairing_removes_the_shared_window_difficulty():
    rng = np.random.default_rng(2)
    difficulty = rng.exponential(1.0, size=30)  # some windows are hard for every model
    plan = 0.8 * difficulty * rng.uniform(0.95, 1.05, size=30)
    uniform = difficulty * rng.uniform(0.95, 1.05, size=30)
    low, high = paired_ratio_ci(plan, uniform)
    assert low <= plan.mean() / uniform.mean() <= high
    assert high < 0.9, "paired, a consistent 20% gain is clearly below 1"
    unpaired_low, unpaired_high = mean_ci(plan)[0] / mean_ci(uniform)[1], mean_ci(plan)[1] / mean_ci(uniform)[0]
    assert high - low < (unpaired_high - unpaired_low) / 3
    difference = paired_difference_ci(uniform, plan)
    assert 0 < difference[0] <= (uniform - plan).mean() <= difference[1]


def test_perplexity_interval_is_of_the_pooled_perplexity():
    nll = np.array([900.0, 1100.0, 1000.0, 1200.0, 800.0])
    tokens = np.array([511] * 5)
    low, high = perplexity_ci(nll, tokens)
    assert low <= math.exp(nll.sum() / tokens.sum()) <= high
    assert perplexity_ci(nll[:1], tokens[:1]) == [pytest.approx(math.exp(900 / 511))] * 2


def test_paired_values_must_be_on_the_same_windows():
    with pytest.raises(ValueError, match="same windows"):
        paired_ratio_ci([1.0, 2.0], [1.0, 2.0, 3.0])
