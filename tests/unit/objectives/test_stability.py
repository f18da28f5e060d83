"""The stability objective: its two terms against hand computations, double backprop into the
model, the decoy task's shortcut and aligned perturbations, and bad input."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.attribution import attribute_tokens, input_gradients
from faithful_train.intervene.sites import run_with
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.stability import StabilityObjective, aligned_cosine, swap_irrelevant
from faithful_train.tasks.concept_objects import ConceptObjects
from faithful_train.tasks.decoy_objects import DecoyObjects
from faithful_train.tasks.domain_mixture import DomainMixture
from tests.conftest import tiny_transformer, unperturbed_task


def test_aligned_cosine_compares_aligned_tokens_only():
    attr = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    perturbed = torch.tensor([[3.0, 5.0, 1.0, 2.0]])
    source = torch.tensor([[2, -1, 0, 1]])  # perturbed token 1 is new filler
    assert aligned_cosine(attr, perturbed, source).item() == pytest.approx(1.0)
    assert aligned_cosine(attr, -perturbed, source).item() == pytest.approx(-1.0)
    assert aligned_cosine(attr, perturbed, torch.full_like(source, -1)).item() == 1.0


def _context(task, model, seed=0):
    batch = task.sample(16, 0)
    logits, cache = run_with(model, batch["input_ids"])
    return StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(seed))


def _term_and_its_rows(task, **options):
    """The objective's term on a tiny model, and the rows it drew (re-drawn by hand from the same
    generator, which the test goes on using for what the term drew next)."""
    model = tiny_transformer(task.vocab_size, max_seq_len=task.seq_len)
    objective = StabilityObjective(fraction=0.5, **options)
    objective.bind(model, task)
    ctx = _context(task, model)
    term = objective.term(ctx)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(16, generator=gen)[:8]
    return model, objective, ctx, term, gen, {k: v[rows] for k, v in ctx.batch.items()}


def test_terms_match_attributions_and_train_the_model_through_them():
    task = ConceptObjects()
    model, objective, ctx, term, gen, sub = _term_and_its_rows(task, stability=1.0, right_reasons=2.0)
    # the same rows and perturbation, recomputed by hand from the same generator
    perturbed, source = task.perturb_aligned(sub, gen)
    attr = attribute_tokens(
        model, torch.cat([sub["input_ids"], perturbed]), sub["labels"].repeat(2), "gradient_x_input", output="logit"
    ).values
    stability = (1 - aligned_cosine(attr[:8], attr[8:], source)).mean()
    grads = input_gradients(model, sub["input_ids"], sub["labels"], output="sum_logprob")  # (8, T, D)
    right = (grads.pow(2).sum(-1) * sub["irrelevant"]).sum(1).mean()
    torch.testing.assert_close(objective.parts["stability"], stability, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(objective.parts["right_reasons"], right, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(term.detach(), stability + 2.0 * right, rtol=1e-4, atol=1e-6)
    term.backward()  # double backprop: the attribution's own graph reaches the weights
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and model.tok_emb.weight.grad.abs().sum() > 0


def test_integrated_gradients_variant_runs():
    task = ConceptObjects()
    model = tiny_transformer(task.vocab_size, max_seq_len=task.seq_len)
    objective = StabilityObjective(method="integrated_gradients", steps=4, fraction=0.25)
    objective.bind(model, task)
    term = objective.term(_context(task, model))
    assert term.requires_grad and torch.isfinite(term)


def test_decoy_gives_the_answer_away_in_training_only():
    task = DecoyObjects()
    train = task.generate(2000, torch.Generator().manual_seed(0))
    test = task.sample(2000, 0)
    assert (train["decoy"] == train["labels"]).all()
    assert abs((test["decoy"] == test["labels"]).float().mean().item() - 0.25) < 0.03
    assert train["irrelevant"][:, task.decoy_position].all() and not train["irrelevant"][:, -1].any()
    ids, source = task.perturb_aligned(test, torch.Generator().manual_seed(1))
    aligned = source >= 0
    assert torch.equal(ids[aligned], test["input_ids"].gather(1, source.clamp_min(0))[aligned])
    assert (source[:, task.decoy_position] == task.decoy_position).all()
    assert sorted(task.token_name(t) for t in range(task.tag_token0, task.vocab_size)) == [
        f"<tag{c}>" for c in range(4)
    ]


def test_bad_input():
    model = tiny_transformer(20)
    with pytest.raises(ConfigError, match="needs a task with meaning-preserving perturbations"):
        StabilityObjective().bind(model, unperturbed_task())
    with pytest.raises(ConfigError, match="marks irrelevant tokens"):
        StabilityObjective(stability=0, right_reasons=1.0).bind(model, DomainMixture())
    with pytest.raises(UnknownNameError, match="attribution method 'saliency'"):
        StabilityObjective(method="saliency")
    with pytest.raises(ConfigError, match="all are 0"):
        StabilityObjective(stability=0)
    with pytest.raises(ConfigError, match="counterfactual needs a task that marks irrelevant tokens"):
        StabilityObjective(stability=0, counterfactual=1.0).bind(model, DomainMixture())
    with pytest.raises(ConfigError, match="counterfactual"):
        StabilityObjective(counterfactual=-1.0)


def test_swap_irrelevant_trades_only_tokens_both_rows_mark():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    irrelevant = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    swapped = swap_irrelevant(ids, irrelevant)  # row b takes row b-1's tokens (cyclically)
    assert swapped.tolist() == [[1, 10, 11, 4], [5, 2, 7, 8], [9, 6, 11, 12]]


def test_the_counterfactual_term_is_the_answer_loss_with_the_decoy_swapped():
    task = DecoyObjects()
    model, objective, ctx, term, _, sub = _term_and_its_rows(task, stability=0.0, counterfactual=1.0)
    swapped = swap_irrelevant(sub["input_ids"], sub["irrelevant"])
    assert not torch.equal(swapped[:, task.decoy_position], sub["input_ids"][:, task.decoy_position])
    logits = model(swapped)[:, -1]  # the answer is read at the last position
    expected = torch.nn.functional.cross_entropy(logits, sub["labels"])
    torch.testing.assert_close(term.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    term.backward()
    assert model.tok_emb.weight.grad.abs().sum() > 0
