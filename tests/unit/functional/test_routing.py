"""Router losses and statistics: parity with transformers and hand-computed cases."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from faithful_train.functional.routing import (
    bias_update,
    expert_concept_mi_loss,
    expert_load,
    load_statistics,
    mapped_alignment_loss,
    normalized_mutual_information,
    router_z_loss,
    routing_entropy,
    switch_load_balance,
    top_k_experts,
)

B, T, E = 3, 5, 4


def layers(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, E, generator=g) * 2 for _ in range(n)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_pooled_load_balance_matches_transformers(top_k):
    logits = layers()
    ours = switch_load_balance(logits, top_k)
    theirs = load_balancing_loss_func(tuple(x.reshape(-1, E) for x in logits), E, top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_pooled_load_balance_matches_transformers_with_padding(top_k):
    logits = layers(seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    ours = switch_load_balance(logits, top_k, mask)
    theirs = load_balancing_loss_func(tuple(x.reshape(-1, E) for x in logits), E, top_k, attention_mask=mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # padding really is left out: changing padded tokens' logits changes nothing
    edited = [x.clone() for x in logits]
    for x in edited:
        x[1, :2] = torch.tensor([9.0, -9.0, 0.0, 0.0])
    torch.testing.assert_close(switch_load_balance(edited, top_k, mask), ours)
    assert not torch.allclose(switch_load_balance(edited, top_k), switch_load_balance(logits, top_k))


def test_per_layer_load_balance_is_the_mean_of_single_layer_losses():
    logits = layers()
    expected = torch.stack([load_balancing_loss_func((x.reshape(-1, E),), E, 2) for x in logits]).mean()
    torch.testing.assert_close(switch_load_balance(logits, 2, pooled=False), expected)
    # pooling differs when layers are unbalanced in opposite directions
    a = torch.tensor([[[5.0, 0, 0, 0]]]).expand(1, 4, E)
    b = torch.tensor([[[0, 5.0, 0, 0]]]).expand(1, 4, E)
    assert switch_load_balance([a, b], 1, pooled=True) < switch_load_balance([a, b], 1, pooled=False)


def test_load_balance_hand_computed():
    # uniform logits: every P_e = 1/E; top-1 picks expert 0 for all tokens (ties -> first):
    # f = (1, 0, 0, 0) -> E * sum f P = E * 1/E = 1
    assert switch_load_balance([torch.zeros(1, 4, E)], 1).item() == pytest.approx(1.0)
    # perfectly balanced one-hot routing: f_e = P_e ~ 1/E -> E * E * 1/E^2 = 1 (the minimum)
    eye = torch.eye(E)[None] * 50
    assert switch_load_balance([eye], 1).item() == pytest.approx(1.0, abs=1e-6)
    # all tokens to one expert with confidence: E * 1 * 1 = E
    skew = torch.tensor([50.0, 0, 0, 0]).expand(1, 4, E)
    assert switch_load_balance([skew], 1).item() == pytest.approx(E, abs=1e-6)


def test_z_loss_and_entropy_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0]]])  # lse = log 2, log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert routing_entropy(logits).item() == pytest.approx((math.log(2) + h2) / 2)
    assert routing_entropy(logits, torch.tensor([[0, 1]])).item() == pytest.approx(h2)
    assert router_z_loss(logits, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(2) ** 2)


def test_mapped_alignment_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))  # (1, 2, 3)
    mapping = torch.tensor([[True, False, False], [False, True, True]])
    per_token = mapped_alignment_loss(logits, torch.tensor([[0, 1]]), mapping)
    assert per_token.item() == pytest.approx((-math.log(0.5) - math.log(0.9)) / 2, rel=1e-6)
    per_sequence = mapped_alignment_loss(logits, torch.tensor([1]), mapping)  # both tokens concept 1
    assert per_sequence.item() == pytest.approx((-math.log(0.5) - math.log(0.9)) / 2, rel=1e-6)


def test_mutual_information_loss_hand_computed():
    # two concepts, each routed with certainty to its own expert: I = log 2
    logits = torch.tensor([[[30.0, 0.0]], [[0.0, 30.0]]])  # (2, 1, 2)
    assert expert_concept_mi_loss(logits, torch.tensor([0, 1]), 2).item() == pytest.approx(-math.log(2), abs=1e-6)
    # routing independent of the concept: I = 0
    same = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    assert expert_concept_mi_loss(same, torch.tensor([0, 1]), 2).item() == pytest.approx(0.0, abs=1e-7)
    # soft case: P(c, e) = 1/2 [[.75, .25], [.25, .75]]
    soft = torch.log(torch.tensor([[[0.75, 0.25]], [[0.25, 0.75]]]))
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert -expert_concept_mi_loss(soft, torch.tensor([0, 1]), 2).item() == pytest.approx(expected, rel=1e-5)


def test_normalized_mutual_information():
    assert normalized_mutual_information(torch.tensor([[5, 0], [0, 7]])).item() == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[5, 5], [3, 3]])).item() == pytest.approx(0.0, abs=1e-12)
    # a permutation of a one-to-one mapping is still 1; a constant column gives 0
    assert normalized_mutual_information(torch.tensor([[0, 0, 4], [3, 0, 0]])).item() == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[4], [3]])).item() == 0.0
    # hand-computed: joint [[.4, .1], [.1, .4]] -> I = .8 log 1.6 + .2 log .4, H = log 2 each
    table = torch.tensor([[4, 1], [1, 4]])
    expected = (0.8 * math.log(1.6) + 0.2 * math.log(0.4)) / math.log(2)
    assert normalized_mutual_information(table).item() == pytest.approx(expected)


def test_load_statistics_and_expert_load():
    stats = load_statistics(torch.tensor([2.0, 2.0, 4.0, 0.0]))
    assert stats["load_cv"].item() == pytest.approx(math.sqrt(2.0) / 2)
    assert stats["load_max_mean"].item() == pytest.approx(2.0)
    assert stats["dead_experts"].item() == 1
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]])
    assert expert_load(logits, 2).tolist() == [1, 1, 1, 1]
    assert expert_load(logits, 2, torch.tensor([[1, 0]])).tolist() == [1, 1, 0, 0]


def test_bias_steers_selection_and_update_sign():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert top_k_experts(logits, 1).tolist() == [[0]]
    assert top_k_experts(logits, 1, torch.tensor([0.0, 0.0, 0.0, 3.5])).tolist() == [[3]]
    new = bias_update(torch.zeros(4), torch.tensor([6.0, 2.0, 0.0, 0.0]), 0.1)  # mean load 2
    assert new.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
