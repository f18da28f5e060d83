"""Latent–variable alignment maths (``faithful_train/functional/latents.py``): per-value AUROCs and
their ranking, one-hot bases, and the greedy selection by what a swap does."""

from __future__ import annotations

import pytest
import torch

from faithful_train.functional.latents import alignment_ranking, greedy_selection, one_hot_basis, value_aurocs


def test_value_aurocs_and_ranking():
    values = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor(
        [[1.0, 0.0, 0.3], [1.0, 0.0, 0.1], [0.0, 2.0, 0.2], [0.0, 2.0, 0.3], [0.0, 0.0, 0.1], [0.0, 0.0, 0.2]]
    )  # latent 0 fires for value 0, latent 1 for value 1, latent 2 is noise
    aurocs = value_aurocs(scores, values)
    assert set(aurocs) == {0, 1, 2}
    assert aurocs[0][0] == 1.0 and aurocs[1][1] == 1.0
    assert aurocs[2][0] == pytest.approx(0.25)  # ties count half: silent for 2, and for 1 too
    order, strength = alignment_ranking(aurocs)
    assert order[:2].tolist() == [0, 1] and strength[0] == 0.5 and strength[-1] < 0.5
    # a one-hot basis swaps exactly the chosen latents
    from faithful_train.intervene.interventions import interchange

    base, source = torch.zeros(2, 5), torch.arange(10.0).view(2, 5)
    swapped = interchange(base, source, torch.ones(1, 5, dtype=torch.bool), one_hot_basis(torch.tensor([3, 1]), 5))
    assert torch.equal(swapped, torch.tensor([[0.0, 1, 0, 3, 0], [0, 6, 0, 8, 0]]))


def test_greedy_selection_picks_by_what_the_swap_does():
    ranked = torch.tensor([4, 0, 1, 2, 3])
    carriers = {1: 0.5, 3: 0.4}  # latents 1 and 3 carry the variable (their IIAs add); the rest do nothing

    def accuracy(sets):
        return torch.tensor([sum(carriers.get(int(i), 0.0) for i in s) for s in sets])

    order, scores = greedy_selection(ranked, 2, accuracy)
    assert order.tolist() == [1, 3, 4, 0, 2] and scores.tolist() == pytest.approx([0.5, 0.9])
    narrow, _ = greedy_selection(ranked, 2, accuracy, candidates=3)  # 3 is not among the 3 first ranked
    assert narrow.tolist() == [1, 4, 0, 2, 3]  # the tie after 1 (all 0.5) goes to the earlier-ranked
