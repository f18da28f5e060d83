"""The ``Task`` interface: a seeded data source with a known causal model.

A task generates token batches with the answer token at the last position, and, per
example, the values of its high-level variables. Its causal model gives the
counterfactual label: the label the example *would* have if some variables took the
values they have on another (source) example. Objectives and audits use that label to
test a model's internal mechanism causally.

Batches are plain dicts of tensors (Lightning moves them to the device):

    input_ids  (B, T) long      the prompt; the answer is predicted at the last position
    labels     (B,)   long      the answer token
    var/<name> (B,)   long      value of each causal variable
    concept/<name> (B,) or (B, T) long   value of each concept label, per sequence or per token
    irrelevant (B, T) bool      (optional) tokens the label does not depend on (noise, decoys):
                                where a "right for the right reasons" term wants no attribution

To write your own task, subclass ``Task`` in your own file and name it in a config as
``task: {name: path/to/file.py:MyTask, ...constructor args}`` (see README).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from faithful_train.errors import UnknownNameError

Batch = dict[str, Tensor]


class Task(ABC):
    """A testbed with a known causal model. Subclasses set the class attributes below."""

    name: str = "task"
    variables: tuple[str, ...] = ()

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def seq_len(self) -> int: ...

    @abstractmethod
    def generate(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` examples drawn with ``generator`` only (never the global RNG)."""

    @abstractmethod
    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        """The causal model's output (answer token) given the values of its variables."""

    @property
    def answer_tokens(self) -> tuple[int, ...] | None:
        """The tokens an answer can be (audits predict among these), or ``None`` for any token."""
        return None

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        """Concept labels in batches (``concept/<name>``): name -> the names of its values."""
        return {}

    def check_concept(self, name: str | None, owner: str) -> str:
        """``name`` (default: the task's only concept) if the task labels it, else an error."""
        if name is None and len(self.concepts) == 1:
            return next(iter(self.concepts))
        if name not in self.concepts:
            raise UnknownNameError(f"concept of task {self.name!r} for {owner}", str(name), self.concepts)
        return name

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """Meaning-preserving perturbations: ``input_ids`` of the same shape whose labels and
        concepts are those of ``batch``; ``None`` if the task has none."""
        return None

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor] | None:
        """Meaning-preserving perturbations with a token alignment: ``(input_ids', source)``, where
        ``source[b, j]`` is the position in ``batch["input_ids"][b]`` that token ``j`` of the
        perturbed sequence stands for, or -1 if it stands for none (inserted filler, resampled
        noise). Default: ``perturb`` with every position aligned to itself; ``None`` if the task
        has no perturbations."""
        ids = self.perturb(batch, generator)
        if ids is None:
            return None
        return ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids).clone()

    def token_name(self, token: int) -> str:
        """A readable name of a token (per-token reports)."""
        return str(token)

    def check_variables(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.variables:
                raise UnknownNameError(f"variable of task {self.name!r}", name, self.variables)

    def counterfactual_labels(self, base: Batch, source: Batch, variables: Sequence[str]) -> Tensor:
        """Label of each base example after setting ``variables`` to the source's values."""
        self.check_variables(variables)
        values = {v: (source if v in variables else base)[f"var/{v}"] for v in self.variables}
        return self.label_from_variables(values)

    def sample(self, n: int, seed: int) -> Batch:
        """A fixed, seeded set (audit and validation sets)."""
        return self.generate(n, torch.Generator().manual_seed(seed))


def take(batch: Batch, index: Tensor | slice) -> Batch:
    """The rows ``index`` of every tensor in a batch."""
    return {key: value[index] for key, value in batch.items()}
