"""Hierarchical equality (Geiger et al. 2022, "Inducing causal structure for interpretable
neural networks"), as a token task.

Input ``w x y z`` (symbols), answer ``(w == x) == (y == z)`` written as the token TRUE or
FALSE. Causal variables: ``left = (w == x)``, ``right = (y == z)``. Each of ``left`` and
``right`` is true for half the examples, so the label is balanced and every counterfactual
(setting ``left`` or ``right`` from another example) flips the label half the time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch, Task


class HierarchicalEquality(Task):
    name = "hierarchical_equality"
    variables = ("left", "right")

    def __init__(self, n_symbols: int = 16):
        if n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2, got {n_symbols}")
        self.n_symbols = n_symbols
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
        left = torch.rand(n, generator=generator) < 0.5
        right = torch.rand(n, generator=generator) < 0.5
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
