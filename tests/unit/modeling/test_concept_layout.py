"""The concept layout (``faithful_train/modeling/concept_layout.py``): units and slices, exact and
predicted probabilities, and discretization (hard forward, soft backward)."""

from __future__ import annotations

import pytest
import torch

from faithful_train.modeling.concept_layout import ConceptLayout

LAYOUT = ConceptLayout(("colour", "size", "shape"), (4, 2, 3))  # units: 4 + 1 + 3


def test_layout_units_and_slices():
    assert LAYOUT.n_units == 8 and LAYOUT.n_embeddings == 9
    assert LAYOUT.slices == (slice(0, 4), slice(4, 5), slice(5, 8))
    with pytest.raises(ValueError):
        ConceptLayout(("a",), (1,))


def test_probabilities_exact_and_predict_round_trip():
    logits = torch.randn(5, 8)
    p = LAYOUT.probabilities(logits)
    torch.testing.assert_close(p[:, 0:4].sum(-1), torch.ones(5))
    torch.testing.assert_close(p[:, 4], logits[:, 4].sigmoid())
    labels = torch.tensor([[3, 1, 0], [0, 0, 2]])
    exact = LAYOUT.exact(labels)
    assert exact.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]]
    assert torch.equal(LAYOUT.predict(exact), labels)
    assert torch.equal(
        LAYOUT.predict(p),
        torch.stack([logits[:, :4].argmax(-1), (logits[:, 4] > 0).long(), logits[:, 5:].argmax(-1)], 1),
    )


def test_discretize_is_hard_forward_soft_backward():
    units = LAYOUT.probabilities(torch.randn(6, 8)).requires_grad_()
    hard = LAYOUT.discretize(units)
    assert torch.equal(hard.detach(), LAYOUT.exact(LAYOUT.predict(units.detach())))
    (hard * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(units.grad, torch.arange(8.0).expand(6, 8))  # straight through
