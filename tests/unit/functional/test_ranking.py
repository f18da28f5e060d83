"""Rank statistics (``faithful_train/functional/ranking.py``): Spearman's rho with ties, masks and
constant rows, and top-k membership."""

from __future__ import annotations

import pytest
import torch

from faithful_train.functional.ranking import spearman, top_k_members


def test_spearman_ranks_ties_masks_and_constant_rows():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 2.0, 3.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 40.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    rho = spearman(a, b)
    assert rho[:3].tolist() == [1.0, -1.0, 0.0]  # monotone, reversed, constant -> 0 (not NaN)
    # ties get average ranks: (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    ra, rb = torch.tensor([1.5, 1.5, 3, 4], dtype=torch.float64), torch.tensor([1.0, 2, 3, 4], dtype=torch.float64)
    expected = ((ra - ra.mean()) * (rb - rb.mean())).sum() / ((ra - ra.mean()).norm() * (rb - rb.mean()).norm())
    assert rho[3].item() == pytest.approx(expected.item(), abs=1e-12)
    # the mask: only the first three entries count (the 4th would break the order)
    x, y = torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    assert spearman(x, y, torch.tensor([[True, True, True, False]])).item() == pytest.approx(1.0)
    assert spearman(x, y, torch.tensor([[True, False, False, False]])).item() == 0.0  # one entry
    # ties in the top k go to the earlier index
    members = top_k_members(torch.tensor([[3.0, 5.0, 5.0, 1.0]]), 2)
    assert members.tolist() == [[False, True, True, False]]
    assert top_k_members(torch.tensor([[5.0, 5.0, 5.0]]), 1).tolist() == [[True, False, False]]
