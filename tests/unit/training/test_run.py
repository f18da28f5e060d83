"""``training.run``'s Ctrl-C handling: the first signal only asks for a stop at the end of the step
(a flag, which nothing can swallow), the second interrupts at once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from faithful_train.training.run import StopOnCtrlC


def test_the_first_ctrl_c_stops_at_the_end_of_the_step_and_the_second_at_once():
    stop, trainer = StopOnCtrlC(), SimpleNamespace(should_stop=False)
    stop.on_train_batch_end(trainer)
    assert not trainer.should_stop  # no signal, no stop
    stop.handle(2, None)  # returns: nothing raised inside whatever code the signal interrupted
    assert stop.requested and not trainer.should_stop
    stop.on_train_batch_end(trainer)
    assert trainer.should_stop
    with pytest.raises(KeyboardInterrupt):
        stop.handle(2, None)
