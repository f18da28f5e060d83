"""Pure concept-bottleneck maths (``faithful_train/functional/concepts.py``): losses, interventions,
the KL, the curve's area, and the leakage probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faithful_train.functional.concepts import (
    concept_loss,
    first_k_mask,
    gaussian_channel_kl,
    intervene,
    intervention_area,
    probe_accuracy,
    random_concept_mask,
)
from faithful_train.modeling.concept_layout import ConceptLayout

LAYOUT = ConceptLayout(("colour", "size", "shape"), (4, 2, 3))  # units: 4 + 1 + 3


def test_concept_loss_is_mean_of_bce_and_cross_entropies():
    logits, labels = torch.randn(7, 8), torch.stack([torch.randint(0, n, (7,)) for n in (4, 2, 3)], 1)
    expected = (
        F.cross_entropy(logits[:, :4], labels[:, 0])
        + F.binary_cross_entropy_with_logits(logits[:, 4], labels[:, 1].float())
        + F.cross_entropy(logits[:, 5:], labels[:, 2])
    ) / 3
    torch.testing.assert_close(concept_loss(LAYOUT, logits, labels), expected)


def test_intervene_sets_only_the_chosen_concepts():
    units = LAYOUT.probabilities(torch.randn(2, 8))
    labels = torch.tensor([[1, 1, 2], [2, 0, 0]])
    mask = torch.tensor([[True, False, False], [False, True, True]])
    out = intervene(LAYOUT, units, labels, mask)
    assert out[0, :4].tolist() == [0, 1, 0, 0] and torch.equal(out[0, 4:], units[0, 4:])
    assert torch.equal(out[1, :4], units[1, :4]) and out[1, 4:].tolist() == [0, 1, 0, 0]


def test_first_k_mask_follows_each_rows_order():
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    assert first_k_mask(order, 0).sum() == 0
    assert first_k_mask(order, 1).tolist() == [[False, False, True], [False, True, False]]
    assert first_k_mask(order, 2).tolist() == [[True, False, True], [False, True, True]]
    assert first_k_mask(order, 3).all()


def test_random_mask_rate_and_seed():
    a = random_concept_mask((4000, 4), 0.25, torch.Generator().manual_seed(0))
    b = random_concept_mask((4000, 4), 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and abs(a.float().mean().item() - 0.25) < 0.01


def test_gaussian_channel_kl_matches_torch_distributions():
    mean = torch.randn(5, 1, 3)
    q = torch.distributions.Normal(mean, torch.ones_like(mean))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum((1, 2)).mean()
    torch.testing.assert_close(gaussian_channel_kl(mean), expected)


def test_intervention_area():
    assert intervention_area([1.0, 1.0, 1.0]) == 1.0
    assert intervention_area([0.0, 1.0]) == 0.5
    assert intervention_area([0.5, 0.7, 0.9, 1.0]) == pytest.approx((0.6 + 0.8 + 0.95) / 3)


def test_probe_reads_a_label_that_is_there_and_not_one_that_is_not():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=gen)
    train = torch.arange(600) % 2 == 0
    informative = torch.cat([F.one_hot(labels, 4).float(), torch.randn(600, 3, generator=gen)], 1)
    noise = torch.randn(600, 7, generator=gen)
    assert probe_accuracy(informative, labels, 4, train) > 0.98
    assert probe_accuracy(noise, labels, 4, train) < 0.4
    assert probe_accuracy(informative, labels, 4, train) == probe_accuracy(
        informative, labels, 4, train
    )  # deterministic
