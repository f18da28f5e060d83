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


def test_layers_train_one_transcoder_per_mlp_each_on_its_own_layer():
    torch.manual_seed(0)
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    objective = SaeObjective(
        site="blocks.{i}.mlp.in", target="blocks.{i}.mlp.out", layers="all", expansion=2, k=4, lr=0.01
    )
    objective.bind(model, task, 0)
    sets = objective.module()
    assert sets.layers == [0, 1] and objective.sites() == [
        "blocks.0.mlp.in",
        "blocks.0.mlp.out",
        "blocks.1.mlp.in",
        "blocks.1.mlp.out",
    ]
    batch = task.sample(32, 0)
    logits, cache = run_with(model, batch["input_ids"], record=objective.sites())
    ctx = StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(0))
    first = objective.term(ctx)
    assert {"fvu/layer0", "fvu/layer1", "dead/layer1", "l0/layer0", "fvu"} <= set(objective.parts)
    fvu0 = {i: float(objective.parts[f"fvu/layer{i}"]) for i in (0, 1)}
    optimizer = torch.optim.Adam(sets.parameters(), lr=0.01)
    for _ in range(80):
        optimizer.zero_grad()
        objective.term(ctx).backward()
        optimizer.step()
    objective.term(ctx)
    for i in (0, 1):  # each transcoder learns its own layer's MLP (swapped, they would not fit)
        assert float(objective.parts[f"fvu/layer{i}"]) < 0.5 * fvu0[i]
    x0, y1 = cache["blocks.0.mlp.in"].flatten(0, 1), cache["blocks.1.mlp.out"].flatten(0, 1)
    with torch.no_grad():
        swapped = sets.at(0)(x0, y1).fvu
    assert float(swapped) > 2 * float(objective.parts["fvu/layer1"])
    assert first.requires_grad and all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match=r"target must hold \{i\}"):
        SaeObjective(site="blocks.{i}.mlp.in", target="blocks.1.mlp.out", layers="all")
    bad = SaeObjective(site="blocks.{i}.mlp.in", target="blocks.{i}.mlp.out", layers=[0, 5])
    with pytest.raises(ConfigError, match="layers: 5 is not a layer of the model"):
        bad.bind(model, task, 0)
