"""The counterfactual_context objective: its term is the answer loss on inputs whose gold document
(or tool result) holds another value, against that value."""

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.functional.losses import answer_loss
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.counterfactual_context import CounterfactualContextObjective
from faithful_train.tasks.base import take
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.kv_retrieval import KVRetrieval
from faithful_train.tasks.tool_use import ToolUse
from tests.conftest import tiny_transformer


@pytest.mark.parametrize("task", [KVRetrieval(parametric=True), ToolUse()], ids=["document", "tool_result"])
def test_term_is_the_loss_of_following_the_counterfactual_evidence(task):
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    batch = task.sample(8, 0)
    objective = CounterfactualContextObjective(fraction=0.5)
    objective.bind(model, task)
    ctx = StepContext(batch, model(batch["input_ids"]), {}, model, task, 0, torch.Generator().manual_seed(3))
    term = objective.term(ctx)
    generator = torch.Generator().manual_seed(3)  # the same draws, by hand
    rows = take(batch, torch.randperm(8, generator=generator)[:4])
    ids, answers = task.counterfactual_evidence(rows, generator)
    expected = answer_loss(model(ids)[:, -1:], answers[:, None], torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(term, expected)
    assert (answers != rows["labels"]).all()  # the evidence says something else than memory
    term.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(ConfigError, match="fraction"):
        CounterfactualContextObjective(fraction=0)
    with pytest.raises(ConfigError, match="counterfactual evidence"):
        CounterfactualContextObjective().bind(tiny_transformer(), HierarchicalEquality())
