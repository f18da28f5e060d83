"""The ``counterfactual_cot`` objective: its term is the cross-entropy of the corrupted input against
the answer that follows from the corrupted steps; it (and the ``cot`` audit) needs written steps."""

import pytest
import torch

from faithful_train.audits.cot import CotAudit
from faithful_train.errors import ConfigError
from faithful_train.functional.cot import corrupted_steps, follow_loss
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.counterfactual_cot import CounterfactualCotObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic
from tests.conftest import tiny_transformer


def test_objective_term_is_ce_of_the_corrupted_input_against_the_followed_answer():
    task = MultiStepArithmetic()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(16, 0)
    objective = CounterfactualCotObjective(fraction=0.5)
    objective.bind(model, task)
    ctx = StepContext(batch, model(batch["input_ids"]), {}, model, task, 0, torch.Generator().manual_seed(3))
    term = objective.term(ctx)
    generator = torch.Generator().manual_seed(3)
    rows = {k: v[:8] for k, v in batch.items()}
    step = corrupted_steps(8, task.n_steps, "any", generator)
    corrupted, follow = task.corrupt(rows, step, generator)
    torch.testing.assert_close(term, follow_loss(model(corrupted)[:, -1], follow))
    term.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0


def test_cot_needs_a_task_with_written_steps():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    with pytest.raises(ConfigError, match="written reasoning steps"):
        CounterfactualCotObjective().bind(model, task)
    with pytest.raises(ConfigError, match="written reasoning steps"):
        CotAudit().bind(model, task)
    with pytest.raises(ConfigError):
        CounterfactualCotObjective(fraction=0)
