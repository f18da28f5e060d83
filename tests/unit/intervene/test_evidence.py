"""Evidence edits (``faithful_train/intervene/evidence.py``): filling, removing and replacing
per-row spans, and the linear surrogate fit."""

import pytest
import torch

from faithful_train.intervene import evidence


def test_surrogate_fit_recovers_a_linear_model():
    kept = evidence.random_subsets(64, 4, torch.Generator().manual_seed(0))
    w = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    target = kept.float() @ w.T + 0.3
    weights, r2 = evidence.linear_surrogate(kept, target.T)
    torch.testing.assert_close(weights, w, atol=1e-2, rtol=0)
    assert r2.item() > 0.999


def test_evidence_edits_on_per_row_spans():
    ids = torch.arange(1, 9).repeat(2, 1)  # two rows, the span at another place in each
    span = torch.tensor([[1, 3], [4, 7]])
    filled = evidence.fill(ids, span[:, None], torch.tensor([True]), 0)
    assert filled.tolist() == [[1, 0, 0, 4, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0, 0, 8]]
    out, mask = evidence.remove(ids, None, span, 0)
    assert out.tolist() == [[0, 0, 1, 4, 5, 6, 7, 8], [0, 0, 0, 1, 2, 3, 4, 8]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    swapped = evidence.replace(ids, torch.tensor([[0, 2], [6, 8]]), torch.tensor([[9, 9], [7, 7]]))
    assert swapped.tolist() == [[9, 9, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 7]]
    with pytest.raises(ValueError, match="spans"):
        evidence.replace(ids, span, torch.zeros(2, 2, dtype=torch.long))
