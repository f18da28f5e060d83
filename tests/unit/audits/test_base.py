"""The audits' framework (``faithful_train/audits/base.py``): threshold parsing."""

import pytest

from faithful_train.audits.base import parse_threshold
from faithful_train.errors import ConfigError


@pytest.mark.parametrize(
    "spec, expected", [(">= 0.9", (">=", 0.9)), ("<0.1", ("<", 0.1)), (0.5, (">=", 0.5)), ("1e-3", (">=", 0.001))]
)
def test_thresholds(spec, expected):
    assert parse_threshold(spec) == expected


def test_bad_threshold():
    with pytest.raises(ConfigError, match="threshold"):
        parse_threshold("about 0.9")
