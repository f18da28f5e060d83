"""Interchange's pure functions (``faithful_train/functional/interchange.py``): the loss and hits
of counterfactual answers, and alignment parsing's errors."""

import pytest
import torch

from faithful_train.errors import UnknownNameError
from faithful_train.functional.interchange import interchange_hits, interchange_loss, parse_alignment
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer


def test_pure_loss_and_hits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0])
    assert torch.equal(interchange_hits(logits, labels), torch.tensor([1.0, 0.0]))
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 0]) / 2
    torch.testing.assert_close(interchange_loss(logits, labels), expected)


def test_alignment_errors_name_valid_values():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    with pytest.raises(UnknownNameError, match="variable"):
        parse_alignment({"middle": "blocks.0.resid_post"}, model, task)
    with pytest.raises(UnknownNameError, match="blocks.0.resid_post"):
        parse_alignment({"left": "blocks.0.resid_psot"}, model, task)
