"""Objects described by attribute tokens, labelled by a rule over their concepts: the testbed
for concept bottlenecks.

Each example describes one object by one token per attribute, shuffled among noise tokens,
then asks for its class::

    <noise> <large> <blue> <noise> <wood> <striped> <square> <noise> ?   ->  class2

Attributes (concepts): ``colour`` (red green blue yellow), ``shape`` (circle square triangle),
``size`` (small large), ``material`` (metal wood), and ``pattern`` (plain striped), which is
always in the input but is *not* a labelled concept. The label is a rule over the concepts::

    class = (colour + shape + size + material) mod n_classes
    class = (colour + shape + size + material) mod h  +  h * pattern,  h = n_classes / 2   (hidden_concept)

With ``hidden_concept`` the rule also depends on the unlabelled ``pattern`` (it picks the half of
the classes; the concepts pick the class within it), so a bottleneck of
the labelled concepts cannot reach full accuracy honestly: a model that does has leaked
``pattern`` around its concepts (Mahinpei et al. 2021; Havasi et al. 2022), which is what the
concepts audit's leakage figure measures.

``occlusion``: each labelled attribute token is, with this probability, replaced by
``<occluded>``; the concept is then not in the input, so a model can only guess it and a
person who knows it can fix the answer by intervening on the concept (the test-time
intervention curve rises).

Concept labels: ``concept/<name>`` (one per sequence); causal variables: the five attributes;
``irrelevant`` marks the noise tokens (and, without ``hidden_concept``, the pattern token).
Perturbations (meaning-preserving): a new order of the tokens and new noise tokens, aligned
attribute to attribute (noise tokens align to nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch, Task

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "size": ("small", "large"),
    "material": ("metal", "wood"),
    "pattern": ("plain", "striped"),
}
LABELLED = ("colour", "shape", "size", "material")


class ConceptObjects(Task):
    marks_irrelevant = True  # the noise tokens (and the pattern token unless it is hidden)
    name = "concept_objects"
    variables = tuple(ATTRIBUTES)

    def __init__(
        self,
        n_noise: int = 4,
        noise_vocab: int = 8,
        n_classes: int = 4,
        hidden_concept: bool = False,
        occlusion: float = 0.0,
    ):
        if n_noise < 0 or noise_vocab < 1 or n_classes < 2:
            raise ValueError(
                f"n_noise >= 0, noise_vocab >= 1 and n_classes >= 2 required, got {n_noise}, {noise_vocab}, {n_classes}"
            )
        if hidden_concept and n_classes % 2:
            raise ValueError(f"hidden_concept needs an even n_classes (pattern picks a half), got {n_classes}")
        if not 0.0 <= occlusion < 1.0:
            raise ValueError(f"occlusion must be in [0, 1), got {occlusion}")
        self.n_noise, self.noise_vocab, self.n_classes = n_noise, noise_vocab, n_classes
        self.hidden_concept, self.occlusion = hidden_concept, occlusion
        self.attribute_token0: dict[str, int] = {}
        token = n_classes
        for attr, values in ATTRIBUTES.items():
            self.attribute_token0[attr] = token
            token += len(values)
        self.occluded_token, self.noise_token0 = token, token + 1
        self.query_token = self.noise_token0 + noise_vocab

    @property
    def vocab_size(self) -> int:
        return self.query_token + 1

    @property
    def seq_len(self) -> int:
        return len(ATTRIBUTES) + self.n_noise + 1

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.n_classes))

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        return {name: ATTRIBUTES[name] for name in LABELLED}

    def token_name(self, token: int) -> str:
        if token < self.n_classes:
            return f"class{token}"
        for attr, start in self.attribute_token0.items():
            if start <= token < start + len(ATTRIBUTES[attr]):
                return f"<{ATTRIBUTES[attr][token - start]}>"
        if token == self.occluded_token:
            return "<occluded>"
        if token == self.query_token:
            return "?"
        return f"<noise{token - self.noise_token0}>"

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        total = sum(variables[name] for name in LABELLED)
        if self.hidden_concept:
            half = self.n_classes // 2
            return total % half + half * variables["pattern"]
        return total % self.n_classes

    def _tokens(self, values: dict[str, Tensor], occluded: Tensor, noise: Tensor, order: Tensor) -> Tensor:
        """Attribute tokens (occluded ones replaced), then noise, permuted by ``order``, then ``?``."""
        attrs = torch.stack([self.attribute_token0[a] + values[a] for a in ATTRIBUTES], dim=1)
        attrs = torch.where(occluded, torch.full_like(attrs, self.occluded_token), attrs)
        body = torch.cat([attrs, self.noise_token0 + noise], dim=1).gather(1, order)
        return torch.cat([body, torch.full_like(body[:, :1], self.query_token)], dim=1)

    def _irrelevant(self, order: Tensor) -> Tensor:
        """``(B, T)``: the positions of noise tokens (and of pattern, if the rule ignores it)."""
        slot_irrelevant = torch.zeros(order.shape[1], dtype=torch.bool)
        slot_irrelevant[len(ATTRIBUTES) :] = True
        if not self.hidden_concept:
            slot_irrelevant[list(ATTRIBUTES).index("pattern")] = True
        return torch.cat([slot_irrelevant[order], torch.zeros(len(order), 1, dtype=torch.bool)], dim=1)

    def _shuffle_and_noise(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        noise = torch.randint(0, self.noise_vocab, (n, self.n_noise), generator=generator)
        order = torch.rand(n, len(ATTRIBUTES) + self.n_noise, generator=generator).argsort(dim=1)
        return noise, order

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        values = {a: torch.randint(0, len(v), (n,), generator=generator) for a, v in ATTRIBUTES.items()}
        occluded = torch.rand(n, len(ATTRIBUTES), generator=generator) < self.occlusion
        occluded[:, list(ATTRIBUTES).index("pattern")] = False  # only labelled concepts are occluded
        noise, order = self._shuffle_and_noise(n, generator)
        return {
            "input_ids": self._tokens(values, occluded, noise, order),
            "labels": self.label_from_variables(values),
            "occluded": occluded,
            "irrelevant": self._irrelevant(order),
            "slots": torch.cat([order, torch.full((n, 1), order.shape[1])], dim=1),
            **{f"concept/{name}": values[name] for name in LABELLED},
            **{f"var/{name}": v for name, v in values.items()},
        }

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor:
        """The same object (same attribute tokens, occluded or not) in a new order among new noise."""
        return self.perturb_aligned(batch, generator)[0]

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``perturb``, with each attribute token (and ``?``) aligned to its old position."""
        values = {a: batch[f"var/{a}"].cpu() for a in ATTRIBUTES}
        noise, order = self._shuffle_and_noise(len(batch["labels"]), generator)
        ids = self._tokens(values, batch["occluded"].cpu(), noise, order)
        slots = torch.cat([order, torch.full((len(order), 1), order.shape[1])], dim=1)  # slot at each new position
        old_position = batch["slots"].cpu().argsort(dim=1)  # old_position[b, slot]
        source = old_position.gather(1, slots)
        source = torch.where(slots[:, :] >= len(ATTRIBUTES), -1, source)  # noise aligns to nothing
        source[:, -1] = ids.shape[1] - 1  # the query
        device = batch["input_ids"].device
        return ids.to(device), source.to(device)
