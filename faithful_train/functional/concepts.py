"""Concept-bottleneck maths, as pure tensor functions (no Lightning, no model).

A bottleneck's *units* are the concept activations the downstream head reads: one unit per
binary concept (the probability of its second value, a sigmoid) and one per value of a
categorical concept (a softmax over its values). ``ConceptLayout`` knows where each concept's
units are and turns logits into probabilities, labels into exact unit values (what a test-time
intervention writes), and both into losses and predictions.

Sources: concept bottleneck models and test-time intervention (Koh et al. 2020, "Concept
Bottleneck Models"); concept embedding models and random training interventions
(Espinosa Zarlenga et al. 2022, "Concept Embedding Models"); leakage (Mahinpei et al. 2021,
"Promises and Pitfalls of Black-Box Concept Learning Models"; Havasi et al. 2022, "Addressing
Leakage in Concept Bottleneck Models"); the variational information bottleneck used as the
side channel's leakage penalty (Alemi et al. 2017, "Deep Variational Information Bottleneck").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from faithful_train.modeling.concept_layout import ConceptLayout


def concept_loss(layout: ConceptLayout, logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over concepts of BCE (binary) or cross-entropy (categorical) of the concept logits
    ``(B, n_units)`` against labels ``(B, K)``: Koh et al. 2020's concept loss L_C."""
    losses = [
        F.binary_cross_entropy_with_logits(logits[:, s][:, 0].float(), labels[:, k].float())
        if layout.n_values[k] == 2
        else F.cross_entropy(logits[:, s].float(), labels[:, k])
        for k, s in enumerate(layout.slices)
    ]
    return torch.stack(losses).mean()


def intervene(layout: ConceptLayout, units: Tensor, labels: Tensor, concept_mask: Tensor) -> Tensor:
    """Test-time intervention: units with the concepts where ``concept_mask (B, K)`` is True set to
    their true values (Koh et al. 2020)."""
    return torch.where(layout.unit_mask(concept_mask), layout.exact(labels).to(units.dtype), units)


def random_concept_mask(shape: tuple[int, int], probability: float, generator: torch.Generator, device=None) -> Tensor:
    """Each (example, concept) chosen with ``probability``: CEM's random training interventions."""
    return (torch.rand(shape, generator=generator) < probability).to(device)


def first_k_mask(order: Tensor, k: int) -> Tensor:
    """``(B, K)`` mask of each row's first ``k`` concepts in ``order`` (a per-row permutation)."""
    rank = order.argsort(dim=1)  # rank[b, c]: position of concept c in row b's order
    return rank < k


def gaussian_channel_kl(mean: Tensor) -> Tensor:
    """KL(N(mean, I) || N(0, I)) = ½‖mean‖², summed over the channel, averaged over examples.

    The side channel carries ``mean`` plus unit Gaussian noise in training, so this KL bounds
    the information it can pass, I(x; z) <= E KL (Alemi et al. 2017): scaling the mean up to
    beat the noise costs penalty, which a deterministic L2 penalty cannot enforce (the head
    would scale its weights up instead)."""
    return 0.5 * mean.float().pow(2).flatten(1).sum(-1).mean()


def intervention_area(accuracies: Sequence[float]) -> float:
    """Area under the test-time intervention curve, accuracy against the fraction of concepts
    intervened on (0, 1/K, ..., 1), by the trapezoid rule: 1 is perfect at every budget."""
    acc = list(accuracies)
    if len(acc) < 2:
        return float(acc[0]) if acc else float("nan")
    return sum((a + b) / 2 for a, b in zip(acc[:-1], acc[1:])) / (len(acc) - 1)


def permute_within_groups(features: Tensor, groups: Tensor, generator: torch.Generator) -> Tensor:
    """Rows of ``features`` shuffled among the examples of the same group (e.g. the same true
    concept values): the features keep their relation to the group and lose any other relation
    to the example (a conditional permutation, Berrett et al. 2019)."""
    by_group = torch.argsort(groups, stable=True)
    shuffled = torch.argsort(groups.double() + 0.5 * torch.rand(len(groups), generator=generator, dtype=torch.float64))
    out = torch.empty_like(features)
    out[by_group] = features[shuffled]
    return out


def probe_accuracy(
    features: Tensor, labels: Tensor, n_classes: int, train: Tensor, hidden: int = 64, steps: int = 300, seed: int = 0
) -> float:
    """Held-out accuracy of an MLP probe ``features -> labels``, trained on the rows ``train``
    (bool mask) and scored on the others: "how well can the label be read from these features".

    Full-batch Adam, fixed seed and step count, standardised features: deterministic, so every
    rank of a DDP run gets the same figure from the same gathered features."""
    x = features.double()
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = ((x - mean) / std).float()
    gen = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(x.shape[1], hidden, generator=gen) / x.shape[1] ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(hidden, n_classes, generator=gen) / hidden**0.5).requires_grad_()
    b2 = torch.zeros(n_classes, requires_grad=True)
    params = [w1, b1, w2, b2]
    optimizer = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)

    def logits(rows: Tensor) -> Tensor:
        return F.relu(rows @ w1 + b1) @ w2 + b2

    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(logits(x[train]), labels[train]).backward()
            optimizer.step()
    with torch.no_grad():
        test = ~train
        return float((logits(x[test]).argmax(-1) == labels[test]).float().mean())
