"""A task file that imports a module beside it (``from my_helpers import ...``)."""

from my_helpers import N_SYMBOLS

from faithful_train.tasks.base import Task


class HelperTask(Task):
    name = "helper"
    variables = ("a",)
    vocab_size = N_SYMBOLS
    seq_len = 2

    def generate(self, n, generator):
        import torch

        a = torch.randint(0, N_SYMBOLS, (n, 2), generator=generator)
        return {"input_ids": a, "labels": a[:, 0], "var/a": a[:, 0]}

    def label_from_variables(self, values):
        return values["a"]
