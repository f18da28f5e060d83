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


def test_a_schedule_in_shares_of_the_run_scales_with_its_length():
    spec = {"kind": "warmup", "start": "30%", "steps": "10%"}
    long, short = Schedule.parse(spec), Schedule.parse(spec)
    long.resolve(5000)
    short.resolve(30)
    assert (long.start, long.steps, short.start, short.steps) == (1500, 500, 9, 3)
    assert [long(s) for s in (1499, 1750, 2000)] == [0.0, 0.5, 1.0]
    assert [short(s) for s in (8, 9, 12)] == [0.0, 0.0, 1.0]
    for bad in ("30", "thirty%", "130%", "-5%"):
        with pytest.raises(ConfigError, match="schedule start: a number of steps or a share of the run"):
            Schedule.parse({"kind": "warmup", "start": bad, "steps": 10})
