"""A user-defined task, loaded by file path from a config (as docs/guide/bring-your-own.md shows).

Input ``a b``; variables ``low = a < n/2`` and ``even = b is even``; answer TRUE iff
``low == even``. Lookups instead of equality: a 2-layer model learns it in a few hundred steps.
"""

import torch

from faithful_train.tasks.base import Task


class HalvesTask(Task):
    name = "halves"
    variables = ("low", "even")

    def __init__(self, n_symbols: int = 16):
        self.n_symbols = n_symbols

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 2

    def generate(self, n, generator):
        a = torch.randint(0, self.n_symbols, (n,), generator=generator)
        b = torch.randint(0, self.n_symbols, (n,), generator=generator)
        variables = {"low": (a < self.n_symbols // 2).long(), "even": (b % 2 == 0).long()}
        return {
            "input_ids": torch.stack([a, b], 1),
            "labels": self.label_from_variables(variables),
            **{f"var/{k}": v for k, v in variables.items()},
        }

    def label_from_variables(self, variables):
        return torch.where(variables["low"] == variables["even"], self.n_symbols + 1, self.n_symbols)
