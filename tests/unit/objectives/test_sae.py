"""The online ``sae`` objective: detached from the model, padding masked, it learns; ``max_rows``
trains on a seeded subset; and its latents become a site."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.intervene.sites import run_with
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.sae import SaeObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer


def _objective(task, model, **kwargs):
    objective = SaeObjective(site="blocks.0.resid_post", expansion=2, k=4, **kwargs)
    objective.bind(model, task, 0)
    return objective


def test_the_objective_is_detached_masks_padding_and_learns():
    torch.manual_seed(0)
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    objective = _objective(task, model, lr=0.01)
    batch = task.sample(16, 0)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][:, 0] = 0  # the first token of every row is padding
    logits, cache = run_with(
        model, batch["input_ids"], record=objective.sites(), attention_mask=batch["attention_mask"]
    )
    ctx = StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(0))
    term = objective.term(ctx)
    term.backward()
    assert all(p.grad is None for p in model.parameters())  # detached: the model is untouched
    assert objective.sae.encoder.weight.grad.abs().sum() > 0
    rows = int(batch["attention_mask"].sum())
    assert int(objective.sae.tokens_since_fired.max()) <= rows  # counted real tokens only
    optimizer = torch.optim.Adam(objective.sae.parameters(), lr=0.01)
    first = float(term.detach())
    for _ in range(60):
        optimizer.zero_grad()
        objective.term(ctx).backward()
        objective.sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        objective.sae.set_decoder_norm_to_unit_norm()
    assert float(objective.term(ctx).detach()) < 0.5 * first
    with pytest.raises(ConfigError, match="l1"):
        SaeObjective(site="blocks.0.resid_post", activation="relu")


def test_max_rows_trains_on_a_seeded_subset_and_positions_on_those_tokens():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    batch = task.sample(16, 0)  # 16 x 4 = 64 tokens
    logits, cache = run_with(model, batch["input_ids"], record=["blocks.0.resid_post"])
    terms = []
    for _ in range(2):
        objective = _objective(task, model, max_rows=10, auxk_alpha=0.0)
        terms.append(
            objective.term(StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(3)))
        )
        assert int(objective.sae.tokens_since_fired.max()) == 10  # ten tokens seen, not 64
    assert torch.equal(terms[0], terms[1])  # the step's generator picks them: a resumed run picks the same
    last = _objective(task, model, positions=[3])
    last.term(StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(3)))
    assert int(last.sae.tokens_since_fired.max()) == 16  # one token per row
    with pytest.raises(ConfigError, match="max_rows"):
        SaeObjective(site="blocks.0.resid_post", max_rows=0)


def test_the_objective_makes_its_latents_a_site():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    objective = _objective(task, model)
    _, cache = run_with(model, task.sample(4, 0)["input_ids"], record=["blocks.0.resid_post.sae"])
    assert cache["blocks.0.resid_post.sae"].shape[-1] == objective.sae.n_latents
