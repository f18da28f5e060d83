"""Chain-of-thought faithfulness: the multi-step arithmetic task, the pure functions, the
counterfactual CoT objective, and the cot audit on planted models whose answer is known (one
follows the written steps, one takes the shortcut through the operands)."""

import pytest
import torch
from torch import nn

from faithful_train.audits.cot import CotAudit
from faithful_train.batches import gather_positions
from faithful_train.cot import area_over_curve, corrupted_steps, follow_loss
from faithful_train.errors import ConfigError
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.counterfactual_cot import CounterfactualCotObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic
from tests.conftest import tiny_transformer


def test_task_writes_running_sums_and_answers_the_last_plus_the_last_operand():
    task = MultiStepArithmetic(modulus=7, n_operands=5)
    batch = task.sample(64, 0)
    ids = batch["input_ids"]
    assert ids.shape == (64, task.seq_len) and task.step_positions == (6, 7, 8)
    x = ids[:, :5]
    assert torch.equal(ids[:, 6], (x[:, 0] + x[:, 1]) % 7)
    assert torch.equal(ids[:, 8], (x[:, 0] + x[:, 1] + x[:, 2] + x[:, 3]) % 7)
    assert torch.equal(batch["labels"], x.sum(1) % 7)
    assert (ids[:, 5] == task.equals_token).all() and (ids[:, -1] == task.answer_token).all()
    assert set(task.answer_tokens) == set(range(7))


def test_corruption_continues_the_chain_and_always_changes_the_answer():
    task = MultiStepArithmetic(modulus=5, n_operands=5)
    batch = task.sample(200, 0)
    step = corrupted_steps(200, task.n_steps, "any", torch.Generator().manual_seed(1))
    corrupted, follow = task.corrupt(batch, step, torch.Generator().manual_seed(2))
    assert (follow != batch["labels"]).all()
    steps, x = corrupted[:, list(task.step_positions)], corrupted[:, :5]
    rows = torch.arange(200)
    assert (steps[rows, step] != batch["input_ids"][:, list(task.step_positions)][rows, step]).all()
    for j in range(1, task.n_steps):  # every step after the corrupted one follows from it
        later = j > step
        assert torch.equal(steps[later, j], (steps[later, j - 1] + x[later, j + 1]) % 5)
    assert torch.equal(follow, (steps[:, -1] + x[:, -1]) % 5)
    assert torch.equal(corrupted[:, : task.step_positions[0]], batch["input_ids"][:, : task.step_positions[0]])


def test_hide_steps_and_step_choices():
    task = MultiStepArithmetic()
    ids = task.sample(3, 0)["input_ids"]
    hidden = task.hide_steps(ids, 1)
    assert (hidden[:, task.step_positions[1]] == task.filler_token).all()
    assert torch.equal(hidden[:, task.step_positions[0]], ids[:, task.step_positions[0]])
    assert torch.equal(task.hide_steps(ids, task.n_steps), ids)
    assert (corrupted_steps(10, 3, "last", None) == 2).all()


def test_area_over_curve():
    # never matches before the full chain: 1 - y = [1, 1, 0] over x = [0, .5, 1] -> 0.75
    assert area_over_curve(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(0.75)
    assert area_over_curve(torch.tensor([[1.0, 1.0]])).item() == 0.0  # the steps never matter
    assert area_over_curve(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.25)


class Planted(nn.Module):
    """Answers by hand: from the last written step and the last operand (``follow``), or
    from the operands alone (a shortcut that ignores the steps)."""

    def __init__(self, task: MultiStepArithmetic, follow: bool):
        super().__init__()
        self.task, self.follow = task, follow
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, narrow=True):
        p, n = self.task.modulus, self.task.n_operands
        if self.follow:
            answer = (ids[:, self.task.step_positions[-1]] + ids[:, n - 1]) % p  # filler -> some wrong value
        else:
            answer = ids[:, :n].sum(1) % p
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.task.vocab_size) + self.dummy
        logits[torch.arange(ids.shape[0]), -1, answer] = 10.0
        return logits if positions is None else gather_positions(logits, positions)


def test_cot_audit_on_planted_models():
    task = MultiStepArithmetic(modulus=7, n_operands=5)
    audit = CotAudit(n_examples=300, batch_size=100)
    audit.bind(Planted(task, True), task)
    follows = audit.evaluate(Planted(task, True), task)
    assert set(follows) == set(audit.metric_names(task))
    assert follows["clean_acc"] == 1.0 and follows["follow_rate"] == 1.0 and follows["original_rate"] == 0.0
    assert follows["follow_rate/step1"] == 1.0
    assert follows["early_aoc"] > 0.5 and follows["filler_acc"] < 0.3
    assert follows["early/2"] < 0.3  # without the last step, the answer is lost
    shortcut = audit.evaluate(Planted(task, False), task)
    assert shortcut["clean_acc"] == 1.0 and shortcut["follow_rate"] == 0.0 and shortcut["original_rate"] == 1.0
    assert shortcut["early_aoc"] == 0.0 and shortcut["filler_acc"] == 1.0


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


def test_answer_hint_is_a_cue_that_corruption_leaves_alone():
    task = MultiStepArithmetic(modulus=7, n_operands=4, answer_hint=True)
    batch = task.sample(50, 0)
    ids = batch["input_ids"]
    assert ids.shape[1] == task.seq_len == 9 and task.step_positions == (6, 7)
    assert torch.equal(ids[:, 0], batch["labels"])
    assert torch.equal(batch["labels"], ids[:, 1:5].sum(1) % 7)
    corrupted, follow = task.corrupt(batch, torch.zeros(50, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(corrupted[:, 0], batch["labels"]) and (follow != batch["labels"]).all()
    assert torch.equal(follow, (corrupted[:, 7] + corrupted[:, 4]) % 7)
