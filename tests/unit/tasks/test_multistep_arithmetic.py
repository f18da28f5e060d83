"""The multi-step arithmetic task (``faithful_train/tasks/multistep_arithmetic.py``): running sums,
corruption that continues the chain and changes the answer, hidden steps, and the answer hint."""

import torch

from faithful_train.functional.cot import corrupted_steps
from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic


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
