"""The objectives' framework (``faithful_train/objectives/base.py``): weight schedules."""

import pytest

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.objectives.base import Schedule


def test_schedules():
    assert Schedule()(123) == 1.0
    warm = Schedule.parse({"kind": "warmup", "start": 10, "steps": 10})
    assert [warm(s) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    anneal = Schedule.parse({"kind": "anneal", "start": 0, "steps": 4, "final": 0.5})
    assert [anneal(s) for s in (0, 2, 4, 8)] == [1.0, 0.75, 0.5, 0.5]
    assert Schedule.parse("constant").kind == "constant"


def test_schedule_errors():
    with pytest.raises(UnknownNameError, match="anneal, constant, warmup|constant, warmup, anneal"):
        Schedule.parse("cosine")
    with pytest.raises(UnknownNameError, match="steps"):
        Schedule.parse({"kind": "warmup", "step": 3})
    with pytest.raises(ConfigError):
        Schedule(kind="warmup", steps=-1)
