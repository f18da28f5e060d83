"""Hierarchical equality (Geiger et al. 2022, "Inducing causal structure for interpretable
neural networks"), as a token task.

Input ``w x y z`` (symbols), answer ``(w == x) == (y == z)`` written as the token TRUE or
FALSE. Causal variables: ``left = (w == x)``, ``right = (y == z)``. Each of ``left`` and
``right`` is true for half the examples, so the label is balanced and every counterfactual
(setting ``left`` or ``right`` from another example) flips the label half the time.
``equal_rate`` (default 0.5) shifts that balance: each pair is equal with that probability (a
shifted distribution for ``faithful-train verify``).

Perturbations (meaning-preserving, every token aligned): the symbols renamed by a random
permutation (synonym tokens: equalities survive a consistent renaming), each pair's two
symbols in either order, and the two pairs in either order; the label is unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch, Task


class HierarchicalEquality(Task):
    name = "hierarchical_equality"
    variables = ("left", "right")

    def __init__(self, n_symbols: int = 16, equal_rate: float = 0.5):
        if n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2, got {n_symbols}")
        if not 0 < equal_rate < 1:
            raise ValueError(f"equal_rate must be in (0, 1), got {equal_rate}")
        self.n_symbols, self.equal_rate = n_symbols, float(equal_rate)
        self.false_token, self.true_token = n_symbols, n_symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 4

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return (self.false_token, self.true_token)

    def _pair(self, equal: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        n = equal.shape[0]
        first = torch.randint(0, self.n_symbols, (n,), generator=generator)
        shift = torch.randint(1, self.n_symbols, (n,), generator=generator)  # never 0: a different symbol
        second = torch.where(equal, first, (first + shift) % self.n_symbols)
        return first, second

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        left = torch.rand(n, generator=generator) < self.equal_rate
        right = torch.rand(n, generator=generator) < self.equal_rate
        w, x = self._pair(left, generator)
        y, z = self._pair(right, generator)
        variables = {"left": left.long(), "right": right.long()}
        return {
            "input_ids": torch.stack([w, x, y, z], dim=1),
            "labels": self.label_from_variables(variables),
            **{f"var/{k}": v for k, v in variables.items()},
        }

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        same = variables["left"] == variables["right"]
        return torch.where(same, self.true_token, self.false_token)

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.perturb_aligned(batch, generator)[0]

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Renamed symbols, each pair and the pairs in a random order; ``source`` says where each
        new token came from."""
        ids = batch["input_ids"].cpu()
        n = ids.shape[0]
        renaming = torch.rand(n, self.n_symbols, generator=generator).argsort(dim=1)  # a permutation per row
        flip_left, flip_right, swap = (torch.rand(n, 3, generator=generator) < 0.5).long().unbind(1)
        left = torch.stack([flip_left, 1 - flip_left], dim=1)
        right = 2 + torch.stack([flip_right, 1 - flip_right], dim=1)
        source = torch.where(swap[:, None].bool(), torch.cat([right, left], 1), torch.cat([left, right], 1))
        perturbed = renaming.gather(1, ids.gather(1, source))
        device = batch["input_ids"].device
        return perturbed.to(device), source.to(device)
