"""Concept objects with a decoy: a token that gives the answer away in training and means
nothing at test time (decoy MNIST's idea, Ross et al. 2017, for token sequences).

Each example of ``concept_objects`` gets one more token before ``?``: a tag ``<tagC>``. In the
training stream (``generate``) the tag names the right class with probability ``decoy_rate``
(1: always); in the fixed validation and audit sets (``sample``) it is a random class. A model
that learns the tag instead of the rule over the concepts scores well in training and near
chance at test. ``irrelevant`` marks the tag (and the noise), so a "right for the right
reasons" term can penalise attribution on it. The tag's class is the variable ``decoy``
(``var/decoy``), which the causal model's label ignores: CAFT and the sae audit find the
latents that carry it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch
from faithful_train.tasks.concept_objects import ConceptObjects


class DecoyObjects(ConceptObjects):
    name = "decoy_objects"
    variables = (*ConceptObjects.variables, "decoy")

    def __init__(self, decoy_rate: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= decoy_rate <= 1.0:
            raise ValueError(f"decoy_rate must be in [0, 1], got {decoy_rate}")
        self.decoy_rate = decoy_rate
        self.tag_token0 = super().vocab_size

    @property
    def vocab_size(self) -> int:
        return self.tag_token0 + self.n_classes

    @property
    def seq_len(self) -> int:
        return super().seq_len + 1

    @property
    def decoy_position(self) -> int:
        return self.seq_len - 2

    def token_name(self, token: int) -> str:
        return f"<tag{token - self.tag_token0}>" if token >= self.tag_token0 else super().token_name(token)

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        """The training distribution: the tag gives the label away (with ``decoy_rate``)."""
        return self._with_tag(super().generate(n, generator), generator, self.decoy_rate)

    def sample(self, n: int, seed: int) -> Batch:
        """The test distribution (validation and audit sets): the tag is random."""
        generator = torch.Generator().manual_seed(seed)
        return self._with_tag(super().generate(n, generator), generator, 0.0)

    def _with_tag(self, batch: Batch, generator: torch.Generator, rate: float) -> Batch:
        n = len(batch["labels"])
        random = torch.randint(0, self.n_classes, (n,), generator=generator)
        tag = torch.where(torch.rand(n, generator=generator) < rate, batch["labels"], random)
        batch["decoy"] = batch["var/decoy"] = tag
        batch["input_ids"] = self._insert(batch["input_ids"], self.tag_token0 + tag)
        batch["irrelevant"] = self._insert(batch["irrelevant"], torch.ones(n, dtype=torch.bool))
        return batch

    def _insert(self, rows: Tensor, column: Tensor) -> Tensor:
        at = self.decoy_position
        return torch.cat([rows[:, :at], column[:, None].to(rows), rows[:, at:]], dim=1)

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The object reordered among new noise; the tag stays (aligned to itself) before ``?``."""
        at = self.decoy_position
        body = {**batch, "input_ids": torch.cat([batch["input_ids"][:, :at], batch["input_ids"][:, at + 1 :]], 1)}
        ids, source = super().perturb_aligned(body, generator)
        source = torch.where(source >= at, source + 1, source)
        tag_column = torch.full_like(source[:, 0], at)
        return self._insert(ids, batch["input_ids"][:, at]), self._insert(source, tag_column)
