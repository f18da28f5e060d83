"""The ``tool_call`` objective: its term is the cross-entropy of the logits at the tool-picking
position (the one before ``span/tool``) against the called tool's token, read from the step's own
forward; and it is what teaches a model to pick the tool, which the answer loss (read at ``=``)
cannot."""

import pytest
import torch
import torch.nn.functional as F

from faithful_train.errors import ConfigError
from faithful_train.objectives.tool_call import ToolCallObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.tool_use import TOOL_POS, ToolUse
from faithful_train.training.module import step_loss
from tests.conftest import tiny_transformer


def test_term_is_the_cross_entropy_of_the_called_tool_at_the_position_before_it():
    task = ToolUse()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    batch = task.sample(16, 0)
    objective = ToolCallObjective()
    objective.bind(model, task)
    out = step_loss(model, task, [(objective, 1.0)], batch, 0, 0)
    rows, picking = torch.arange(16), batch["span/tool"][:, 0] - 1
    assert (picking == TOOL_POS - 1).all()
    called = batch["input_ids"][rows, picking + 1]  # the tool token the row writes after CALL
    assert torch.equal(called, batch["tool_ids"])
    expected = F.cross_entropy(model(batch["input_ids"])[rows, picking], called)
    torch.testing.assert_close(out.terms["train/objective/tool_call"], expected)
    torch.testing.assert_close(out.loss, out.terms["train/task_loss"] + expected)
    with pytest.raises(ConfigError, match="call a tool"):
        ToolCallObjective().bind(tiny_transformer(), HierarchicalEquality())


def _selection_accuracy(with_term: bool, steps: int = 30) -> float:
    """Tool-selection accuracy on held-out rows after ``steps`` training steps of the answer loss,
    with or without the term."""
    task = ToolUse()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    objective = ToolCallObjective()
    objective.bind(model, task)
    active = [(objective, 1.0)] if with_term else []
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss = step_loss(model, task, active, task.sample(64, step), step, step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = task.sample(256, 10_000)
    picking = held_out["span/tool"][:, 0] - 1
    with torch.no_grad():
        picked = model(held_out["input_ids"])[torch.arange(256), picking].argmax(-1)
    return float((picked == held_out["tool_ids"]).float().mean())


def test_the_term_teaches_the_model_which_tool_to_call():
    accuracy = {with_term: _selection_accuracy(with_term) for with_term in (False, True)}
    assert accuracy[True] >= 0.9 and accuracy[False] <= 0.6, accuracy
