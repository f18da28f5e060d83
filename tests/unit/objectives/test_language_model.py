"""The ``language_model`` objective: its term is the next-token loss of the step's rows (averaged
with that of the task's plain text, ``lm_text/`` rows, when a batch carries some), and it teaches a
model its prompts, which the answer loss (read at the last position) does not."""

import pytest
import torch
from omegaconf import OmegaConf

from faithful_train.errors import ConfigError
from faithful_train.functional.losses import language_model_loss
from faithful_train.modeling import build_model
from faithful_train.objectives.language_model import LanguageModelObjective
from faithful_train.tasks.concept_objects import ConceptObjects
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.training.module import step_loss
from tests.conftest import tiny_transformer


def test_term_is_the_language_model_loss_averaged_with_the_plain_texts():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(16, 0)
    objective = LanguageModelObjective()
    objective.bind(model, task)
    rows = language_model_loss(model(batch["input_ids"]), batch["input_ids"], None)
    out = step_loss(model, task, [(objective, 1.0)], batch, 0, 0)
    torch.testing.assert_close(out.terms["train/objective/language_model"], rows)
    torch.testing.assert_close(out.loss, out.terms["train/task_loss"] + rows)
    # plain text beside the rows (right-padded lines of another length): the mean of the two losses
    text_ids = torch.randint(0, task.n_symbols, (6, 7), generator=torch.Generator().manual_seed(1))
    text_mask = torch.ones(6, 7, dtype=torch.long)
    text_mask[:3, 5:] = 0
    with_text = batch | {"lm_text/input_ids": text_ids, "lm_text/attention_mask": text_mask}
    text = language_model_loss(model(text_ids, attention_mask=text_mask), text_ids, text_mask)
    out = step_loss(model, task, [(objective, 1.0)], with_text, 0, 0)
    torch.testing.assert_close(out.terms["train/objective/language_model"], (rows + text) / 2)
    torch.testing.assert_close(objective.parts["rows"], rows.detach())
    torch.testing.assert_close(objective.parts["text"], text.detach())


def test_a_model_without_next_token_logits_is_refused():
    task = ConceptObjects()
    tiny = {"arch": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4, "d_mlp": 64}
    tiny["bottleneck"] = {"mode": "hard"}
    model = build_model(OmegaConf.create(tiny), task.vocab_size, task.seq_len, concepts=task.concepts)
    with pytest.raises(ConfigError, match="next-token logits"):
        LanguageModelObjective().bind(model, task)


def _held_out_next_token_loss(with_term: bool, steps: int = 30) -> float:
    """The next-token loss on held-out rows' prompts after ``steps`` training steps of the answer
    loss, with or without the term."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = LanguageModelObjective()
    objective.bind(model, task)
    active = [(objective, 1.0)] if with_term else []
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss = step_loss(model, task, active, task.sample(64, step), step, step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = task.sample(256, 10_000)["input_ids"]
    with torch.no_grad():
        return float(language_model_loss(model(held_out), held_out, None))


def test_the_term_teaches_the_model_its_prompts():
    loss = {with_term: _held_out_next_token_loss(with_term) for with_term in (False, True)}
    assert loss[True] < loss[False] - 0.3, loss
