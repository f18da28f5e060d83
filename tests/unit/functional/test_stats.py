"""Seed statistics against scipy: the percentile bootstrap of the mean and the exact sign test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from faithful_train.functional.stats import bootstrap_ci, paired, sign_test, spread


def test_the_sign_test_is_scipys_exact_binomial_test():
    for d in ([1, 1, 1, 1, 1], [1, 1, 1, 1, -1], [0.2, -0.1, 0.3, 0.0, 0.5, 0.1, -0.4], [-1, -2, -3]):
        x = np.asarray(d)
        wins, m = int((x > 0).sum()), int((x != 0).sum())
        assert sign_test(d) == pytest.approx(scipy_stats.binomtest(wins, m, 0.5).pvalue, abs=1e-12)
    assert sign_test([1] * 5) == pytest.approx(0.0625)  # five seeds cannot reach p < 0.05
    assert sign_test([0.0, 0.0]) == 1.0


def test_the_bootstrap_interval_is_scipys_percentile_bootstrap():
    values = [0.91, 0.97, 1.0, 0.85, 0.99]
    ours = bootstrap_ci(values, resamples=20_000, seed=1)
    theirs = scipy_stats.bootstrap(
        (np.asarray(values),), np.mean, n_resamples=20_000, method="percentile", rng=np.random.default_rng(1)
    ).confidence_interval
    # different random streams: the two estimates of the same quantiles agree to Monte Carlo error
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.01)
    assert ours[0] < np.mean(values) < ours[1]
    assert bootstrap_ci(values) == bootstrap_ci(values)  # seeded: a table is reproducible
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5) and bootstrap_ci([0.3]) == (0.3, 0.3)


def test_spread_and_paired_differences():
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean, s.min, s.max) == (4, 2.5, 1.0, 4.0)
    assert s.sd == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    result = paired([0.99, 1.0, 0.98, 0.97, 1.0], [0.6, 0.7, 0.65, 0.99, 0.6])
    assert (result.wins, result.losses) == (4, 1) and result.p == pytest.approx(0.375)
    assert result.difference.mean == pytest.approx(0.28)
    with pytest.raises(ValueError, match="same length"):
        paired([1.0], [1.0, 2.0])
