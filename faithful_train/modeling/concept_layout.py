"""Concepts laid out as a bottleneck's units (Koh et al. 2020, "Concept Bottleneck Models").

A bottleneck's *units* are the concept activations the downstream head reads: one unit per
binary concept (the probability of its second value, a sigmoid) and one per value of a
categorical concept (a softmax over its values). ``ConceptLayout`` knows where each concept's
units are and turns logits into probabilities, labels into exact unit values (what a test-time
intervention writes), and both into losses and predictions (``functional.concepts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ConceptLayout:
    """Concepts ``(name, n_values)`` laid out as bottleneck units."""

    names: tuple[str, ...]
    n_values: tuple[int, ...]

    @classmethod
    def from_task(cls, concepts: Mapping[str, Sequence[str]], names: Sequence[str] | None = None) -> ConceptLayout:
        names = tuple(names) if names is not None else tuple(concepts)
        return cls(names, tuple(len(concepts[n]) for n in names))

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a concept bottleneck needs at least one concept")
        if any(n < 2 for n in self.n_values):
            raise ValueError(f"every concept needs >= 2 values, got {dict(zip(self.names, self.n_values))}")

    @property
    def n_concepts(self) -> int:
        return len(self.names)

    def width(self, k: int) -> int:
        """Units of concept ``k``: 1 if binary, else one per value."""
        return 1 if self.n_values[k] == 2 else self.n_values[k]

    @property
    def slices(self) -> tuple[slice, ...]:
        starts = [0]
        for k in range(self.n_concepts):
            starts.append(starts[-1] + self.width(k))
        return tuple(slice(a, b) for a, b in zip(starts[:-1], starts[1:]))

    @property
    def n_units(self) -> int:
        return sum(self.width(k) for k in range(self.n_concepts))

    @property
    def n_embeddings(self) -> int:
        """Value embeddings of a concept-embedding bottleneck: one per value, binary included."""
        return sum(self.n_values)

    # -- logits, probabilities, exact values ---------------------------------------------------

    def probabilities(self, logits: Tensor) -> Tensor:
        """Units from logits ``(..., n_units)``: sigmoid for binary, softmax per categorical group."""
        parts = [
            logits[..., s].sigmoid() if self.n_values[k] == 2 else logits[..., s].softmax(-1)
            for k, s in enumerate(self.slices)
        ]
        return torch.cat(parts, dim=-1)

    def exact(self, labels: Tensor) -> Tensor:
        """The units of the true concept values ``labels (B, K)``: 0/1 or one-hot, ``(B, n_units)``."""
        parts = [
            labels[:, k : k + 1].float() if self.n_values[k] == 2 else F.one_hot(labels[:, k], self.n_values[k]).float()
            for k in range(self.n_concepts)
        ]
        return torch.cat(parts, dim=-1)

    def predict(self, units: Tensor) -> Tensor:
        """Predicted value of each concept ``(B, K)`` from units ``(B, n_units)``."""
        cols = [
            (units[:, s][:, 0] > 0.5).long() if self.n_values[k] == 2 else units[:, s].argmax(-1)
            for k, s in enumerate(self.slices)
        ]
        return torch.stack(cols, dim=1)

    def discretize(self, units: Tensor) -> Tensor:
        """Straight-through hard concepts: the exact units of the predicted values in the forward
        pass, the soft units' gradient in the backward (Bengio et al. 2013; Havasi et al. 2022
        use hard concepts to stop leakage through soft probabilities)."""
        hard = self.exact(self.predict(units.reshape(-1, units.shape[-1]))).view_as(units).to(units.dtype)
        return units + (hard - units).detach()

    def mixing_weights(self, units: Tensor) -> Tensor:
        """Per-value weights ``(..., n_embeddings)`` that mix a concept-embedding bottleneck's value
        embeddings: ``[1 - p, p]`` for a binary concept, the softmax for a categorical one."""
        parts = []
        for k, s in enumerate(self.slices):
            u = units[..., s]
            parts.append(torch.cat([1 - u, u], dim=-1) if self.n_values[k] == 2 else u)
        return torch.cat(parts, dim=-1)

    def unit_mask(self, concept_mask: Tensor) -> Tensor:
        """Expand a per-concept mask ``(B, K)`` to the units ``(B, n_units)``."""
        widths = torch.tensor([self.width(k) for k in range(self.n_concepts)], device=concept_mask.device)
        return concept_mask.repeat_interleave(widths, dim=1)

    def uncertainty(self, units: Tensor) -> Tensor:
        """Normalised entropy of each concept's predicted distribution ``(B, K)``, in [0, 1]."""
        cols = []
        for k, s in enumerate(self.slices):
            u = units[:, s].clamp(1e-7, 1 - 1e-7)
            if self.n_values[k] == 2:
                u = torch.cat([1 - u, u], dim=-1)
            cols.append(-(u * u.log()).sum(-1) / torch.log(torch.tensor(float(u.shape[-1]))))
        return torch.stack(cols, dim=1)
