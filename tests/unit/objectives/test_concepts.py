"""The concepts objective's terms against hand computations, their gradients, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from faithful_train.errors import ConfigError
from faithful_train.functional.concepts import concept_loss
from faithful_train.intervene.sites import run_with
from faithful_train.modeling import build_model
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.concepts import ConceptsObjective
from faithful_train.tasks.concept_objects import ConceptObjects
from tests.conftest import tiny_transformer

TASK = ConceptObjects()


def make(mode: str = "hybrid", **bottleneck):
    torch.manual_seed(0)
    section = OmegaConf.create(
        dict(arch="transformer", d_model=32, n_layers=2, n_heads=4, d_mlp=64, bottleneck={"mode": mode, **bottleneck})
    )
    return build_model(section, TASK.vocab_size, TASK.seq_len, concepts=TASK.concepts).train()


def step(objective: ConceptsObjective, model, seed: int = 0):
    objective.bind(model, TASK)
    batch = TASK.sample(32, 0)
    logits, cache = run_with(model, batch["input_ids"], record=objective.sites())
    ctx = StepContext(batch, logits, cache, model, TASK, 0, torch.Generator().manual_seed(seed))
    return objective.term(ctx), batch, cache


def test_terms_match_hand_computations():
    model = make("hybrid")
    objective = ConceptsObjective(concept=2.0, leakage=0.5, sparsity=0.1, intervention_prob=1.0, intervention=3.0)
    term, batch, cache = step(objective, model)
    labels = model.concept_labels(batch)
    parts = objective.parts
    torch.testing.assert_close(
        parts["concept"], concept_loss(model.layout, cache["bottleneck.logits"][:, 0], labels).detach()
    )
    torch.testing.assert_close(parts["leakage"], 0.5 * cache["bottleneck.side"].detach().pow(2).sum(-1).mean())
    units = cache["bottleneck.concepts"][:, 0].detach()
    torch.testing.assert_close(parts["sparsity"], torch.cat([units[:, 7:8], units[:, 8:9]], 1).mean())  # size, material
    assert objective.sites() == ["bottleneck.concepts", "bottleneck.logits", "bottleneck.side"]
    # every concept intervened on (probability 1): the head sees the exact true units
    model.bottleneck.noise_draws.zero_()
    model.bottleneck.noise_draws += 1  # the draw the objective's readout used (the forward used draw 0)
    exact = model.layout.exact(labels)[:, None]
    answer = model.bottleneck.readout(exact, cache["bottleneck.side"])[:, -1]
    torch.testing.assert_close(parts["intervention"], F.cross_entropy(answer, batch["labels"]).detach())
    expected = 2.0 * parts["concept"] + 0.5 * parts["leakage"] + 0.1 * parts["sparsity"] + 3.0 * parts["intervention"]
    torch.testing.assert_close(term.detach(), expected)


def test_intervention_term_is_off_without_probability_and_seeded_with_it():
    model = make("hard")
    objective = ConceptsObjective()
    step(objective, model)
    assert set(objective.parts) == {"concept"}
    a, b = ConceptsObjective(intervention_prob=0.3), ConceptsObjective(intervention_prob=0.3)
    ta, tb = step(a, model, seed=5)[0], step(b, model, seed=5)[0]
    torch.testing.assert_close(ta, tb)
    assert not torch.allclose(step(ConceptsObjective(intervention_prob=0.3), model, seed=6)[0], ta)


def test_concept_loss_trains_the_encoder_and_backbone_full_intervention_does_not_reach_concepts():
    model = make("hard")
    term, _, _ = step(ConceptsObjective(concept=1.0), model)
    term.backward()
    assert model.bottleneck.concept_logits.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.bottleneck.head[0].weight.grad is None  # the concept loss does not touch the head
    model.zero_grad(set_to_none=True)
    term, _, _ = step(ConceptsObjective(concept=0.0, intervention_prob=1.0), model)
    term.backward()
    assert model.bottleneck.head[0].weight.grad.abs().sum() > 0
    grad = model.bottleneck.concept_logits.weight.grad
    assert grad is None or grad.abs().sum() == 0  # exact units replace the predicted ones


def test_embedding_mode_records_embeddings_and_intervenes_through_them():
    model = make("embedding")
    term, _, cache = step(ConceptsObjective(intervention_prob=1.0), model)
    assert "bottleneck.embeddings" in cache and torch.isfinite(term)
    term.backward()
    assert model.bottleneck.value_embeddings.weight.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(ConfigError, match="needs a model with a concept bottleneck"):
        ConceptsObjective().bind(tiny_transformer(TASK.vocab_size, max_seq_len=TASK.seq_len), TASK)
    with pytest.raises(ConfigError, match="side channel; this one is 'hard'"):
        ConceptsObjective(leakage=0.1).bind(make("hard"), TASK)
    with pytest.raises(ConfigError, match="intervention_prob"):
        ConceptsObjective(intervention_prob=1.5)
    with pytest.raises(ConfigError, match="sparsity must be >= 0"):
        ConceptsObjective(sparsity=-1)
