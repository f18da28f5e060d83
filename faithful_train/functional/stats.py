"""Summaries of a figure measured over seeds: mean, standard deviation, a bootstrap confidence
interval, and the seed-matched (paired) difference of two configs with a sign test.

- ``bootstrap_ci``: the percentile bootstrap (Efron & Tibshirani 1993, §13.3): resample the
  ``n`` values with replacement ``resamples`` times, take the mean of each resample, and report
  the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of those means. Seeded, so a table is
  reproducible. With 5 seeds the interval is narrow where the seeds agree and says little more
  than the range where they do not; it is what MIB-style tables over a handful of runs report.
- ``sign_test``: two-sided exact binomial test of "a beats b as often as b beats a" on the
  non-zero paired differences (ties dropped, Dixon & Mood 1946):
  ``p = min(1, 2 · P[Bin(m, ½) ≤ min(wins, losses)])``. With 5 seeds the smallest p is 0.0625:
  five seeds cannot make a sign test significant at 0.05, and the table says the p it has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Spread:
    """A figure over seeds: ``n`` values, their mean, sd (n − 1), bootstrap CI, min and max."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    min: float
    max: float


def bootstrap_ci(
    values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (see the module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if np.all(x == x[0]):  # one value, or all equal: every resample has that mean
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def spread(values: Sequence[float], level: float = LEVEL, seed: int = 0) -> Spread:
    x = np.asarray(values, dtype=np.float64)
    low, high = bootstrap_ci(x, level, seed=seed)
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return Spread(int(x.size), float(x.mean()), sd, low, high, float(x.min()), float(x.max()))


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test p-value of paired differences (zeros dropped); 1.0 when all tie."""
    d = np.asarray(differences, dtype=np.float64)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1)) / 2**m
    return float(min(1.0, 2 * tail))


@dataclass(frozen=True)
class Paired:
    """``a − b`` matched by seed: the spread of the differences, wins of ``a``, and the sign test."""

    difference: Spread
    wins: int
    losses: int
    p: float


def paired(a: Sequence[float], b: Sequence[float], level: float = LEVEL, seed: int = 0) -> Paired:
    """Seed-matched differences ``a[i] − b[i]``; ``a`` and ``b`` are in the same seed order."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired needs two non-empty lists of the same length, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return Paired(spread(d, level, seed), int((d > 0).sum()), int((d < 0).sum()), sign_test(d))
